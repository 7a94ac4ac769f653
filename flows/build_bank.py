"""Build a product's reference bank from one reference-set version (default: the latest), and
its FoundAD projector when the product's scorer uses FoundAD."""

from __future__ import annotations

from prefect import flow

from flows.banks import prepare_bank, prepare_projector, resolve_model
from flows.config import PipelineConfig
from flows.runtime import resolve_config
from tasks.bank import BankManifest


@flow(name="build-bank", log_prints=False)
def build_bank(
    product: str,
    version: str | None = None,
    config: PipelineConfig | None = None,
    force: bool = False,
) -> BankManifest:
    """Build (or find) the bank of a product's reference version (default: the latest), and
    train (or find) its projector when the product's scorer is foundad or both."""
    cfg = resolve_config(config)
    resolved = resolve_model(cfg, product)
    manifest = prepare_bank(cfg, product, resolved, version, force=force)
    prepare_projector(cfg, product, resolved, manifest, force=force)
    return manifest
