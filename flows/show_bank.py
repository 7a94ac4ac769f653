"""What a product's banks decided (masking, threshold) and on which reference images, read from
the stored manifests (``anomalydino show-bank``): no flow run, no model."""

from __future__ import annotations

from tasks.bank import BankManifest, read_manifest
from tasks.layout import check_name, latest_version
from tasks.storage import join, list_dirs


def product_banks(cfg, product: str, version: str | None = None) -> list[BankManifest]:
    """Every complete bank of ``product`` (of ``version``, or of its latest one with banks)."""
    storage = cfg.storage_config()
    root = join(cfg.layout().root, "banks", check_name("product", product))
    versions = list_dirs(root, storage)
    if version is None:
        version = latest_version(versions)
    if version is None or version not in versions:
        raise FileNotFoundError(f"no banks of product {product!r} (version {version}) at {root}")
    manifests = [
        read_manifest(join(root, version, key), storage)
        for key in list_dirs(join(root, version), storage)
    ]
    return sorted((m for m in manifests if m is not None), key=lambda m: m.created_at)


def bank_text(m: BankManifest) -> str:
    """The bank, its threshold and its masking decision with the evidence of each tested view."""
    threshold = "none" if m.threshold is None else f"{m.threshold:.4f}"
    refs = ", ".join(r.image_id for r in m.references)
    return "\n".join(
        [
            f"bank {m.uri}",
            f"  built {m.created_at} from {len(m.references)} reference(s) x {len(m.angles)} "
            f"view(s), {m.bank_patches} patches: {refs}",
            f"  threshold {threshold} ({m.threshold_source}: {m.threshold_reason or 'n/a'})",
            *(f"  rotations of {ref}: {why}" for ref, why in m.rotation_notes.items()),
            "  " + m.masking.explain().replace("\n", "\n  "),
        ]
    )
