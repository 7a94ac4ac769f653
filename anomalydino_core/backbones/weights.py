"""Resolve, verify and load backbone weights; build a ready backbone by name."""

from __future__ import annotations

import hashlib
import logging
import os
import shutil
import tempfile
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

from .registry import BackboneSpec, PreprocessConfig, get_backbone_spec

log = logging.getLogger(__name__)

#: Downloads a remote URI (s3://, gs://, https://...) to a local file; supplied by the I/O layer.
RemoteFetcher = Callable[[str, Path], None]

RANDOM_WEIGHTS = "random"
DEFAULT_CACHE_DIR = Path(
    os.environ.get("ANOMALYDINO_WEIGHTS_DIR", Path.home() / ".cache" / "anomalydino" / "weights")
)


class WeightsUnavailableError(RuntimeError):
    """No source could supply verified weights for a backbone."""


@dataclass(frozen=True)
class BackboneIdentity:
    """What produced a feature: recorded with every embedding and report row."""

    name: str
    weights_sha256: str  # sha256 of the weights file, or "random:<seed>"
    weights_source: str

    def to_dict(self) -> dict:
        return {
            "backbone": self.name,
            "weights_sha256": self.weights_sha256,
            "weights_source": self.weights_source,
        }


@dataclass
class LoadedBackbone:
    """A backbone module in eval mode with its spec and identity."""

    spec: BackboneSpec
    identity: BackboneIdentity
    module: torch.nn.Module

    def preprocess(self, resolution: int) -> PreprocessConfig:
        return self.spec.preprocess(resolution)


def sha256_file(path: str | Path, chunk: int = 1 << 20) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        while block := fh.read(chunk):
            digest.update(block)
    return digest.hexdigest()


def offline() -> bool:
    """True when hub downloads must not be attempted (``HF_HUB_OFFLINE`` / ``ANOMALYDINO_OFFLINE``)."""
    return any(
        os.environ.get(var, "").strip().lower() in {"1", "true", "yes", "on"}
        for var in ("HF_HUB_OFFLINE", "ANOMALYDINO_OFFLINE")
    )


def _verify(spec: BackboneSpec, path: Path, *, pinned: bool) -> str:
    digest = sha256_file(path)
    if pinned and spec.weights.sha256 and digest != spec.weights.sha256:
        raise WeightsUnavailableError(
            f"weights file {path} for {spec.name} has sha256 {digest}, "
            f"expected {spec.weights.sha256}: the file is corrupt or not the official checkpoint"
        )
    if pinned and not spec.weights.sha256:
        log.warning("no pinned sha256 for %s; recording %s", spec.name, digest)
    return digest


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


def _load_state_dict(path: Path) -> dict[str, torch.Tensor]:
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        return load_file(str(path))
    state = torch.load(path, map_location="cpu", weights_only=True)
    if isinstance(state, dict) and "model" in state and isinstance(state["model"], dict):
        state = state["model"]
    return state


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
    cache = Path(cache_dir) if cache_dir else DEFAULT_CACHE_DIR
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
    spec = get_backbone_spec(name)
    if weights == RANDOM_WEIGHTS:
        torch.manual_seed(seed)
        module = spec.build()
        identity = BackboneIdentity(name, f"random:{seed}", "random initialisation")
    else:
        path, digest, source = resolve_weights(
            spec, weights, cache_dir=cache_dir, fetch_remote=fetch_remote
        )
        module = spec.build()
        module.load_official_state_dict(_load_state_dict(path))
        identity = BackboneIdentity(name, digest, source)
    module.eval().requires_grad_(False)
    return LoadedBackbone(spec=spec, identity=identity, module=module)
