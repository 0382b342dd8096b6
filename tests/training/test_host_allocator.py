"""On glibc, CPU training reuses large temporaries instead of page-faulting them in every step (host_allocator)."""

import platform
import subprocess
import sys

import pytest

PAGE_FAULTS_OF_REPEATED_40MB_TEMPORARIES = """
import resource, torch
from surgvqa.training.host_allocator import reuse_large_host_allocations

def faults():
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    for _ in range(10):
        torch.ones(10_000_000).sum()  # 40 MB, above glibc's default 32 MiB mmap ceiling
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before

faults()
default = faults()
applied = reuse_large_host_allocations()
faults()
reused = min(faults() for _ in range(3))  # the quietest of three rounds: the kernel may reclaim on a loaded machine
print(default, applied, reused, reuse_large_host_allocations())
"""


@pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="mallopt thresholds are glibc's")
def test_large_temporaries_are_reused_rather_than_faulted_in_again():
    completed = subprocess.run([sys.executable, "-c", PAGE_FAULTS_OF_REPEATED_40MB_TEMPORARIES],
                               capture_output=True, text=True, check=True, timeout=120)
    default, applied, reused, applied_again = completed.stdout.split()
    import resource  # Unix only; the test runs on glibc alone

    block_pages = 40_000_000 // resource.getpagesize()
    assert int(default) > 9 * block_pages  # every 40 MB block faulted in anew
    assert applied == applied_again == "True"
    # Reused: none here; one block of five was once faulted in again on a loaded CI machine, hence the margin.
    assert int(reused) < 1.5 * block_pages
