"""Config system: strict parsing, clear errors, per-layer overrides, CLI-style overrides, describe()."""

from __future__ import annotations

import copy

import pytest
import yaml

import llmparts
from llmparts import ConfigError, LLMPartsError, ModelConfig, ModelNotFoundError, load_config
from llmparts.config import select_layers

BASE = yaml.safe_load((llmparts.shipped_configs()["tiny/qwen3"]).read_text())


def cfg(**changes) -> dict:
    out = copy.deepcopy(BASE)
    for path, value in changes.items():
        node = out
        *head, last = path.split("__")
        for part in head:
            node = node.setdefault(part, {})
        node[last] = value
    return out


def raises(data_or_overrides, *fragments, overrides=None):
    with pytest.raises(ConfigError) as e:
        load_config(data_or_overrides, overrides)
    msg = str(e.value)
    for f in fragments:
        assert f in msg, f"{f!r} not in {msg!r}"
    return msg


def test_errors_share_one_base_class():
    assert issubclass(ConfigError, LLMPartsError) and issubclass(ModelNotFoundError, LLMPartsError)


def test_unknown_key_names_key_path_allowed_and_closest():
    d = cfg(attention__n_kv_head=1)
    msg = raises(d, "'n_kv_head'", "config.attention", "allowed keys:", "n_heads", "did you mean 'n_kv_heads'")
    assert "qk_norm" in msg


def test_unknown_top_level_key():
    d = cfg(d_modle=32)
    raises(d, "'d_modle'", "did you mean 'd_model'")


def test_unknown_key_inside_override():
    d = cfg(overrides=[{"layers": "1::2", "attention": {"windw": 4}}])
    raises(d, "overrides[0].attention", "'windw'", "did you mean 'window'")


@pytest.mark.parametrize(
    "changes,fragments",
    [
        ({"attention__n_heads": "four"}, ["config.attention.n_heads", "expected an integer", "'four'"]),
        ({"tie_embeddings": "yes"}, ["config.tie_embeddings", "true or false"]),
        ({"norm__eps": [1]}, ["config.norm.eps", "expected a number"]),
        ({"attention__qk_norm": "perhead"}, ["config.attention.qk_norm", "'per_head'"]),
        ({"block__norm_placement": "middle"}, ["norm_placement", "'pre'", "'sandwich'"]),
    ],
)
def test_wrong_types(changes, fragments):
    raises(cfg(**changes), *fragments)


def test_inconsistent_dims():
    raises(cfg(attention__n_kv_heads=3), "n_kv_heads", "divisible", "valid values: [1, 2, 4]")
    raises(cfg(position__rotary_dim=7), "rotary_dim", "even")
    raises(cfg(position__rotary_dim=64), "rotary_dim", "<= head_dim (32)")
    raises(cfg(attention__window=0), "window must be >= 1")
    raises(cfg(attention__window=10_000), "window (10000) is larger than max_seq_len (512)")
    d = cfg(attention={"type": "gqa", "n_heads": 3})  # d_model 64 not divisible by 3, no head_dim
    raises(d, "head_dim is missing and cannot be derived", "d_model (64)", "n_heads (3)")
    raises(cfg(d_model=0), "d_model must be > 0")
    raises(cfg(mlp={"type": "gated"}), "hidden_dim")


def test_head_dim_derived_when_possible():
    c = load_config(cfg(attention={"type": "gqa", "n_heads": 4}))
    assert c.layers[0].attention.head_dim == 16 and c.layers[0].attention.n_kv_heads == 4


def test_unknown_types_and_rope_scalings():
    raises(cfg(attention__type="flash"), "unknown attention type 'flash'", "known types: gqa")
    raises(cfg(position__scaling={"type": "dynamic", "factor": 2.0}), "unknown rope_scaling type 'dynamic'",
           "llama3", "yarn")
    raises(cfg(position__scaling={"type": "llama3", "factor": 8.0, "orig": 3}), "'orig'", "original_max_seq_len")
    raises(cfg(position__scaling={"type": "linear", "factor": -1.0}), "factor must be > 0")
    # YaRN's correction range reversed, or an attention factor that is not positive
    raises(cfg(position__scaling={"type": "yarn", "factor": 4.0, "beta_fast": 1.0, "beta_slow": 32.0}),
           "beta_fast (1.0) must be >= beta_slow (32.0)")
    raises(cfg(position__scaling={"type": "yarn", "factor": 4.0, "mscale": -100.0, "mscale_all_dim": 1.0}),
           "attention factor of -11.2969", "must be finite and > 0")
    c = load_config(cfg(position__scaling={"type": "yarn", "factor": 4.0, "mscale": -1.0, "mscale_all_dim": 1.0}))
    assert 0 < c.layers[0].position.scaling.attention_factor < 1  # unusual, but a valid factor


