"""KV caches, passed to the model explicitly: ``model(ids, cache=cache, pos=pos)``.

The cache is a sequence of *slots* shared by the batch; each forward of T tokens fills T slots.
Every slot records the absolute position of the token it holds for every row (-1 = empty or
padding), so masks are always built from absolute positions (:mod:`llmparts.masks`):

* full-attention layers keep a preallocated buffer, written at slots ``[length, length + T)``;
* sliding-window layers keep a ring buffer of W slots (W = window), enough for the W - 1 past keys a
  window of W can see plus the current one. A multi-token step attends over ``ring + new`` and then
  keeps the last W tokens, so a prefill longer than the window and decoding past it are both exact.

Post-RoPE keys are stored. One cache may be reused for a new sequence after :meth:`KVCache.reset`.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Any

import torch

from .allocator import long_lived
from .errors import CacheError
from .masks import visible


@dataclass
class StepPlan:
    """What the layers sharing one window need for one forward: key positions and mask."""

    window: int | None
    mask: torch.Tensor | None  # (B, 1, T, S) bool, or None when `is_causal` or all keys are visible
    is_causal: bool
    k_pos: torch.Tensor  # (B, S)
    write: torch.Tensor | None = None  # slots written this step (cache only; ring slots for a window)
    n_keep: int = 0  # how many of the T new tokens the ring keeps
    ring: bool = True  # (window) whether the keys attended are the ring's then the new ones, or only the new ones


def plan_without_cache(q_pos: torch.Tensor, window: int | None, contiguous: bool) -> StepPlan:
    """Plan for a forward without a cache: the keys are the queries themselves."""
    T = q_pos.shape[1]
    if contiguous and (window is None or T <= window):
        return StepPlan(window, None, T > 1, q_pos)  # plain causal: SDPA's fast path
    return StepPlan(window, visible(q_pos, q_pos, window), False, q_pos)


class LayerKV:
    """Key/value storage for one layer: a full buffer (window None) or a ring of W slots."""

    def __init__(self, window: int | None, n_slots: int, B: int, n_kv: int, k_dim: int, v_dim: int,
                 dtype: torch.dtype, device: torch.device | str | None) -> None:
        self.window = window
        # A full buffer is only ever read up to the cached length: left uninitialised (no zero-fill
        # pass over a long cache). A ring is read whole, masked: zeros keep 0 * value finite.
        alloc = torch.empty if window is None else torch.zeros
        self.k = alloc(B, n_kv, n_slots, k_dim, dtype=dtype, device=device)
        self.v = alloc(B, n_kv, n_slots, v_dim, dtype=dtype, device=device)
        self.marked_dynamic = False  # whether a compiled decode step marked the slot dim dynamic

    def step_buffers(self, plan: StepPlan, start: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, int]:
        """For a one-token step whose key/value the caller writes (a compiled decode step): the whole
        (B, K, slots, D) buffers, the slot (1,) this token goes to along dim 2, and how many leading
        slots the query attends over — ``k.index_copy_(2, write, new_k)[:, :, :n]`` is :meth:`update`."""
        return self.k, self.v, plan.write, (start + 1 if self.window is None else self.k.shape[2])

    def update(self, k: torch.Tensor, v: torch.Tensor, plan: StepPlan, start: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Store this step's (B, H, T, D) keys/values; return everything the queries attend over."""
        T = k.shape[2]
        if self.window is None:
            self.k[:, :, start : start + T] = k
            self.v[:, :, start : start + T] = v
            return self.k[:, :, : start + T], self.v[:, :, : start + T]
        if T == 1:  # the slot overwritten held a key exactly W positions back: already invisible
            self.k[:, :, plan.write] = k
            self.v[:, :, plan.write] = v
            return self.k, self.v
        k_all, v_all = (torch.cat((self.k, k), dim=2), torch.cat((self.v, v), dim=2)) if plan.ring else (k, v)
        self.k[:, :, plan.write] = k[:, :, T - plan.n_keep :]
        self.v[:, :, plan.write] = v[:, :, T - plan.n_keep :]
        return k_all, v_all


