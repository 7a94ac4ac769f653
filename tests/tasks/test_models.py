"""The runtime's allocator decision (``ANOMALYDINO_MALLOC_TUNING``), made outside the core."""

from __future__ import annotations

from anomalydino_core.cpu import keep_freed_memory
from tasks.models import malloc_tuning_wanted, tune_allocator


def test_malloc_tuning_is_on_unless_the_environment_turns_it_off():
    assert malloc_tuning_wanted({}) is True
    assert malloc_tuning_wanted({"ANOMALYDINO_MALLOC_TUNING": "1"}) is True
    for off in ("0", "false", " No "):
        assert malloc_tuning_wanted({"ANOMALYDINO_MALLOC_TUNING": off}) is False
    assert keep_freed_memory(False) is False  # the core only does what it is told
    assert tune_allocator("cuda:0") is False  # a GPU extractor leaves the host allocator alone
