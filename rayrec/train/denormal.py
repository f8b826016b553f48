"""Flush subnormal floats to zero on every CPU thread that computes (FTZ/DAZ).

Why: Adam with weight decay drives parameters that get almost no gradient (DE's experts that the annealed
Gumbel selection stops choosing) into the subnormal range (|x| < 1.2e-38). An AVX-512 GEMM with subnormal operands
takes a microcode assist per instruction: DE's expert backward on CiteULike-t ran 4x slower after 15 epochs with
0.7% of the experts' second-layer weights subnormal (1.33 s -> 0.33 s per step on one thread with the same weights
flushed), and the slowdown grows as more weights decay. Flushing changes values below 1.2e-38 only.

``torch.set_flush_denormal`` sets the MXCSR of the *calling* thread only; the intra-op (OpenMP) threads keep their
own. :func:`flush_denormals` therefore also runs ``set_flush_denormal`` once on each thread of torch's OpenMP team
(``GOMP_parallel`` of the libgomp torch loaded): with 2 threads the same step went from 0.90 s (calling thread
flushed only: 0.85 s) to 0.26 s. Call it after ``torch.set_num_threads``; threads created later are not covered.
"""

from __future__ import annotations

import ctypes
import threading

import torch


def _openmp_library() -> str | None:
    """Path of the libgomp mapped into this process (torch's CPU OpenMP runtime), if any."""
    try:
        with open("/proc/self/maps") as f:
            paths = {line.split()[-1] for line in f if "libgomp" in line and "/" in line}
    except OSError:
        return None
    return sorted(paths)[0] if paths else None


def flush_denormals(enabled: bool = True) -> int:
    """Set (or clear) flush-to-zero for subnormals on the calling thread and on each thread of torch's OpenMP
    team. Returns how many distinct threads were set (0 when the CPU does not support it: not x86 with SSE3)."""
    if not torch.set_flush_denormal(enabled):
        return 0
    done = {threading.get_native_id()}
    lib = _openmp_library()
    n = torch.get_num_threads()
    if lib is None or n <= 1:
        return len(done)
    lock = threading.Lock()

    def _set(_data) -> None:  # runs on every thread of the OpenMP team (the calling thread included)
        torch.set_flush_denormal(enabled)
        with lock:
            done.add(threading.get_native_id())

    callback = ctypes.CFUNCTYPE(None, ctypes.c_void_p)(_set)
    try:
        ctypes.CDLL(lib).GOMP_parallel(callback, None, ctypes.c_uint(n), ctypes.c_uint(0))
    except (OSError, AttributeError):
        pass  # another OpenMP runtime: the calling thread is still set
    return len(done)
