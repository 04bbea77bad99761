"""ran.train.allocator: freed activations are reused by the next allocation instead of being paged in
again."""

from __future__ import annotations

import resource
import subprocess
import sys

import pytest

from ran.train.allocator import keep_freed_memory

PROBE = """
import resource, sys, torch
from ran.train.allocator import keep_freed_memory
print(keep_freed_memory())
faults = []
for step in range(4):  # a training step's pattern: activations of several sizes alive together, then freed
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    shapes = ((64, 32), (16, 32), (128, 16), (32, 16), (256, 8))
    acts = [torch.empty(64, c, s, s).fill_(1.0) for c, s in shapes for _ in range(6)]
    del acts
    faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
print(",".join(map(str, faults)))
"""


def run_probe(env_value: str) -> tuple[str, list[int]]:
    import os

    env = dict(os.environ, RAN_MALLOC_TUNING=env_value)
    out = subprocess.run([sys.executable, "-c", PROBE], env=env, capture_output=True, text=True, check=True)
    applied, faults = out.stdout.split()
    return applied, [int(f) for f in faults.split(",")]


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's mallopt: Linux only")
def test_freed_activations_are_reused_without_page_faults():
    applied, faults = run_probe("1")
    assert applied == "True"
    assert faults[0] > 40_000  # the first step pages its 210 MB of activations in (4 KiB a fault)
    assert (
        sum(faults[1:]) < 0.2 * faults[0]
    )  # the next three steps reuse them (at most a block or two faults)
    # Without the setting, glibc hands the freed blocks back to the kernel and later steps fault them in again
    # (on this machine's glibc the next two steps fault about as often as the first).
    applied, untuned = run_probe("0")
    assert applied == "False"
    assert sum(untuned[1:]) > 0.5 * untuned[0]


def test_the_setting_is_applied_once_per_process():
    assert keep_freed_memory() is keep_freed_memory()
    assert resource.getrusage(resource.RUSAGE_SELF).ru_minflt > 0
