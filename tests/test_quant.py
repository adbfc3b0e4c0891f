"""MXFP4 and block-FP8 dequantization, checked bit for bit against transformers' own code and loads."""

from __future__ import annotations

import json

import pytest
import torch
import transformers
from conftest import requantize
from safetensors.torch import load_file, save_file
from transformers.integrations.finegrained_fp8 import Fp8Dequantize, _dequantize_fp8_weight
from transformers.integrations.mxfp4 import FP4_VALUES, convert_moe_packed_tensors

from llmparts.errors import CheckpointError, ConfigError, UnsupportedModelError
from llmparts.loading import quant
from llmparts.loading.checkpoint import SafetensorsCheckpoint
from llmparts.loading.quant import (
    QuantConfig,
    QuantizedCheckpoint,
    dequantize_fp8_blocks,
    dequantize_mxfp4,
    detect_quantization,
    parse_quant_config,
    quantize_fp8_blocks,
    quantize_mxfp4,
    wrap_quantized,
)

GPT_OSS_QUANT = {  # openai/gpt-oss-20b and -120b config.json
    "modules_to_not_convert": ["model.layers.*.self_attn", "model.layers.*.mlp.router", "model.embed_tokens",
                               "lm_head"],
    "quant_method": "mxfp4",
}
DEEPSEEK_QUANT = {"activation_scheme": "dynamic", "fmt": "e4m3", "quant_method": "fp8", "weight_block_size": [128, 128]}


def bits(t: torch.Tensor) -> torch.Tensor:
    """The raw bits, so NaN/inf/-0 compare exactly."""
    return t.contiguous().view({1: torch.int8, 2: torch.int16, 4: torch.int32, 8: torch.int64}[t.element_size()])


def random_mxfp4(*shape, lo=0, hi=255):
    """Random blocks (..., G, 16) and scales (..., G) with scale bytes in [lo, hi)."""
    return torch.randint(0, 256, (*shape, 16), dtype=torch.uint8), torch.randint(lo, hi, shape, dtype=torch.uint8)


# ------------------------------------------------------------------------------- MXFP4 numerics
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("chunk", [quant.DEQUANT_CHUNK, 96])  # 96: many chunks, the last one partial
def test_mxfp4_matches_transformers(dtype, chunk, monkeypatch):
    monkeypatch.setattr(quant, "DEQUANT_CHUNK", chunk)
    blocks, scales = random_mxfp4(3, 10, 4, lo=0, hi=256)  # every scale byte, 255 (inf/NaN) included
    ref = convert_moe_packed_tensors(blocks, scales, dtype=dtype)  # (E, in, out)
    ours = dequantize_mxfp4(blocks, scales, dtype)  # (E, out, in)
    assert ours.shape == (3, 10, 128) and ours.dtype == dtype
    assert torch.equal(bits(ours.transpose(1, 2)), bits(ref))


def test_mxfp4_layout_and_lut():
    # byte 0x7A in group scale 128 (x2): low nibble 0xA -> element 0 = -1.0*2, high 0x7 -> element 1 = 6.0*2
    blocks = torch.zeros(1, 1, 16, dtype=torch.uint8)
    blocks[0, 0, 0] = 0x7A
    out = dequantize_mxfp4(blocks, torch.tensor([[128]], dtype=torch.uint8), torch.float32)
    assert out[0, :2].tolist() == [-2.0, 12.0] and not out[0, 2:].any()
    codes = torch.arange(16, dtype=torch.uint8)
    lut = dequantize_mxfp4((codes[0::2] | codes[1::2] << 4).reshape(1, 1, 8).repeat(1, 1, 2)[..., :16],
                           torch.tensor([[127]], dtype=torch.uint8), torch.float32)
    assert bits(lut[0, :16]).tolist() == bits(torch.tensor(FP4_VALUES)).tolist()


