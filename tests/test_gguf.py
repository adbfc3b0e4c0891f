"""GGUF reading on small crafted files: llama.cpp's Q/K permutation undone (checked against
transformers' own GGUF loader), quantized tensors dequantized, bad files refused clearly."""

from __future__ import annotations

import gc
from pathlib import Path

import gguf
import numpy as np
import pytest
import torch
import transformers

import llmparts
from llmparts import CheckpointError, UnsupportedModelError

V, D, F, L, H, K = 96, 64, 96, 2, 4, 2
HD = D // H


def permute(w: np.ndarray, n_head: int) -> np.ndarray:
    """llama.cpp's convert_hf_to_gguf permutation of q/k rows (for its interleaved RoPE)."""
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def write_llama_gguf(path, model, arch="llama", qtypes=None, extra=None, extra_tensors=None, arrays=None):
    sd = {k: v.detach().numpy().astype(np.float32) for k, v in model.state_dict().items()}
    w = gguf.GGUFWriter(str(path), arch)
    w.add_block_count(L)
    w.add_context_length(256)
    w.add_embedding_length(D)
    if f"{arch}.feed_forward_length" not in (arrays or {}):
        w.add_feed_forward_length(F)
    w.add_head_count(H)
    w.add_head_count_kv(K)
    w.add_layer_norm_rms_eps(1e-5)
    w.add_rope_freq_base(10000.0)
    w.add_rope_dimension_count(HD)
    w.add_vocab_size(V)
    for key, value in (extra or {}).items():
        w.add_uint32(key, value)
    for key, value in (arrays or {}).items():
        w.add_array(key, value)
    names = {"model.embed_tokens.weight": "token_embd.weight", "model.norm.weight": "output_norm.weight",
             "lm_head.weight": "output.weight"}
    per = {"self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k", "self_attn.v_proj": "attn_v",
           "self_attn.o_proj": "attn_output", "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up",
           "mlp.down_proj": "ffn_down", "input_layernorm": "attn_norm", "post_attention_layernorm": "ffn_norm"}
    for key, value in sd.items():
        if key in names:
            name = names[key]
        else:
            parts = key.split(".")
            name = f"blk.{parts[2]}.{per['.'.join(parts[3:-1])]}.{parts[-1]}"
        if ".attn_q." in name:
            value = permute(value, H)
        elif ".attn_k." in name:
            value = permute(value, K)
        qtype = (qtypes or {}).get(name)
        if qtype is not None:
            w.add_tensor(name, gguf.quants.quantize(value, qtype), raw_dtype=qtype)
        else:
            w.add_tensor(name, value)
    for name, (value, qtype) in (extra_tensors or {}).items():
        raw = value if value.dtype == np.uint8 else gguf.quants.quantize(value, qtype)
        w.add_tensor(name, raw, raw_dtype=qtype)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


@pytest.fixture(scope="module")
def tiny_llama():
    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(vocab_size=V, hidden_size=D, intermediate_size=F, num_hidden_layers=L,
                                   num_attention_heads=H, num_key_value_heads=K, tie_word_embeddings=False,
                                   max_position_embeddings=256, rms_norm_eps=1e-5)
    model = transformers.LlamaForCausalLM(cfg).eval()
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "norm" in n:
                p.add_(torch.randn_like(p) * 0.1)
    return model


def test_unpermute_matches_transformers_gguf_loader(tiny_llama, tmp_path):
    path = write_llama_gguf(tmp_path / "tiny.gguf", tiny_llama)
    ours = llmparts.load_pretrained(path)
    ref = transformers.AutoModelForCausalLM.from_pretrained(tmp_path, gguf_file="tiny.gguf", dtype=torch.float32,
                                                           attn_implementation="eager").eval()
    x = torch.randint(0, V, (2, 48))
    with torch.no_grad():
        expected, got = ref(x).logits, ours(x)
        original = tiny_llama(x).logits
    assert (expected - got).abs().max().item() <= 1e-5
    assert (original - got).abs().max().item() <= 1e-5  # and the permutation round-trips exactly
    assert torch.equal(ours.layers[1].attn.k_proj.weight, tiny_llama.model.layers[1].self_attn.k_proj.weight)


K_QUANT_F16_FIELDS = {"Q4_K": (144, (0, 2)), "Q6_K": (210, (208,))}  # block bytes, offsets of f16 scales


