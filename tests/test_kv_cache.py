"""KV cache exactness on a tiny model: one full forward == prefill + decode, with full and
sliding-window layers, chunked prefill, cache reuse after reset, left padding, and capacity errors."""

from __future__ import annotations

import pytest
import torch

import llmparts
from llmparts import CacheError

VOCAB, W, TOL = 64, 4, 1e-5

VARIANTS = {
    "sdpa": {},
    "eager": {"sinks": True, "softcap": 8.0},  # sinks and soft-capping take the eager path
}


def config(window: int | None = None, variant: str = "sdpa", max_seq_len: int = 64) -> dict:
    cfg = {
        "vocab_size": VOCAB, "d_model": 32, "n_layers": 4, "max_seq_len": max_seq_len, "init_std": 0.1,
        "attention": {"type": "gqa", "n_heads": 4, "n_kv_heads": 2, "head_dim": 8, "qk_norm": "per_head",
                      **VARIANTS[variant]},
        "position": {"type": "rope", "theta": 10000.0},
        "norm": {"type": "rmsnorm", "eps": 1e-6},
        "mlp": {"type": "gated", "hidden_dim": 64, "activation": "silu"},
    }
    if window is not None:  # layers 0 and 2 slide, 1 and 3 attend to everything
        cfg["overrides"] = [{"layers": [0, 2], "attention": {"window": window}}]
    return cfg


def tiny_model(window: int | None = None, variant: str = "sdpa", max_seq_len: int = 64):
    model = llmparts.build_model(config(window, variant, max_seq_len), seed=0).eval()
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():  # non-trivial norm weights and sinks
        for name, p in model.named_parameters():
            if "norm" in name:
                p.mul_(1 + 0.3 * torch.randn(p.shape, generator=gen))
            elif name.endswith("sinks"):
                p.copy_(torch.randn(p.shape, generator=gen))
    windows = [b.attn.spec.window for b in model.layers]
    assert windows == ([None] * 4 if window is None else [window, None, window, None])
    return model


def max_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    assert a.shape == b.shape, (a.shape, b.shape)
    return (a - b).abs().max().item()


def run_chunks(model, ids: torch.Tensor, chunks: list[int], cache=None) -> torch.Tensor:
    """Feed ids through the cache in consecutive chunks; concatenate the logits."""
    assert sum(chunks) == ids.shape[1]
    cache = cache if cache is not None else model.make_cache(ids.shape[0], 48)
    out, t = [], 0
    for n in chunks:
        out.append(model(ids[:, t : t + n], cache=cache))
        t += n
    assert cache.length == ids.shape[1]
    return torch.cat(out, 1)


def prefill_then_decode(model, ids, prefill: int, cache=None) -> torch.Tensor:
    return run_chunks(model, ids, [prefill] + [1] * (ids.shape[1] - prefill), cache)


def ids_for(T: int, B: int = 2, seed: int = 0) -> torch.Tensor:
    return torch.randint(0, VOCAB, (B, T), generator=torch.Generator().manual_seed(seed))


# --------------------------------------------------------------------------- (a) full attention
@pytest.mark.parametrize("variant", list(VARIANTS))
@pytest.mark.parametrize("prefill", [1, 5, 17])
def test_full_attention_prefill_decode(variant, prefill):
    model = tiny_model(None, variant)
    ids = ids_for(17)
    with torch.no_grad():
        full = model(ids)
        cached = prefill_then_decode(model, ids, prefill)
    assert max_diff(cached, full) <= TOL


# ------------------------------------------------------------------ (b) sliding + full layers
SLIDING_CASES = [  # (total length, prefill length); 2 * W = 8
    (6, 1), (6, 3), (6, 6),  # shorter than 2W
    (8, 1), (8, 4), (8, 5),  # equal to 2W (prefill 5 > W)
    (13, 1), (13, 3), (13, 4), (13, 6), (13, 9), (13, 13),  # longer than 2W; prefills longer than W
]


@pytest.mark.parametrize("variant", list(VARIANTS))
@pytest.mark.parametrize("total,prefill", SLIDING_CASES)
def test_sliding_window_prefill_decode(variant, total, prefill):
    model = tiny_model(W, variant)
    ids = ids_for(total, seed=total * 31 + prefill)
    with torch.no_grad():
        full = model(ids)
        cached = prefill_then_decode(model, ids, prefill)
    assert max_diff(cached, full) <= TOL


