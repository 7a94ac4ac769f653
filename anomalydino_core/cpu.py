"""Process-wide CPU settings: one thread team per library, and an allocator that keeps memory.

Threads. torch, faiss (its own OpenMP runtime) and numpy/scipy (OpenBLAS, several copies) each
start a thread team as large as the machine, and OpenBLAS teams busy-wait after each call. On a
small CPU those teams compete: the same 83-image audit step ran 128 ms per image with every team
at 2 threads and 101 ms with the BLAS teams at 1 (preprocessing 15 -> 6 ms, the PCA mask
7 -> 2.6 ms, the model 27 -> 22 ms). ``set_threads(n)`` gives torch and faiss ``n`` threads and the
BLAS libraries one: their calls here are small (PCA of one image, the map blur).

Memory. A ViT forward pass allocates and frees tens of MB per layer. With glibc's defaults those blocks
are handed back to the kernel on free and faulted in (and zeroed) again on the next allocation,
which cost a quarter of the DINOv2 ViT-S/14 bf16 forward pass on CPU here (148 -> 111 ms per
image at 448, batch 8). ``keep_freed_memory`` raises the trim and mmap thresholds once per process
so that freed blocks are reused, and caps the number of malloc arenas (``MALLOC_ARENAS``). The
price: the process keeps its peak heap until it exits, which suits batch workers. The runtime decides (``tasks.models.tune_allocator``: on CPU, unless
``ANOMALYDINO_MALLOC_TUNING=0``) and passes its decision here.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import functools

import faiss
import threadpoolctl
import torch


@functools.cache
def cpu_has_fast_bf16() -> bool:
    """The CPU multiplies bf16 natively (AMX or AVX512-BF16)."""
    try:
        with open("/proc/cpuinfo") as fh:
            flags = fh.read()
    except OSError:
        return False
    return "amx_bf16" in flags or "avx512_bf16" in flags


def set_threads(threads: int) -> None:
    """Use ``threads`` threads for torch and faiss, one for numpy's and scipy's BLAS (see above).

    faiss's own OpenBLAS (the OpenMP build, sharing faiss's thread team) keeps ``threads``.
    """
    if torch.get_num_threads() != threads:
        torch.set_num_threads(threads)
    faiss.omp_set_num_threads(threads)
    controller = threadpoolctl.ThreadpoolController()
    for lib in controller.lib_controllers:
        if lib.user_api != "blas":
            continue
        wanted = threads if "faiss" in lib.filepath else 1
        if lib.num_threads != wanted:
            lib.set_num_threads(wanted)


_M_TRIM_THRESHOLD = -1
_M_TOP_PAD = -2
_M_MMAP_THRESHOLD = -3
_M_ARENA_MAX = -8
#: glibc malloc arenas: by default up to 8 per core, one per thread that allocates at the same
#: time as another (the I/O pools, Prefect's threads, the runtimes' teams), each keeping its own
#: freed memory. An 83-image ViT-S audit after its bank build (AMD EPYC, 2 vCPUs): peak RSS 2.02
#: GiB with the default, 1.75 with 2 arenas, 1.69 with 1 (set from the start, MALLOC_ARENA_MAX),
#: in the same 22.0-22.4 s; capped here when the extractor is built (threads already run): 1.90.
MALLOC_ARENAS = 2


@functools.cache
def keep_freed_memory(enabled: bool) -> bool:
    """Tune glibc malloc once when ``enabled`` (no-op elsewhere); True when the settings were
    applied. ``enabled=False`` leaves the allocator alone."""
    if not enabled:
        return False
    name = ctypes.util.find_library("c")
    if not name:
        return False
    try:
        libc = ctypes.CDLL(name)
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return False  # not glibc (musl, macOS): nothing to tune
    mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
    ok = mallopt(_M_MMAP_THRESHOLD, 1 << 30)  # blocks up to 1 GiB come from the heap
    ok &= mallopt(_M_TRIM_THRESHOLD, 2**31 - 1)  # never give the heap top back
    ok &= mallopt(_M_TOP_PAD, 64 << 20)  # grow the heap in 64 MiB steps
    ok &= mallopt(_M_ARENA_MAX, MALLOC_ARENAS)  # no new arenas past this (see MALLOC_ARENAS)
    return bool(ok)
