"""Process-wide CPU settings: the CPU's bf16 support, one thread team per library.

Threads. torch, faiss (its own OpenMP runtime) and numpy/scipy (OpenBLAS, several copies) each
start a thread team as large as the machine, and OpenBLAS teams busy-wait after each call. On a
small CPU those teams compete: the same 83-image audit step ran 128 ms per image with every team
at 2 threads and 101 ms with the BLAS teams at 1 (preprocessing 15 -> 6 ms, the PCA mask
7 -> 2.6 ms, the model 27 -> 22 ms). ``set_threads(n)`` gives torch and faiss ``n`` threads and the
BLAS libraries one: their calls here are small (PCA of one image, the map blur).

Memory: ``anomalydino_core.allocator``.
"""

from __future__ import annotations

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
