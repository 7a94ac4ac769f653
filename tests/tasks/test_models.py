"""The runtime's allocator decision for an extractor (``tasks.models.tune_allocator``)."""

from __future__ import annotations

from tasks.models import tune_allocator


def test_a_gpu_extractor_leaves_the_host_allocator_alone():
    assert tune_allocator("cuda:0") is False
