"""The node's heap setting: large freed blocks go back to the OS (glibc), which is what keeps a PSI's RSS down."""

from __future__ import annotations

import platform
import subprocess
import sys

import pytest

from vfl.node.heap import return_freed_memory

PROBE = r"""
import sys
from vfl.node.heap import return_freed_memory

def rss_kib():
    for line in open("/proc/self/status"):
        if line.startswith("VmRSS"):
            return int(line.split()[1])

if sys.argv[1] == "set":
    assert return_freed_memory() is True
big = bytearray(1 << 20)
del big  # a freed 1 MiB mapping: glibc alone now raises its threshold to 1 MiB
before = rss_kib()
keep, blocks = [], []
for i in range(200):  # 200 blocks of 256 KiB, a small long-lived object after each (as a PSI's heap looks)
    blocks.append(bytearray(256 * 1024))
    keep.append(bytearray(1024))  # above pymalloc's 512 bytes: from the same glibc heap
grown = rss_kib()
del blocks
after = rss_kib()
print(before, grown, after)
sys.exit(0 if grown - before > 40_000 and after - before < 10_000 else 1)
"""


@pytest.mark.skipif(platform.system() != "Linux" or platform.libc_ver()[0] != "glibc", reason="glibc only")
def test_freed_large_blocks_are_returned_to_the_os():
    out = subprocess.run([sys.executable, "-c", PROBE, "set"], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stdout + out.stderr
    # the probe itself is sound: without the setting, the same blocks stay in the heap
    unset = subprocess.run([sys.executable, "-c", PROBE, "unset"], capture_output=True, text=True, timeout=60)
    assert unset.returncode == 1, unset.stdout + unset.stderr


def test_setting_it_twice_is_harmless():
    first = return_freed_memory()
    assert return_freed_memory() == first