@pytest.mark.parametrize("qtype", ["Q8_0", "Q4_1", "Q5_0", "Q4_K", "Q6_K", "F16", "BF16"])
def test_quantized_tensors_dequantize_like_gguf(tiny_llama, tmp_path, qtype, monkeypatch):
    q = getattr(gguf.GGMLQuantizationType, qtype)
    rng = np.random.default_rng(0)
    ref = rng.standard_normal((8, 512)).astype(np.float32)  # K-quants need 256-wide rows
    if qtype in K_QUANT_F16_FIELDS:  # gguf cannot quantize K-quants: random blocks with sane f16 scales
        block, fields = K_QUANT_F16_FIELDS[qtype]
        blocks = rng.integers(0, 256, (8, 2, block), dtype=np.uint8)
        for off in fields:
            blocks[..., off : off + 2] = np.frombuffer(np.float16(0.01).tobytes(), np.uint8)
        packed = blocks.reshape(8, 2 * block)
    else:
        packed = gguf.quants.quantize(ref, q)
    path = write_llama_gguf(tmp_path / "q.gguf", tiny_llama, extra_tensors={"extra.weight": (packed, q)})
    f = llmparts.loading.gguf.GGUFFile(path)
    got = f.tensor("extra.weight")
    expected = gguf.quants.dequantize(packed, q).reshape(ref.shape)
    assert got.shape == (8, 512) and np.array_equal(got.numpy(), expected.astype(np.float32))
    if qtype in ("F16", "BF16", "Q8_0"):
        assert np.abs(got.numpy() - ref).max() < 0.05  # and it is a faithful approximation
    with pytest.raises(CheckpointError, match="unexpected tensors.*\\n.*extra.weight"):
        llmparts.load_pretrained(path)  # the strict check still applies to GGUF files
    # read_into: a few whole rows at a time (here 3, 3, 2), into float32 and into bfloat16
    monkeypatch.setattr(llmparts.loading.gguf, "DEQUANT_CHUNK", 3 * 512)
    for dtype in (torch.float32, torch.bfloat16):
        out = torch.full((8, 512), float("nan"), dtype=dtype)
        f.read_into("extra.weight", out)
        assert torch.equal(out, torch.from_numpy(expected.astype(np.float32)).to(dtype))


def test_chunked_reads_load_the_same_model(tiny_llama, tmp_path, monkeypatch):
    """Tensors dequantized a row at a time (q/k, which llama.cpp permutes, whole) equal whole reads."""
    Q = gguf.GGMLQuantizationType
    path = write_llama_gguf(tmp_path / "m.gguf", tiny_llama, qtypes={
        "token_embd.weight": Q.Q8_0, "blk.0.attn_q.weight": Q.Q8_0, "blk.0.attn_k.weight": Q.Q4_1,
        "blk.0.ffn_up.weight": Q.Q5_0, "blk.1.ffn_down.weight": Q.Q4_1, "output.weight": Q.Q8_0})
    whole = llmparts.load_pretrained(path, dtype=torch.bfloat16)
    calls = []
    real = llmparts.loading.gguf.dequantize
    monkeypatch.setattr(llmparts.loading.gguf, "dequantize", lambda raw, q, shape: calls.append(shape) or real(raw, q, shape))
    monkeypatch.setattr(llmparts.loading.gguf, "DEQUANT_CHUNK", D)  # one row of the d_model-wide tensors
    rows = llmparts.load_pretrained(path, dtype=torch.bfloat16)
    for (name, a), b in zip(whole.state_dict().items(), rows.state_dict().values()):
        assert torch.equal(a, b), name
    assert (1, D) in calls and (H * HD, D) in calls  # row reads, and the whole q/k


def test_unsupported_quantization_type_is_refused(tiny_llama, tmp_path):
    path = write_llama_gguf(tmp_path / "q40.gguf", tiny_llama, qtypes={"blk.0.ffn_up.weight": gguf.GGMLQuantizationType.Q4_0})
    with pytest.raises(UnsupportedModelError, match="Q4_0 are not supported; supported: F32, F16, BF16, Q8_0"):
        llmparts.load_pretrained(path)


def test_unsupported_architecture(tiny_llama, tmp_path):
    path = write_llama_gguf(tmp_path / "b.gguf", tiny_llama, arch="bert")
    with pytest.raises(UnsupportedModelError, match="GGUF architecture 'bert' is not supported; supported: gemma3, llama"):
        llmparts.load_pretrained(path)


