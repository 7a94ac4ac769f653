"""Top-1 inner-product search on CPU: the kernels of ``PatchIndex`` and the measured choice.

Every exact search is a (queries x bank) product plus a running maximum, so it should cost what
its FLOPs imply. Which library reaches that differs by CPU, hence a measurement, not a rule:

- ``faiss``: ``IndexFlatIP.search`` (its bundled OpenBLAS, blocks of 4096 queries x 1024 rows).
  AMD EPYC (avx512_bf16, 2 threads): 125-190 GFLOP/s, the best there at 152-192 dims. Intel
  Xeon (AMX, 2 vCPUs): ~25-65 GFLOP/s on the same searches (16-shot bank: 200 ms/img where the
  products are ~6-10 GFLOP; a 1,960-patch query: 354 ms/img).
- ``torch``: blocked fp32 ``torch.mm`` (MKL / oneDNN) of ``query_block`` x ``bank_block`` tiles,
  argmax per tile, running maximum; no (queries x bank) matrix is held. AMD EPYC, quiet: 120-150
  GFLOP/s (1,568 x 16,384 x 384: torch 142 ms, faiss 153 ms; at 192 dims faiss 44, torch 55).
- ``bf16`` (``exact_bf16`` only): bf16 products of ``query_block`` x 4096-row tiles, the best
  row of each tile as a candidate, the candidates re-ranked in fp32. AMD EPYC: ~330 GFLOP/s
  (2.5x fp32); AMX: ~1000.

``choose_method`` times the candidates on a probe (the search's query count, rounded to a power
of two in 512..4096, x 8192 rows of the bank's width; interleaved, best of 2 after a warm-up;
0.1-0.8 s) once per process, width, query-count class, thread count and candidate set; faiss
(``exact``) or bf16 (``exact_bf16``) stays unless another is 15% faster. The pipeline keeps the
results per machine (``adopt_choices`` / ``known_choices``; ``tasks/search_choices.py``).

Whatever the method, the reported similarity is recomputed as one fp32 dot product of the query
and its chosen row (``row_similarities``): the methods then agree to the bit whenever they choose
the same row, and a distance does not depend on how the queries were batched.

A bf16 screen cannot serve the ``exact`` kind: bf16 products are within ~1.2e-2 of fp32 at worst
(inputs 2 x 2**-8 relative, output 2**-8), and on DINOv2 (random weights) bottle features 7,500
bank rows of 65,536 lie within 2e-3 of a query's best on average: a re-rank of every row in the
error window costs more than the fp32 product.
"""

from __future__ import annotations

import threading
import time
import typing
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Literal

import faiss
import numpy as np
import torch

SearchMethod = Literal["faiss", "torch", "bf16"]

#: Tiles of the fp32 kernel: up to 4096 queries x (16 Mi elements / queries) bank rows, at least
#: 1024. Few large products: with the 2 vCPUs shared by other processes (load 4.5) every
#: ``torch.mm`` call waits for both threads, and 1,024 x 8,192 x 384 took 388 ms in 512-row
#: tiles, 249 in 1024, 168 in 2048 (one product: 123; faiss 125). Quiet, AMD EPYC: 4096 x 512
#: to 4096 x 2048 tiles ran at 124-152 GFLOP/s, as fast as any tiling tried (256-4096 rows).
QUERY_BLOCK = 4096
TILE_ELEMENTS = 2**22
MIN_BANK_BLOCK = 1024
#: bank rows per bf16 candidate (the ``exact_bf16`` contract: one candidate per 4096 rows).
BF16_BLOCK = 4096
#: the probe: the search's own query count (up to QUERY_BLOCK) x PROBE_ROWS bank rows. Smaller
#: searches (queries x bank < PROBE_QUERIES x SMALL_ROWS) are not worth a probe: torch fp32.
PROBE_QUERIES = 512
PROBE_ROWS = 8192
SMALL_ROWS = 4096
#: The first candidate is the default; another must beat it by this factor. AMD EPYC, 784 x
#: 100,352 x 152: a 4096-row probe had torch 13% ahead (21.4 vs 24.5 ms), the search itself
#: faiss 20% ahead (220 vs 277 ms); noise on a shared machine is 10-30%.
MARGIN = 0.85


