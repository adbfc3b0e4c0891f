"""Strict HF loading: every bad checkpoint or config.json gets a clear LLMPartsError before a model exists."""

from __future__ import annotations

import json

import pytest
import torch
import transformers
from safetensors.torch import load_file, save_file

import llmparts
from llmparts import CheckpointError, ConfigError, ModelNotFoundError, UnsupportedModelError


@pytest.fixture
def qwen_dir(tmp_path):
    cfg = transformers.Qwen3Config(vocab_size=128, hidden_size=32, intermediate_size=48, num_hidden_layers=3,
                                   num_attention_heads=4, num_key_value_heads=2, head_dim=16,
                                   tie_word_embeddings=False)
    transformers.Qwen3ForCausalLM(cfg).save_pretrained(tmp_path)
    return tmp_path


def edit_weights(d, fn):
    sd = load_file(d / "model.safetensors")
    fn(sd)
    save_file(sd, d / "model.safetensors", metadata={"format": "pt"})


def edit_config(d, **changes):
    cfg = json.loads((d / "config.json").read_text())
    for k, v in changes.items():
        if v is ...:
            cfg.pop(k, None)
        else:
            cfg[k] = v
    (d / "config.json").write_text(json.dumps(cfg))


def test_missing_tensors_grouped_by_template(qwen_dir):
    edit_weights(qwen_dir, lambda sd: [sd.pop(f"model.layers.{i}.self_attn.q_norm.weight") for i in range(3)])
    with pytest.raises(CheckpointError) as e:
        llmparts.load_pretrained(qwen_dir)
    assert "layers.{i}.attn.q_norm.weight for i in 0..2" in str(e.value)


def test_unexpected_tensor(qwen_dir):
    edit_weights(qwen_dir, lambda sd: sd.__setitem__("model.extra.weight", torch.zeros(2)))
    with pytest.raises(CheckpointError, match=r"unexpected tensors.*\n.*model.extra.weight"):
        llmparts.load_pretrained(qwen_dir)


def test_tensor_for_absent_parameter(qwen_dir):  # a bias the config does not declare
    edit_weights(qwen_dir, lambda sd: sd.__setitem__("model.layers.0.self_attn.q_proj.bias", torch.zeros(64)))
    with pytest.raises(CheckpointError, match="q_proj.bias -> layers.0.attn.q_proj.bias"):
        llmparts.load_pretrained(qwen_dir)


def test_wrong_shape(qwen_dir):
    edit_weights(qwen_dir, lambda sd: sd.__setitem__("model.layers.1.mlp.up_proj.weight", torch.zeros(49, 32)))
    with pytest.raises(CheckpointError, match=r"checkpoint \(49, 32\) vs parameter layers.1.mlp.up_proj.weight \(48, 32\)"):
        llmparts.load_pretrained(qwen_dir)


def test_untied_config_without_head(qwen_dir):
    edit_weights(qwen_dir, lambda sd: sd.pop("lm_head.weight"))
    with pytest.raises(CheckpointError, match="tie_word_embeddings=false"):
        llmparts.load_pretrained(qwen_dir)


def test_tied_config_with_distinct_head(qwen_dir):
    edit_config(qwen_dir, tie_word_embeddings=True)
    with pytest.raises(CheckpointError, match="differs from the tensor it is tied to"):
        llmparts.load_pretrained(qwen_dir)


def test_tied_config_with_identical_head_loads(qwen_dir):
    edit_config(qwen_dir, tie_word_embeddings=True)
    edit_weights(qwen_dir, lambda sd: sd.__setitem__("lm_head.weight", sd["model.embed_tokens.weight"].clone()))
    m = llmparts.load_pretrained(qwen_dir)
    assert m.head.weight is m.embed.weight


def test_ignored_rotary_buffer(qwen_dir):
    edit_weights(qwen_dir, lambda sd: sd.__setitem__("model.layers.0.self_attn.rotary_emb.inv_freq", torch.ones(8)))
    llmparts.load_pretrained(qwen_dir)


