"""Bad inputs get llmparts errors that name the field, before any state (cache, files) changes."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file, save_file

import llmparts
from llmparts.errors import CheckpointError, ConfigError, InputError
from llmparts.loading.export import save_pretrained


@pytest.fixture(scope="module")
def model():
    return llmparts.build_model("tiny/qwen3", seed=0).eval()


IDS = torch.tensor([[1, 2, 3, 4]])


@pytest.mark.parametrize("override, match", [
    ("norm.eps=.nan", "finite"), ("position.theta=.inf", "finite"), ("init_std=-1", "init_std"),
    ("logit_softcap=.nan", "finite"),
])
def test_non_finite_or_negative_config_numbers(override, match):
    with pytest.raises(ConfigError, match=match):
        llmparts.build_model("tiny/qwen3", overrides=[override])


def test_duplicate_yaml_keys(tmp_path):
    text = (llmparts.config.shipped_configs()["tiny/qwen3"]).read_text()
    path = tmp_path / "dup.yaml"
    path.write_text(text + "\nd_model: 128\n")
    with pytest.raises(ConfigError, match="duplicate key 'd_model'"):
        llmparts.build_model(path)
    with pytest.raises(ConfigError, match="duplicate key"):
        llmparts.build_model("tiny/qwen3", overrides=["mlp={hidden_dim: 8, hidden_dim: 16}"])


def test_build_model_dtype_names_and_seed():
    assert llmparts.build_model("tiny/qwen3", dtype="bfloat16").dtype == torch.bfloat16
    for dtype in ("int8", torch.int64):
        with pytest.raises(ConfigError, match="dtype"):
            llmparts.build_model("tiny/qwen3", dtype=dtype)
    for seed in ("x", 1.5, -1, 2**70, True):
        with pytest.raises(InputError, match="seed"):
            llmparts.build_model("tiny/qwen3", seed=seed)


def test_forward_rejects_bad_ids_masks_and_labels_before_the_cache_changes(model):
    cache = model.make_cache(1, 32)
    with torch.no_grad():
        with pytest.raises(InputError, match="integer token ids"):
            model(IDS.float(), cache=cache)
        with pytest.raises(InputError, match="labels shape"):
            model(IDS, cache=cache, labels=IDS[:, :2])
        with pytest.raises(InputError, match="outside the vocabulary"):
            model(IDS, cache=cache, labels=IDS + 10_000)
        with pytest.raises(InputError, match="0 \\(padding\\) or 1"):
            model(IDS, attention_mask=torch.tensor([[0, 2, 2, 2]]))
        with pytest.raises(InputError, match="integers or bools"):
            model(IDS, attention_mask=torch.tensor([[0.5, 1.0, 1.0, 1.0]]))
        with pytest.raises(InputError, match="batch size 0"):
            model(IDS[:0])
        assert cache.length == 0
        # labels of -100 are ignored, not out of range
        assert model(IDS, labels=torch.tensor([[-100, 2, 3, -100]])).isfinite()


def test_generate_rejects_bad_prompts_masks_stops_and_seeds(model):
    with pytest.raises(InputError, match="integer token ids"):
        llmparts.generate(model, None, torch.tensor([[1.9, 2.9]]), max_new_tokens=2)
    with pytest.raises(InputError, match="0 \\(padding\\) or 1"):
        llmparts.generate(model, None, IDS, attention_mask=torch.tensor([[0, 2, 2, 2]]), max_new_tokens=2)
    for stops in (["a"], [2.9], [-1], [True]):
        with pytest.raises(InputError, match="stop_token_ids"):
            llmparts.generate(model, None, IDS, stop_token_ids=stops, max_new_tokens=2)
    with pytest.raises(InputError, match="seed"):
        llmparts.generate(model, None, IDS, temperature=1.0, seed=2**70, max_new_tokens=2)


@pytest.mark.parametrize("kwargs, match", [
    (dict(batch_size=0), "batch_size"), (dict(batch_size=1.5), "batch_size"),
    (dict(batch_size=1, max_seq_len=0), "max_seq_len"), (dict(batch_size=1, max_seq_len=8.0), "max_seq_len"),
    (dict(batch_size=1, dtype=torch.float16), "differs from the model"), (dict(batch_size=1, dtype="int8"), "dtype"),
])
def test_make_cache_arguments(model, kwargs, match):
    with pytest.raises((InputError, ConfigError), match=match):
        model.make_cache(**kwargs)


def test_save_pretrained_validates_before_writing(model, tmp_path):
    out = tmp_path / "out"
    with pytest.raises(ConfigError, match="dtype"):
        save_pretrained(model, out, model_type="qwen3", dtype=torch.int8)
    with pytest.raises(ConfigError, match="meta"):
        save_pretrained(llmparts.build_model("tiny/qwen3", device="meta"), out, model_type="qwen3")
    assert not out.exists()
    (tmp_path / "file").write_text("x")
    with pytest.raises(ConfigError, match="not a directory"):
        save_pretrained(model, tmp_path / "file", model_type="qwen3")
    save_pretrained(model, out, model_type="qwen3", dtype="bfloat16")
    assert json.loads((out / "config.json").read_text())["dtype"] == "bfloat16"


def test_saving_over_a_sharded_checkpoint_replaces_it(model, tmp_path, monkeypatch):
    import llmparts.loading.export as export

    monkeypatch.setattr(export, "SHARD_BYTES", 64 * 1024)  # several shards
    save_pretrained(model, tmp_path, model_type="qwen3")
    assert (tmp_path / "model.safetensors.index.json").is_file()
    monkeypatch.setattr(export, "SHARD_BYTES", 2**40)
    changed = llmparts.build_model("tiny/qwen3", seed=5).eval()
    save_pretrained(changed, tmp_path, model_type="qwen3")
    assert sorted(p.name for p in tmp_path.glob("*.safetensors*")) == ["model.safetensors"]
    with torch.no_grad():
        assert torch.equal(llmparts.load_pretrained(tmp_path)(IDS), changed(IDS))


def test_single_file_next_to_an_index_is_ambiguous(model, tmp_path):
    save_pretrained(model, tmp_path, model_type="qwen3")
    (tmp_path / "model.safetensors.index.json").write_text(json.dumps(
        {"metadata": {}, "weight_map": {k: "model.safetensors" for k in load_file(tmp_path / "model.safetensors")}}))
    with pytest.raises(CheckpointError, match="both model.safetensors and"):
        llmparts.load_pretrained(tmp_path)


def test_integer_tensor_for_a_float_weight_is_refused(model, tmp_path):
    save_pretrained(model, tmp_path, model_type="qwen3")
    sd = load_file(tmp_path / "model.safetensors")
    key = next(k for k in sd if k.endswith("up_proj.weight"))
    sd[key] = torch.ones_like(sd[key], dtype=torch.uint8)
    save_file(sd, tmp_path / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(CheckpointError, match=f"{key}.*torch.uint8"):
        llmparts.load_pretrained(tmp_path)


@pytest.mark.parametrize("edit, match", [
    (lambda c: c.update(rope_parameters="abc"), "rope_parameters must be an object"),
    (lambda c: c.update(rope_scaling="linear"), "rope_scaling must be an object"),
    (lambda c: c["rope_parameters"].update(rope_theta="abc"), "rope_theta must be a finite number"),
    (lambda c: c.update(rms_norm_eps=float("nan")), "finite"),
    (lambda c: c.update(rms_norm_eps="abc"), "rms_norm_eps"),
    (lambda c: c.update(tie_word_embeddings="false"), "tie_word_embeddings must be true or false"),
    (lambda c: c.update(use_sliding_window="false"), "use_sliding_window must be true or false"),
])
def test_bad_config_json_values(model, tmp_path, edit, match):
    save_pretrained(model, tmp_path, model_type="qwen3")
    cfg = json.loads((tmp_path / "config.json").read_text())
    edit(cfg)
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ConfigError, match=match):
        llmparts.load_pretrained(tmp_path)


def test_chunked_cached_step_through_a_nope_layer(tmp_path):
    """Several tokens at once on a non-empty cache (the few-query attention) with a NoPE layer."""
    m = llmparts.build_model("tiny/qwen3", overrides=["layers[1].position.type=none"], seed=0).eval()
    ids = torch.randint(0, 256, (1, 12))
    with torch.no_grad():
        full = m(ids)
        cache = m.make_cache(1, 32)
        steps = [m(ids[:, :8], cache=cache), m(ids[:, 8:10], cache=cache), m(ids[:, 10:], cache=cache)]
    assert (torch.cat(steps, 1) - full).abs().max().item() <= 1e-5


def test_a_cache_left_by_an_interrupted_forward_must_be_reset():
    """Layers write their keys as they go (rings overwrite old ones), so a forward that raises midway
    leaves a cache that no later step may trust."""
    from llmparts.errors import CacheError

    m = llmparts.build_model("tiny/qwen3", overrides=["attention.window=4"], seed=0).eval()
    cache = m.make_cache(1, 32)
    ids = torch.randint(0, 256, (1, 10))

    def fail(*_):
        raise RuntimeError("out of memory (simulated)")

    handle = m.layers[1].register_forward_pre_hook(fail)
    with torch.no_grad(), pytest.raises(RuntimeError, match="simulated"):
        m(ids, cache=cache)
    handle.remove()
    with torch.no_grad():
        with pytest.raises(CacheError, match="reset"):
            m(ids, cache=cache)
        cache.reset()
        assert (m(ids, cache=cache) - m(ids)).abs().max().item() <= 1e-5


@pytest.mark.parametrize("override, model_type", [
    ("attention={type: mla, n_heads: 4, q_lora_rank: 32, kv_lora_rank: 16, qk_nope_head_dim: 8, "
     "qk_rope_head_dim: 8, v_head_dim: 8}", "qwen3"),
    ("position.type=none", "gemma3_text"),
])
def test_save_pretrained_refuses_what_the_family_cannot_express(tmp_path, override, model_type):
    m = llmparts.build_model("tiny/qwen3", overrides=[override])
    with pytest.raises(ConfigError, match=f"cannot be written as model_type '{model_type}'"):
        save_pretrained(m, tmp_path / "out", model_type=model_type)
    assert not (tmp_path / "out").exists()


def test_smollm3_export_of_a_small_vocabulary_loads_in_transformers(tmp_path):
    import transformers

    m = llmparts.build_model("tiny/qwen3", overrides=["layers[1].position.type=none", "attention.qk_norm=none"])
    save_pretrained(m, tmp_path, model_type="smollm3")
    ref = transformers.AutoModelForCausalLM.from_pretrained(tmp_path, dtype=torch.float32).eval()
    with torch.no_grad():
        assert (ref(IDS).logits - m(IDS)).abs().max().item() <= 1e-4


def test_int32_labels_give_the_same_loss_as_int64():
    model = llmparts.build_model("tiny/qwen3", seed=0)
    ids = torch.randint(0, 256, (2, 9))
    labels = ids.clone()
    labels[0, :3] = -100
    with torch.no_grad():
        assert torch.equal(model(ids, labels=labels.int()), model(ids, labels=labels))
