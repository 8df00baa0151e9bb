"""The C allocator's policy for freed memory: keep it for the next training step, or return it at once (glibc only).

A training step of a neural ODE on the CPU allocates and frees the same large buffers every step:
the network's activations (a few MB each), and with pnode also PETSc's trajectory (one vector per
stored stage). By default glibc's malloc hands a freed block at the top of its heap back to the
operating system once it exceeds a threshold that it sets itself, so the next step touches fresh
pages again; each 4 KiB page is a page fault that zeroes memory in the kernel. On the 2-core
machine of ``BENCHMARKS.md`` they cost 6-20 % of a pnode training step (rk4, 16 steps, its
page-fault table) against 1 % of torchdiffeq's adjoint, which frees less between steps, and they
vary from process to process.

:func:`keep_freed_memory` switches that off for the whole process: freed memory stays mapped and
is reused, so after the first step the resident size stays at the step's peak (the peak itself
does not change). It is the in-process form of the environment variables
``MALLOC_TRIM_THRESHOLD_`` and ``MALLOC_MMAP_THRESHOLD_`` (which must be set before Python starts);
``jemalloc`` or ``tcmalloc`` through ``LD_PRELOAD`` have a similar effect.

:func:`return_freed_memory` is the opposite: every block of 1 MiB or more is mapped on its own and
unmapped when freed, so the resident size follows the memory in use. By default glibc raises its
mapping threshold to the largest block freed so far (up to 32 MiB), after which activations come
from the heap, and a forward pass that frees its intermediates between the tensors it keeps
leaves holes that stay resident: on the ODE-Net benchmark the forward pass of kept graphs peaks
about 1 GB above what it holds. A memory budget (:mod:`pnode._impl.budget`) bounds what pnode holds, so
under a tight budget this setting is what makes the process's peak follow it; it costs a page
fault per 4 KiB of every new block.
"""

import ctypes
import ctypes.util
from typing import Optional

# mallopt(3) parameters (glibc's <malloc.h>).
_M_TRIM_THRESHOLD = -1
_M_MMAP_THRESHOLD = -3
# glibc refuses mmap thresholds above 4 * 1024 * 1024 * sizeof(long) bytes (32 MiB on 64-bit).
MAX_MMAP_THRESHOLD_MB = 32
# mallopt takes a C int: the most free memory glibc can be told to keep is 2 GiB - 1 byte.
_MAX_TRIM_BYTES = 2**31 - 1
MAX_LIMIT_MB = _MAX_TRIM_BYTES / 2**20


def _glibc() -> Optional[ctypes.CDLL]:
    """glibc, if this process runs on it (it exports mallopt and gnu_get_libc_version)."""
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
    except OSError:
        return None
    if not (hasattr(libc, "gnu_get_libc_version") and hasattr(libc, "mallopt")):
        return None
    return libc


def keep_freed_memory(limit_mb: Optional[float] = None,
                      mmap_threshold_mb: float = MAX_MMAP_THRESHOLD_MB) -> bool:
    """Ask glibc's malloc to keep freed memory for reuse instead of returning it to the OS.

    Process-wide, and it stays in force: call it once, at the start of a training script (before
    or after importing torch; it applies to later frees and allocations).

    Args:
        limit_mb: how much free memory (MB) at the top of the heap glibc may keep before it gives
            the rest back; None (default): as much as glibc can be told, 2 GiB (mallopt's limit).
        mmap_threshold_mb: blocks at least this large (MB) are mapped on their own and returned to
            the OS as soon as they are freed, whatever ``limit_mb`` says; smaller blocks come from
            the heap and are kept. At most 32 (glibc's ceiling); the default, 32, keeps every
            activation and PETSc vector of the ODE-Net benchmark (2-4 MB each) on the heap.

    Returns:
        True when glibc took both settings; False when the process does not run on glibc
        (musl, macOS): nothing was changed, and the platform's allocator decides.

    Raises:
        ValueError: ``limit_mb`` outside [0, 2048), or ``mmap_threshold_mb`` outside (0, 32].
    """
    if limit_mb is not None and not 0 <= limit_mb <= MAX_LIMIT_MB:
        raise ValueError(f"limit_mb must be in [0, 2048) MB (mallopt takes a C int), or None for the most "
                         f"glibc keeps; got {limit_mb!r}")
    _check_mmap_threshold(mmap_threshold_mb)
    trim = _MAX_TRIM_BYTES if limit_mb is None else int(limit_mb * 2**20)
    return _mallopt((_M_MMAP_THRESHOLD, int(mmap_threshold_mb * 2**20)), (_M_TRIM_THRESHOLD, trim))


def return_freed_memory(mmap_threshold_mb: float = 1.0) -> bool:
    """Ask glibc's malloc to map every block of at least ``mmap_threshold_mb`` MB on its own and to
    return it to the OS when it is freed, so that the resident size follows live memory.

    Process-wide, and it stays in force (the counterpart of :func:`keep_freed_memory`; the last
    call wins). Setting the threshold fixes it: glibc no longer raises it as blocks are freed.

    Args:
        mmap_threshold_mb: the smallest block (MB) mapped on its own, in (0, 32].

    Returns:
        True when glibc took the setting; False when the process does not run on glibc.

    Raises:
        ValueError: ``mmap_threshold_mb`` outside (0, 32].
    """
    _check_mmap_threshold(mmap_threshold_mb)
    return _mallopt((_M_MMAP_THRESHOLD, int(mmap_threshold_mb * 2**20)))


def _check_mmap_threshold(mmap_threshold_mb: float) -> None:
    if not 0 < mmap_threshold_mb <= MAX_MMAP_THRESHOLD_MB:
        raise ValueError(f"mmap_threshold_mb must be in (0, {MAX_MMAP_THRESHOLD_MB}] (glibc refuses larger "
                         f"thresholds); got {mmap_threshold_mb!r}")


def _mallopt(*settings) -> bool:
    """Apply ``(parameter, value)`` pairs with glibc's mallopt; False without glibc or if one is refused."""
    libc = _glibc()
    if libc is None:
        return False
    libc.mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
    return all([bool(libc.mallopt(parameter, value)) for parameter, value in settings])