def test_unsupported_family_lists_supported(qwen_dir):
    edit_config(qwen_dir, model_type="bert")
    with pytest.raises(UnsupportedModelError, match="model_type .bert. is not supported.*supported: .*llama.*qwen3"):
        llmparts.load_pretrained(qwen_dir)


def test_unknown_config_field(qwen_dir):
    edit_config(qwen_dir, attn_logit_softcapping=30.0)
    with pytest.raises(UnsupportedModelError, match="attn_logit_softcapping"):
        llmparts.load_pretrained(qwen_dir)
    with pytest.warns(UserWarning, match="attn_logit_softcapping"):
        llmparts.load_pretrained(qwen_dir, strict_config=False)


@pytest.mark.parametrize(
    "rope,fragment",
    [
        ({"rope_type": "dynamic", "factor": 2.0, "rope_theta": 1e4}, "rope_type 'dynamic' is not supported"),
        ({"rope_type": "llama3", "factor": 2.0, "rope_theta": 1e4}, "requires 'low_freq_factor'"),
        ({"rope_type": "linear", "factor": 2.0, "rope_theta": 1e4, "bogus": 1}, "key 'bogus' is not valid"),
    ],
)
def test_bad_rope_parameters(qwen_dir, rope, fragment):
    edit_config(qwen_dir, rope_parameters=rope)
    with pytest.raises(ConfigError, match=fragment):
        llmparts.load_pretrained(qwen_dir)


def test_contradictory_and_inconsistent_config(qwen_dir):
    edit_config(qwen_dir, layer_types=["full_attention", "sliding_attention", "full_attention"])
    with pytest.raises(ConfigError, match="use_sliding_window is false"):
        llmparts.load_pretrained(qwen_dir)
    edit_config(qwen_dir, layer_types=["full_attention"] * 2)
    with pytest.raises(ConfigError, match="one entry per layer"):
        llmparts.load_pretrained(qwen_dir)
    edit_config(qwen_dir, layer_types=...)
    edit_config(qwen_dir, num_key_value_heads=3)
    with pytest.raises(ConfigError, match="config.json.*divisible"):
        llmparts.load_pretrained(qwen_dir)


def test_missing_files(tmp_path, qwen_dir):
    with pytest.raises(ModelNotFoundError):
        llmparts.load_pretrained(tmp_path / "nope")
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(ModelNotFoundError, match="no config.json"):
        llmparts.load_pretrained(empty)
    (qwen_dir / "model.safetensors").rename(qwen_dir / "pytorch_model.bin")
    with pytest.raises(CheckpointError, match="pickle"):
        llmparts.load_pretrained(qwen_dir)


def test_truncated_safetensors(qwen_dir):
    f = qwen_dir / "model.safetensors"
    f.write_bytes(f.read_bytes()[:1000])
    with pytest.raises(CheckpointError, match="model.safetensors"):
        llmparts.load_pretrained(qwen_dir)


def _rewrite_header(path, edit):
    raw = path.read_bytes()
    n = int.from_bytes(raw[:8], "little")
    header = json.loads(raw[8:8 + n])
    data = raw[8 + n:]
    data = edit(header, data) or data
    text = json.dumps(header).encode()
    path.write_bytes(len(text).to_bytes(8, "little") + text + data)


def _shift(key, by):
    def edit(header, data):
        header[key]["data_offsets"] = [o + by for o in header[key]["data_offsets"]]
    return edit


