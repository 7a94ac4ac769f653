"""FoundADConfig survives JSON and rejects what it does not know."""

from __future__ import annotations

import json
from dataclasses import replace

import pytest

from anomalydino_core.foundad.config import FoundADConfig
from anomalydino_core.foundad.scoring import ScoringConfig
from anomalydino_core.foundad.synthesis import CutPasteConfig
from anomalydino_core.foundad.training import TrainingConfig


def test_json_round_trip_keeps_nested_dataclasses_and_tuples():
    config = FoundADConfig(
        training=replace(
            TrainingConfig(), seed=7, max_seconds=None, cutpaste=CutPasteConfig(p_scar=0.25)
        ),
        scoring=ScoringConfig(top_k=5),
    )
    back = FoundADConfig.from_dict(json.loads(json.dumps(config.to_dict())))
    assert back == config
    assert isinstance(back.training.cutpaste.area_ratio, tuple)
    assert back.training.augment.jitter.hue == 0.05
    assert FoundADConfig.from_dict({}) == FoundADConfig()


def test_unknown_settings_are_errors():
    with pytest.raises(ValueError, match="lr_typo"):
        FoundADConfig.from_dict({"training": {"lr_typo": 1.0}})