def test_unknown_metadata_is_refused(tiny_llama, tmp_path):
    path = write_llama_gguf(tmp_path / "m.gguf", tiny_llama, extra={"llama.expert_count": 8})
    with pytest.raises(UnsupportedModelError, match="llama.expert_count"):
        llmparts.load_pretrained(path)


@pytest.mark.skipif(not Path("/proc/self/maps").exists(), reason="reads Linux's /proc/self/maps")
def test_the_file_is_read_not_kept_mapped(tiny_llama, tmp_path):
    """Mapped pages would count in the process's memory until the end, the quantized file on top of the
    dequantized weights: the file is parsed from a mapping that is let go, and tensors are read."""
    from llmparts.loading.gguf_format import GGUFContainer

    path = write_llama_gguf(tmp_path / "m.gguf", tiny_llama, qtypes={"blk.0.ffn_up.weight": gguf.GGMLQuantizationType.Q8_0})
    c = GGUFContainer(path)
    gc.collect()
    assert str(path) not in Path("/proc/self/maps").read_text()
    raw = path.read_bytes()
    for info in c.tensors.values():
        assert c.data(info).tobytes() == raw[info.offset : info.offset + info.nbytes]
    model = llmparts.load_pretrained(path)
    assert str(path) not in Path("/proc/self/maps").read_text()
    ref = {n: p.detach() for n, p in tiny_llama.named_parameters()}
    torch.testing.assert_close(model.layers[1].mlp.down_proj.weight, ref["model.layers.1.mlp.down_proj.weight"])