def test_a_default_every_layer_overrides_is_still_checked():
    # deepseek-v3 cut to its 3 dense layers uses no MoE layer; a bad MoE default is refused, not ignored
    assert {layer.mlp.type for layer in load_config("deepseek-v3", ["n_layers=3"]).layers} == {"gated"}
    raises("deepseek-v3", "config.mlp (the default, though every layer overrides it in part).topk_groups",
           "got 500", overrides=["n_layers=3", "mlp.topk_groups=500"])


def test_unknown_shipped_name_lists_choices():
    with pytest.raises(ModelNotFoundError) as e:
        load_config("qwen3-tiny")
    assert "shipped:" in str(e.value)


@pytest.mark.parametrize("source", [5, None, ["qwen3-0.6b"]])
def test_a_source_of_the_wrong_type_is_named(source):
    with pytest.raises(ConfigError, match=f"got {type(source).__name__}"):
        llmparts.build_model(source)
    with pytest.raises(ModelNotFoundError, match=f"must be a path or a Hub repo id .str., got {type(source).__name__}"):
        llmparts.load_pretrained(source)


def test_layer_selectors():
    assert select_layers("5::6", 18, "p") == (5, 11, 17)
    assert select_layers("0:3", 8, "p") == (0, 1, 2)
    assert select_layers([0, -1], 4, "p") == (0, 3)
    assert select_layers("all", 3, "p") == (0, 1, 2)
    assert select_layers(2, 4, "p") == (2,)
    # a stepped pattern may select nothing in a short model; a range past the end is a mistake
    assert select_layers("5::6", 4, "p") == ()
    for bad in ("9::", "4:", "9::1", "a:b", [7], "1::0", True, "x"):
        with pytest.raises(ConfigError):
            select_layers(bad, 4, "p")


def test_overrides_resolve_per_layer_with_deep_merge_and_type_replacement():
    d = cfg(overrides=[
        {"layers": "1::2", "attention": {"window": 8}},
        {"layers": [3], "position": {"type": "none"}, "attention": {"qk_norm": "none"}},
        {"layers": "0", "position": {"scaling": {"type": "linear", "factor": 2.0}}},
    ])
    c = load_config(d)
    a = [layer.attention for layer in c.layers]
    assert [x.window for x in a] == [None, 8, None, 8]
    assert a[3].qk_norm == "none" and a[1].qk_norm == "per_head" and a[1].head_dim == 32  # merged, not replaced
    assert [layer.position.type for layer in c.layers] == ["rope", "rope", "rope", "none"]
    assert c.layers[0].position.scaling.factor == 2.0 and c.layers[0].position.theta == 1e6  # deep merge
    assert c.layers[1].position.scaling.type == "default"


def test_override_type_change_rejects_fields_of_old_type():
    d = cfg(overrides=[{"layers": [0], "position": {"type": "none", "theta": 5.0}}])
    raises(d, "overrides[0].position", "'theta'")


def test_cli_overrides_on_any_field():
    c = load_config("tiny/qwen3", ["attention.window=16", "n_layers=6", "position.scaling.type=linear",
                                   "position.scaling.factor=4", "tie_embeddings=false", "mlp.activation=gelu_tanh"])
    assert c.n_layers == 6 and not c.tie_embeddings
    assert all(layer.attention.window == 16 for layer in c.layers)
    assert c.layers[0].position.scaling.factor == 4.0 and c.layers[0].mlp.activation == "gelu_tanh"


def test_cli_layer_override_and_type_swap():
    c = load_config("tiny/qwen3", ["layers[3::4].position.type=none", "norm.type=layernorm"])
    assert [layer.position.type for layer in c.layers] == ["rope", "rope", "rope", "none"]
    assert c.layers[0].norm.type == "layernorm"


def test_type_swapped_back_to_the_models_own_takes_its_settings():
    # smollm3-3b: RoPE theta 5e6, every 4th layer NoPE; switching those layers back to RoPE gives them
    # the model's RoPE (theta 5e6), not RoPE's default theta (1e4)
    c = load_config("smollm3-3b", ["layers[3::4].position.type=rope"])
    assert {(layer.position.type, layer.position.theta) for layer in c.layers} == {("rope", 5e6)}
    c = load_config("smollm3-3b", ["layers[3].position={type: rope, theta: 1.0e4}"])
    assert (c.layers[3].position.theta, c.layers[7].position.type) == (1e4, "none")
    # a type the model does not use starts from that type's defaults (LayerNorm's eps 1e-5, not the
    # model's RMSNorm eps 1e-6); switched back, the layer has the model's norm again
    c = load_config("tiny/qwen3", ["layers[1:3].norm.type=layernorm", "layers[2].norm.type=rmsnorm"])
    assert [(layer.norm.type, layer.norm.eps) for layer in c.layers[1:3]] == [("layernorm", 1e-5), ("rmsnorm", 1e-6)]
    assert c.layers[2] == c.layers[0]