def test_mxfp4_into_out_and_device_arg():
    blocks, scales = random_mxfp4(2, 5, 3, lo=100, hi=150)
    want = dequantize_mxfp4(blocks, scales, torch.bfloat16)
    out = torch.empty(2, 96, 5, dtype=torch.bfloat16).transpose(1, 2)  # non-contiguous target
    assert dequantize_mxfp4(blocks, scales, out=out) is out
    assert torch.equal(out, want)
    with pytest.raises(CheckpointError, match="do not match"):
        dequantize_mxfp4(blocks, scales[..., :2])
    with pytest.raises(CheckpointError, match="uint8"):
        dequantize_mxfp4(blocks.int(), scales)


def test_mxfp4_round_trip():
    w = torch.randn(4, 6, 128) * torch.logspace(-3, 3, 6)[:, None]
    blocks, scales = quantize_mxfp4(w)
    assert blocks.shape == (4, 6, 4, 16) and scales.shape == (4, 6, 4)
    back = dequantize_mxfp4(blocks, scales, torch.float32)
    step = torch.ldexp(torch.ones(scales.shape), scales.int() - 127)  # largest half-spacing: 1 unit of the scale
    assert ((back - w).abs().reshape(4, 6, 4, 32) <= step[..., None]).all()
    # values already on the grid survive exactly (scale bytes kept in range so nothing overflows)
    grid = dequantize_mxfp4(*random_mxfp4(5, 7, lo=60, hi=190), dtype=torch.float32)
    assert torch.equal(bits(dequantize_mxfp4(*quantize_mxfp4(grid), dtype=torch.float32)), bits(grid))
    # midpoints round to the even code: 0.25->0, 0.75->1, 1.25->1, 1.75->2, 2.5->2, 3.5->4, 5->4
    mids = torch.tensor([6.0, 0.25, 0.75, 1.25, 1.75, 2.5, 3.5, 5.0] + [0.0] * 24)
    assert dequantize_mxfp4(*quantize_mxfp4(mids), dtype=torch.float32)[:8].tolist() == [6, 0, 1, 1, 2, 2, 4, 4]
    assert not dequantize_mxfp4(*quantize_mxfp4(torch.zeros(32)), dtype=torch.float32).any()


# --------------------------------------------------------------------------------- FP8 numerics
def random_fp8(*shape):
    w = (torch.randn(shape) * 100).clamp(-448, 448).to(torch.float8_e4m3fn)
    return w


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_fp8_matches_transformers_load_path(dtype):
    # transformers' load-time dequantization (dequantize=True, e.g. on CPU); it needs whole blocks
    w = random_fp8(256, 384)
    s = torch.rand(2, 3) * 0.01
    ref = Fp8Dequantize(None)._dequantize_one(w, s, output_dtype=dtype)
    ours = dequantize_fp8_blocks(w, s, (128, 128), dtype)
    assert ours.dtype == dtype and torch.equal(bits(ours), bits(ref))


@pytest.mark.parametrize("shape,block", [((200, 300), (128, 128)), ((5, 7), (2, 3)), ((3, 130, 129), (64, 128)),
                                         ((16, 16), (128, 128))])
