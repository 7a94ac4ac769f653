"""What a pipeline process sets first: the malloc tuning on unless switched off, the arena cap
taken before threads run, triton kept out where no GPU could run it."""

from __future__ import annotations

import importlib.metadata
import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from anomalydino_core.allocator import MALLOC_ARENAS, keep_freed_memory
from tasks.process_start import cap_arenas_at_start, malloc_tuning_wanted

REPO = Path(__file__).resolve().parents[2]

#: 8 threads allocate through libc at once (ctypes drops the GIL), then glibc's own report counts
#: the arenas (``malloc_info``: one ``<heap nr=...>`` per arena).
ARENA_PROBE = textwrap.dedent(
    """
    import ctypes, os, sys, tempfile, threading
    from tasks.process_start import cap_arenas_at_start
    capped = cap_arenas_at_start(dict(os.environ))
    libc = ctypes.CDLL("libc.so.6")
    libc.malloc.restype = ctypes.c_void_p
    libc.free.argtypes = [ctypes.c_void_p]
    libc.fopen.restype = ctypes.c_void_p
    libc.malloc_info.argtypes = [ctypes.c_int, ctypes.c_void_p]
    libc.fclose.argtypes = [ctypes.c_void_p]
    barrier = threading.Barrier(8)
    def work():
        barrier.wait()
        blocks = [libc.malloc(4096) for _ in range(200)]
        for b in blocks:
            libc.free(b)
    threads = [threading.Thread(target=work) for _ in range(8)]
    for t in threads: t.start()
    for t in threads: t.join()
    path = os.path.join(tempfile.mkdtemp(), "info.xml")
    fh = libc.fopen(path.encode(), b"w")
    libc.malloc_info(0, fh)
    libc.fclose(fh)
    print(capped, open(path).read().count("<heap nr="))
    """
)


def _arenas(env: dict[str, str]) -> tuple[str, int]:
    out = subprocess.run(
        [sys.executable, "-c", ARENA_PROBE],
        env=env,
        cwd=REPO,
        capture_output=True,
        text=True,
        check=True,
    ).stdout.split()
    return out[0], int(out[1])


def test_malloc_tuning_is_on_unless_the_environment_turns_it_off():
    assert malloc_tuning_wanted({}) is True
    assert malloc_tuning_wanted({"ANOMALYDINO_MALLOC_TUNING": "1"}) is True
    for off in ("0", "false", " No "):
        assert malloc_tuning_wanted({"ANOMALYDINO_MALLOC_TUNING": off}) is False
    assert keep_freed_memory(False) is False  # the core only does what it is told


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's malloc_info")
def test_the_arena_cap_bounds_the_arenas_of_threads_that_allocate_at_once():
    base = {k: v for k, v in os.environ.items() if k != "MALLOC_ARENA_MAX"}
    capped, n = _arenas(base)
    assert capped == "True" and n <= MALLOC_ARENAS
    # switched off: glibc's default, an arena per thread here (up to 8 per core)
    capped, n = _arenas({**base, "ANOMALYDINO_MALLOC_TUNING": "0"})
    assert capped == "False" and n > MALLOC_ARENAS
    # the environment's own setting is glibc's to apply; left alone here
    capped, n = _arenas({**base, "MALLOC_ARENA_MAX": "4"})
    assert capped == "False" and MALLOC_ARENAS < n <= 4
    assert cap_arenas_at_start({"ANOMALYDINO_MALLOC_TUNING": "no"}) is False


TRITON_PROBE = textwrap.dedent(
    """
    import json, sys
    import tasks.process_start as start
    start.GPU_DEVICE_FILES = tuple(sys.argv[1:])
    import flows  # prepares the process, as the command and deployments do
    import timm  # imports torch._dynamo, which imports triton where it can
    import torch.utils._triton
    maps = open("/proc/self/maps").read()
    print(json.dumps({"gpu": start.gpu_present(), "entry": repr(sys.modules.get("triton")),
                      "has_triton": torch.utils._triton.has_triton_package(),
                      "mapped": "libtriton" in maps}))
    """
)


def _triton_probe(*gpu_files: str) -> dict:
    out = subprocess.run(
        [sys.executable, "-c", TRITON_PROBE, *gpu_files],
        cwd=REPO, capture_output=True, text=True, check=True, timeout=300,
    ).stdout  # fmt: skip
    return json.loads(out.strip().splitlines()[-1])


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="/proc/self/maps")
def test_triton_stays_out_of_a_process_without_a_gpu(tmp_path):
    try:  # installed with the CUDA build of torch (this process may have kept it out already)
        importlib.metadata.version("triton")
    except importlib.metadata.PackageNotFoundError:
        pytest.skip("triton is not installed")
    none = _triton_probe(str(tmp_path / "nvidia[0-9]*"))
    assert none == {"gpu": False, "entry": "None", "has_triton": False, "mapped": False}
    (tmp_path / "nvidia0").touch()  # a GPU device file: triton is left to torch
    gpu = _triton_probe(str(tmp_path / "nvidia[0-9]*"))
    assert gpu["gpu"] and gpu["has_triton"] and gpu["mapped"]
