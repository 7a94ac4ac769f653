"""FoundAD (METHOD.md section 7): a learned projection of frozen encoder tokens onto the normal
manifold; the anomaly map is the per-patch squared error between the tokens and their projection.

Arrays in, arrays out: no files, no environment, no orchestration.
"""