def test_a_first_prefill_attends_to_its_own_keys_only():
    """An empty ring adds no keys: a first prefill of up to W tokens is plain causal attention over its
    own keys (SDPA's fast path, as without a cache), a longer one the window's mask over them; a later
    chunk attends over the ring and its own keys."""
    model = tiny_model(W)
    for T, causal in ((W, True), (W + 3, False)):
        cache = model.make_cache(1, 48)
        plan = cache.begin(torch.arange(T)[None], True)[W]
        assert plan.k_pos.shape == (1, T) and not plan.ring
        assert plan.is_causal == causal and (plan.mask is None) == causal
        assert causal or plan.mask.shape == (1, 1, T, T)
        cache.commit(torch.arange(T)[None])
        plan = cache.begin(torch.arange(T, T + 2)[None], True)[W]
        assert plan.ring and plan.k_pos.shape == (1, W + 2) and plan.mask.shape == (1, 1, 2, W + 2)


def test_sliding_window_is_active():
    """The window matters: a token more than W back changes the logits of the full model only
    through the full-attention layers, so the windowed model differs from the all-full one."""
    ids = ids_for(13)
    with torch.no_grad():
        windowed = tiny_model(W)(ids)
        full = tiny_model(None)(ids)
    assert max_diff(windowed[:, :W], full[:, :W]) <= TOL  # identical before the window is exceeded
    assert max_diff(windowed[:, W:], full[:, W:]) > 1e-3


@pytest.mark.parametrize("windows", [(1,), (3, 5)], ids=["window-1", "windows-3-5"])
@pytest.mark.parametrize("chunks", [[1] * 14, [5] + [1] * 9, [3, 6, 2, 3]], ids=["decode", "prefill5", "chunks"])
def test_several_window_sizes(windows, chunks):
    """Layer 0 with window windows[0], layer 2 with windows[-1] (two rings when they differ)."""
    cfg = config(None)
    cfg["overrides"] = [{"layers": [0], "attention": {"window": windows[0]}},
                        {"layers": [2], "attention": {"window": windows[-1]}}]
    model = llmparts.build_model(cfg, seed=0).eval()
    ids = ids_for(14, seed=7)
    with torch.no_grad():
        full = model(ids)
        cache = model.make_cache(2, 32)
        cached = run_chunks(model, ids, chunks, cache)
    assert sorted(cache.ring_pos) == sorted(set(windows))
    assert max_diff(cached, full) <= TOL


# ------------------------------------------------------------------------- (c) chunked prefill
CHUNKS = [
    [3, 5, 2, 6, 1, 4],  # mixed, some shorter and some longer than W
    [2, 7, 3, 9],  # chunks longer than W after a non-empty cache
    [4, 4, 4, 4, 4],  # exactly W each
    [1, 1, 6, 1, 1, 5, 1],  # decode steps between multi-token chunks
]


@pytest.mark.parametrize("variant", list(VARIANTS))
@pytest.mark.parametrize("window", [None, W])
@pytest.mark.parametrize("chunks", CHUNKS, ids=lambda c: "-".join(map(str, c)))
def test_chunked_prefill(variant, window, chunks):
    model = tiny_model(window, variant)
    ids = ids_for(sum(chunks), seed=len(chunks))
    with torch.no_grad():
        full = model(ids)
        cached = run_chunks(model, ids, chunks)
    assert max_diff(cached, full) <= TOL


# ------------------------------------------------------------------------------ (d) reset/reuse
@pytest.mark.parametrize("variant", list(VARIANTS))
@pytest.mark.parametrize("window", [None, W])
def test_cache_reuse_after_reset(variant, window):
    model = tiny_model(window, variant)
    first, second = ids_for(19, seed=1), ids_for(11, seed=2)
    with torch.no_grad():
        cache = model.make_cache(2, 32)
        prefill_then_decode(model, first, 7, cache)
        cache.reset()
        assert cache.length == 0
        reused = prefill_then_decode(model, second, 3, cache)
        fresh = prefill_then_decode(model, second, 3, model.make_cache(2, 32))
        full = model(second)
    assert torch.equal(reused, fresh)
    assert max_diff(reused, full) <= TOL


