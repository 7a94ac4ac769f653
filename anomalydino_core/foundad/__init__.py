"""FoundAD (METHOD.md section 7): a learned projection of frozen encoder tokens onto the normal
manifold; the anomaly map is the per-patch squared error between the tokens and their projection.

Arrays in, arrays out: no files, no environment, no orchestration. Modules: ``projector`` (the
model), ``augmentation`` (few-shot), ``synthesis`` (CutPaste-union), ``training`` (cached pools,
budgeted training), ``scoring`` (errors, scores, maps), ``features`` (tokens from the kNN's
backbone pass), ``config`` (all settings as JSON-able data), ``defaults`` (the tunable
defaults, read by the settings model), ``evaluation`` (inside the MVTec protocol).

Import from the modules: the package itself stays light (no torch) for the settings model.
"""