class KVCache:
    """Cache for a whole model. Build it with ``model.make_cache(batch_size, max_seq_len)``.

    Args:
        windows: per layer, the attention window (None for full attention).
        dims: per layer, ``(n_kv_heads, key_dim, value_dim)``.
        batch_size, max_seq_len: capacity; full layers hold max_seq_len slots.
    """

    def __init__(self, windows: list[int | None], dims: list[tuple[int, int, int]], batch_size: int,
                 max_seq_len: int, dtype: torch.dtype, device: torch.device | str | None = None) -> None:
        if batch_size < 1 or max_seq_len < 1:
            raise CacheError(f"batch_size and max_seq_len must be >= 1, got {batch_size}, {max_seq_len}")
        self.batch_size, self.max_seq_len = batch_size, max_seq_len
        with long_lived(device):  # (CPU: buffers mapped on their own, returned to the kernel when freed)
            self.layers = [
                LayerKV(w, max_seq_len if w is None else w, batch_size, *d, dtype=dtype, device=device)
                for w, d in zip(windows, dims)
            ]
        self.windows = sorted({w for w in windows if w is not None})
        self.slot_pos = torch.full((batch_size, max_seq_len), -1, dtype=torch.long, device=device)
        self.ring_pos = {w: torch.full((batch_size, w), -1, dtype=torch.long, device=device) for w in self.windows}
        self.length = 0
        self.next_pos = 0  # the position that continues the sequence contiguously
        self.contiguous = True  # every slot so far holds position == slot index + offset, no padding
        self.incomplete = False  # a forward began writing and did not commit (it raised or was interrupted)
        self.fits: Any = None  # weakref to the model whose layout this cache was checked against

    def reset(self) -> None:
        """Forget every token; the buffers are kept for the next sequence."""
        self.slot_pos.fill_(-1)
        for r in self.ring_pos.values():
            r.fill_(-1)
        self.length, self.next_pos, self.contiguous, self.incomplete = 0, 0, True, False

    def begin(self, q_pos: torch.Tensor, contiguous: bool) -> dict[int | None, StepPlan]:
        """Record the positions of T new tokens and plan the step for every window kind.

        ``contiguous``: the caller guarantees q_pos is ``arange(next_pos, next_pos + T)`` in every row.
        """
        B, T = q_pos.shape
        if self.incomplete:
            raise CacheError("this cache holds a partly written step: a forward that used it raised or was "
                             "interrupted after writing some layers (sliding-window rings may have lost keys); "
                             "call cache.reset() and run the prompt again")
        if B != self.batch_size:
            raise CacheError(f"batch size {B} does not match the cache's batch_size {self.batch_size}")
        L = self.length
        if L + T > self.max_seq_len:
            raise CacheError(
                f"cache full: {L} tokens cached + {T} new > max_seq_len {self.max_seq_len}; "
                "make a larger cache (model.make_cache(batch_size, max_seq_len)) or reset() it"
            )
        self.incomplete = True  # until commit
        self.contiguous = self.contiguous and contiguous and (L == 0 or self.next_pos == int(q_pos[0, 0]))
        self.slot_pos[:, L : L + T] = q_pos
        plans: dict[int | None, StepPlan] = {}
        k_pos = self.slot_pos[:, : L + T]
        write = torch.arange(L, L + T, device=q_pos.device)
        if self.contiguous:  # causal by slot order: no mask for decode, SDPA's causal flag for prefill
            plans[None] = StepPlan(None, None, T > 1 and L == 0, k_pos, write)
            if T > 1 and L > 0:
                plans[None].mask = visible(q_pos, k_pos, None)
        else:
            plans[None] = StepPlan(None, visible(q_pos, k_pos, None), False, k_pos, write)
        for w in self.windows:
            ring = self.ring_pos[w]
            n_keep = min(T, w)
            write = torch.arange(L + T - n_keep, L + T, device=ring.device) % w
            if T == 1:
                ring[:, write] = q_pos
                plans[w] = StepPlan(w, visible(q_pos, ring, w), False, ring, write, n_keep)
            elif L == 0:  # an empty ring: the new keys alone, causal (SDPA's fast path) if the window cuts none
                ring[:, write] = q_pos[:, T - n_keep :]
                plans[w] = replace(plan_without_cache(q_pos, w, self.contiguous), write=write, n_keep=n_keep,
                                   ring=False)
            else:
                k_pos_w = torch.cat((ring, q_pos), dim=1)
                ring[:, write] = q_pos[:, T - n_keep :]
                plans[w] = StepPlan(w, visible(q_pos, k_pos_w, w), False, k_pos_w, write, n_keep)
        return plans

    def commit(self, q_pos: torch.Tensor) -> None:
        self.incomplete = False
        T = q_pos.shape[1]
        self.length += T
        self.next_pos = int(q_pos[0, -1]) + 1 if self.contiguous else -1

    def nbytes(self) -> int:
        return sum(layer.k.nbytes + layer.v.nbytes for layer in self.layers)
