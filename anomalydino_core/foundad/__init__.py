"""FoundAD (METHOD.md section 7): a learned projection of frozen encoder tokens onto the normal
manifold; the anomaly map is the per-patch squared error between the tokens and their projection.

Arrays in, arrays out: no files, no environment, no orchestration. Modules: ``projector`` (the
model), ``augmentation`` (few-shot), ``synthesis`` (CutPaste-union), ``training`` (cached pools,
budgeted training), ``scoring`` (errors, scores, maps), ``features`` (tokens from the kNN's
backbone pass), ``config`` (all settings as JSON-able data).
"""

from .config import FoundADConfig
from .features import embed_with_foundad, foundad_dim, foundad_encoder
from .projector import ManifoldProjector, ProjectorConfig, from_anomalib_state_dict
from .scoring import ScoringConfig, anomaly_map, image_score, image_scores, patch_errors
from .training import TokenPool, TrainingConfig, TrainingResult, build_pool, fit, train_projector

__all__ = [
    "FoundADConfig",
    "ManifoldProjector",
    "ProjectorConfig",
    "ScoringConfig",
    "TokenPool",
    "TrainingConfig",
    "TrainingResult",
    "anomaly_map",
    "build_pool",
    "embed_with_foundad",
    "fit",
    "foundad_dim",
    "foundad_encoder",
    "from_anomalib_state_dict",
    "image_score",
    "image_scores",
    "patch_errors",
    "train_projector",
]