def test_fp8_partial_blocks_match_transformers_formula(shape, block, monkeypatch):
    # _dequantize_fp8_weight (transformers' backward path) handles partial edge blocks; in float32 it is
    # the documented formula W[r, c] = W8[r, c] * scale_inv[r // bo, c // bi] in one rounding
    monkeypatch.setattr(quant, "DEQUANT_CHUNK", 1)  # one row block per chunk
    w = random_fp8(*shape)
    s = torch.rand(quant._fp8_grid(shape, block)) * 0.01
    ref = _dequantize_fp8_weight(w, s, list(block), torch.float32)
    assert torch.equal(dequantize_fp8_blocks(w, s, block, torch.float32), ref)
    assert torch.equal(dequantize_fp8_blocks(w, s, block, torch.bfloat16), ref.to(torch.bfloat16))
    r, c = shape[-2] - 1, shape[-1] - 1
    assert ref[..., r, c].equal(w[..., r, c].float() * s[..., r // block[0], c // block[1]])


def test_fp8_per_tensor_and_errors():
    w = random_fp8(10, 20)
    out = torch.empty(20, 10).t()  # non-contiguous target
    dequantize_fp8_blocks(w, torch.tensor(0.5), None, out=out)
    assert torch.equal(out, w.float() * 0.5)
    with pytest.raises(CheckpointError, match=r"needs \(1, 1\)"):
        dequantize_fp8_blocks(w, torch.ones(2, 1), (128, 128))
    with pytest.raises(CheckpointError, match="float8"):
        dequantize_fp8_blocks(w.float(), torch.ones(1, 1))


def test_fp8_round_trip():
    w = torch.randn(300, 200) * torch.logspace(-4, 2, 300)[:, None]
    q, s = quantize_fp8_blocks(w, (128, 128))
    assert q.dtype == torch.float8_e4m3fn and s.shape == (3, 2) and s.dtype == torch.float32
    back = dequantize_fp8_blocks(q, s, (128, 128), torch.float32)
    scale = s.repeat_interleave(128, 0)[:300].repeat_interleave(128, 1)[:, :200]
    assert ((back - w).abs() <= w.abs() / 16 + scale * 2.0**-9).all()  # 3 mantissa bits; subnormals
    # exactly representable: fp8 values times a power-of-two scale, each block holding a +-448
    exact_q = random_fp8(300, 200)
    exact_q[::128, ::128] = 448
    pow2 = 2.0 ** torch.randint(-20, 0, (3, 2)).float()
    exact = exact_q.float() * pow2.repeat_interleave(128, 0)[:300].repeat_interleave(128, 1)[:, :200]
    q, s = quantize_fp8_blocks(exact, (128, 128))
    assert torch.equal(q.view(torch.uint8), exact_q.view(torch.uint8))
    assert torch.equal(dequantize_fp8_blocks(q, s, (128, 128), torch.float32), exact)
    q, s = quantize_fp8_blocks(torch.zeros(4, 4), None)
    assert s.shape == () and s.item() == 1.0 and not q.float().any()


# ----------------------------------------------------------------------------------------- config
def test_parse_quant_config_released():
    assert parse_quant_config(None, "c.json") is None
    mx = parse_quant_config(GPT_OSS_QUANT, "c.json")
    assert mx == QuantConfig("mxfp4", None, tuple(GPT_OSS_QUANT["modules_to_not_convert"]), "c.json")
    fp8 = parse_quant_config(DEEPSEEK_QUANT, "c.json")
    assert fp8.method == "fp8" and fp8.weight_block_size == (128, 128)
    # what transformers writes when it re-saves a FineGrainedFP8Config
    resaved = transformers.FineGrainedFP8Config(weight_block_size=[64, 32]).to_dict()
    assert parse_quant_config(resaved).weight_block_size == (64, 32)
    assert parse_quant_config(transformers.Mxfp4Config().to_dict()).method == "mxfp4"
    assert parse_quant_config({"quant_method": "fp8", "weight_block_size": None}).weight_block_size is None


@pytest.mark.parametrize("data,match", [
    ({"quant_method": "gptq", "bits": 4}, r"quant_method='gptq' is not supported.*'mxfp4' and 'fp8'"),
    ({**DEEPSEEK_QUANT, "activation_scheme": "static"}, r"activation_scheme='static'.*supported: 'dynamic'"),
    ({**DEEPSEEK_QUANT, "fmt": "e5m2"}, r"fmt='e5m2'.*supported: 'e4m3'"),
    ({**DEEPSEEK_QUANT, "scale_fmt": "ue8m0"}, r"scale_fmt='ue8m0'"),
    ({**GPT_OSS_QUANT, "group_size": 32}, r"quantization_config.group_size=32 is not a field.*known: dequantize"),
    ({"bits": 4}, r"quant_method=None"),
])
def test_parse_quant_config_unsupported(data, match):
    with pytest.raises(UnsupportedModelError, match=match):
        parse_quant_config(data, "x/config.json")


@pytest.mark.parametrize("data", [[1], {**DEEPSEEK_QUANT, "weight_block_size": [128]},
                                  {**DEEPSEEK_QUANT, "weight_block_size": [0, 128]},
                                  {**GPT_OSS_QUANT, "modules_to_not_convert": "lm_head"}])
def test_parse_quant_config_malformed(data):
    with pytest.raises(ConfigError, match="x/config.json: quantization_config"):
        parse_quant_config(data, "x/config.json")


# ----------------------------------------------------------------------------- QuantizedCheckpoint
def write(directory, tensors, name="model.safetensors"):
    directory.mkdir(exist_ok=True)
    save_file({k: v.contiguous() for k, v in tensors.items()}, directory / name)
    return directory


@pytest.fixture
def mx_dir(tmp_path):
    torch.manual_seed(1)
    gu_b, gu_s = random_mxfp4(3, 12, 2, lo=110, hi=140)  # (E, out=12, G=2): in = 64
    dn_b, dn_s = random_mxfp4(3, 64, 1, lo=110, hi=140)  # (E, out=64, G=1): in = 32
    return write(tmp_path / "mx", {
        "a.embed.weight": torch.randn(10, 64, dtype=torch.bfloat16),
        "a.experts.gate_up_proj_blocks": gu_b, "a.experts.gate_up_proj_scales": gu_s,
        "a.experts.gate_up_proj_bias": torch.randn(3, 12, dtype=torch.bfloat16),
        "a.experts.down_proj_blocks": dn_b, "a.experts.down_proj_scales": dn_s,
        "a.norm.weight": torch.randn(64, dtype=torch.bfloat16),
        "a.sinks": torch.randn(4, dtype=torch.float32),
    })


def test_mxfp4_checkpoint(mx_dir):
    inner = SafetensorsCheckpoint(mx_dir)
    assert detect_quantization(inner) == "mxfp4" and QuantizedCheckpoint.detect(inner) == "mxfp4"
    ckpt = wrap_quantized(inner, parse_quant_config(GPT_OSS_QUANT), "mx")
    assert isinstance(ckpt, QuantizedCheckpoint)
    assert ckpt.shapes == {
        "a.embed.weight": (10, 64), "a.experts.gate_up_proj": (3, 64, 12), "a.experts.gate_up_proj_bias": (3, 12),
        "a.experts.down_proj": (3, 32, 64), "a.norm.weight": (64,), "a.sinks": (4,),
    }
    assert ckpt.dominant_dtype() == torch.bfloat16 and ckpt.dtype == torch.bfloat16
    assert ckpt.dtypes["a.experts.down_proj"] == "BF16" and ckpt.dtypes["a.sinks"] == "F32"
    raw = load_file(mx_dir / "model.safetensors")
    assert ckpt.ordered(None) == [
        k.removesuffix("_blocks") for k in inner.ordered(None) if not k.endswith("_scales")
    ]
    on_disk = inner.ordered({"a.sinks", "a.experts.down_proj_blocks"})
    assert ckpt.ordered({"a.sinks", "a.experts.down_proj"}) == [k.removesuffix("_blocks") for k in on_disk]
    got = dict(ckpt.tensors())
    assert set(got) == set(ckpt.shapes)
    for name in ("gate_up_proj", "down_proj"):
        b, s = raw[f"a.experts.{name}_blocks"], raw[f"a.experts.{name}_scales"]
        want = convert_moe_packed_tensors(b, s, dtype=torch.bfloat16)
        assert torch.equal(got[f"a.experts.{name}"], want)
        out = torch.empty(ckpt.shapes[f"a.experts.{name}"], dtype=torch.float32)
        ckpt.read_into(f"a.experts.{name}", out)
        assert torch.equal(out, convert_moe_packed_tensors(b, s, dtype=torch.float32))
    assert torch.equal(got["a.sinks"], raw["a.sinks"]) and got["a.sinks"].dtype == torch.float32
    out = torch.empty(10, 64, dtype=torch.float32)
    ckpt.read_into("a.embed.weight", out)  # pass-through delegates (and casts)
    assert torch.equal(out, raw["a.embed.weight"].float())
    with pytest.raises(CheckpointError, match=r"has shape \(3, 32, 64\), not \(3, 64, 32\)"):
        ckpt.read_into("a.experts.down_proj", torch.empty(3, 64, 32))


def test_sharded_and_without_read_into(tmp_path):
    """Blocks and scales in different shards; and an inner reader with only shapes + tensors()."""
    b, s = random_mxfp4(2, 4, 1, lo=120, hi=130)
    d = write(tmp_path, {"x.w_blocks": b, "y.bias": torch.ones(4, dtype=torch.bfloat16)}, "model-00001.safetensors")
    write(d, {"x.w_scales": s, "z.weight": torch.zeros(2, dtype=torch.bfloat16)}, "model-00002.safetensors")
    (d / "model.safetensors.index.json").write_text(json.dumps({"weight_map": {
        "x.w_blocks": "model-00001.safetensors", "y.bias": "model-00001.safetensors",
        "x.w_scales": "model-00002.safetensors", "z.weight": "model-00002.safetensors"}}))
    inner = SafetensorsCheckpoint(d)
    ckpt = QuantizedCheckpoint(inner, parse_quant_config(GPT_OSS_QUANT))
    assert set(inner.ordered(None)[2:]) == {"x.w_scales", "z.weight"}  # shard 2 after shard 1
    assert ckpt.ordered(None) == [k.removesuffix("_blocks") for k in inner.ordered(None) if k != "x.w_scales"]
    want = convert_moe_packed_tensors(b, s, dtype=torch.bfloat16)
    assert torch.equal(dict(ckpt.tensors())["x.w"], want)

    class Plain:  # like PickleCheckpoint: no read_into, no ordered, torch dtypes
        def __init__(self, sd):
            self.sd, self.shapes = sd, {k: tuple(v.shape) for k, v in sd.items()}
            self.dtypes = {k: v.dtype for k, v in sd.items()}

        def tensors(self, keys=None):
            yield from ((k, v) for k, v in self.sd.items() if keys is None or k in keys)

    sd = load_file(d / "model-00001.safetensors") | load_file(d / "model-00002.safetensors")
    plain = QuantizedCheckpoint(Plain(sd), parse_quant_config(GPT_OSS_QUANT), dtype=torch.float32)
    got = dict(plain.tensors())
    assert set(got) == {"x.w", "y.bias", "z.weight"} and plain.dtypes["x.w"] == torch.float32
    assert torch.equal(got["x.w"], want.float()) and got["y.bias"].dtype == torch.bfloat16
    out = torch.empty(4)
    plain.read_into("y.bias", out)
    assert out.tolist() == [1.0] * 4


@pytest.fixture
def fp8_dir(tmp_path):
    torch.manual_seed(2)
    tensors = {"m.embed.weight": torch.randn(8, 6, dtype=torch.bfloat16),
               "m.norm.weight": torch.ones(6, dtype=torch.bfloat16),
               "m.gate.e_score_correction_bias": torch.zeros(4, dtype=torch.float32)}
    for name, shape in {"m.q.weight": (5, 6), "m.experts.gate_up_proj": (4, 7, 3)}.items():
        tensors[name], tensors[name + "_scale_inv"] = quantize_fp8_blocks(torch.randn(shape), (2, 4))
    return write(tmp_path / "fp8", tensors)


def test_fp8_checkpoint(fp8_dir):
    inner = SafetensorsCheckpoint(fp8_dir)
    assert detect_quantization(inner) == "fp8"
    cfg = parse_quant_config({**DEEPSEEK_QUANT, "weight_block_size": [2, 4]})
    ckpt = QuantizedCheckpoint(inner, cfg)
    assert ckpt.shapes == {"m.embed.weight": (8, 6), "m.norm.weight": (6,), "m.gate.e_score_correction_bias": (4,),
                           "m.q.weight": (5, 6), "m.experts.gate_up_proj": (4, 7, 3)}
    # the float32 scales outnumber the bf16 tensors on disk; the logical view ignores them
    assert ckpt.dominant_dtype() == torch.bfloat16 and inner.dominant_dtype() == torch.float32
    assert ckpt.dtypes["m.q.weight"] == "BF16"
    assert set(ckpt.ordered(None)) == set(ckpt.shapes)
    raw = load_file(fp8_dir / "model.safetensors")
    got = dict(ckpt.tensors({"m.q.weight", "m.experts.gate_up_proj", "m.norm.weight"}))
    assert set(got) == {"m.q.weight", "m.experts.gate_up_proj", "m.norm.weight"}
    for k in ("m.q.weight", "m.experts.gate_up_proj"):
        ref = _dequantize_fp8_weight(raw[k], raw[k + "_scale_inv"], [2, 4], torch.float32)
        assert torch.equal(got[k], ref.to(torch.bfloat16))
        out = torch.empty(ckpt.shapes[k], dtype=torch.float32)
        ckpt.read_into(k, out)
        assert torch.equal(out, ref)


def error_case(tmp_path, tensors, quant_cfg, match):
    with pytest.raises(CheckpointError, match=match):
        inner = SafetensorsCheckpoint(write(tmp_path / "bad", tensors))
        QuantizedCheckpoint(inner, parse_quant_config(quant_cfg), source="bad")


def test_mxfp4_checkpoint_errors(tmp_path):
    b, s = random_mxfp4(2, 4, 1)
    error_case(tmp_path, {"e.w_blocks": b}, GPT_OSS_QUANT, r"bad: MXFP4 _blocks without their _scales: e.w_blocks")
    error_case(tmp_path, {"e.w_scales": s}, GPT_OSS_QUANT, r"_scales without their _blocks: e.w_scales")
    error_case(tmp_path, {"e.w_blocks": b, "e.w_scales": s[:, :3]}, GPT_OSS_QUANT, r"MXFP4 shapes .*e.w_blocks")
    error_case(tmp_path, {"e.w_blocks": b[0], "e.w_scales": s[0]}, GPT_OSS_QUANT, r"not \(E, out, G, 16\)")
    error_case(tmp_path, {"e.w_blocks": b.float(), "e.w_scales": s}, GPT_OSS_QUANT, r"must be uint8")
    error_case(tmp_path, {"e.w_blocks": b, "e.w_scales": s, "e.w": torch.ones(1)}, GPT_OSS_QUANT, r"both a tensor")
    error_case(tmp_path, {"e.w": torch.ones(2, 2).to(torch.float8_e4m3fn)}, GPT_OSS_QUANT, r"says mxfp4: e.w")


def test_fp8_checkpoint_errors(tmp_path):
    q, s = quantize_fp8_blocks(torch.randn(5, 6), (2, 4))
    error_case(tmp_path, {"l.weight": q}, DEEPSEEK_QUANT, r"bad: float8 tensors without their _scale_inv: l.weight")
    error_case(tmp_path, {"l.weight_scale_inv": s, "l.weight": q.float()}, DEEPSEEK_QUANT,
               r"_scale_inv tensors without a float8 tensor to scale: l.weight_scale_inv")
    error_case(tmp_path, {"l.weight": q, "l.weight_scale_inv": s}, DEEPSEEK_QUANT,
               r"scale shape \(3, 2\) does not match weight \(5, 6\) with weight_block_size \[128, 128\] "
               r"\(expected \(1, 1\)\)")
    error_case(tmp_path, {"l.weight": q.float().to(torch.float8_e5m2), "l.weight_scale_inv": s},
               {**DEEPSEEK_QUANT, "weight_block_size": [2, 4]}, r"must be float8_e4m3fn")
    error_case(tmp_path, {"l.weight": q, "l.weight_scale_inv": s.bfloat16()},
               {**DEEPSEEK_QUANT, "weight_block_size": [2, 4]}, r"scales must be float32")
    b, sc = random_mxfp4(1, 1, 1)
    error_case(tmp_path, {"e_blocks": b, "e_scales": sc}, DEEPSEEK_QUANT, r"MXFP4 tensors .* says fp8")


def test_quantized_checkpoint_without_quantization_config(mx_dir, fp8_dir, tmp_path):
    for d, kind in ((mx_dir, "mxfp4"), (fp8_dir, "fp8")):
        with pytest.raises(CheckpointError, match=f"holds {kind} quantized tensors .* no quantization_config"):
            wrap_quantized(SafetensorsCheckpoint(d), None, str(d))
    plain = SafetensorsCheckpoint(write(tmp_path / "plain", {"w": torch.ones(2, dtype=torch.bfloat16)}))
    assert detect_quantization(plain) is None and wrap_quantized(plain, None) is plain


# ------------------------------------------------------------------- end to end against transformers
def _quantize_dir(model, directory, quant_cfg, convert):
    model.save_pretrained(directory)
    requantize(directory, quant_cfg, convert)


def _compare_with_transformers(directory, quant_cfg, dtype):
    ref = transformers.AutoModelForCausalLM.from_pretrained(directory, dtype=dtype)  # dequantizes on CPU
    params = dict(ref.named_parameters())
    ckpt = wrap_quantized(SafetensorsCheckpoint(directory), parse_quant_config(quant_cfg), str(directory), dtype)
    assert ckpt.dominant_dtype() == torch.bfloat16 and ckpt.dtype == dtype
    ours = dict(ckpt.tensors())
    assert set(ours) == set(params)
    for k, p in params.items():
        assert ours[k].shape == p.shape and torch.equal(ours[k].to(p.dtype), p), k
        out = torch.empty_like(p)
        ckpt.read_into(k, out)
        assert torch.equal(out, p), k


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_gpt_oss_mxfp4_matches_transformers_load(tmp_path, dtype):
    cfg = transformers.GptOssConfig(vocab_size=64, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                                    num_attention_heads=4, num_key_value_heads=2, head_dim=16, num_local_experts=4,
                                    num_experts_per_tok=2, layer_types=["sliding_attention", "full_attention"])
    model = transformers.GptOssForCausalLM(cfg).to(torch.bfloat16)

    def convert(k, sd):
        if not k.endswith(("experts.gate_up_proj", "experts.down_proj")):
            return {}
        blocks, scales = quantize_mxfp4(sd.pop(k).transpose(1, 2).float())  # param (E, in, out) -> (E, out, in)
        return {f"{k}_blocks": blocks, f"{k}_scales": scales}

    _quantize_dir(model, tmp_path, GPT_OSS_QUANT, convert)
    assert SafetensorsCheckpoint(tmp_path).shapes["model.layers.0.mlp.experts.gate_up_proj_blocks"] == (4, 192, 2, 16)
    _compare_with_transformers(tmp_path, GPT_OSS_QUANT, dtype)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_fp8_matches_transformers_load(tmp_path, dtype):
    # transformers 5.23's load-time Fp8Dequantize rejects partial blocks, so these shapes divide evenly
    cfg = transformers.Qwen3Config(vocab_size=64, hidden_size=64, intermediate_size=96, num_hidden_layers=1,
                                   num_attention_heads=4, num_key_value_heads=2, head_dim=16, tie_word_embeddings=False)
    model = transformers.Qwen3ForCausalLM(cfg).to(torch.bfloat16)
    quant_cfg = {**DEEPSEEK_QUANT, "weight_block_size": [16, 32]}

    def convert(k, sd):
        if not k.endswith("proj.weight"):
            return {}
        q, s = quantize_fp8_blocks(sd[k], (16, 32))
        return {k: q, f"{k}_scale_inv": s}

    _quantize_dir(model, tmp_path, quant_cfg, convert)
    _compare_with_transformers(tmp_path, quant_cfg, dtype)
