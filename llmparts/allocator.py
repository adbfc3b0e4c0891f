"""Keep the C heap's freed memory for reuse during CPU inference (glibc's ``mallopt``).

A forward pass allocates and frees its activations layer after layer: for a 512-token prompt a few
to tens of MB per layer. PyTorch's CPU tensors come from ``malloc`` (``posix_memalign``). glibc
gives the top of its heap back to the kernel whenever more than ``M_TRIM_THRESHOLD`` bytes there are
free, and serves blocks of ``M_MMAP_THRESHOLD`` bytes or more with a mapping of their own that
``free`` unmaps; both start at 128 KiB and only grow once the process frees a large mapped block.
Until then every layer's temporaries land on fresh pages, which the kernel faults in and zeroes one
by one. Measured here (2 cores, a Qwen3-MoE of 8 layers, d_model 512, float32): 45,000 page faults
(180 MB) and 0.06-0.13 s of system time per 512-token prefill of 0.24-0.30 s; with the thresholds
below, none. Which behaviour a process gets otherwise depends on what it happened to allocate and
free before: a transformers process loading the same model got the fast one (10-340 faults per
prefill), while llmparts' loader, which reads straight into the parameters, frees no large block.

:func:`keep_freed_memory` sets the thresholds to the largest values glibc's own adaptive rule would
reach (mapping from 32 MiB up, trimming above 64 MiB free), once per process. ``build_model`` and
``load_pretrained`` call it when they place a model on the CPU; they allocate the weights, and
``make_cache`` the KV cache buffers, inside :func:`long_lived`, so that those still get mappings of
their own. It does nothing where it would not apply or where the user chose otherwise: outside
Linux/glibc, with ``LLMPARTS_TUNE_MALLOC=0``, when glibc's malloc is already configured through the
environment (``MALLOC_*_`` variables or ``GLIBC_TUNABLES=glibc.malloc...``), or when another
allocator is preloaded (jemalloc, tcmalloc, mimalloc). The cost: freed blocks under 32 MiB stay in
the process for reuse (at most 64 MiB of them at the top of the heap) instead of going back to the
kernel.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import sys
import threading
from collections.abc import Iterator
from typing import Any

import torch

ENV = "LLMPARTS_TUNE_MALLOC"
MMAP_THRESHOLD = 32 * 2**20  # glibc's largest mmap threshold on 64-bit (DEFAULT_MMAP_THRESHOLD_MAX)
LONG_LIVED_MMAP_THRESHOLD = 128 * 2**10  # glibc's initial one: for weights and caches
TRIM_THRESHOLD = 2 * MMAP_THRESHOLD  # the trim threshold glibc's rule pairs with it
M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3  # <malloc.h>
_USER_SETTINGS = ("MALLOC_TRIM_THRESHOLD_", "MALLOC_MMAP_THRESHOLD_", "MALLOC_TOP_PAD_", "MALLOC_MMAP_MAX_")
_OTHER_ALLOCATORS = ("jemalloc", "tcmalloc", "mimalloc")

_applied: bool | None = None
_mallopt: Any = None
_lock = threading.Lock()
_long_lived_depth = 0


def keep_freed_memory() -> bool:
    """Raise glibc's trim and mmap thresholds once per process (see the module docstring).

    Returns whether the thresholds are (now) set by llmparts; False where it does not apply."""
    global _applied
    if _applied is None:
        _applied = _set_thresholds()
    return _applied


@contextlib.contextmanager
def long_lived(device: torch.device | str | None) -> Iterator[None]:
    """Allocations on the CPU inside get mappings of their own again from 128 KiB up (and
    :func:`keep_freed_memory` is in effect after): for a model's weights and its KV cache buffers,
    which live long and are freed together, so that deleting them returns their memory to the kernel
    instead of leaving it in a heap that only shrinks from the top (measured: with its weights in the
    heap, deleting a float32 Qwen3-0.6B after one forward left 2.0 of its 2.4 GB in the process;
    mapped, all of it went back). Does nothing for other devices. Nests, and may be entered by
    several threads at once: the threshold goes back up when the last one leaves."""
    global _long_lived_depth
    if torch.device(device or "cpu").type != "cpu" or not keep_freed_memory():
        yield
        return
    with _lock:
        if _long_lived_depth == 0:
            _mallopt(M_MMAP_THRESHOLD, LONG_LIVED_MMAP_THRESHOLD)
        _long_lived_depth += 1
    try:
        yield
    finally:
        with _lock:
            _long_lived_depth -= 1
            if _long_lived_depth == 0:
                _mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD)


def _set_thresholds() -> bool:
    global _mallopt
    if os.environ.get(ENV, "1").strip().lower() in ("0", "false", "no", "off"):
        return False
    if not sys.platform.startswith("linux"):
        return False
    if any(k in os.environ for k in _USER_SETTINGS) or "glibc.malloc" in os.environ.get("GLIBC_TUNABLES", ""):
        return False  # the user configured malloc
    if any(name in os.environ.get("LD_PRELOAD", "") for name in _OTHER_ALLOCATORS):
        return False  # malloc is not glibc's
    mallopt = glibc_mallopt()
    if mallopt is None:
        return False
    _mallopt = mallopt
    return bool(mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD)) and bool(mallopt(M_TRIM_THRESHOLD, TRIM_THRESHOLD))


def glibc_mallopt() -> Any:
    """glibc's ``mallopt(param, value)`` through ctypes, or None where the C library is not glibc
    (musl's ``mallopt`` ignores these parameters) or cannot be loaded."""
    try:
        libc = ctypes.CDLL(None)
        libc.gnu_get_libc_version  # noqa: B018 - glibc only
        mallopt = libc.mallopt
    except (OSError, AttributeError, TypeError):  # (TypeError: CDLL(None) on Windows)
        return None
    mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
    mallopt.restype = ctypes.c_int
    return mallopt
