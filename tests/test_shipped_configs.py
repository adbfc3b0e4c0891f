"""Shipped model configs: each resolves, round-trips, and has the parameter count transformers reports.

Everything is built on the meta device, so even the 1T-parameter config costs no memory.
"""

from __future__ import annotations

import copy
import functools

import pytest
import torch

import llmparts
from llmparts import ModelConfig
from llmparts.loading.families import HFConfig, family_for

SHIPPED = sorted(name for name in llmparts.shipped_configs() if not name.startswith("tiny/"))

# Config-name prefix -> the family adapter (``model_type``) that reads (and, where it can, exports) it. The
# longest matching prefix wins: "qwen3-30b-a3b" is Qwen3-MoE, not Qwen3.
FAMILY_BY_PREFIX = {
    "llama-": "llama",
    "qwen3-": "qwen3",
    "qwen3-30b": "qwen3_moe",
    "qwen3-235b": "qwen3_moe",
    "gemma3-": "gemma3_text",
    "olmo2-": "olmo2",
    "olmo3-": "olmo3",
    "smollm3-": "smollm3",
    "mistral-": "mistral",
    "deepseek-v3": "deepseek_v3",
    "deepseek-v2": "deepseek_v2",
    "kimi-": "kimi_k2",
    "gpt-oss-": "gpt_oss",
}

# Totals published for the released checkpoints (tied embeddings counted once). Hard-coded so that
# they cannot drift with the adapters: Llama from the Hub's safetensors metadata (Llama-3.3-70B has
# the Llama-3.1-70B architecture), Qwen3 and Gemma-3-270M/1B from the keras-hub presets, OLMo 2/3,
# SmolLM3 and Mistral from the Hub's safetensors totals (``safetensors.total`` of the model repos), as are
# Qwen3-30B-A3B and Qwen3-235B-A22B; DeepSeek-V2-Lite from the sum over the -Chat checkpoint's safetensors
# tensors (same shape). (DeepSeek-V3's, Kimi K2's and gpt-oss' Hub totals count FP8 scales, the MTP layer or
# packed MXFP4 bytes, so they are not comparable; transformers' count below covers them.)
KNOWN_TOTALS = {
    "llama-3.2-1b": 1_235_814_400,
    "llama-3.2-3b": 3_212_749_824,
    "llama-3.1-8b": 8_030_261_248,
    "llama-3.1-70b": 70_553_706_496,
    "qwen3-0.6b": 596_049_920,
    "qwen3-1.7b": 1_720_574_976,
    "qwen3-4b": 4_022_468_096,
    "qwen3-8b": 8_190_735_360,
    "qwen3-14b": 14_768_307_200,
    "qwen3-32b": 32_762_123_264,
    "gemma3-270m": 268_098_176,
    "gemma3-1b": 999_885_952,
    "olmo2-1b": 1_484_916_736,
    "olmo2-7b": 7_298_617_344,
    "olmo2-13b": 13_716_198_400,
    "olmo2-32b": 32_234_279_936,
    "olmo3-7b": 7_298_011_136,
    "olmo3-32b": 32_233_522_176,
    "smollm3-3b": 3_075_098_624,
    "mistral-7b-v0.1": 7_241_732_096,
    "mistral-7b-v0.3": 7_248_023_552,
    "qwen3-30b-a3b": 30_532_122_624,
    "qwen3-235b-a22b": 235_093_634_560,
    "deepseek-v2-lite": 15_706_484_224,
}

# keras-hub's text-only Gemma 3 presets (gemma3_{4b,12b,27b}_text) keep the tokenizer's 262144 embedding
# rows; the Hugging Face checkpoints of 4B and up pad the vocabulary to 262208. Checked with that override.
KERAS_GEMMA3_TEXT_TOTALS = {
    "gemma3-4b": 3_880_099_328,
    "gemma3-12b": 11_765_788_416,
    "gemma3-27b": 27_009_002_240,
}

