"""Build a product's reference bank from one reference-set version (default: the latest)."""

from __future__ import annotations

from prefect import flow

from flows.banks import model_context, prepare_bank
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
    """Build (or find) the bank of a product's reference version (default: the latest)."""
    cfg = resolve_config(config)
    mc = model_context(cfg, product)
    return prepare_bank(cfg, product, mc, version, force=force)
