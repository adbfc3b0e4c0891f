"""Family adapters for OLMo 2, OLMo 3, SmolLM3, Mistral and Gemma 3 against transformers.

Tiny random transformers models (every layer kind present: sliding and full, RoPE and NoPE; windows
shorter than the test sequence) are saved with ``save_pretrained`` and loaded through
``llmparts.load_pretrained``, from the transformers-5 config.json and from hand-written 4.x forms.
Logits are compared in float32 with eager attention; run with ``-s`` to see the measured differences.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import transformers

import llmparts
from conftest import hf_reference, save_hf, to_legacy_layout
from llmparts import ModelConfig
from llmparts.loading import config_of
from llmparts.loading.export import save_pretrained
from llmparts.loading.families import HFConfig, family_for

TOL = 1e-4
SEQ = 80  # > 2 windows of 16, and long enough to reach the llama3/yarn-scaled frequency bands
WINDOW = 16
LAYOUTS = ["v5", "v4-type", "v4-rope_type"]

YARN = {"rope_type": "yarn", "rope_theta": 20000.0, "factor": 4.0, "original_max_position_embeddings": 32}
LLAMA3 = {"rope_type": "llama3", "rope_theta": 10000.0, "factor": 8.0, "low_freq_factor": 1.0,
          "high_freq_factor": 4.0, "original_max_position_embeddings": 32}

# name: (config class, model class, kwargs, layouts)
CASES = {
    "olmo2-gqa-untied": (transformers.Olmo2Config, transformers.Olmo2ForCausalLM, dict(
        num_attention_heads=4, num_key_value_heads=2, rms_norm_eps=1e-6,
        rope_parameters={"rope_type": "default", "rope_theta": 500.0}), LAYOUTS),
    "olmo2-mha-bias-tied-llama3": (transformers.Olmo2Config, transformers.Olmo2ForCausalLM, dict(
        num_attention_heads=4, num_key_value_heads=4, attention_bias=True, tie_word_embeddings=True,
        rope_parameters=LLAMA3), LAYOUTS),
    # layers 0-2 sliding (window 16), layer 3 full with YaRN; one RoPE base, as 4.x files can say
    "olmo3-yarn": (transformers.Olmo3Config, transformers.Olmo3ForCausalLM, dict(
        num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=1, sliding_window=WINDOW,
        rope_parameters={"full_attention": YARN, "sliding_attention": {"rope_type": "default", "rope_theta": 20000.0}}),
        LAYOUTS),
    # two RoPE bases and an explicit pattern: only the nested (5.x) layout can say this
    "olmo3-two-bases": (transformers.Olmo3Config, transformers.Olmo3ForCausalLM, dict(
        num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2, sliding_window=WINDOW,
        layer_types=["full_attention", "sliding_attention", "sliding_attention", "full_attention"],
        rope_parameters={"full_attention": {"rope_type": "default", "rope_theta": 100000.0},
                         "sliding_attention": {"rope_type": "default", "rope_theta": 1000.0}}), ["v5"]),
    # layer 3 NoPE (no_rope_layer_interval 4), tied head
    "smollm3-nope-tied": (transformers.SmolLM3Config, transformers.SmolLM3ForCausalLM, dict(
        num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2,
        rope_parameters={"rope_type": "default", "rope_theta": 50000.0}), LAYOUTS),
    # NoPE layers 1 and 3, which are also the sliding ones (use_sliding_window), untied head
    "smollm3-nope-sliding-untied": (transformers.SmolLM3Config, transformers.SmolLM3ForCausalLM, dict(
        num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=1, no_rope_layers=[1, 0, 1, 0],
        use_sliding_window=True, sliding_window=WINDOW, tie_word_embeddings=False, rope_parameters=LLAMA3),
        LAYOUTS),
    # every layer sliding; head_dim 24 != 64 / 4
    "mistral-window-headdim": (transformers.MistralConfig, transformers.MistralForCausalLM, dict(
        num_attention_heads=4, num_key_value_heads=2, head_dim=24, sliding_window=WINDOW), LAYOUTS),
    "mistral-full-linear": (transformers.MistralConfig, transformers.MistralForCausalLM, dict(
        num_attention_heads=4, num_key_value_heads=1, sliding_window=None,
        rope_parameters={"rope_type": "linear", "rope_theta": 1000.0, "factor": 2.0}), LAYOUTS),
    # 5 local : 1 global, two bases, linear scaling on the global layer, head_dim 32 and scale 24^-0.5
    "gemma3-5to1": (transformers.Gemma3TextConfig, transformers.Gemma3ForCausalLM, dict(
        num_hidden_layers=6, num_attention_heads=4, num_key_value_heads=2, head_dim=32, query_pre_attn_scalar=24,
        sliding_window=WINDOW, rope_parameters={
            "full_attention": {"rope_type": "linear", "factor": 8.0, "rope_theta": 1_000_000.0},
            "sliding_attention": {"rope_type": "default", "rope_theta": 10_000.0}}), LAYOUTS),
}
NESTED_ROPE = {"olmo3", "gemma3_text"}
PARITY = [(name, layout) for name, case in CASES.items() for layout in case[3]]


def to_legacy_nested(directory: Path, rope_key: str) -> dict:
    """The 4.x form of an OLMo 3 / Gemma 3 config.json: ``rope_theta`` (+ Gemma's ``rope_local_base_freq``)
    and a flat ``rope_scaling`` for the global layers, the layer pattern left to its default."""
    path = directory / "config.json"
    cfg = json.loads(path.read_text())
    rope = cfg.pop("rope_parameters")
    full, local = dict(rope["full_attention"]), dict(rope["sliding_attention"])
    cfg["rope_theta"] = full.pop("rope_theta")
    kind = full.pop("rope_type")
    cfg["rope_scaling"] = None if kind == "default" else {rope_key: kind, **full}
    assert local.pop("rope_type") == "default" and not set(local) - {"rope_theta"}
    types = cfg.pop("layer_types")
    n = cfg["num_hidden_layers"]
    if cfg["model_type"] == "gemma3_text":
        cfg["rope_local_base_freq"] = local["rope_theta"]
        cfg["sliding_window_pattern"] = 6
        assert types == ["full_attention" if (i + 1) % 6 == 0 else "sliding_attention" for i in range(n)]
    else:  # OLMo 3 in 4.x: one base for all layers, default 3:1 pattern
        assert local["rope_theta"] == cfg["rope_theta"]
        assert types == ["full_attention" if (i + 1) % 4 == 0 else "sliding_attention" for i in range(n)]
    cfg["torch_dtype"] = cfg.pop("dtype", "float32")
    path.write_text(json.dumps(cfg, indent=2))
    return cfg


def make(name: str, directory: Path, layout: str = "v5"):
    """Save a tiny random model; return (directory, transformers reference loaded from the 5.x files).

    The reference is loaded before the config is rewritten: transformers 5.23 itself misreads some 4.x
    nested-rope files (see olmo3.py), and the 4.x forms must mean the same network as the 5.x one.
    """
    cfg_cls, model_cls, kw, _ = CASES[name]
    kw = {"vocab_size": 320, "hidden_size": 64, "intermediate_size": 112, "num_hidden_layers": 2,
          "max_position_embeddings": 256, "pad_token_id": None, "bos_token_id": None, "eos_token_id": None, **kw}
    model = model_cls(cfg_cls(**kw)).eval()
    with torch.no_grad():  # random non-trivial norm weights and biases (init sets them to 1 / 0)
        for n, p in model.named_parameters():
            if "norm" in n or n.endswith("bias"):
                p.add_(torch.randn_like(p) * 0.1)
    save_hf(model, directory)
    ref = hf_reference(directory)
    if layout != "v5":
        rope_key = "type" if layout == "v4-type" else "rope_type"
        if model.config.model_type in NESTED_ROPE:
            to_legacy_nested(directory, rope_key)
        else:
            to_legacy_layout(directory, rope_key=rope_key)
    return directory, ref


def batch(T: int = SEQ) -> torch.Tensor:
    return torch.randint(0, 320, (2, T))


def layer_kinds(model) -> set[tuple[str, bool]]:
    return {(layer.position.type, layer.attention.window is None) for layer in model.config.layers}


@pytest.mark.parametrize("name,layout", PARITY)
def test_logits_match_transformers(name, layout, tmp_path):
    d, ref = make(name, tmp_path, layout)
    ours = llmparts.load_pretrained(d)
    assert ours.dtype == torch.float32
    kinds = layer_kinds(ours)
    if "olmo3" in name or "gemma3" in name or "sliding" in name:
        assert {w for _, w in kinds} == {True, False}, f"both sliding and full layers expected: {kinds}"
    if "smollm3" in name:
        assert {p for p, _ in kinds} == {"rope", "none"}, f"both RoPE and NoPE layers expected: {kinds}"
    x = batch()
    with torch.no_grad():
        expected, got = ref(x).logits, ours(x)
    diff = (expected - got).abs().max().item()
    print(f"{name} [{layout}] max abs diff {diff:.2e}")
    assert got.shape == expected.shape
    assert diff <= TOL


def test_olmo2_module_layout(tmp_path):
    """OLMo 2: no norm on the branch inputs, norms on the outputs; q/k norms over the full width."""
    d, _ = make("olmo2-gqa-untied", tmp_path)
    m = llmparts.load_pretrained(d)
    block = m.layers[0]
    assert not hasattr(block, "attn_norm") and not hasattr(block, "mlp_norm")
    assert block.attn_out_norm.weight.shape == (64,) and block.mlp_out_norm.weight.shape == (64,)
    assert block.attn.q_norm.weight.shape == (4 * 16,) and block.attn.k_norm.weight.shape == (2 * 16,)
    assert m.head.weight is not m.embed.weight
    layer = m.config.layers[0]
    assert (layer.norm.cast, layer.position.compute_dtype) == ("after_weight", "float32")


@pytest.mark.parametrize("name", list(CASES))
def test_cached_decode_matches_full_forward_and_transformers(name, tmp_path):
    """Prefill longer than the window, then token by token past twice the window; the same cache reset
    and reused for a second sequence. Both agree with llmparts' full forward and transformers' logits."""
    d, ref = make(name, tmp_path)
    ours = llmparts.load_pretrained(d)
    cache = ours.make_cache(2, 64)
    worst = 0.0
    for prefill, total in ((20, 56), (WINDOW + 1, 2 * WINDOW + 9)):
        assert prefill > WINDOW and total > 2 * WINDOW
        cache.reset()
        x = batch(total)
        with torch.no_grad():
            expected, full = ref(x).logits, ours(x)
            steps = [ours(x[:, :prefill], cache=cache)]
            steps += [ours(x[:, t : t + 1], cache=cache) for t in range(prefill, total)]
        cached = torch.cat(steps, 1)
        assert (cached - full).abs().max().item() <= 1e-5
        worst = max(worst, (cached - expected).abs().max().item())
    print(f"{name} cached decode vs transformers max abs diff {worst:.2e}")
    assert worst <= TOL


@pytest.mark.parametrize("name", list(CASES))
def test_config_round_trips_and_parameter_count(name, tmp_path):
    """config_to_hf -> config_from_hf (strict) gives the same config; transformers counts the same parameters."""
    d, ref = make(name, tmp_path)
    ours = llmparts.load_pretrained(d)
    cfg = ours.config
    family = family_for(ref.config.model_type)
    hf_dict = family.config_to_hf(cfg)
    hf = HFConfig(json.loads(json.dumps(hf_dict)))
    raw = family.config_from_hf(hf)
    hf.finish(strict=True)
    back = ModelConfig.from_dict({**raw, "name": cfg.name})
    assert back == cfg and back.layers == cfg.layers
    config = transformers.AutoConfig.for_model(**{**hf_dict, "pad_token_id": None})  # default id > tiny vocab
    with torch.device("meta"):
        hf_model = transformers.AutoModelForCausalLM.from_config(config)
    assert ours.num_parameters() == sum(p.numel() for p in hf_model.parameters())
    assert ours.num_parameters() == sum(p.numel() for p in ref.parameters())


@pytest.mark.parametrize("name", ["olmo2-mha-bias-tied-llama3", "olmo3-yarn", "smollm3-nope-sliding-untied",
                                  "mistral-window-headdim"])
def test_export_loads_in_transformers(name, tmp_path):
    """The weight maps reverse: llmparts writes the family's checkpoint and transformers reads it back."""
    d, _ = make(name, tmp_path / "src")
    ours = llmparts.load_pretrained(d)
    with torch.no_grad():
        for p in ours.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    out = save_pretrained(ours, tmp_path / "out", extra_config={"pad_token_id": None})  # default id > tiny vocab
    x = batch()
    with torch.no_grad():
        diff = (hf_reference(out)(x).logits - ours(x)).abs().max().item()
    assert diff <= TOL


# --------------------------------------------------------------------------------- bad input
BASE = {"vocab_size": 320, "hidden_size": 64, "intermediate_size": 112, "num_hidden_layers": 4,
        "num_attention_heads": 4, "num_key_value_heads": 2, "max_position_embeddings": 256}
OLMO3 = {**BASE, "model_type": "olmo3", "sliding_window": WINDOW, "rope_theta": 500000.0}
SMOLLM3 = {**BASE, "model_type": "smollm3"}
MISTRAL = {**BASE, "model_type": "mistral", "sliding_window": WINDOW}
GEMMA3 = {**BASE, "model_type": "gemma3_text", "head_dim": 16, "sliding_window": WINDOW}
SLIDING_3_1 = ["sliding_attention"] * 3 + ["full_attention"]

BAD = {
    "layer_types-length": ({**OLMO3, "layer_types": SLIDING_3_1[:3]},
                           r"layer_types must list one entry per layer \(4\), got 3"),
    "layer_types-unknown": ({**OLMO3, "layer_types": ["sliding_attention", "chunked_attention", "sliding_attention",
                             "full_attention"]}, r"layer_types\[1\] = 'chunked_attention' is not one of"),
    "olmo3-window-null": ({**OLMO3, "sliding_window": None}, r"sliding_attention but sliding_window is null"),
    "olmo3-flat-rope": ({**{k: v for k, v in OLMO3.items() if k != "rope_theta"},
                         "rope_parameters": {"rope_type": "default", "rope_theta": 1e4}},
                        r"rope_parameters must be nested by layer type"),
    "olmo3-theta-contradiction": ({**OLMO3, "rope_theta": 1e4, "rope_parameters": {
        "full_attention": {"rope_type": "default", "rope_theta": 5e5},
        "sliding_attention": {"rope_type": "default", "rope_theta": 5e5}}}, r"rope_theta=10000.0 disagrees"),
    "olmo3-unknown-rope": ({**OLMO3, "rope_scaling": {"rope_type": "longrope", "factor": 2.0}},
                           r"rope_parameters.full_attention.rope_type 'longrope' is not supported"),
    "olmo2-clip_qkv": ({**BASE, "model_type": "olmo2", "clip_qkv": 8.0}, r"clip_qkv=8.0 is not supported"),
    "olmo2-unknown-key": ({**BASE, "model_type": "olmo2", "qk_layernorm": True}, r"unknown field\(s\) 'qk_layernorm'"),
    "no_rope_layers-length": ({**SMOLLM3, "no_rope_layers": [1, 1, 0]},
                              r"no_rope_layers must list one flag per layer \(num_hidden_layers=4\), got 3"),
    "no_rope_layers-values": ({**SMOLLM3, "no_rope_layers": [1, 1, 2, 0]},
                              r"no_rope_layers\[2\] = 2; each flag must be 1 \(the layer uses RoPE\) or 0 \(NoPE\)"),
    "smollm3-interval": ({**SMOLLM3, "no_rope_layer_interval": 0}, r"no_rope_layer_interval must be an integer >= 1"),
    "smollm3-sliding-without-window": ({**SMOLLM3, "layer_types": SLIDING_3_1},
                                       r"sliding_attention but sliding_window is null"),
    "mistral-layer_types": ({**MISTRAL, "layer_types": SLIDING_3_1},
                            r"layer_types .* contradicts sliding_window=16: Mistral applies the window to every layer"),
    "mistral-bias": ({**MISTRAL, "attention_bias": True}, r"attention_bias=True is not supported"),
    "gemma3-layer_types-length": ({**GEMMA3, "layer_types": SLIDING_3_1 + ["full_attention"]},
                                  r"layer_types must list one entry per layer \(4\), got 5"),
}


@pytest.mark.parametrize("case", list(BAD))
def test_bad_config_fails_naming_the_field(case, tmp_path):
    data, message = BAD[case]
    (tmp_path / "config.json").write_text(json.dumps(data))
    with pytest.raises(llmparts.ConfigError, match=message):
        config_of(tmp_path)


WIDE_WINDOWS = {  # config.json -> the window of its sliding layers (max_position_embeddings 256)
    "olmo3-wider": ({**OLMO3, "sliding_window": 512}, 256),
    "olmo3-default-4096": ({k: v for k, v in OLMO3.items() if k != "sliding_window"}, 256),
    "smollm3-wider": ({**SMOLLM3, "use_sliding_window": True, "sliding_window": 300}, 256),
    "mistral-one-wider": ({**MISTRAL, "sliding_window": 257}, 256),
    "mistral-default-4096": ({k: v for k, v in MISTRAL.items() if k != "sliding_window"}, 256),
    "gemma3-wider": ({**GEMMA3, "sliding_window": 1024}, 256),
    "mistral-as-wide": ({**MISTRAL, "sliding_window": 256}, 256),
}


@pytest.mark.parametrize("case", list(WIDE_WINDOWS))
def test_window_wider_than_the_context_reads_as_the_context(case, tmp_path):
    data, window = WIDE_WINDOWS[case]
    (tmp_path / "config.json").write_text(json.dumps(data))
    windows = {layer.attention.window for layer in config_of(tmp_path).layers}
    assert window in windows and windows <= {window, None}


@pytest.mark.parametrize("model_type", ["mistral", "gemma3_text"])
def test_window_wider_than_the_context_matches_transformers(model_type, tmp_path):
    """transformers' config classes default ``sliding_window`` to 4096 whatever
    ``max_position_embeddings`` says, so small checkpoints carry windows wider than their context.
    Such a window sees every earlier key of any sequence the model takes: loaded as the context's
    width (the layers keep their window and a ring of that many slots), the logits are transformers',
    over the whole context and decoded token by token."""
    ctx = 40
    kw = dict(vocab_size=320, hidden_size=64, intermediate_size=112, num_hidden_layers=2, num_attention_heads=4,
              num_key_value_heads=2, max_position_embeddings=ctx, pad_token_id=None, bos_token_id=None,
              eos_token_id=None)
    if model_type == "mistral":
        config = transformers.MistralConfig(**kw)
        assert config.sliding_window == 4096  # the class default
        model = transformers.MistralForCausalLM(config)
    else:
        config = transformers.Gemma3TextConfig(**kw, head_dim=16, sliding_window=1024,
                                               layer_types=["sliding_attention", "full_attention"])
        model = transformers.Gemma3ForCausalLM(config)
    save_hf(model.eval(), tmp_path)
    ref, ours = hf_reference(tmp_path), llmparts.load_pretrained(tmp_path)
    windows = [layer.attention.window for layer in ours.config.layers]
    assert windows == ([ctx, ctx] if model_type == "mistral" else [ctx, None])
    x = batch(ctx)
    cache = ours.make_cache(2, ctx)
    with torch.no_grad():
        expected = ref(x).logits
        cached = torch.cat([ours(x[:, :9], cache=cache)] + [ours(x[:, t : t + 1], cache=cache) for t in range(9, ctx)], 1)
        diff = max((ours(x) - expected).abs().max().item(), (cached - expected).abs().max().item())
    print(f"{model_type} window 4096/1024 in a context of {ctx}: max abs diff {diff:.2e}")
    assert diff <= TOL


def test_null_window_is_full_attention_and_smollm3_slides_nope_layers(tmp_path):
    """A written ``sliding_window: null`` (Mistral v0.2+) is full attention, not the 4096 default."""
    (tmp_path / "config.json").write_text(json.dumps({**MISTRAL, "sliding_window": None}))
    assert all(layer.attention.window is None for layer in config_of(tmp_path).layers)
    (tmp_path / "config.json").write_text(json.dumps({**SMOLLM3, "use_sliding_window": True, "sliding_window": 8}))
    cfg = config_of(tmp_path)
    assert [(layer.attention.window, layer.position.type) for layer in cfg.layers] == [
        (None, "rope"), (None, "rope"), (None, "rope"), (8, "none")]


# ------------------------------------------------------------------------------------- swaps
def gemma3_adapter_config(tmp_path: Path, **changes) -> ModelConfig:
    """The tiny Gemma 3 config as the adapter reads it from a config.json with ``changes``."""
    d, ref = make("gemma3-5to1", tmp_path / "src")
    hf = {**ref.config.to_dict(), **changes}
    (tmp_path / "config.json").write_text(json.dumps(hf))
    return config_of(tmp_path)


def assert_builds_and_decodes(cfg: ModelConfig) -> None:
    model = llmparts.build_model(cfg, seed=3).eval()
    ids = torch.randint(0, cfg.vocab_size, (2, 40))
    with torch.no_grad():
        full = model(ids)
        cache = model.make_cache(2, 40)
        steps = [model(ids[:, :20], cache=cache)] + [model(ids[:, t : t + 1], cache=cache) for t in range(20, 40)]
    assert (torch.cat(steps, 1) - full).abs().max().item() <= 1e-5


def test_gemma3_swap_window_is_one_override(tmp_path):
    d, _ = make("gemma3-5to1", tmp_path)
    cfg = llmparts.load_pretrained(d).config
    swapped = cfg.with_overrides(["layers[0:5].attention.window=8"])
    assert [layer.attention.window for layer in swapped.layers] == [8] * 5 + [None]
    # the same network the adapter reads from a config.json with sliding_window 8
    assert swapped.layers == gemma3_adapter_config(tmp_path / "hf", sliding_window=8).layers
    assert_builds_and_decodes(swapped)


def test_gemma3_swap_pattern_5to1_to_3to1_is_one_override(tmp_path):
    """5:1 -> 3:1 local/global: one override string restating the local layers' spec on the new selection."""
    d, _ = make("gemma3-5to1", tmp_path)
    cfg = llmparts.load_pretrained(d).config
    local = cfg.layers[0]
    line = (
        "overrides=[{layers: [0, 1, 2, 4, 5], attention: {window: %d}, "
        "position: {theta: %r, scaling: {type: default}}}]" % (local.attention.window, local.position.theta)
    )
    swapped = llmparts.load_config(cfg.to_dict(), [line])
    assert [layer.attention.window is None for layer in swapped.layers] == [False, False, False, True, False, False]
    types = ["full_attention" if (i + 1) % 4 == 0 else "sliding_attention" for i in range(6)]
    assert swapped.layers == gemma3_adapter_config(tmp_path / "hf", layer_types=types).layers
    assert_builds_and_decodes(swapped)
