"""One FoundAD configuration (training and scoring), as plain JSON-able data and back."""

from __future__ import annotations

import dataclasses
import typing
from dataclasses import dataclass, field
from typing import Any

from .scoring import ScoringConfig
from .training import TrainingConfig


@dataclass(frozen=True)
class FoundADConfig:
    """Everything that determines a FoundAD model and its scores (besides the features):
    ``training`` (:class:`TrainingConfig`: projector shape, pools, optimiser, budget, seed,
    augmentation and CutPaste) and ``scoring`` (:class:`ScoringConfig`: top-K, map sigma)."""

    training: TrainingConfig = field(default_factory=TrainingConfig)
    scoring: ScoringConfig = field(default_factory=ScoringConfig)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> FoundADConfig:
        """Inverse of ``to_dict`` (also after a JSON round trip); unknown keys are errors,
        missing keys take their defaults."""
        return _build(cls, data)


def _build(cls: type, data: dict[str, Any]) -> Any:
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = set(data) - names
    if unknown:
        raise ValueError(f"{cls.__name__}: unknown settings {sorted(unknown)}")
    kwargs = {}
    for name, value in data.items():
        hint = hints[name]
        if dataclasses.is_dataclass(hint) and isinstance(value, dict):
            value = _build(hint, value)
        elif typing.get_origin(hint) is tuple and isinstance(value, list):
            value = tuple(value)
        kwargs[name] = value
    return cls(**kwargs)
