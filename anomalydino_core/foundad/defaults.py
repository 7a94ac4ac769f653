"""FoundAD's tunable defaults, in one place (no heavy imports: the settings model and the CLI
read them). Why these values: ``training.py``'s module docstring (sized on a 2-core CPU)."""

POOL_SIZE = 64  # augmented / CutPaste pairs encoded once for training
VAL_POOL_SIZE = 16  # held-out synthetic pairs for early stopping
MAX_EPOCHS = 14
MAX_SECONDS = 420.0  # training budget; None: epochs only (byte-reproducible)
PATIENCE = 3  # epochs without a validation improvement
TOP_K = 10  # patches averaged into the image score (the paper's K on MVTec)
