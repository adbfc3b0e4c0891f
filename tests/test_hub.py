"""Hub repo ids resolved for real, offline: a tiny checkpoint laid out in a temporary Hugging Face
cache exactly as huggingface_hub lays it out, then loaded with HF_HUB_OFFLINE=1."""

from __future__ import annotations

import shutil

import pytest
import torch
import transformers

import llmparts
from llmparts import ModelNotFoundError

REPO = "Qwen/Qwen3-0.6B"
COMMIT = "c1899de289a04d12100db370d81485cdf75e47ca"


@pytest.fixture
def hf_cache(tmp_path, monkeypatch):
    cfg = transformers.Qwen3Config(vocab_size=128, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=2, head_dim=16, tie_word_embeddings=True)
    model = transformers.Qwen3ForCausalLM(cfg).eval()
    src = tmp_path / "src"
    model.save_pretrained(src)
    cache = tmp_path / "hub"
    repo = cache / f"models--{REPO.replace('/', '--')}"
    snap = repo / "snapshots" / COMMIT
    snap.mkdir(parents=True)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(COMMIT)
    blobs = repo / "blobs"
    blobs.mkdir()
    for f in src.iterdir():  # huggingface_hub stores content in blobs/ and symlinks it from the snapshot
        blob = blobs / f"blob-{f.name}"
        shutil.copy(f, blob)
        (snap / f.name).symlink_to(blob)
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    return model, snap


def test_repo_id_resolves_from_cache_offline(hf_cache):
    ref, snap = hf_cache
    ours = llmparts.load_pretrained(REPO)
    x = torch.randint(0, 128, (2, 16))
    with torch.no_grad():
        assert (ours(x) - ref(x).logits).abs().max().item() <= 1e-5
    assert llmparts.loading.hub.resolve_source(REPO) == snap


def test_uncached_repo_offline_gives_clear_error(hf_cache):
    with pytest.raises(ModelNotFoundError) as e:
        llmparts.load_pretrained("someone/not-cached")
    msg = str(e.value)
    assert "not in the local Hugging Face cache" in msg and "HF_HUB_OFFLINE=1" in msg and "local" in msg


def test_not_a_path_nor_repo_id():
    with pytest.raises(ModelNotFoundError, match="not an existing directory, a .gguf file or a Hugging Face repo id"):
        llmparts.load_pretrained("./no/such/dir/here")
    with pytest.raises(ModelNotFoundError, match="no such GGUF file"):
        llmparts.load_pretrained("missing.gguf")
