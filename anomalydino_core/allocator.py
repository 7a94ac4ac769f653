"""glibc malloc settings for batch workers: keep freed memory, few arenas (ctypes only: no torch,
so that a command can cap the arenas before any library starts a thread).

A ViT forward pass allocates and frees tens of MB per layer. With glibc's defaults those blocks
are handed back to the kernel on free and faulted in (and zeroed) again on the next allocation,
which cost a quarter of the DINOv2 ViT-S/14 bf16 forward pass on CPU here (148 -> 111 ms per
image at 448, batch 8). ``keep_freed_memory`` raises the trim and mmap thresholds so that freed
blocks are reused, and caps the number of malloc arenas. The price: the
process keeps its peak heap until it exits, which suits batch workers. An exported runtime
(OpenVINO, ONNX Runtime) allocates its buffers once, so where one computes the model
``give_freed_memory_back`` restores glibc's thresholds and trims the heap. The runtime decides
(``tasks.models.tune_allocator``: on CPU, unless ``ANOMALYDINO_MALLOC_TUNING=0``) and passes its
decision here.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import functools

_M_TRIM_THRESHOLD = -1
_M_TOP_PAD = -2
_M_MMAP_THRESHOLD = -3
_M_ARENA_MAX = -8
#: glibc malloc arenas: by default up to 8 per core, one per thread that allocates at the same
#: time as another (the I/O pools, Prefect's threads, the runtimes' teams), each keeping its own
#: freed memory. Peak RSS of a 1-shot bank build + 83-image ViT-S audit in one process (AMD EPYC,
#: 2 vCPUs): 1.88 GiB with the default, 1.74-1.77 with 2 arenas set at process start
#: (``MALLOC_ARENA_MAX=2`` or ``cap_arenas`` first thing), the same seconds per image. A cap set
#: later (when the extractor is built, threads already running) kept 1.90 of 2.02 in another run.
MALLOC_ARENAS = 2
#: ``give_freed_memory_back``'s mmap threshold: blocks from 8 MiB up are mapped on their own and
#: unmapped when freed; the heap is trimmed past twice that; the top pad is glibc's 128 KiB.
#: The pipeline allocates ~40 MB per image in 1-8 MB blocks (decoding, the input tensor, the
#: mask, the map), faulted in again when each is mapped. glibc's own thresholds settle at 32 /
#: 64 MiB on 64-bit: there the peak depended on where freed blocks landed. Peer bench audits
#: with OpenVINO (Intel Xeon, AMX; interleaved), peak RSS / ms per image: 1-shot, 5 runs each,
#: 8 MiB 1.34-1.36 GiB / 117.3 median, 32 MiB 1.38-1.47 / 114.6; 16-shot, 2 runs each, 8 MiB
#: 1.43-1.49 / 160.7, 16 MiB 1.46 / 162.3, 32 MiB 1.55-1.60 / 161.6. Earlier (before the
#: arena cap): mmap 128 KiB 1.56 GiB / 126 ms; thresholds never lowered 1.92 / 112.7.
GIVE_BACK_MMAP_THRESHOLD = 8 << 20
GLIBC_TOP_PAD = 128 << 10


@functools.cache
def _libc() -> ctypes.CDLL | None:
    name = ctypes.util.find_library("c")
    try:
        return ctypes.CDLL(name) if name else None
    except OSError:
        return None


@functools.cache
def _mallopt():
    """glibc's ``mallopt``, or None (musl, macOS: nothing to tune)."""
    mallopt = getattr(_libc(), "mallopt", None)
    if mallopt is None:
        return None
    mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
    return mallopt


def cap_arenas(arenas: int = MALLOC_ARENAS) -> bool:
    """No new malloc arenas past ``arenas`` (True when glibc took the setting). Call it before
    threads start: arenas already made stay."""
    mallopt = _mallopt()
    return bool(mallopt and mallopt(_M_ARENA_MAX, int(arenas)))


def keep_freed_memory(enabled: bool) -> bool:
    """Tune glibc malloc when ``enabled`` (no-op elsewhere; calling it again changes nothing);
    True when the settings were applied. ``enabled=False`` leaves the allocator alone."""
    mallopt = _mallopt()
    if not enabled or mallopt is None:
        return False
    ok = mallopt(_M_MMAP_THRESHOLD, 1 << 30)  # blocks up to 1 GiB come from the heap
    ok &= mallopt(_M_TRIM_THRESHOLD, 2**31 - 1)  # never give the heap top back
    ok &= mallopt(_M_TOP_PAD, 64 << 20)  # grow the heap in 64 MiB steps
    return bool(ok) and cap_arenas()


def give_freed_memory_back() -> bool:
    """Undo ``keep_freed_memory``'s thresholds (to ``GIVE_BACK_MMAP_THRESHOLD``, the trim
    threshold at twice that) and return the freed heap to the kernel (``malloc_trim``); the
    arena cap stays. True when glibc took the settings."""
    mallopt, libc = _mallopt(), _libc()
    if mallopt is None or libc is None or not hasattr(libc, "malloc_trim"):
        return False
    ok = mallopt(_M_MMAP_THRESHOLD, GIVE_BACK_MMAP_THRESHOLD)
    ok &= mallopt(_M_TRIM_THRESHOLD, 2 * GIVE_BACK_MMAP_THRESHOLD)
    ok &= mallopt(_M_TOP_PAD, GLIBC_TOP_PAD)
    libc.malloc_trim.argtypes = [ctypes.c_size_t]
    libc.malloc_trim(0)
    return bool(ok)
