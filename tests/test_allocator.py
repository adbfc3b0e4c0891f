"""llmparts.allocator: building or loading a model on the CPU makes glibc keep freed activation memory
for reuse, so repeated large temporaries stop costing page faults; every opt-out leaves malloc alone.
Each case runs in a fresh interpreter (the thresholds are per process and cannot be unset)."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch

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
# deleting the model gives them back to the kernel even though activations were allocated after them: through
# malloc's own mappings (huge pages off), or the huge-page mappings of the tensors of 2 MiB.
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
@pytest.mark.parametrize("heap,huge", [(False, "0"), (True, "0"), (False, "1")])
def test_deleting_a_model_returns_its_weights(heap, huge):
    res = subprocess.run([sys.executable, "-c", WEIGHTS] + (["heap"] if heap else []), capture_output=True, text=True,
                         env=_clean_env(LLMPARTS_HUGE_PAGES=huge), timeout=120)
    assert res.returncode == 0, res.stderr[-3000:]
    applied, weights, grew, returned = res.stdout.split()
    assert applied == "True" and int(grew) >= int(weights) > 100e6
    if heap:  # shows the test can fail: weights in the heap stay in the process
        assert int(returned) < 0.5 * int(weights)
    else:
        assert int(returned) >= 0.95 * int(weights)


def _vma_flags(address: int) -> list[str]:
    """The VmFlags of the mapping that holds ``address`` (/proc/self/smaps)."""
    inside = False
    with open("/proc/self/smaps") as f:
        for line in f:
            head = line.split(" ", 1)[0]
            if "-" in head and not line.startswith("VmFlags"):
                try:
                    lo, hi = (int(x, 16) for x in head.split("-"))
                except ValueError:
                    continue
                inside = lo <= address < hi
            elif inside and line.startswith("VmFlags:"):
                return line.split()[1:]
    raise AssertionError(f"no mapping holds {address:#x}")


@pytest.fixture
def huge_pages(monkeypatch):
    """Re-reads LLMPARTS_HUGE_PAGES (huge_page_size() is looked up once per process)."""
    def set_env(value: str) -> int | None:
        monkeypatch.setenv("LLMPARTS_HUGE_PAGES", value)
        monkeypatch.setattr(allocator, "_huge_page", False)
        return allocator.huge_page_size()
    yield set_env
    allocator._huge_page = False


def test_large_weights_and_caches_get_huge_pages(huge_pages):
    from llmparts import build_model

    size = huge_pages("1")
    if size is None:
        pytest.skip("this kernel has transparent huge pages disabled (or no THP): nothing to advise")
    model = build_model("tiny/qwen3", ["d_model=512", "n_layers=2", "mlp.hidden_dim=2048", "vocab_size=1024",
                                       "max_seq_len=2048", "attention.head_dim=128"])
    cache = model.make_cache(1, 2048)
    big = [model.layers[0].mlp.up_proj.weight, model.embed.weight, cache.layers[0].k]  # 4, 2, 4 MiB
    small = model.layers[0].attn.k_norm.weight
    for t in big:
        assert t.nbytes >= size and t.data_ptr() % size == 0
        assert t.untyped_storage().nbytes() == t.nbytes  # the storage is the tensor's own bytes, nothing more
        assert "hg" in _vma_flags(t.data_ptr())  # advised: MADV_HUGEPAGE
    assert "hg" not in _vma_flags(small.data_ptr())
    ids = torch.randint(0, 1024, (1, 8))
    with torch.no_grad():
        assert torch.isfinite(model(ids, cache=cache)).all()

    assert huge_pages("0") is None  # the opt-out; and shows the test can fail
    off = build_model("tiny/qwen3", ["d_model=512", "n_layers=1", "mlp.hidden_dim=2048", "vocab_size=1024"])
    assert "hg" not in _vma_flags(off.layers[0].mlp.up_proj.weight.data_ptr())


@pytest.mark.parametrize("shape,dtype", [((2048, 1024), torch.float32), ((3, 1024, 1024), torch.bfloat16),
                                         ((5, 7), torch.float32), ((0, 4096), torch.float16), ((), torch.float64)])
def test_long_lived_empty(huge_pages, shape, dtype):
    huge_pages("1")
    t = allocator.long_lived_empty(shape, dtype)
    assert t.shape == shape and t.dtype == dtype and t.device.type == "cpu" and t.is_contiguous()
    t.fill_(1.5)
    assert bool((t == 1.5).all())
    z = allocator.long_lived_empty(shape, dtype, zero=True)
    assert z.shape == shape and not z.any()
    assert allocator.long_lived_empty(shape, dtype, "meta").is_meta


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
