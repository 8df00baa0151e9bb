"""Memory of a training step: resident anonymous memory, its peak, and glibc's cached free memory.

``RssAnon`` (``/proc/self/status``) is the memory a process has written to: heap and anonymous
mappings, where torch's CPU tensors (taken from malloc, without a cache of torch's own), PETSc's
vectors and Python's objects live; not code or mapped files, whose pages the first call of a
library touches once. MB means 2**20 bytes. Linux only (``/proc``).
"""

import ctypes
import gc
import threading
from typing import Callable, Dict, Optional


def status_mb(*names: str) -> Dict[str, float]:
    """Fields of ``/proc/self/status`` given in kB (``VmRSS``, ``RssAnon``, ...), in MB (2**20 bytes)."""
    values = {}
    with open("/proc/self/status") as fh:
        for line in fh:
            name, _, rest = line.partition(":")
            if name in names:
                values[name] = int(rest.split()[0]) / 1024
    missing = set(names) - set(values)
    if missing:
        raise RuntimeError(f"/proc/self/status has no {', '.join(sorted(missing))} (Linux >= 4.5 needed)")
    return values


def anonymous_mb() -> float:
    """Resident anonymous memory of this process (MB): heap and anonymous mappings, not code or files."""
    return status_mb("RssAnon")["RssAnon"]


def release_free_memory() -> None:
    """Collect garbage and hand the free memory glibc keeps back to the OS, so that RSS is live memory."""
    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):  # not glibc: RSS may include freed memory the allocator keeps
        pass


class PeakMemory:
    """``with PeakMemory() as peak: ...``; then ``peak.mb`` is the most anonymous memory resident inside
    the block (MB).

    From the kernel's high-water mark of the whole RSS (``VmHWM``, reset on entry; Linux >= 4.0)
    less the file-backed and shared pages resident on exit (code and mapped files: these only grow
    during a step, so this may undercount the peak by pages first mapped after it, never overcount).
    Where the kernel refuses the reset, a thread samples ``RssAnon`` every ``interval_s`` instead
    (``method`` says which was used).
    """

    def __init__(self, interval_s: float = 1e-3):
        self.interval_s = interval_s
        self.mb = 0.0
        self.method = ""
        self._stop = threading.Event()
        self._thread: Optional[threading.Thread] = None

    def __enter__(self) -> "PeakMemory":
        try:
            with open("/proc/self/clear_refs", "w") as fh:
                fh.write("5")
            self.method = "VmHWM - RssFile - RssShmem"
        except OSError:
            self.method = f"RssAnon sampled every {self.interval_s * 1e3:g} ms"
            self.mb = anonymous_mb()
            self._thread = threading.Thread(target=self._sample, daemon=True)
            self._thread.start()
        return self

    def _sample(self) -> None:
        while not self._stop.wait(self.interval_s):
            self.mb = max(self.mb, anonymous_mb())

    def __exit__(self, *exc) -> None:
        if self._thread is None:
            status = status_mb("VmHWM", "RssFile", "RssShmem")
            self.mb = status["VmHWM"] - status["RssFile"] - status["RssShmem"]
            return
        self._stop.set()
        self._thread.join()
        self.mb = max(self.mb, anonymous_mb())


def step_memory(step: Callable[[], object], baseline_mb: float) -> Dict[str, object]:
    """``peak_mb`` and ``held_mb`` of one call of ``step`` over ``baseline_mb`` (see the module docstring)."""
    release_free_memory()
    held = anonymous_mb() - baseline_mb
    with PeakMemory() as peak:
        step()
    return {"peak_mb": peak.mb - baseline_mb, "held_mb": held, "memory": peak.method}
