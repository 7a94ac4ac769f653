"""What a pipeline process sets first, before torch and before its threads: the ``anomalydino``
command and every flow run of a deployment (both import ``flows`` first, which calls
``start_process``). No torch here, so that it can run before any import that starts threads;
``anomalydino_core.allocator`` applies the allocator settings.

Peak RSS of the peer bench's 1-shot bank build + 83-image ViT-S audit in one process (Intel
Xeon, AMX, 2 vCPUs; 3 interleaved pairs each): 1.74 GiB uncapped, 1.64 capped (the same
speed), 1.61 capped and without triton.
"""

from __future__ import annotations

import glob
import os
import sys
from collections.abc import Mapping

from anomalydino_core.allocator import cap_arenas

#: Device files of GPUs that triton compiles for (NVIDIA, AMD ROCm, WSL's GPU paravirtualisation).
GPU_DEVICE_FILES = ("/dev/nvidia[0-9]*", "/dev/kfd", "/dev/dxg")


def malloc_tuning_wanted(environ: Mapping[str, str] = os.environ) -> bool:
    """False when ``ANOMALYDINO_MALLOC_TUNING`` is 0 / false / no (glibc's defaults stay)."""
    value = environ.get("ANOMALYDINO_MALLOC_TUNING", "1")
    return value.strip().lower() not in ("0", "false", "no")


def cap_arenas_at_start(environ: Mapping[str, str] = os.environ) -> bool:
    """Cap glibc's malloc arenas first thing in a process (``anomalydino_core.allocator``), unless
    the tuning is off or the environment already sets ``MALLOC_ARENA_MAX`` (glibc read it at
    start). True when capped here.

    Measured against the S3-outage test's time to fail: on the AMD EPYC a capped process took
    27-35 s instead of 25 (5 runs against 2; once 10 s from its last line to its exit); on the
    Intel Xeon (AMX), 3 runs each alternating, 24.2-27.3 s capped and 24.1-27.0 without; in
    another session there 34.0 s capped, 34.3 without."""
    if not malloc_tuning_wanted(environ) or "MALLOC_ARENA_MAX" in environ:
        return False
    return cap_arenas()


def gpu_present() -> bool:
    """Whether this machine shows a GPU device file that triton could compile for."""
    return any(glob.glob(pattern) for pattern in GPU_DEVICE_FILES)


def keep_triton_out() -> bool:
    """On a machine without a GPU, make ``import triton`` fail in this process, as where it is
    not installed (the CPU build of torch): torch then reports no triton and never loads it.
    True when done here; nothing changes if triton is imported already or a GPU is present.

    Nothing on a CPU runs triton, yet the CUDA build of torch that pip installs by default
    imports it as soon as ``torch._dynamo`` is imported, which timm does through torchvision
    (``torchvision.ops.roi_align``): 0.07 GiB of ``libtriton.so`` mapped for nothing."""
    if "triton" in sys.modules or gpu_present():
        return False
    sys.modules["triton"] = None  # the import system's "not importable" entry
    return True


def start_process(environ: Mapping[str, str] = os.environ) -> None:
    """The arenas capped (``cap_arenas_at_start``) and triton kept out (``keep_triton_out``)."""
    cap_arenas_at_start(environ)
    keep_triton_out()
