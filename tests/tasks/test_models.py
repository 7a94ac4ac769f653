"""The runtime's allocator decision for an extractor (``tasks.models.tune_allocator``)."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from tasks.models import tune_allocator

REPO = Path(__file__).resolve().parents[2]

#: The decision for ``runtime``, then a touched 64 MiB block freed: how much of it the process
#: still holds (MiB of anonymous memory).
FREED_PROBE = textwrap.dedent(
    """
    import ctypes, sys
    from tasks.models import tune_allocator
    def anon_mib():
        for line in open("/proc/self/status"):
            if line.startswith("RssAnon:"):
                return int(line.split()[1]) / 1024
    libc = ctypes.CDLL("libc.so.6")
    libc.malloc.restype = ctypes.c_void_p
    libc.free.argtypes = [ctypes.c_void_p]
    size = 64 << 20
    kept = tune_allocator("cpu", "torch")
    if sys.argv[1] != "torch":
        kept = tune_allocator("cpu", sys.argv[1])
    block = libc.malloc(size)
    ctypes.memset(block, 1, size)
    before = anon_mib()
    libc.free(block)
    print(kept, before - anon_mib())
    """
)


def _freed_mib(runtime: str, **env: str) -> tuple[str, float]:
    out = subprocess.run(
        [sys.executable, "-c", FREED_PROBE, runtime],
        env={**os.environ, **env},
        cwd=REPO,
        capture_output=True,
        text=True,
        check=True,
    ).stdout.split()
    return out[-2], float(out[-1])


def test_a_gpu_extractor_leaves_the_host_allocator_alone():
    assert tune_allocator("cuda:0") is False


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's malloc")
def test_freed_memory_is_kept_while_torch_computes_and_given_back_for_an_exported_runtime():
    kept, returned = _freed_mib("torch")
    assert kept == "True" and returned < 8  # the freed block stays in the heap for reuse
    for runtime in ("openvino", "onnx"):
        kept, returned = _freed_mib(runtime)
        assert kept == "False" and returned > 56, runtime  # back to the kernel on free
    # switched off: glibc's own behaviour throughout (a 64 MiB block is its own mapping)
    kept, returned = _freed_mib("torch", ANOMALYDINO_MALLOC_TUNING="0")
    assert kept == "False" and returned > 56