@pytest.mark.parametrize("edit, fragment", [
    # offsets that overlap the previous tensor, leave a gap, or bytes after the last tensor: the
    # safetensors library refuses all of these; they used to load other tensors' bytes
    (_shift("model.norm.weight", -8), "must follow each other"),
    (lambda h, d: d + b"\0" * 8, "the tensors end at byte"),
    (lambda h, d: h["model.norm.weight"].update(data_offsets=[str(o) for o in h["model.norm.weight"]["data_offsets"]]),
     "malformed header entry for 'model.norm.weight'"),
    (lambda h, d: h["model.norm.weight"].update(shape=[32.0]), "malformed header entry"),
    (lambda h, d: h.update(__metadata__=["pt"]), "__metadata__ must map strings to strings"),
    (lambda h, d: h.update(__metadata__={"x": 1}), "__metadata__ must map strings to strings"),
])
def test_corrupt_safetensors_headers_are_refused(qwen_dir, edit, fragment):
    _rewrite_header(qwen_dir / "model.safetensors", edit)
    with pytest.raises(CheckpointError, match="model.safetensors") as e:
        llmparts.load_pretrained(qwen_dir)
    assert fragment in str(e.value)


def test_a_deeply_nested_header_or_config_is_refused(qwen_dir):
    f = qwen_dir / "model.safetensors"
    text = b'{"x": ' + b"[" * 100000 + b"]" * 100000 + b"}"
    f.write_bytes(len(text).to_bytes(8, "little") + text)
    with pytest.raises(CheckpointError, match="RecursionError"):
        llmparts.load_pretrained(qwen_dir)
    (qwen_dir / "config.json").write_text('{"model_type": ' + "[" * 100000 + "]" * 100000 + "}")
    with pytest.raises(ConfigError, match="config.json"):
        llmparts.load_pretrained(qwen_dir)


def test_missing_shard(qwen_dir, tmp_path):
    m = transformers.AutoModelForCausalLM.from_pretrained(qwen_dir)
    out = tmp_path / "sharded"
    m.save_pretrained(out, max_shard_size="20KB")
    shard = sorted(out.glob("model-*.safetensors"))[0]
    shard.unlink()
    with pytest.raises(CheckpointError, match=f"missing: {shard.name}"):
        llmparts.load_pretrained(out)


@pytest.mark.parametrize("weight_map, fragment", [
    (["model-00001-of-00002.safetensors"], "'weight_map' object"),
    ({"model.norm.weight": 3}, "got 3"),
    ({"model.norm.weight": None}, "got None"),
    ({"model.norm.weight": "../elsewhere.safetensors"}, "the file name of a shard"),
])
def test_a_malformed_shard_index_is_refused(qwen_dir, tmp_path, weight_map, fragment):
    m = transformers.AutoModelForCausalLM.from_pretrained(qwen_dir)
    out = tmp_path / "sharded"
    m.save_pretrained(out, max_shard_size="20KB")
    index = out / "model.safetensors.index.json"
    data = json.loads(index.read_text())
    data["weight_map"] = weight_map if not isinstance(weight_map, dict) else {**data["weight_map"], **weight_map}
    index.write_text(json.dumps(data))
    with pytest.raises(CheckpointError, match="model.safetensors.index.json") as e:
        llmparts.load_pretrained(out)
    assert fragment in str(e.value)


def test_shards_and_index_must_agree(qwen_dir, tmp_path):
    m = transformers.AutoModelForCausalLM.from_pretrained(qwen_dir)
    out = tmp_path / "sharded"
    m.save_pretrained(out, max_shard_size="20KB")
    index = out / "model.safetensors.index.json"
    data = json.loads(index.read_text())
    key = "model.norm.weight"
    other = next(s for s in sorted(set(data["weight_map"].values())) if s != data["weight_map"][key])
    for change in ({**data["weight_map"], key: other}, {k: v for k, v in data["weight_map"].items() if k != key}):
        index.write_text(json.dumps({**data, "weight_map": change}))
        with pytest.raises(CheckpointError, match="missing from the index or listed in another shard"):
            llmparts.load_pretrained(out)