_LAYER_TYPES_5_1 = lambda n: ["full_attention" if (i + 1) % 6 == 0 else "sliding_attention" for i in range(n)]  # noqa: E731
_LAYER_TYPES_3_1 = lambda n: ["full_attention" if (i + 1) % 4 == 0 else "sliding_attention" for i in range(n)]  # noqa: E731
_OLMO3_YARN = {
    "rope_type": "yarn", "factor": 8.0, "original_max_position_embeddings": 8192,
    "beta_fast": 32.0, "beta_slow": 1.0, "attention_factor": 1.2079441541679836,
}
_GEMMA3_LINEAR_X8 = {"factor": 8.0, "rope_type": "linear"}
_DEEPSEEK_YARN = lambda factor, mscale, beta_fast=32, beta_slow=1: {  # noqa: E731  (4.x layout, "type")
    "beta_fast": beta_fast, "beta_slow": beta_slow, "factor": factor, "mscale": mscale, "mscale_all_dim": mscale,
    "original_max_position_embeddings": 4096, "type": "yarn",
}

# The architecture fields of the released config.json files (dtype and version stamps left out; of the token
# ids only pad_token_id, the embedding's padding row, where the file has one: gpt-oss 199999 and Gemma 3 0 as
# checked against the files; OLMo 2/3 100277, the dolma2 tokenizer's <|pad|>, and SmolLM3 128004, the Llama 3
# tokenizer's <|finetune_right_pad_id|>, not read from the files here but corroborated; Llama, Qwen3, Mistral
# and DeepSeek files have none).
# Gemma 3 4B/12B/27B are the ``text_config`` of the multimodal checkpoints, which list only what differs from
# Gemma3TextConfig's defaults; transformers fills in the rest exactly as ``from_pretrained`` does.
RELEASED = {
    "gemma3-270m": {  # google/gemma-3-270m
        "model_type": "gemma3_text", "vocab_size": 262144, "hidden_size": 640, "intermediate_size": 2048,
        "num_hidden_layers": 18, "num_attention_heads": 4, "num_key_value_heads": 1, "head_dim": 256,
        "hidden_activation": "gelu_pytorch_tanh", "max_position_embeddings": 32768, "rms_norm_eps": 1e-06,
        "query_pre_attn_scalar": 256, "sliding_window": 512, "_sliding_window_pattern": 6,
        "layer_types": _LAYER_TYPES_5_1(18), "rope_theta": 1000000.0, "rope_local_base_freq": 10000.0,
        "rope_scaling": None, "attention_bias": False, "attn_logit_softcapping": None,
        "final_logit_softcapping": None, "use_bidirectional_attention": False, "pad_token_id": 0,
    },
    "gemma3-1b": {  # google/gemma-3-1b-pt
        "model_type": "gemma3_text", "vocab_size": 262144, "hidden_size": 1152, "intermediate_size": 6912,
        "num_hidden_layers": 26, "num_attention_heads": 4, "num_key_value_heads": 1, "head_dim": 256,
        "hidden_activation": "gelu_pytorch_tanh", "max_position_embeddings": 32768, "rms_norm_eps": 1e-06,
        "query_pre_attn_scalar": 256, "sliding_window": 512, "sliding_window_pattern": 6,
        "rope_theta": 1000000, "rope_local_base_freq": 10000, "rope_scaling": None, "attention_bias": False,
        "attn_logit_softcapping": None, "final_logit_softcapping": None, "pad_token_id": 0,
    },
    "gemma3-4b": {  # google/gemma-3-4b-pt, text_config
        "model_type": "gemma3_text", "hidden_size": 2560, "intermediate_size": 10240, "num_hidden_layers": 34,
        "rope_scaling": _GEMMA3_LINEAR_X8, "sliding_window": 1024,
    },
    "gemma3-12b": {  # google/gemma-3-12b-pt, text_config
        "model_type": "gemma3_text", "hidden_size": 3840, "intermediate_size": 15360, "num_hidden_layers": 48,
        "num_attention_heads": 16, "num_key_value_heads": 8, "rope_scaling": _GEMMA3_LINEAR_X8,
        "sliding_window": 1024,
    },
    "gemma3-27b": {  # google/gemma-3-27b-pt, text_config
        "model_type": "gemma3_text", "head_dim": 128, "hidden_size": 5376, "intermediate_size": 21504,
        "num_hidden_layers": 62, "num_attention_heads": 32, "num_key_value_heads": 16,
        "query_pre_attn_scalar": 168, "rope_scaling": _GEMMA3_LINEAR_X8, "sliding_window": 1024,
    },
    **{
        name: {  # allenai/OLMo-2-0425-1B, OLMo-2-1124-7B, OLMo-2-1124-13B, OLMo-2-0325-32B
            "model_type": "olmo2", "vocab_size": 100352, "hidden_size": d, "intermediate_size": ffn,
            "num_hidden_layers": layers, "num_attention_heads": heads, "num_key_value_heads": kv,
            "hidden_act": "silu", "max_position_embeddings": 4096, "rms_norm_eps": 1e-06, "rope_theta": 500000,
            "rope_scaling": None, "attention_bias": False, "tie_word_embeddings": False, "pad_token_id": 100277,
        }
        for name, (d, ffn, layers, heads, kv) in {
            "olmo2-1b": (2048, 8192, 16, 16, 16),
            "olmo2-7b": (4096, 11008, 32, 32, 32),
            "olmo2-13b": (5120, 13824, 40, 40, 40),
            "olmo2-32b": (5120, 27648, 64, 40, 8),
        }.items()
    },
    **{
        name: {  # allenai/Olmo-3-1025-7B, Olmo-3-1125-32B
            "model_type": "olmo3", "vocab_size": 100278, "hidden_size": d, "intermediate_size": ffn,
            "num_hidden_layers": layers, "num_attention_heads": heads, "num_key_value_heads": kv,
            "hidden_act": "silu", "max_position_embeddings": 65536, "rms_norm_eps": 1e-06, "rope_theta": 500000,
            "rope_scaling": _OLMO3_YARN, "sliding_window": 4096, "layer_types": _LAYER_TYPES_3_1(layers),
            "attention_bias": False, "tie_word_embeddings": False, "pad_token_id": 100277,
        }
        for name, (d, ffn, layers, heads, kv) in {
            "olmo3-7b": (4096, 11008, 32, 32, 32),
            "olmo3-32b": (5120, 27648, 64, 40, 8),
        }.items()
    },
    "smollm3-3b": {  # HuggingFaceTB/SmolLM3-3B
        "model_type": "smollm3", "vocab_size": 128256, "hidden_size": 2048, "intermediate_size": 11008,
        "num_hidden_layers": 36, "num_attention_heads": 16, "num_key_value_heads": 4, "hidden_act": "silu",
        "max_position_embeddings": 65536, "rms_norm_eps": 1e-06, "rope_theta": 5000000.0, "rope_scaling": None,
        "no_rope_layers": [1, 1, 1, 0] * 9, "no_rope_layer_interval": 4, "use_sliding_window": False,
        "sliding_window": None, "attention_bias": False, "mlp_bias": False, "tie_word_embeddings": True,
        "pad_token_id": 128004,
    },
    "mistral-7b-v0.1": {  # mistralai/Mistral-7B-v0.1
        "model_type": "mistral", "vocab_size": 32000, "hidden_size": 4096, "intermediate_size": 14336,
        "num_hidden_layers": 32, "num_attention_heads": 32, "num_key_value_heads": 8, "hidden_act": "silu",
        "max_position_embeddings": 32768, "rms_norm_eps": 1e-05, "rope_theta": 10000.0, "sliding_window": 4096,
        "tie_word_embeddings": False,
    },
    "mistral-7b-v0.3": {  # mistralai/Mistral-7B-v0.3
        "model_type": "mistral", "vocab_size": 32768, "hidden_size": 4096, "intermediate_size": 14336,
        "num_hidden_layers": 32, "num_attention_heads": 32, "num_key_value_heads": 8, "hidden_act": "silu",
        "max_position_embeddings": 32768, "rms_norm_eps": 1e-05, "rope_theta": 1000000.0, "sliding_window": None,
        "tie_word_embeddings": False,
    },
    **{
        name: {  # Qwen/Qwen3-30B-A3B, Qwen/Qwen3-235B-A22B
            "architectures": ["Qwen3MoeForCausalLM"], "model_type": "qwen3_moe", "vocab_size": 151936,
            "hidden_size": d, "intermediate_size": ffn, "moe_intermediate_size": moe, "num_hidden_layers": layers,
            "num_attention_heads": heads, "num_key_value_heads": 4, "head_dim": 128, "hidden_act": "silu",
            "max_position_embeddings": 40960, "rms_norm_eps": 1e-06, "rope_theta": 1000000.0, "rope_scaling": None,
            "attention_bias": False, "use_sliding_window": False, "sliding_window": None,
            "max_window_layers": layers, "num_experts": 128, "num_experts_per_tok": 8, "norm_topk_prob": True,
            "decoder_sparse_step": 1, "mlp_only_layers": [], "router_aux_loss_coef": 0.001,
            "output_router_logits": False, "tie_word_embeddings": False,
        }
        for name, (d, ffn, moe, layers, heads) in {
            "qwen3-30b-a3b": (2048, 6144, 768, 48, 32),
            "qwen3-235b-a22b": (4096, 12288, 1536, 94, 64),
        }.items()
    },
    "deepseek-v3": {  # deepseek-ai/DeepSeek-V3
        "architectures": ["DeepseekV3ForCausalLM"], "model_type": "deepseek_v3", "vocab_size": 129280,
        "hidden_size": 7168, "intermediate_size": 18432, "moe_intermediate_size": 2048, "num_hidden_layers": 61,
        "num_attention_heads": 128, "num_key_value_heads": 128, "q_lora_rank": 1536, "kv_lora_rank": 512,
        "qk_nope_head_dim": 128, "qk_rope_head_dim": 64, "v_head_dim": 128, "hidden_act": "silu",
        "max_position_embeddings": 163840, "rms_norm_eps": 1e-06, "rope_theta": 10000,
        "rope_scaling": _DEEPSEEK_YARN(40, 1.0), "attention_bias": False, "first_k_dense_replace": 3,
        "moe_layer_freq": 1, "n_routed_experts": 256, "n_shared_experts": 1, "num_experts_per_tok": 8,
        "n_group": 8, "topk_group": 4, "topk_method": "noaux_tc", "scoring_func": "sigmoid", "norm_topk_prob": True,
        "routed_scaling_factor": 2.5, "num_nextn_predict_layers": 1, "ep_size": 1, "aux_loss_alpha": 0.001,
        "seq_aux": True, "pretraining_tp": 1, "tie_word_embeddings": False,
    },
    "deepseek-v2-lite": {  # deepseek-ai/DeepSeek-V2-Lite
        "architectures": ["DeepseekV2ForCausalLM"], "model_type": "deepseek_v2", "vocab_size": 102400,
        "hidden_size": 2048, "intermediate_size": 10944, "moe_intermediate_size": 1408, "num_hidden_layers": 27,
        "num_attention_heads": 16, "num_key_value_heads": 16, "q_lora_rank": None, "kv_lora_rank": 512,
        "qk_nope_head_dim": 128, "qk_rope_head_dim": 64, "v_head_dim": 128, "hidden_act": "silu",
        "max_position_embeddings": 163840, "rms_norm_eps": 1e-06, "rope_theta": 10000,
        "rope_scaling": _DEEPSEEK_YARN(40, 0.707), "attention_bias": False, "first_k_dense_replace": 1,
        "moe_layer_freq": 1, "n_routed_experts": 64, "n_shared_experts": 2, "num_experts_per_tok": 6,
        "n_group": 1, "topk_group": 1, "topk_method": "greedy", "scoring_func": "softmax", "norm_topk_prob": False,
        "routed_scaling_factor": 1.0, "aux_loss_alpha": 0.001, "seq_aux": True, "pretraining_tp": 1,
        "tie_word_embeddings": False,
    },
    "kimi-k2": {  # moonshotai/Kimi-K2-Instruct (model_type kimi_k2: DeepSeek-V3 code under another name)
        "architectures": ["DeepseekV3ForCausalLM"], "model_type": "kimi_k2", "vocab_size": 163840,
        "hidden_size": 7168, "intermediate_size": 18432, "moe_intermediate_size": 2048, "num_hidden_layers": 61,
        "num_attention_heads": 64, "num_key_value_heads": 64, "q_lora_rank": 1536, "kv_lora_rank": 512,
        "qk_nope_head_dim": 128, "qk_rope_head_dim": 64, "v_head_dim": 128, "hidden_act": "silu",
        "max_position_embeddings": 131072, "rms_norm_eps": 1e-06, "rope_theta": 50000.0,
        "rope_scaling": _DEEPSEEK_YARN(32.0, 1.0, beta_fast=1.0, beta_slow=1.0), "attention_bias": False,
        "first_k_dense_replace": 1, "moe_layer_freq": 1, "n_routed_experts": 384, "n_shared_experts": 1,
        "num_experts_per_tok": 8, "n_group": 1, "topk_group": 1, "topk_method": "noaux_tc",
        "scoring_func": "sigmoid", "norm_topk_prob": True, "routed_scaling_factor": 2.827,
        "num_nextn_predict_layers": 0, "aux_loss_alpha": 0.001, "seq_aux": True, "pretraining_tp": 1,
        "tie_word_embeddings": False,
    },
    **{
        name: {  # openai/gpt-oss-20b, openai/gpt-oss-120b
            "architectures": ["GptOssForCausalLM"], "model_type": "gpt_oss", "vocab_size": 201088,
            "hidden_size": 2880, "intermediate_size": 2880, "num_hidden_layers": layers, "num_attention_heads": 64,
            "num_key_value_heads": 8, "head_dim": 64, "hidden_act": "silu", "max_position_embeddings": 131072,
            "initial_context_length": 4096, "rms_norm_eps": 1e-05, "rope_theta": 150000,
            "rope_scaling": {"beta_fast": 32.0, "beta_slow": 1.0, "factor": 32.0,
                             "original_max_position_embeddings": 4096, "rope_type": "yarn", "truncate": False},
            "attention_bias": True, "sliding_window": 128,
            "layer_types": ["sliding_attention", "full_attention"] * (layers // 2), "num_local_experts": experts,
            "num_experts_per_tok": 4, "experts_per_token": 4, "router_aux_loss_coef": 0.9,
            "output_router_logits": False, "swiglu_limit": 7.0, "tie_word_embeddings": False,
            "pad_token_id": 199999,
        }
        for name, (layers, experts) in {"gpt-oss-20b": (24, 32), "gpt-oss-120b": (36, 128)}.items()
    },
}

# model_types transformers does not know, and the one it builds the same network with.
TRANSFORMERS_MODEL_TYPE = {"kimi_k2": "deepseek_v3"}


def released_for_transformers(name: str) -> dict:
    """A fresh copy of the released config.json, under a model_type transformers knows. (A copy: transformers
    rewrites nested dicts such as ``rope_scaling`` in place, adding ``rope_theta`` and ``rope_type``.)"""
    hf = copy.deepcopy(RELEASED[name])
    hf["model_type"] = TRANSFORMERS_MODEL_TYPE.get(hf["model_type"], hf["model_type"])
    return hf


def family_of(name: str) -> str:
    prefixes = [prefix for prefix in FAMILY_BY_PREFIX if name.startswith(prefix)]
    if not prefixes:
        raise AssertionError(f"shipped config {name!r} has no family in FAMILY_BY_PREFIX; add one")
    return FAMILY_BY_PREFIX[max(prefixes, key=len)]


def _exportable(name: str) -> bool:
    try:
        return family_for(family_of(name)).config_to_hf is not None
    except AssertionError:  # no family: test_resolves names it
        return False


# Configs whose family can write a config.json (config_to_hf); the mixture-of-experts families only read one.
EXPORTABLE = [name for name in SHIPPED if _exportable(name)]


def assert_same_network(got: ModelConfig, want: ModelConfig) -> None:
    """Equal as networks: every resolved layer, the embedding and final norm, and the top-level sizes.

    A config's layer defaults and ``overrides`` may be written differently for the same network (the shipped
    Gemma 3 files make the local layers the defaults and override every 6th; the adapter does the reverse),
    so they are compared through ``layers``, which holds each layer's fully resolved specs.
    """
    for key in ("vocab_size", "d_model", "n_layers", "max_seq_len", "tie_embeddings", "logit_softcap", "init_std"):
        assert getattr(got, key) == getattr(want, key), key
    assert got.embedding == want.embedding
    assert got.final_norm == want.final_norm
    for i, (a, b) in enumerate(zip(got.layers, want.layers, strict=True)):
        assert a == b, f"layer {i}:\n  got  {a}\n  want {b}"


# RELEASED entries that are Gemma 3 ``text_config`` excerpts rather than whole config.json files.
GEMMA3_TEXT_CONFIG_EXCERPTS = {"gemma3-4b", "gemma3-12b", "gemma3-27b"}


def test_expected_configs_are_shipped():
    missing = sorted((set(KNOWN_TOTALS) | set(RELEASED) | set(KERAS_GEMMA3_TEXT_TOTALS)) - set(SHIPPED))
    assert not missing, f"missing shipped configs: {missing}"


@pytest.mark.parametrize("name", SHIPPED)
def test_resolves(name):
    cfg = llmparts.load_config(name)
    assert cfg.name == name
    assert len(cfg.layers) == cfg.n_layers
    family_of(name)


@pytest.mark.parametrize("name", SHIPPED)
def test_round_trips(name):
    cfg = llmparts.load_config(name)
    back = ModelConfig.from_dict(cfg.to_dict())
    assert back == cfg
    assert back.layers == cfg.layers


def test_every_shipped_config_is_counted_by_transformers():
    """Each shipped config gets a transformers parameter count: through its family's config_to_hf
    (test_parameter_count_matches_transformers) or from its released config.json (RELEASED)."""
    uncounted = sorted(set(SHIPPED) - set(EXPORTABLE) - set(RELEASED))
    assert not uncounted, f"no config_to_hf and no RELEASED entry, so no transformers count: {uncounted}"


def test_family_prefixes_pick_the_longest_match():
    assert family_of("qwen3-0.6b") == "qwen3"
    assert family_of("qwen3-30b-a3b") == "qwen3_moe"
    assert family_of("qwen3-235b-a22b") == "qwen3_moe"


@pytest.mark.parametrize("name", EXPORTABLE)
def test_hf_config_round_trips(name):
    """config_to_hf then config_from_hf (strict: every key consumed) gives the same network back."""
    cfg = llmparts.load_config(name)
    family = family_for(family_of(name))
    hf = HFConfig(family.config_to_hf(cfg))
    raw = family.config_from_hf(hf)
    hf.finish(strict=True)
    assert_same_network(ModelConfig.from_dict({**raw, "name": name}), cfg)


@pytest.mark.parametrize("name", sorted(RELEASED))
def test_released_config_gives_the_shipped_config(name):
    """The released config.json, completed with transformers' defaults as ``from_pretrained`` does, read by
    the family adapter (strict), is the same network as the shipped YAML."""
    import transformers
    hf_dict = transformers.AutoConfig.for_model(**released_for_transformers(name)).to_dict()
    hf_dict["model_type"] = RELEASED[name]["model_type"]  # kimi_k2, which transformers builds as deepseek_v3
    assert hf_dict["model_type"] == family_of(name)
    hf = HFConfig(hf_dict, source=f"{name} (released config.json)")
    raw = family_for(hf_dict["model_type"]).config_from_hf(hf)
    hf.finish(strict=True)
    raw.pop("weights", None)  # checkpoint facts for the weight map (e.g. DeepSeek's MTP layers), not the network
    assert_same_network(ModelConfig.from_dict({**raw, "name": name}), llmparts.load_config(name))


@pytest.mark.parametrize("name", sorted(set(RELEASED) - GEMMA3_TEXT_CONFIG_EXCERPTS))
def test_released_config_file_gives_the_shipped_config(name):
    """The released config.json as ``load_pretrained`` reads it (the file itself, no transformers defaults
    filled in), read strictly by the family adapter, is the same network as the shipped YAML. (Gemma 3 4B+
    are left out: their RELEASED entries are ``text_config`` excerpts, not whole files.)"""
    hf = HFConfig(copy.deepcopy(RELEASED[name]), source=f"{name} (released config.json)")
    raw = family_for(RELEASED[name]["model_type"]).config_from_hf(hf)
    hf.finish(strict=True)
    raw.pop("weights", None)
    assert_same_network(ModelConfig.from_dict({**raw, "name": name}), llmparts.load_config(name))


def hf_num_parameters(hf_dict: dict) -> int:
    import transformers
    config = transformers.AutoConfig.for_model(**copy.deepcopy(hf_dict))
    assert config.model_type == hf_dict["model_type"]
    with torch.device("meta"):
        model = transformers.AutoModelForCausalLM.from_config(config)
    if "architectures" in hf_dict:
        assert type(model).__name__ == hf_dict["architectures"][0]
    # DeepSeek's router correction bias (e_score_correction_bias) is a learned, checkpointed tensor that
    # transformers registers as a buffer and llmparts as a parameter (mlp.router.correction_bias): count it.
    correction = sum(b.numel() for n, b in model.named_buffers() if n.endswith("e_score_correction_bias"))
    return sum(p.numel() for p in model.parameters()) + correction  # parameters() yields a tied weight once


@functools.lru_cache(maxsize=None)
def meta_model(name: str) -> llmparts.CausalLM:
    """The shipped config built on the meta device, once per test session."""
    return llmparts.build_model(name, device="meta")


@pytest.mark.parametrize("name", EXPORTABLE)
def test_parameter_count_matches_transformers(name):
    cfg = llmparts.load_config(name)
    ours = meta_model(name).num_parameters()
    hf_dict = family_for(family_of(name)).config_to_hf(cfg)
    assert hf_dict["tie_word_embeddings"] == cfg.tie_embeddings
    assert ours == hf_num_parameters(hf_dict)


@pytest.mark.parametrize("name", sorted(RELEASED))
def test_parameter_count_matches_transformers_on_the_released_config(name):
    """Needs no llmparts adapter: transformers builds the released config.json itself."""
    assert meta_model(name).num_parameters() == hf_num_parameters(released_for_transformers(name))


@pytest.mark.parametrize("name", sorted(KNOWN_TOTALS))
def test_parameter_count_matches_published_total(name):
    assert meta_model(name).num_parameters() == KNOWN_TOTALS[name]


@pytest.mark.parametrize("name", SHIPPED)
def test_active_parameters(name):
    """A token uses every parameter of a dense model and fewer than all of a mixture of experts."""
    model = meta_model(name)
    total, active = model.num_parameters(), model.num_active_parameters()
    if any(layer.mlp.type == "moe" for layer in model.config.layers):
        assert 0 < active < total
    else:
        assert active == total


# name: (MoE layers, n_experts, top_k, parameters of one expert), from the released config.json numbers alone.
MOE_ARITHMETIC = {
    "qwen3-30b-a3b": (48, 128, 8, 3 * 2048 * 768),  # gate, up (768 x 2048) and down (2048 x 768), no biases
    "gpt-oss-20b": (24, 32, 4, 3 * 2880 * 2880 + 2 * 2880 + 2880),  # the same plus gate, up and down biases
}


@pytest.mark.parametrize("name", sorted(MOE_ARITHMETIC))
def test_active_parameters_match_the_config_arithmetic(name):
    """Active = total minus the (n_experts - top_k) experts each MoE layer skips; routers, shared experts and
    everything else stay active. (Qwen3-30B-A3B: 30,532,122,624 - 27,179,089,920 = 3,353,032,704, the "A3B".)"""
    layers, n_experts, top_k, per_expert = MOE_ARITHMETIC[name]
    model = meta_model(name)
    assert model.num_active_parameters() == model.num_parameters() - layers * (n_experts - top_k) * per_expert


@pytest.mark.parametrize("name", sorted(KERAS_GEMMA3_TEXT_TOTALS))
def test_gemma3_parameter_count_matches_keras_hub_with_its_vocabulary(name):
    cfg = llmparts.load_config(name, overrides=["vocab_size=262144"])
    assert llmparts.build_model(cfg, device="meta").num_parameters() == KERAS_GEMMA3_TEXT_TOTALS[name]
