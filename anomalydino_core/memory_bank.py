"""A small serialisable faiss index of reference patches (fit / search / to and from bytes)."""

from __future__ import annotations

import contextlib
import json
import typing
from dataclasses import dataclass

import faiss
import numpy as np
import torch

from .choices import IndexKind
from .cpu import cpu_has_fast_bf16
from .nn_search import (
    PROBE_QUERIES,
    SMALL_ROWS,
    Calibration,
    SearchMethod,
    bf16_candidates,
    choose_method,
    faiss_top1,
    rerank,
    row_similarities,
    top1_fp32,
)

INDEX_KINDS: tuple[str, ...] = typing.get_args(IndexKind)
INDEX_FORMAT = "anomalydino.patch_index/1"
_BYTES_MAGIC = b"ADPATCHIDX1\n"


#: Flat indexes store vectors zero-padded to a multiple of this many dimensions: faiss's BLAS
#: search ran 4x slower at 152 dims (efficientnet_lite0) than at 192 here. Zeros leave every
#: inner product unchanged.
FLAT_DIM_MULTIPLE = 64


#: faiss searches a flat index with BLAS only when (queries x dims) reaches this threshold
#: (default 128000), otherwise with a loop 4-6x slower from a few dozen queries on: 630 masked
#: queries of a 152-dim grid against a 16-shot bank took 810 ms instead of 145. At 4096, BLAS
#: starts at ~20 queries, where it measured as fast or faster (process-wide faiss setting).
faiss.cvar.distance_compute_blas_threshold = 4096


def _as_unit_rows(x: np.ndarray, pad_to: int | None = None) -> np.ndarray:
    x = np.asarray(x, dtype=np.float32).reshape(-1, x.shape[-1])
    norms = np.linalg.norm(x, axis=1, keepdims=True)
    np.maximum(norms, 1e-12, out=norms)
    out = np.zeros((x.shape[0], pad_to or x.shape[1]), dtype=np.float32)
    np.divide(x, norms, out=out[:, : x.shape[1]])
    return out


