"""tasks/embed.py: incremental embedding, and a re-run that never needs the model."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np

from anomalydino_core.config import ModelSettings
from tasks.embed import SourceImage, embed_sources
from tasks.embedding_store import EmbeddingStore
from tasks.models import embedder
from tests.pipeline_data import lot_files, write_local


def test_rerun_reuses_without_loading_the_model(tmp_path: Path, mvtec_root: Path) -> None:
    write_local(tmp_path / "lot", lot_files(mvtec_root, bad=False))
    paths = sorted((tmp_path / "lot").rglob("*.png"))[:2]
    ids = [p.relative_to(tmp_path / "lot").as_posix() for p in paths]
    items = [
        SourceImage(image_id=i, uri=str(p), store_id=f"lots/l/{i}")
        for i, p in zip(ids, paths, strict=True)
    ]
    model = embedder(ModelSettings(backbone="efficientnet_lite0", resolution=224, threads=2))
    store = EmbeddingStore.open(str(tmp_path / "emb.zarr"), model.settings)
    loads: list[int] = []

    def load_model():
        loads.append(1)
        return model

    def refuse():
        raise AssertionError("the model was loaded although every embedding is stored")

    with ThreadPoolExecutor(2) as pool:
        first = embed_sources(items, store, load_model, threads=2, pool=pool)
        again = embed_sources(items, store, refuse, threads=2, pool=pool)
    assert loads == [1]
    assert [r.reused for r in first] == [False, False] and [r.reused for r in again] == [True, True]
    for a, b in zip(first, again, strict=True):
        assert a.ok and b.ok
        np.testing.assert_array_equal(a.features[0], b.features[0])
        np.testing.assert_array_equal(a.masks[0], b.masks[0])


def test_masks_off_stores_none_and_a_later_run_computes_the_same_ones(
    tmp_path: Path, mvtec_root: Path
) -> None:
    """With the product's masking off no mask is computed or stored; a run that needs masks
    later gets from ``EmbeddingStore.foreground`` exactly the masks an eager run stored."""
    write_local(tmp_path / "lot", lot_files(mvtec_root, bad=True))
    paths = sorted((tmp_path / "lot").rglob("*.png"))[:3]
    items = [
        SourceImage(image_id=p.name, uri=str(p), store_id=f"lots/l/{p.parent.name}/{p.name}")
        for p in paths
    ]
    model = embedder(ModelSettings(backbone="efficientnet_lite0", resolution=224, threads=2))
    eager = EmbeddingStore.open(str(tmp_path / "eager.zarr"), model.settings)
    lazy = EmbeddingStore.open(str(tmp_path / "lazy.zarr"), model.settings)
    with ThreadPoolExecutor(2) as pool:
        stored = embed_sources(items, eager, model, threads=2, pool=pool)
        unmasked = embed_sources(items, lazy, model, threads=2, pool=pool, masks=False)
        later = embed_sources(items, lazy, model, threads=2, pool=pool, masks=True)
    assert all(r.ok and r.masks == [None] for r in unmasked)
    assert all(r.reused for r in later)
    for item, a, b, c in zip(items, stored, unmasked, later, strict=True):
        assert lazy.get(item.store_id).mask is None  # the store holds none
        assert eager.get(item.store_id).mask is not None
        np.testing.assert_array_equal(a.features[0], b.features[0])
        np.testing.assert_array_equal(c.masks[0], a.masks[0])
        np.testing.assert_array_equal(lazy.foreground(lazy.get(item.store_id)), a.masks[0])
    assert any(0 < m.mean() < 1 for r in stored for m in r.masks)  # masks that say something
