"""Bank building for real (Prefect test server, real bottle images cut to a tall frame)."""

from __future__ import annotations

import cv2
import numpy as np
import pytest

from anomalydino_core.augment import AGNOSTIC_ANGLES
from flows.build_bank import build_bank
from flows.config import PipelineConfig
from flows.show_bank import bank_text
from tasks.embedding_store import EmbeddingStore
from tests.pipeline_data import REFERENCES, fast_config, reference_files, write_local

pytestmark = pytest.mark.slow


def test_tall_references_keep_only_exact_rotations_and_say_so(
    prefect_harness, tmp_path, mvtec_root
) -> None:
    """A 900 x 360 part in agnostic mode: only its 0 and 180 degree views go into the bank
    (the others would be mostly reflections); the masking test still saw all 8 rotations."""
    tall = {}
    for name, data in reference_files(mvtec_root).items():
        image = cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_COLOR)
        tall[name] = cv2.imencode(".png", image[:, 270:630])[1].tobytes()
    root = tmp_path / "pipeline"
    write_local(root / "references" / "bottle" / "v1", tall)
    overrides = fast_config(str(root))
    overrides["products"] = {"bottle": {"rotation": "agnostic"}}
    cfg = PipelineConfig.model_validate(overrides)
    manifest = build_bank("bottle", None, cfg)

    assert manifest.angles == AGNOSTIC_ANGLES
    assert sorted(manifest.rotation_notes) == sorted(REFERENCES)
    assert all("360x900 (aspect 2.50" in why for why in manifest.rotation_notes.values())
    store = EmbeddingStore.open(
        cfg.layout().embeddings("bottle", manifest.feature_key), None, read_only=True
    )
    grids = [
        store.attributes(f"references/{r.content_sha256}/rot000")["grid"]
        for r in manifest.references
    ]
    assert manifest.bank_patches == sum(2 * h * w for h, w in grids)  # 0 and 180 degrees
    assert len(manifest.masking.views) == len(REFERENCES) * 8
    assert "rotations of 001.png: 360x900" in bank_text(manifest)