def _padded_dim(dim: int) -> int:
    return -(-dim // FLAT_DIM_MULTIPLE) * FLAT_DIM_MULTIPLE


def gpu_available() -> bool:
    """faiss was built with GPU support and sees a GPU."""
    return hasattr(faiss, "StandardGpuResources") and faiss.get_num_gpus() > 0


@contextlib.contextmanager
def _fp32_matmul():
    """True fp32 products on CUDA (no TF32), whatever the process set globally."""
    previous = torch.get_float32_matmul_precision()
    if previous != "highest":
        torch.set_float32_matmul_precision("highest")
    try:
        yield
    finally:
        if previous != "highest":
            torch.set_float32_matmul_precision(previous)


@dataclass(frozen=True)
class SearchResult:
    distances: np.ndarray  # (n, k) float32 cosine distances, ascending
    indices: np.ndarray  # (n, k) int64 bank rows


class PatchIndex:
    """Nearest reference patch by cosine distance (inner product of L2-normalised vectors).

    ``kind="exact"`` (default) is a flat fp32 index. ``exact_bf16`` screens the bank with a bf16
    matmul (AMX on recent x86 CPUs, tensor cores on CUDA), keeps the best bank row of every block
    of ``bf16_block`` rows and re-ranks those candidates in fp32: the returned distance is the true
    fp32 distance of the chosen row, and the chosen row is the true nearest neighbour unless two
    rows of one block are within bf16 rounding (~1e-3) of each other. ``hnsw`` / ``ivf`` are
    approximate options for full-shot banks of millions of patches.

    CPU top-1 search of the flat kinds (``anomalydino_core.nn_search``): faiss or blocked torch
    fp32 (``exact``), or those and the bf16 screen (``exact_bf16``, on CPUs with native bf16),
    whichever measured fastest in this process (``search_method=None``), or the one named.
    Searches smaller than ``PROBE_QUERIES x SMALL_ROWS`` use torch fp32. The distance
    reported is one fp32 dot product of the query and the chosen row, whichever method chose it.

    GPU (``use_gpu=None``: when present): a faiss GPU copy where faiss has GPU support; else, for
    ``exact``, the same fp32 search as torch matrix products on CUDA (TF32 off), and
    ``exact_bf16`` runs on CUDA in any case. ``use_gpu=False`` keeps the search on the CPU.
    """

    bf16_block = 4096
    cuda_block = 65536

    def __init__(
        self,
        kind: IndexKind = "exact",
        *,
        use_gpu: bool | None = None,
        hnsw_m: int = 32,
        ivf_lists: int | None = None,
        nprobe: int = 16,
        search_method: SearchMethod | None = None,
    ) -> None:
        if kind not in INDEX_KINDS:
            raise ValueError(f"unknown index kind {kind!r}; choose one of {', '.join(INDEX_KINDS)}")
        self.kind = kind
        self.want_gpu = use_gpu
        self.use_gpu = False  # whether the search runs on a GPU (set by fit / load)
        self.hnsw_m = hnsw_m
        self.ivf_lists = ivf_lists
        self.nprobe = nprobe
        self._index: faiss.Index | None = None
        self._search_index: faiss.Index | None = None
        self._dim = 0  # feature dim (the flat index may hold zero-padded vectors)
        if search_method not in (None, "faiss", "torch", "bf16"):
            raise ValueError(f"unknown search method {search_method!r}")
        if search_method == "bf16" and kind != "exact_bf16":
            raise ValueError("search_method 'bf16' is for the exact_bf16 index only")
        self.search_method = search_method
        self._rows: torch.Tensor | None = None  # CPU flat kinds: (n, dim) view of faiss's rows
        self._rows16: torch.Tensor | None = None
        self._calibration: Calibration | None = None

    @property
    def size(self) -> int:
        return 0 if self._index is None else int(self._index.ntotal)

    @property
    def dim(self) -> int:
        if self._index is None:
            raise RuntimeError("index is empty: call fit() first")
        return self._dim

    def fit(self, features: np.ndarray) -> PatchIndex:
        """Index (n, C) patch features (any leading shape; the last axis is the feature)."""
        flat = self.kind in ("exact", "exact_bf16")
        dim = int(features.shape[-1])
        x = _as_unit_rows(features, _padded_dim(dim) if flat else None)
        if x.shape[0] == 0:
            raise ValueError("cannot build a memory bank from zero patches")
        if flat:
            index = faiss.IndexFlatIP(x.shape[1])
        elif self.kind == "hnsw":
            index = faiss.IndexHNSWFlat(dim, self.hnsw_m, faiss.METRIC_INNER_PRODUCT)
            index.hnsw.efSearch = max(64, self.nprobe * 4)
        else:
            lists = self.ivf_lists or max(1, int(4 * np.sqrt(x.shape[0])))
            index = faiss.IndexIVFFlat(
                faiss.IndexFlatIP(dim), dim, lists, faiss.METRIC_INNER_PRODUCT
            )
            index.train(x)
            index.nprobe = self.nprobe
        index.add(x)
        self._set(index, dim)
        return self

    def _set(self, index: faiss.Index, dim: int) -> None:
        if dim > index.d:
            raise ValueError(f"index of {index.d} dims cannot hold {dim}-dim features")
        self._index = index
        self._dim = dim
        self._search_index = index
        self._bank32 = self._bank16 = None
        self._rows = self._rows16 = None
        self._calibration = None
        self.use_gpu = False
        want_gpu = self.want_gpu is not False
        cuda = want_gpu and torch.cuda.is_available()
        flat = self.kind in ("exact", "exact_bf16")
        if flat and cuda and (self.kind == "exact_bf16" or not gpu_available()):
            rows = np.ascontiguousarray(index.reconstruct_n(0, index.ntotal)[:, :dim])
            self._bank32 = torch.from_numpy(rows).to("cuda")
            if self.kind == "exact_bf16":
                self._bank16 = self._bank32.to(torch.bfloat16)
            self.use_gpu = True
            return
        if want_gpu and self.kind != "hnsw" and gpu_available():
            self._gpu_res = faiss.StandardGpuResources()
            self._search_index = faiss.index_cpu_to_gpu(self._gpu_res, 0, index)
            self.use_gpu = True
            return
        if flat:  # the CPU search reads faiss's own storage (no copy)
            stored = faiss.rev_swig_ptr(index.get_xb(), index.ntotal * index.d)
            self._rows = torch.from_numpy(stored.reshape(index.ntotal, index.d))[:, :dim]

    def search(self, queries: np.ndarray, k: int = 1) -> SearchResult:
        """k nearest bank patches of each query row, as cosine distances 1 - cos."""
        if self._search_index is None:
            raise RuntimeError("index is empty: call fit() first")
        if queries.shape[-1] != self.dim:
            raise ValueError(f"query dim {queries.shape[-1]} != bank dim {self.dim}")
        if self.kind == "exact_bf16" and k != 1:
            raise ValueError("exact_bf16 search returns the nearest neighbour only (k=1)")
        if self._rows is not None and k == 1:
            return self._search_cpu(queries)
        if self._bank16 is not None:
            return self._search_bf16(_as_unit_rows(queries))
        if self._bank32 is not None and k == 1:
            return self._search_cuda_exact(_as_unit_rows(queries))
        q = _as_unit_rows(queries, self._index.d)
        sims, idx = self._search_index.search(q, k)
        dist = np.clip(1.0 - sims, 0.0, 2.0).astype(np.float32)
        return SearchResult(distances=dist, indices=idx.astype(np.int64))

    def method_for(self, n_queries: int) -> SearchMethod:
        """The CPU method a search of ``n_queries`` rows uses (measured once, see the class)."""
        if self.search_method is not None:
            return self.search_method
        if n_queries * self.size < PROBE_QUERIES * SMALL_ROWS:
            return "torch"
        candidates: tuple[SearchMethod, ...] = ("faiss", "torch")
        if self.kind == "exact_bf16" and cpu_has_fast_bf16():
            candidates = ("bf16", *candidates)
        self._calibration = choose_method(candidates, self._dim, self._index.d, n_queries)
        return self._calibration.method

    def _search_cpu(self, queries: np.ndarray) -> SearchResult:
        padded = _as_unit_rows(queries, self._index.d)
        q = torch.from_numpy(padded)[:, : self._dim]
        method = self.method_for(q.shape[0])
        with torch.inference_mode():
            if method == "faiss":
                idx = torch.from_numpy(faiss_top1(self._index, padded))
            elif method == "torch":
                idx = top1_fp32(q, self._rows)
            else:
                if self._rows16 is None:
                    self._rows16 = self._rows.to(torch.bfloat16)
                cand = bf16_candidates(q.to(torch.bfloat16), self._rows16, block=self.bf16_block)
                idx = rerank(q, self._rows, cand)
            sims = row_similarities(q, self._rows, idx)
        dist = np.clip(1.0 - sims, 0.0, 2.0).astype(np.float32)[:, None]
        return SearchResult(distances=dist, indices=idx.numpy().astype(np.int64)[:, None])

    def _search_cuda_exact(self, q: np.ndarray) -> SearchResult:
        bank = self._bank32
        q32 = torch.from_numpy(q).to(bank.device)
        best = idx = None
        with torch.inference_mode(), _fp32_matmul():
            for start in range(0, bank.shape[0], self.cuda_block):
                sims, rows = (q32 @ bank[start : start + self.cuda_block].T).max(dim=1)
                if best is None:
                    best, idx = sims, rows
                else:
                    better = sims > best
                    best = torch.where(better, sims, best)
                    idx = torch.where(better, rows + start, idx)
        dist = np.clip(1.0 - best.cpu().numpy(), 0.0, 2.0).astype(np.float32)[:, None]
        return SearchResult(distances=dist, indices=idx.cpu().numpy().astype(np.int64)[:, None])

    def _search_bf16(self, q: np.ndarray) -> SearchResult:
        bank32, bank16 = self._bank32, self._bank16
        q32 = torch.from_numpy(q).to(bank32.device)
        q16 = q32.to(torch.bfloat16)
        cand = []
        with torch.inference_mode(), _fp32_matmul():
            for start in range(0, bank16.shape[0], self.bf16_block):
                sims = q16 @ bank16[start : start + self.bf16_block].T
                cand.append(sims.max(dim=1).indices + start)
            cand_idx = torch.stack(cand, dim=1)  # (n, blocks)
            exact = torch.einsum("nd,nbd->nb", q32, bank32[cand_idx])
            best, pos = exact.max(dim=1)
            idx = cand_idx.gather(1, pos[:, None])
        dist = np.clip(1.0 - best.cpu().numpy(), 0.0, 2.0).astype(np.float32)[:, None]
        return SearchResult(distances=dist, indices=idx.cpu().numpy().astype(np.int64))

    def nearest_distance(self, queries: np.ndarray) -> np.ndarray:
        """Cosine distance of each query row to its nearest bank patch, (n,) float32."""
        return self.search(queries, 1).distances[:, 0]

    def to_bytes(self) -> bytes:
        """A small JSON header (format, kind, dim) then the faiss bytes; no pickle."""
        if self._index is None:
            raise RuntimeError("nothing to serialise: call fit() first")
        header = json.dumps({"format": INDEX_FORMAT, "kind": self.kind, "dim": self.dim}).encode()
        raw = faiss.serialize_index(self._index).tobytes()
        return _BYTES_MAGIC + len(header).to_bytes(4, "little") + header + raw

    @classmethod
    def from_bytes(
        cls,
        data: bytes,
        kind: IndexKind = "exact",
        *,
        use_gpu: bool | None = None,
        nprobe: int = 16,
        dim: int | None = None,
        search_method: SearchMethod | None = None,
    ) -> PatchIndex:
        """An index from ``to_bytes()`` (or bare faiss bytes, as banks before the header were
        written; ``dim`` then gives the feature dim of a padded flat index)."""
        if data[: len(_BYTES_MAGIC)] == _BYTES_MAGIC:
            start = len(_BYTES_MAGIC) + 4
            size = int.from_bytes(data[len(_BYTES_MAGIC) : start], "little")
            header = json.loads(data[start : start + size])
            if header.get("kind") != kind:
                raise ValueError(f"serialised index is {header.get('kind')!r}, not {kind!r}")
            dim, data = int(header["dim"]), data[start + size :]
        obj = cls(kind, use_gpu=use_gpu, nprobe=nprobe, search_method=search_method)
        index = faiss.deserialize_index(np.frombuffer(data, dtype=np.uint8))
        if kind == "ivf":
            index.nprobe = nprobe
        obj._set(index, dim or index.d)
        return obj