@pytest.mark.parametrize("window", [None, W])
def test_cache_reuse_after_padded_sequence(window):
    """A padded (non-contiguous) sequence, reset, then a plain one continuing without explicit pos."""
    model = tiny_model(window)
    with torch.no_grad():
        cache = model.make_cache(2, 32)
        ids = ids_for(9, seed=3)
        mask = torch.ones_like(ids)
        mask[0, :4] = 0
        model(ids, cache=cache, attention_mask=mask)
        cache.reset()
        second = ids_for(10, seed=4)
        reused = prefill_then_decode(model, second, 4, cache)
        full = model(second)
    assert max_diff(reused, full) <= TOL


# ---------------------------------------------------------------------------- (e) left padding
LENGTHS = [9, 5, 7]  # row lengths; padded on the left to 9


def padded_batch(lengths=LENGTHS, seed=5):
    rows = [ids_for(n, B=1, seed=seed + i)[0] for i, n in enumerate(lengths)]
    T = max(lengths)
    ids = torch.zeros(len(rows), T, dtype=torch.long)
    mask = torch.zeros(len(rows), T, dtype=torch.long)
    for i, r in enumerate(rows):
        ids[i, T - len(r):] = r
        mask[i, T - len(r):] = 1
    return rows, ids, mask


@pytest.mark.parametrize("variant", list(VARIANTS))
@pytest.mark.parametrize("window", [None, W])
def test_left_padding_full_forward(variant, window):
    model = tiny_model(window, variant)
    rows, ids, mask = padded_batch()
    T = ids.shape[1]
    with torch.no_grad():
        batched = model(ids, attention_mask=mask)
        for i, r in enumerate(rows):
            alone = model(r[None])
            assert max_diff(batched[i, T - len(r):], alone[0]) <= TOL


@pytest.mark.parametrize("variant", list(VARIANTS))
@pytest.mark.parametrize("window", [None, W])
@pytest.mark.parametrize("prefill_chunks", [[9], [9, 1, 1, 1, 1, 1, 1]], ids=["prefill", "prefill+decode"])
def test_left_padding_with_cache(variant, window, prefill_chunks):
    """Padded prefill through the cache, then per-row decode with explicit positions."""
    model = tiny_model(window, variant)
    rows, ids, mask = padded_batch()
    B, T = ids.shape
    extra = sum(prefill_chunks) - T
    cont = ids_for(extra, B=B, seed=9) if extra else torch.zeros(B, 0, dtype=torch.long)
    with torch.no_grad():
        cache = model.make_cache(B, 32)
        outs = [model(ids, cache=cache, attention_mask=mask)]
        next_pos = mask.sum(-1)  # per row: the position after its last real token
        for t in range(extra):
            outs.append(model(cont[:, t : t + 1], cache=cache, pos=next_pos[:, None] + t))
        cached = torch.cat(outs, 1)
        for i, r in enumerate(rows):
            alone = model(torch.cat((r, cont[i]))[None])
            assert max_diff(cached[i, T - len(r):], alone[0]) <= TOL


@pytest.mark.parametrize("variant", list(VARIANTS))
@pytest.mark.parametrize("window", [None, W])
def test_left_padding_then_chunks_with_explicit_pos(variant, window):
    """Padded prefill, then multi-token chunks and decode steps with explicit (B, T) positions."""
    model = tiny_model(window, variant)
    rows, ids, mask = padded_batch()
    B, T = ids.shape
    cont = ids_for(6, B=B, seed=11)
    nxt = mask.sum(-1)[:, None]
    with torch.no_grad():
        cache = model.make_cache(B, 32)
        outs = [model(ids, cache=cache, attention_mask=mask)]
        outs.append(model(cont[:, :3], cache=cache, pos=nxt + torch.arange(3)))
        outs.append(model(cont[:, 3:4], cache=cache, pos=nxt + 3))
        outs.append(model(cont[:, 4:6], cache=cache, pos=nxt + 4 + torch.arange(2)))
        cached = torch.cat(outs, 1)
        for i, r in enumerate(rows):
            alone = model(torch.cat((r, cont[i]))[None])
            assert max_diff(cached[i, T - len(r):], alone[0]) <= TOL


