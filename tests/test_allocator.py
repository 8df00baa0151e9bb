"""pnode.allocator: keep_freed_memory (glibc keeps freed memory, so a repeated step stops faulting pages in) and
return_freed_memory (freed blocks leave the resident size at once)."""

import re
import subprocess
import sys

import pytest

from pnode.allocator import _glibc, keep_freed_memory, return_freed_memory

# A "training step" in miniature: 24 blocks of 4 MiB allocated together (bytearray zero-fills, so
# every page is touched) and freed together, three times; the page faults of the last two rounds
# are printed. By default glibc returns the freed 96 MiB at the top of its heap to the OS, so every
# round faults all 24,576 pages in again.
ROUNDS = """
import resource, sys
from pnode.allocator import keep_freed_memory
if sys.argv[1] == "keep":
    assert keep_freed_memory()
def step():
    blocks = [bytearray(4 << 20) for _ in range(24)]
    del blocks
step()
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
step(); step()
print(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
"""
PAGES_PER_ROUND = 24 * (4 << 20) // 4096

needs_glibc = pytest.mark.skipif(_glibc() is None, reason="keep_freed_memory acts on glibc only")


def _printed(script: str, mode: str) -> str:
    proc = subprocess.run([sys.executable, "-c", script, mode], capture_output=True, text=True, timeout=120,
                          check=True)
    return proc.stdout.strip()


def faults(mode: str) -> int:
    return int(_printed(ROUNDS, mode))


@needs_glibc
def test_kept_memory_is_reused_without_page_faults():
    # Without the call the two rounds fault (nearly) all their pages in: the property can fail.
    assert faults("default") > PAGES_PER_ROUND
    # With it they reuse the first round's pages: a few faults for Python's own small objects.
    assert faults("keep") < PAGES_PER_ROUND / 20


# A forward pass in miniature: a 4 MiB block freed once (by default glibc then raises its mapping
# threshold to 4 MiB), then 24 temporaries of 2 MiB and one kept block above them; the temporaries
# are freed. Printed: how far the resident anonymous memory (MiB) stayed above what is still live.
HOLES = """
import sys
from pnode.allocator import return_freed_memory
if sys.argv[1] == "return":
    assert return_freed_memory()
def rss_anon():
    with open("/proc/self/status") as fh:
        return next(int(line.split()[1]) for line in fh if line.startswith("RssAnon")) / 1024
first = bytearray(4 << 20)
del first
before = rss_anon()
temporaries = [bytearray(2 << 20) for _ in range(24)]
kept = bytearray(2 << 20)
del temporaries
print(rss_anon() - before - 2)
"""


def resident_holes(mode: str) -> float:
    return float(_printed(HOLES, mode))


@needs_glibc
def test_returned_memory_leaves_no_resident_holes():
    # By default the freed temporaries below the kept block stay resident: the property can fail.
    assert resident_holes("default") > 40
    assert resident_holes("return") < 4


def test_a_bad_mapping_threshold_is_refused():
    with pytest.raises(ValueError, match=re.escape("mmap_threshold_mb must be in (0, 32]")):
        return_freed_memory(mmap_threshold_mb=0)


@pytest.mark.parametrize("kwargs, message", [
    ({"limit_mb": -1}, "limit_mb must be in [0, 2048) MB"),
    ({"limit_mb": 4096}, "limit_mb must be in [0, 2048) MB"),
    ({"mmap_threshold_mb": 0}, "mmap_threshold_mb must be in (0, 32]"),
    ({"mmap_threshold_mb": 64}, "mmap_threshold_mb must be in (0, 32]"),
])
def test_bad_settings_are_refused_before_anything_changes(kwargs, message):
    with pytest.raises(ValueError, match=re.escape(message)):
        keep_freed_memory(**kwargs)
