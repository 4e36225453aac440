"""glibc malloc settings of the calibrations (`artifacts.provenance.malloc_thresholds`), each probed in a
fresh process, whose heap state is known: where a block comes from (/proc/self/maps) and whether freeing
it returns its pages (/proc/self/statm)."""

from __future__ import annotations

import subprocess
import sys

import pytest

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's malloc and /proc")


def probe(code: str) -> list[str]:
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    return out.stdout.split()


HEAP_PROBE = """
import torch
from sparse_ffn.artifacts.provenance import large_blocks_mapped

def in_heap(t):
    for line in open("/proc/self/maps"):
        if line.rstrip().endswith("[heap]"):
            lo, hi = (int(x, 16) for x in line.split()[0].split("-"))
            return lo <= t.data_ptr() < hi
    return False

big = torch.ones(4 << 20)  # 16 MiB, mmapped; freeing it raises glibc's dynamic threshold to 16 MiB
del big
before = torch.ones(1 << 20)  # 4 MiB blocks from here on; each kept alive, so none reuses another's place
with large_blocks_mapped() as active:
    inside = torch.ones(1 << 20)
after = torch.ones(1 << 20)
print(active, in_heap(before), in_heap(inside), in_heap(after))
"""


def test_large_blocks_are_mapped_inside_the_block_only():
    """A 4 MiB tensor comes from glibc's heap by default once a bigger block was freed (the dynamic
    threshold rose); within `large_blocks_mapped` it has its own mapping (freed straight back to the
    OS), and after it the threshold is 32 MiB: the heap again. Run in a fresh process, whose heap has
    no free 4 MiB chunk."""
    assert probe(HEAP_PROBE) == ["True", "True", "False", "True"]


KEPT_PROBE = """
import torch
from sparse_ffn.artifacts.provenance import freed_blocks_kept, resident_bytes

MiB = 1 << 20
with freed_blocks_kept() as active:
    block = torch.ones(12 * MiB)  # 48 MiB: below the block's mmap threshold (64 MiB), from the heap
    touched = resident_bytes()
    del block
    freed = resident_bytes()
left = resident_bytes()
block = torch.ones(12 * MiB)  # after the block: above the 32 MiB mmap threshold, a mapping of its own
touched_after = resident_bytes()
del block
print(active, (touched - freed) // MiB, (freed - left) // MiB, (touched_after - resident_bytes()) // MiB)
"""


def test_freed_blocks_are_kept_inside_the_block_and_returned_on_exit():
    """Inside `freed_blocks_kept` a freed 48 MiB block stays resident for the next pass (by default glibc
    returns the heap top and page-faults it back in); on exit it is returned, and a block that size is
    again mapped on its own and returned when freed."""
    active, dropped_inside, returned_on_exit, dropped_after = probe(KEPT_PROBE)
    assert active == "True"
    assert int(dropped_inside) < 1
    assert int(returned_on_exit) >= 40
    assert int(dropped_after) >= 40
