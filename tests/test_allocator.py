"""llmparts.allocator: building or loading a model on the CPU makes glibc keep freed activation memory
for reuse, so repeated large temporaries stop costing page faults; every opt-out leaves malloc alone.
Each case runs in a fresh interpreter (the thresholds are per process and cannot be unset)."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from llmparts import allocator

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's mallopt is Linux-only")

# Build a tiny model on the CPU, then 8 times allocate and fill six 4 MiB tensors and free them (as each
# layer of a prefill does with its activations), counting the page faults of the last 5 rounds. With
# glibc's initial thresholds each of them is mapped and unmapped, every page faulted in every round;
# after glibc adapted them to a freed 4 MiB block, they come from a heap whose top is trimmed every
# round; what a given process has depends on what it freed before.
SCRIPT = r"""
import resource, sys, torch
from llmparts import build_model
from llmparts import allocator
build_model("tiny/qwen3", dtype=torch.float32)
if len(sys.argv) > 1:  # mutation check: glibc's initial thresholds (128 KiB, no adaptation)
    mallopt = allocator.glibc_mallopt()
    mallopt(allocator.M_MMAP_THRESHOLD, 128 * 1024), mallopt(allocator.M_TRIM_THRESHOLD, 128 * 1024)
def faults():
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt
def churn():
    ts = [torch.empty(2**20).fill_(1.0) for _ in range(6)]
    del ts
for _ in range(3):
    churn()
f0 = faults()
for _ in range(5):
    churn()
print(allocator._applied, faults() - f0)
"""


def _clean_env(**env: str) -> dict[str, str]:
    clean = {k: v for k, v in os.environ.items()
             if k != "LLMPARTS_TUNE_MALLOC" and not k.startswith("MALLOC_") and k not in ("GLIBC_TUNABLES", "LD_PRELOAD")}
    return {**clean, **env}


def _run(*args: str, **env: str) -> tuple[str, int]:
    res = subprocess.run([sys.executable, "-c", SCRIPT, *args], capture_output=True, text=True, env=_clean_env(**env),
                         timeout=120)
    assert res.returncode == 0, res.stderr[-3000:]
    applied, faults = res.stdout.split()
    return applied, int(faults)


@pytest.mark.skipif(allocator.glibc_mallopt() is None, reason="needs glibc")
def test_cpu_model_makes_malloc_reuse_freed_memory():
    applied, faults = _run()
    assert applied == "True"
    assert faults < 6144  # less than one round of fresh pages (each would be 6144 faults)
    applied, faults = _run("defaults")  # shows the test can fail
    assert faults >= 5 * 6144 * 0.9


# Weights (126 MB in tensors of 0.25-2 MiB, below the raised mmap threshold) are still mapped on their own, so
# deleting the model gives them back to the kernel even though activations were allocated after them.
WEIGHTS = r"""
import gc, sys, torch
from llmparts import allocator, build_model
if len(sys.argv) > 1:  # mutation check: weights from the heap like activations
    allocator.LONG_LIVED_MMAP_THRESHOLD = allocator.MMAP_THRESHOLD
def rss():
    return int(open("/proc/self/statm").read().split()[1]) * 4096
before = rss()
model = build_model("tiny/qwen3", ["d_model=512", "n_layers=16", "mlp.hidden_dim=1024", "attention.head_dim=64"])
weights = sum(p.nbytes for p in model.parameters())
with torch.no_grad():
    model(torch.randint(0, 256, (1, 64)))
loaded = rss()
del model
gc.collect()
print(allocator._applied, weights, loaded - before, loaded - rss())
"""


@pytest.mark.skipif(allocator.glibc_mallopt() is None, reason="needs glibc")
@pytest.mark.parametrize("heap", [False, True])
def test_deleting_a_model_returns_its_weights(heap):
    res = subprocess.run([sys.executable, "-c", WEIGHTS] + (["heap"] if heap else []), capture_output=True, text=True,
                         env=_clean_env(), timeout=120)
    assert res.returncode == 0, res.stderr[-3000:]
    applied, weights, grew, returned = res.stdout.split()
    assert applied == "True" and int(grew) >= int(weights) > 100e6
    if heap:  # shows the test can fail: weights in the heap stay in the process
        assert int(returned) < 0.5 * int(weights)
    else:
        assert int(returned) >= 0.95 * int(weights)


@pytest.mark.parametrize("env", [{"LLMPARTS_TUNE_MALLOC": "off"}, {"MALLOC_TRIM_THRESHOLD_": "131072"},
                                 {"GLIBC_TUNABLES": "glibc.malloc.trim_threshold=131072"}])
def test_user_settings_are_left_alone(env):
    applied, _ = _run(**env)
    assert applied == "False"


NESTED = r"""
import torch
from llmparts import allocator
from llmparts.allocator import long_lived
assert allocator.keep_freed_memory()
calls = []
real = allocator._mallopt
allocator._mallopt = lambda opt, value: calls.append((opt, value)) or real(opt, value)
with long_lived("cpu"):
    with long_lived(None):
        pass
    assert calls == [(allocator.M_MMAP_THRESHOLD, allocator.LONG_LIVED_MMAP_THRESHOLD)], calls  # still lowered after the inner one
with long_lived("meta"):
    pass
M = allocator.M_MMAP_THRESHOLD
print(calls == [(M, allocator.LONG_LIVED_MMAP_THRESHOLD), (M, allocator.MMAP_THRESHOLD)])
"""


@pytest.mark.skipif(allocator.glibc_mallopt() is None, reason="needs glibc")
def test_long_lived_nests():
    res = subprocess.run([sys.executable, "-c", NESTED], capture_output=True, text=True, env=_clean_env(), timeout=120)
    assert res.returncode == 0, res.stderr[-3000:]
    assert res.stdout.split() == ["True"]