def test_not_a_gguf_and_truncated(tiny_llama, tmp_path):
    bad = tmp_path / "bad.gguf"
    bad.write_bytes(b"this is not a model" * 100)
    with pytest.raises(CheckpointError, match="not a readable GGUF file"):
        llmparts.load_pretrained(bad)
    good = write_llama_gguf(tmp_path / "t.gguf", tiny_llama)
    cut = tmp_path / "cut.gguf"
    cut.write_bytes(good.read_bytes()[: good.stat().st_size // 2])
    with pytest.raises(CheckpointError, match="not a readable GGUF file"):
        llmparts.load_pretrained(cut)


def test_llama_file_with_attention_biases(tmp_path):
    """llama.cpp loads q/k/v biases as optional tensors of its llama graph (permuted like the weights)."""
    torch.manual_seed(1)
    cfg = transformers.LlamaConfig(vocab_size=V, hidden_size=D, intermediate_size=F, num_hidden_layers=L,
                                   num_attention_heads=H, num_key_value_heads=K, tie_word_embeddings=False,
                                   max_position_embeddings=256, rms_norm_eps=1e-5, attention_bias=True)
    model = transformers.LlamaForCausalLM(cfg).eval()
    with torch.no_grad():
        for n, p in model.named_parameters():
            if n.endswith("bias"):
                p.normal_(0.0, 0.5)
    ours = llmparts.load_pretrained(write_llama_gguf(tmp_path / "bias.gguf", model))
    x = torch.randint(0, V, (1, 24))
    with torch.no_grad():
        assert (ours(x) - model(x).logits).abs().max().item() <= 1e-5


@pytest.mark.parametrize("alignment", [0, 7])
def test_alignment_must_be_a_power_of_two(tiny_llama, tmp_path, alignment):
    path = write_llama_gguf(tmp_path / "a.gguf", tiny_llama, extra={"general.alignment": alignment})
    with pytest.raises(CheckpointError, match="power of two"):
        llmparts.load_pretrained(path)


def test_per_layer_array_metadata_is_refused(tiny_llama, tmp_path):
    path = write_llama_gguf(tmp_path / "arr.gguf", tiny_llama, arrays={"llama.feed_forward_length": [F] * L})
    with pytest.raises(UnsupportedModelError, match="per-layer array"):
        llmparts.load_pretrained(path)


@pytest.mark.parametrize("layers, scale", [(2, 8**-0.5), (62, 16**-0.5)])
def test_gemma3_attention_scale_as_llama_cpp(tmp_path, layers, scale):
    """GGUF has no query_pre_attn_scalar: llama.cpp scales by 1/sqrt(head_dim), except for the 62-layer
    Gemma 3 27B, where it uses 1/sqrt(n_embd / n_head) (its released config's 168)."""
    from llmparts.loading import config_of

    w = gguf.GGUFWriter(str(tmp_path / "g.gguf"), "gemma3")
    for key, value in (("block_count", layers), ("context_length", 256), ("embedding_length", 64),
                       ("feed_forward_length", 96), ("attention.head_count", 4), ("attention.head_count_kv", 1),
                       ("attention.key_length", 8), ("attention.value_length", 8),
                       ("attention.sliding_window", 16)):
        w.add_uint32(f"gemma3.{key}", value)
    w.add_float32("gemma3.attention.layer_norm_rms_epsilon", 1e-6)
    w.add_tensor("token_embd.weight", np.zeros((V, 64), dtype=np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    scales = {spec.attention.scale for spec in config_of(tmp_path / "g.gguf").layers}
    assert len(scales) == 1 and scales.pop() == pytest.approx(scale)


def _patch_after(raw: bytes, name: str, skip: int, value: bytes) -> bytes:
    """``raw`` with the bytes ``skip`` bytes after GGUF string ``name`` (length-prefixed) replaced by ``value``."""
    key = len(name).to_bytes(8, "little") + name.encode()
    at = raw.index(key) + len(key) + skip
    return raw[:at] + value + raw[at + len(value):]


def test_a_corrupt_tensor_table_is_refused(tiny_llama, tmp_path):
    """Tensor data must follow the table in order at aligned offsets (llama.cpp's rule): an offset that
    overlaps the previous tensor, or a dimension whose product wraps past 64 bits, used to load garbage
    or fail inside torch."""
    good = write_llama_gguf(tmp_path / "t.gguf", tiny_llama)
    raw = good.read_bytes()
    # the second tensor's offset (after n_dims u32, two u64 dims and the type u32) set to the first's (0)
    from llmparts.loading.gguf_format import GGUFContainer

    second = list(GGUFContainer(good).tensors)[1]
    bad = tmp_path / "overlap.gguf"
    bad.write_bytes(_patch_after(raw, second, 4 + 2 * 8 + 4, (0).to_bytes(8, "little")))
    with pytest.raises(CheckpointError, match=f"tensor '{second}' starts at data offset 0, expected"):
        llmparts.load_pretrained(bad)
    bad.write_bytes(_patch_after(raw, "token_embd.weight", 4 + 8, (2**59).to_bytes(8, "little")))
    with pytest.raises(CheckpointError, match="not a readable GGUF file"):
        llmparts.load_pretrained(bad)


@pytest.mark.parametrize("key, skip, value, fragment", [
    ("llama.attention.head_count", 4, (0).to_bytes(4, "little"), "head_count must be > 0, got 0"),
    ("llama.embedding_length", 4, (2**31).to_bytes(4, "little"), "embedding_length is 2147483648 but the token "
                                                                  "embedding is"),
])
def test_bad_gguf_metadata_values_are_named(tiny_llama, tmp_path, key, skip, value, fragment):
    bad = tmp_path / "m.gguf"
    bad.write_bytes(_patch_after(write_llama_gguf(tmp_path / "t.gguf", tiny_llama).read_bytes(), key, skip, value))
    with pytest.raises(CheckpointError, match=fragment):
        llmparts.load_pretrained(bad)


@pytest.mark.parametrize("value", ["x", [1.0, 2.0]])
def test_a_non_numeric_gguf_float_is_named(tiny_llama, tmp_path, monkeypatch, value):
    from llmparts.loading.gguf_format import GGUFContainer

    path = write_llama_gguf(tmp_path / "t.gguf", tiny_llama)
    init = GGUFContainer.__init__

    def patched(self, p):
        init(self, p)
        self.fields["llama.rope.freq_base"] = value

    monkeypatch.setattr(GGUFContainer, "__init__", patched)
    with pytest.raises(CheckpointError, match="llama.rope.freq_base must be a number"):
        llmparts.load_pretrained(path)


def test_a_vocab_size_the_embedding_contradicts_is_named(tiny_llama, tmp_path):
    bad = tmp_path / "v.gguf"
    raw = write_llama_gguf(tmp_path / "t.gguf", tiny_llama).read_bytes()
    bad.write_bytes(_patch_after(raw, "llama.vocab_size", 4, (V + 72).to_bytes(4, "little")))
    with pytest.raises(CheckpointError, match=f"llama.vocab_size is {V + 72} but the token embedding has {V} rows"):
        llmparts.load_pretrained(bad)
