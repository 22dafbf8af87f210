"""How a process reuses the memory it frees (hsic_ray.machine.keep_freed_memory), measured in fresh processes."""

import os
import subprocess
import sys

import pytest

from hsic_ray.machine import glibc_version

CHURN = """
import resource, sys
import numpy as np
from hsic_ray.machine import keep_freed_memory

applied = sys.argv[1] == "keep" and keep_freed_memory()

def step():  # a step's pattern: several large blocks at once, all freed by its end
    blocks = [np.ones(4 * 1024 * 1024, dtype=np.float32) for _ in range(3)]
    del blocks

step()
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for _ in range(10):
    step()
print(applied, (resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before) / 10)
"""


def _faults_per_step(mode: str) -> tuple[bool, float]:
    out = subprocess.run([sys.executable, "-c", CHURN, mode], capture_output=True, text=True, check=True).stdout
    applied, faults = out.split()
    return applied == "True", float(faults)


@pytest.mark.skipif(glibc_version() is None, reason="glibc's malloc only: other C libraries keep their own ways")
def test_a_process_that_keeps_freed_memory_takes_no_page_faults_for_a_repeated_step():
    applied, kept = _faults_per_step("keep")
    _, default = _faults_per_step("default")
    pages = 3 * 16 * 1024 * 1024 // os.sysconf("SC_PAGE_SIZE")  # what one step touches
    assert applied
    assert kept < 0.01 * pages, (kept, default)
    assert default > 10 * max(kept, 1), (kept, default)  # glibc's own way does fault: the test measures it