def test_a_layer_type_named_again_drops_settings_written_for_another_type():
    # gemma3-270m's own override sets theta 1e6 on its global layers; NoPE everywhere makes that theta
    # meaningless: the error says how to name the type for those layers, and naming it builds
    with pytest.raises(ConfigError, match=r"overrides\[0\]\.position \(layer 5\): unknown key 'theta'.*"
                       r"add the override 'layers\[5\]\.position\.type=none'"):
        load_config("gemma3-270m", ["position.type=none"])
    c = load_config("gemma3-270m", ["position.type=none", "layers[5::6].position.type=none"])
    assert {layer.position.type for layer in c.layers} == {"none"}
    # naming the type a layer already has keeps its settings of that type
    c = load_config("gemma3-270m", ["layers[5::6].position.type=rope"])
    assert [c.layers[i].position.theta for i in (0, 5, 11)] == [1e4, 1e6, 1e6]
    # a misspelt key, or one the same override wrote with the type, gets no such hint
    for overrides in (["layers[1].position.thetaa=3.0"], ["layers[1].position={type: none, theta: 5.0}"]):
        with pytest.raises(ConfigError) as e:
            load_config("gemma3-270m", overrides)
        assert "add the override" not in str(e.value)


def test_a_type_change_replaces_a_component_whose_type_was_left_out():
    # `type` left out means the kind's default type: switching away from it must not keep its fields
    implicit = cfg(position={"theta": 1e6}, mlp={"hidden_dim": 32, "activation": "relu"})
    implicit["mlp"].pop("type", None)
    c = load_config(implicit, ["mlp.type=plain", "mlp.hidden_dim=32", "position.type=none"])
    assert (c.layers[0].mlp.type, c.layers[0].mlp.activation, c.layers[0].position.type) == ("plain", "gelu", "none")
    c = load_config(implicit, ["mlp.type=gated"])  # naming the default type changes nothing
    assert (c.layers[0].mlp.activation, c.layers[0].position.theta) == ("relu", 1e6)


@pytest.mark.parametrize("scale", [0, -2.0])
def test_a_numeric_embedding_scale_must_be_positive(scale):
    raises(cfg(embedding={"scale": scale}), "config.embedding.scale must be > 0", repr(scale))


def test_a_range_past_the_last_layer_stops_there():
    assert select_layers("2:10", 4, "p") == (2, 3)
    assert [layer.mlp.type for layer in load_config("deepseek-v3", ["n_layers=2"]).layers] == ["gated", "gated"]


def test_cli_override_errors():
    raises("tiny/qwen3", "config.attention", "'windw'", "did you mean 'window'", overrides=["attention.windw=4"])
    with pytest.raises(ConfigError, match="expected 'path.to.field=value'"):
        load_config("tiny/qwen3", ["attention.window"])
    with pytest.raises(ConfigError, match="not a mapping"):
        load_config("tiny/qwen3", ["d_model.x=3"])


def test_round_trip_and_frozen():
    c = load_config("tiny/qwen3", ["layers[1::2].attention.window=8"])
    assert ModelConfig.from_dict(c.to_dict()) == c
    with pytest.raises(Exception):
        c.attention.n_heads = 3  # frozen


def test_yaml_file_path(tmp_path):
    p = tmp_path / "my.yaml"
    p.write_text(yaml.safe_dump(cfg(n_layers=2)))
    assert load_config(str(p)).n_layers == 2
    p.write_text(yaml.safe_dump(cfg(attention__bogus=1)))
    with pytest.raises(ConfigError, match="my.yaml"):
        load_config(p)


def test_describe_one_line_per_run():
    c = load_config("tiny/qwen3", ["n_layers=6", "layers[4:].attention.window=8"])
    text = llmparts.describe(c)
    lines = text.splitlines()
    assert "6 layers" in lines[0] and "parameters" in lines[0]
    assert any(line.strip().startswith("layers 0-3 (x4)") for line in lines)
    assert any(line.strip().startswith("layers 4-5 (x2)") and "window=8" in line for line in lines)