def bank_block_for(query_rows: int) -> int:
    """Bank rows per fp32 tile for a block of ``query_rows`` queries (a multiple of 256)."""
    rows = TILE_ELEMENTS // max(1, min(query_rows, QUERY_BLOCK))
    return max(MIN_BANK_BLOCK, rows // 256 * 256)


def probe_queries(n_queries: int) -> int:
    """The probe's query count for a search of ``n_queries``: the next power of two, at least
    PROBE_QUERIES and at most QUERY_BLOCK (the cache key of the measurement)."""
    n = max(PROBE_QUERIES, min(n_queries, QUERY_BLOCK))
    return min(QUERY_BLOCK, 1 << (n - 1).bit_length())


@dataclass(frozen=True)
class Calibration:
    """The method chosen for a search geometry and the probe's timings (ms, best of rounds)."""

    method: SearchMethod
    ms: dict[str, float]


def top1_fp32(
    queries: torch.Tensor,
    bank: torch.Tensor,
    *,
    query_block: int = QUERY_BLOCK,
    bank_block: int | None = None,
) -> torch.Tensor:
    """(n,) int64 index of each query's largest inner product with the (m, C) bank rows."""
    n, m = queries.shape[0], bank.shape[0]
    bank_block = bank_block or bank_block_for(n)
    out = torch.empty(n, dtype=torch.int64)
    tile = torch.empty(min(n, query_block) * min(m, bank_block))
    for q0 in range(0, n, query_block):
        q1 = min(n, q0 + query_block)
        block = queries[q0:q1]
        best = idx = None
        for b0 in range(0, m, bank_block):
            b1 = min(m, b0 + bank_block)
            sims = tile[: (q1 - q0) * (b1 - b0)].view(q1 - q0, b1 - b0)
            torch.mm(block, bank[b0:b1].T, out=sims)
            arg = sims.argmax(dim=1)  # fp32 argmax: 2x faster than max(dim) here
            top = sims.gather(1, arg[:, None])[:, 0]
            if best is None:
                best, idx = top, arg
            else:
                better = top > best
                best = torch.where(better, top, best)
                idx = torch.where(better, arg + b0, idx)
        out[q0:q1] = idx
    return out


def bf16_candidates(
    queries16: torch.Tensor,
    bank16: torch.Tensor,
    *,
    query_block: int = 1024,
    block: int = BF16_BLOCK,
) -> torch.Tensor:
    """(n, ceil(m / block)) int64: per query, the best bank row of every ``block`` rows by bf16
    products (``max(dim)`` on bf16: 4x faster than ``argmax`` here)."""
    n, m = queries16.shape[0], bank16.shape[0]
    n_blocks = -(-m // block)
    out = torch.empty(n, n_blocks, dtype=torch.int64, device=queries16.device)
    tile = torch.empty(
        min(n, query_block) * min(m, block), dtype=bank16.dtype, device=queries16.device
    )
    for q0 in range(0, n, query_block):
        q1 = min(n, q0 + query_block)
        for j, b0 in enumerate(range(0, m, block)):
            b1 = min(m, b0 + block)
            sims = tile[: (q1 - q0) * (b1 - b0)].view(q1 - q0, b1 - b0)
            torch.mm(queries16[q0:q1], bank16[b0:b1].T, out=sims)
            out[q0:q1, j] = sims.max(dim=1).indices + b0
    return out


def rerank(queries: torch.Tensor, bank: torch.Tensor, candidates: torch.Tensor) -> torch.Tensor:
    """(n,) int64: of each query's candidate rows (n, c), the one with the largest fp32 product."""
    if candidates.shape[1] == 1:
        return candidates[:, 0]
    exact = torch.einsum("nd,ncd->nc", queries, bank[candidates])
    return candidates.gather(1, exact.argmax(dim=1, keepdim=True))[:, 0]


#: queries per block of ``row_similarities``: its gathered rows and products stay ~12 MB at 384
#: dims (a 16-image chunk's 16,384 queries at once held 48 MiB more at the audit's peak).
ROW_BLOCK = 4096


def row_similarities(queries: torch.Tensor, bank: torch.Tensor, idx: torch.Tensor) -> np.ndarray:
    """(n,) float32 inner product of each query with its bank row ``idx``: one fp32 dot product
    per query, the same whichever method chose the row and however the queries were batched
    (each row is reduced on its own, so the blocks of ``ROW_BLOCK`` queries change nothing)."""
    out = torch.empty(queries.shape[0], dtype=torch.float32)
    for start in range(0, queries.shape[0], ROW_BLOCK):
        rows = slice(start, start + ROW_BLOCK)
        torch.sum(queries[rows] * bank[idx[rows]], dim=1, out=out[rows])
    return out.numpy()


def faiss_top1(index: faiss.Index, queries_padded: np.ndarray) -> np.ndarray:
    """(n,) int64 row of the largest inner product, by faiss."""
    return index.search(queries_padded, 1)[1][:, 0].astype(np.int64)


def _unit(rng: np.random.Generator, rows: int, width: int) -> np.ndarray:
    x = rng.standard_normal((rows, width), dtype=np.float32)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def _probe_runs(
    candidates: tuple[SearchMethod, ...], dim: int, padded: int, n_queries: int
) -> dict[str, Callable[[], object]]:
    rng = np.random.default_rng(0)
    bank = np.zeros((PROBE_ROWS, padded), dtype=np.float32)
    bank[:, :dim] = _unit(rng, PROBE_ROWS, dim)
    queries = np.zeros((n_queries, padded), dtype=np.float32)
    queries[:, :dim] = _unit(rng, n_queries, dim)
    bank_t = torch.from_numpy(bank)[:, :dim]  # the padded storage, as PatchIndex holds it
    q_t = torch.from_numpy(np.ascontiguousarray(queries[:, :dim]))
    runs: dict[str, Callable[[], object]] = {}
    if "faiss" in candidates:
        index = faiss.IndexFlatIP(padded)
        index.add(bank)
        runs["faiss"] = lambda: faiss_top1(index, queries)
    if "torch" in candidates:
        runs["torch"] = lambda: top1_fp32(q_t, bank_t)
    if "bf16" in candidates:
        bank16 = bank_t.to(torch.bfloat16)
        runs["bf16"] = lambda: rerank(q_t, bank_t, bf16_candidates(q_t.to(torch.bfloat16), bank16))
    return runs


def measure(
    candidates: tuple[SearchMethod, ...],
    dim: int,
    padded: int,
    n_queries: int = PROBE_QUERIES,
    rounds: int = 2,
) -> Calibration:
    """Time each candidate on the probe (``n_queries`` x PROBE_ROWS), interleaved, after one
    warm-up run each; the fastest (best of ``rounds``) wins if it beats the first candidate
    (the default) by ``MARGIN``."""
    runs = _probe_runs(candidates, dim, padded, n_queries)
    best = {name: float("inf") for name in runs}
    with torch.inference_mode():
        for fn in runs.values():
            fn()  # warm-up: first-call allocations, thread start
        for _ in range(rounds):
            for name, fn in runs.items():
                t0 = time.perf_counter()
                fn()
                best[name] = min(best[name], 1e3 * (time.perf_counter() - t0))
    method = min(best, key=best.__getitem__)
    if best[method] >= MARGIN * best[candidates[0]]:
        method = candidates[0]
    return Calibration(method=method, ms=best)  # type: ignore[arg-type]


#: Probe results of this process (measured, or adopted from a cache by the caller), by
#: ``probe_key``.
_CHOICES: dict[str, Calibration] = {}
_CHOICES_LOCK = threading.Lock()


def probe_key(candidates: tuple[SearchMethod, ...], dim: int, padded: int, n_queries: int) -> str:
    """What a probe result holds for: the candidates, the widths, the query-count class and
    the current torch and faiss thread counts, as one string."""
    threads = (torch.get_num_threads(), faiss.omp_get_max_threads())
    return (
        f"{','.join(candidates)}|dim {dim}|padded {padded}|queries {probe_queries(n_queries)}"
        f"|threads {threads[0]}x{threads[1]}"
    )


def choose_method(
    candidates: tuple[SearchMethod, ...], dim: int, padded: int, n_queries: int
) -> Calibration:
    """The fastest of ``candidates`` for a search of ``n_queries`` ``dim``-wide rows (faiss holds
    them ``padded`` wide) at the current torch and faiss thread counts, measured once per
    process and query-count class (``probe_queries``) unless adopted (``adopt_choices``)."""
    if len(candidates) == 1:
        return Calibration(method=candidates[0], ms={})
    key = probe_key(tuple(candidates), dim, padded, n_queries)
    with _CHOICES_LOCK:
        found = _CHOICES.get(key)
        if found is None:
            found = _CHOICES[key] = measure(tuple(candidates), dim, padded, n_queries)
    return found


def known_choices() -> dict[str, dict]:
    """The probe results of this process as JSON-ready {key: {"method", "ms"}}."""
    with _CHOICES_LOCK:
        return {k: {"method": c.method, "ms": dict(c.ms)} for k, c in _CHOICES.items()}


def adopt_choices(choices: Mapping[str, Mapping]) -> None:
    """Take probe results measured earlier on this machine (``known_choices``' form); entries
    of an unknown method are ignored, results of this process are kept."""
    methods = typing.get_args(SearchMethod)
    with _CHOICES_LOCK:
        for key, value in choices.items():
            if value.get("method") in methods and key not in _CHOICES:
                ms = {str(k): float(v) for k, v in dict(value.get("ms", {})).items()}
                _CHOICES[key] = Calibration(method=value["method"], ms=ms)