@pytest.mark.parametrize("edit, fragment", [
    (lambda d: (d / "generation_config.json").write_text('{"eos_token_id": "x"}'),
     "generation_config.json: eos_token_id must be a token id"),
    (lambda d: edit_config(d, dtype="float7"), "dtype must name a torch dtype"),
    (lambda d: edit_config(d, hidden_size=10**400), "does not fit a 64-bit integer"),
])
def test_bad_values_in_the_config_files_are_named(qwen_dir, edit, fragment):
    edit(qwen_dir)
    with pytest.raises(ConfigError, match=fragment):
        llmparts.load_pretrained(qwen_dir)


def test_errors_are_llmparts_errors():
    for cls in (CheckpointError, ConfigError, ModelNotFoundError, UnsupportedModelError):
        assert issubclass(cls, llmparts.LLMPartsError)


def test_pickle_checkpoint_only_on_request(qwen_dir):
    sd = load_file(qwen_dir / "model.safetensors")
    (qwen_dir / "model.safetensors").unlink()
    torch.save(sd, qwen_dir / "pytorch_model.bin")
    with pytest.raises(CheckpointError, match="allow_pickle=True"):
        llmparts.load_pretrained(qwen_dir)
    m = llmparts.load_pretrained(qwen_dir, allow_pickle=True)
    assert torch.equal(m.layers[1].mlp.up_proj.weight, sd["model.layers.1.mlp.up_proj.weight"])


def test_dtype_cast_per_tensor(qwen_dir):
    m32 = llmparts.load_pretrained(qwen_dir)
    m16 = llmparts.load_pretrained(qwen_dir, dtype="bfloat16")
    assert torch.equal(m16.layers[0].attn.q_proj.weight, m32.layers[0].attn.q_proj.weight.bfloat16())
    with pytest.raises(ConfigError, match="dtype 'int8'"):
        llmparts.load_pretrained(qwen_dir, dtype="int8")


def test_allocate_empty_allocates_a_tied_weight_once():
    """Tied embeddings are one tensor on the meta device and get one allocation (a GPU allocates eagerly:
    a second one showed as 1.26x the weights in Qwen3-0.6B's peak GPU memory while loading)."""
    from llmparts.config import load_config
    from llmparts.model import CausalLM, allocate_empty

    with torch.device("meta"):
        model = CausalLM(load_config("tiny/qwen3", ["tie_embeddings=true"]))
    allocate_empty(model, "cpu")
    assert model.head.weight.device.type == "cpu"
    assert model.head.weight.data_ptr() == model.embed.weight.data_ptr()
    model.tie_weights()
    assert model.head.weight is model.embed.weight
    assert len({p.data_ptr() for p in model.parameters()}) == len(list(model.parameters()))  # the rest distinct


def test_allocate_empty_holds_no_other_allocation(monkeypatch):
    """What a module replaces while converting is freed at once: MoE experts join gate and up into one
    tensor, and their separate allocations must not outlive the join (on a GPU, holding them all made
    a small MoE model's load peak 1.5x its weights)."""
    import gc
    import weakref

    from llmparts.config import load_config
    from llmparts.model import CausalLM, allocate_empty
    from llmparts.modules.moe import Experts

    with torch.device("meta"):
        model = CausalLM(load_config("tiny/qwen3", ["mlp={type: moe, n_experts: 4, top_k: 2, hidden_dim: 32}"]))
    shape = tuple(model.layers[0].mlp.experts.gate_proj.shape)
    made, empty, join, joins = [], torch.empty, Experts._join, []

    def recording_empty(*args, **kwargs):
        t = empty(*args, **kwargs)
        if tuple(t.shape) == shape:
            made.append(weakref.ref(t))
        return t

    def checked_join(self, empty=False):
        join(self, empty)
        gc.collect()
        joins.append([r() is None for r in made])

    monkeypatch.setattr(torch, "empty", recording_empty)
    monkeypatch.setattr(Experts, "_join", checked_join)
    allocate_empty(model, "cpu")
    assert len(joins) == len(model.layers) and all(all(dead) and len(dead) >= 2 for dead in joins)
    assert model.layers[0].mlp.experts.gate_up() is not None