@pytest.mark.parametrize("window", [None, W])
@pytest.mark.parametrize("start", [0, 3])
def test_explicit_positions_match_implicit(window, start):
    """Positions given as an int start, as a tensor (non-contiguous path), or continued by the cache."""
    model = tiny_model(window)
    ids = ids_for(12)
    with torch.no_grad():
        full = model(ids, pos=start)
        cache = model.make_cache(2, 32)
        implicit = [model(ids[:, :5], cache=cache, pos=start)]  # later steps continue from the cache
        implicit += [model(ids[:, t : t + 1], cache=cache) for t in range(5, 12)]
        cache = model.make_cache(2, 32)
        explicit = [model(ids[:, :5], cache=cache, pos=torch.arange(5) + start)]
        explicit += [model(ids[:, t : t + 1], cache=cache, pos=torch.tensor([t + start])) for t in range(5, 12)]
    assert max_diff(torch.cat(implicit, 1), full) <= TOL
    assert max_diff(torch.cat(explicit, 1), full) <= TOL


# --------------------------------------------------------------------------------- (f) capacity
@pytest.mark.parametrize("window", [None, W])
def test_overfilling_raises_cache_error(window):
    model = tiny_model(window)
    ids = ids_for(12, B=1)
    with torch.no_grad():
        cache = model.make_cache(1, 10)
        with pytest.raises(CacheError):
            model(ids[:, :11], cache=cache)  # one prefill beyond capacity
        assert cache.length == 0
        model(ids[:, :6], cache=cache)
        with pytest.raises(CacheError):
            model(ids[:, 6:11], cache=cache)  # chunk crossing the capacity
        for t in range(6, 10):  # fill exactly to capacity
            model(ids[:, t : t + 1], cache=cache)
        assert cache.length == 10
        with pytest.raises(CacheError):
            model(ids[:, 10:11], cache=cache)  # one decode step too many
        cache.reset()
        model(ids[:, :10], cache=cache)  # usable again after reset


def test_cache_batch_size_mismatch_raises():
    model = tiny_model()
    cache = model.make_cache(2, 8)
    with torch.no_grad(), pytest.raises(CacheError):
        model(ids_for(3, B=1), cache=cache)


def test_cache_error_is_llmparts_error():
    assert issubclass(CacheError, llmparts.LLMPartsError)


def test_labels_with_last_only_raise_before_the_cache_records_anything():
    model = tiny_model()
    ids = ids_for(5, B=1)
    cache = model.make_cache(1, 8)
    with pytest.raises(llmparts.InputError, match="last_only"):
        model(ids, cache=cache, labels=ids, last_only=True)
    assert cache.length == 0 and bool((cache.slot_pos == -1).all())
    with torch.no_grad():
        model(ids, cache=cache)  # the cache is still usable from position 0
    assert cache.length == 5


def test_a_cache_must_fit_the_model_and_is_left_usable_when_refused():
    """A cache of another model (other windows, depth or head layout), dtype or device, or not a cache
    at all, is refused by name before anything is written; the cache still serves its own model."""
    from llmparts import ConfigError, InputError

    model, other = tiny_model(window=8), tiny_model()
    ids = ids_for(6)
    cache = model.make_cache(2, 32)
    model(ids, cache=cache)
    for bad in (other.make_cache(2, 32), llmparts.build_model(config(window=8), seed=0).to(torch.float64).make_cache(2, 32)):
        with pytest.raises(InputError, match="make one with this model's make_cache"):
            model(ids[:, :1], cache=bad)
    with pytest.raises(InputError, match="cache must be a KVCache"):
        model(ids[:, :1], cache={"layers": []})
    with pytest.raises(InputError, match="input_ids must be a .B, T. tensor"):
        model([[1, 2]], cache=cache)
    with pytest.raises(InputError, match="attention_mask must be a .B, T. tensor"):
        model(ids, attention_mask=[[1] * 6] * 2)
    for pos, match in (("6", "got str"), (True, "got bool"), (torch.tensor([[6.9], [6.9]]), "integer positions, got dtype")):
        with pytest.raises(InputError, match=match):
            model(ids[:, :1], cache=cache, pos=pos)
    assert not cache.incomplete
    step = model(ids[:, :1], cache=cache)  # the refusals changed nothing
    full = model(torch.cat((ids, ids[:, :1]), 1))
    assert max_diff(step[:, -1], full[:, -1]) <= 1e-5
    with pytest.raises(ConfigError, match="'bogus' is not a torch device"):
        model.make_cache(1, device="bogus")
    with pytest.raises(InputError, match="meta device holds no data"):
        model.make_cache(1, device="meta")
    if not torch.backends.mps.is_available():
        with pytest.raises(ConfigError, match="not available in this torch build or on this machine"):
            model.make_cache(1, device="mps")
