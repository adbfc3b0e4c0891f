"""`llmparts bench` end to end on a tiny model: both libraries run in their own processes on the same
checkpoint, and the JSON holds what the table is made of. (No timing is asserted: figures are for
reading, not for pass/fail.)"""

from __future__ import annotations

import json

import pytest
from test_gguf import tiny_llama, write_llama_gguf  # noqa: F401 (tiny_llama: a fixture)

from llmparts import bench


def test_bench_runs_both_libraries_and_writes_json(tmp_path, monkeypatch, capsys):
    import torch

    monkeypatch.setattr(bench, "CACHE", tmp_path / "cache")
    ballast = torch.ones(64 * 2**20)  # 256 MB resident in this (parent) process while the workers run
    out = tmp_path / "bench.json"
    assert bench.main(["tiny/qwen3", "--dtype", "float32", "--repeats", "1", "--prefill", "8,16",
                       "--new-tokens", "40", "--contexts", "24", "--json", str(out)]) == 0
    res = json.loads(out.read_text())["float32"]
    assert {r["framework"] for r in res["runs"]} == {"llmparts", "transformers"}
    for r in res["runs"]:
        assert set(r["prefill_s"]) == {"8", "16"} and all(t > 0 for t in r["prefill_s"].values())
        assert r["decode_tok_s"] > 0 and set(r["context_tok_s"]) == {"24"}
        assert len(r["bandwidth_samples"]) == 3  # before, after token 32, after the decode
        assert r["bandwidth"] > 0 and r["load_peak_rss"] > 0
        # A worker's load peak is its own: Linux's ru_maxrss would hold the parent's RSS at the fork
        assert r["load_peak_rss"] < 128 * 2**20, r["load_peak_rss"]
        assert len(r["weight_read_samples"]) == 3 and r["weight_read"] > 0
        assert r["load_peak_device_memory"] is None  # (CUDA only)
    assert res["device"] == "cpu" and res["device_name"]  # what ran it, in the JSON and the table's title
    summary = res["summary"]
    assert summary["bound_tok_s"] > 0
    assert {"decode_tok_s", "decode/bound", "decode/weight_read_bound", "weight_read_GB_s", "prefill_16_s",
            "load_s"} <= set(summary["llmparts"]) & set(summary["transformers"])
    assert "load_peak_gpu_mem/weights" not in summary["llmparts"]
    assert "decode_tok_s" in capsys.readouterr().out  # the printed table
    del ballast


def test_weight_storages_count_shared_weights_once():
    """Tied embeddings and views of one tensor (MoE gate/up) are one storage, read and counted once."""
    import llmparts

    model = llmparts.build_model("tiny/qwen3", overrides=["tie_embeddings=true", "mlp={type: moe, n_experts: 4, "
                                                          "top_k: 2, hidden_dim: 32}"], seed=0)
    storages = bench.weight_storages(model)
    experts = model.layers[0].mlp.experts
    assert experts.gate_proj.untyped_storage().data_ptr() == experts.up_proj.untyped_storage().data_ptr()
    every = sum(p.nbytes for _, p in model.named_parameters(remove_duplicate=False))  # the head counted twice
    assert sum(s.numel() for s in storages) == every - model.head.weight.nbytes
    assert len(storages) < len(list(model.parameters()))  # gate and up: one storage per layer
    assert bench.measure_weight_read(storages) > 0


def test_summary_has_a_gpu_memory_row_for_cuda_runs():
    run = {"framework": "llmparts", "load_s": 1.0, "load_peak_rss": 10, "load_peak_device_memory": 150,
           "weight_bytes": 100, "prefill_s": {"8": 0.1}, "decode_tok_s": 10.0, "bandwidth": 1e9,
           "weight_read": 5e8, "context_tok_s": {}}
    summary = bench.summarize([run], kv_bytes_per_token=0, active_bytes=10**7)
    assert summary["llmparts"]["load_peak_gpu_mem/weights"]["median"] == 1.5
    assert summary["llmparts"]["decode/bound"]["median"] == 0.1  # 10 tok/s against 1e9 / 1e7 = 100
    assert summary["llmparts"]["decode/weight_read_bound"]["median"] == 0.2


@pytest.mark.parametrize("args,named", [
    (["nosuch-model"], "model 'nosuch-model'"),
    (["tiny/qwen3", "--dtype", "float32,bf16"], "--dtype 'float32,bf16'"),
    (["tiny/qwen3", "--dtype", ""], "--dtype ''"),
    (["tiny/qwen3", "--threads", "0"], "--threads 0"),
    (["tiny/qwen3", "--repeats", "0"], "--repeats 0"),
    (["tiny/qwen3", "--new-tokens", "1"], "--new-tokens 1"),
    (["tiny/qwen3", "--prefill", "8,-5"], "--prefill 8,-5"),
    (["tiny/qwen3", "--contexts", "0"], "--contexts 0"),
    (["tiny/qwen3", "--contexts", "600"], "--contexts 600 (+16 decoded) needs 616 positions; tiny/qwen3 holds 512"),
    (["tiny/qwen3", "--prefill", "512"], "--prefill 512 needs 513 positions"),
    (["tiny/qwen3", "--new-tokens", "400"], "--new-tokens 400 after a 128-token prompt needs 528 positions"),
    (["tiny/qwen3", "--plot", "x.png"], "--plot x.png"),
    (["tiny/qwen3", "--device", "tpu"], "--device 'tpu'"),
])
def test_bad_arguments_are_refused_before_any_work(tmp_path, monkeypatch, capsys, args, named):
    monkeypatch.setattr(bench, "CACHE", tmp_path / "cache")
    with pytest.raises(SystemExit) as e:
        bench.main(args)
    assert e.value.code == 2
    assert named in capsys.readouterr().err
    assert not (tmp_path / "cache").exists()  # no checkpoint written, no worker started


def test_a_binary_file_is_not_taken_for_a_config(tmp_path, capsys):
    f = tmp_path / "weights.bin"
    f.write_bytes(bytes(range(256)))
    with pytest.raises(SystemExit):
        bench.main([str(f)])
    assert "not a YAML config (not text)" in capsys.readouterr().err


def test_bench_runs_a_gguf_file_in_both_libraries(tmp_path, monkeypatch, tiny_llama):
    """A GGUF checkpoint: llmparts and transformers (its gguf_file loader) both dequantize it."""
    path = write_llama_gguf(tmp_path / "tiny.gguf", tiny_llama)
    monkeypatch.setattr(bench, "CACHE", tmp_path / "cache")
    out = tmp_path / "bench.json"
    assert bench.main([str(path), "--dtype", "float32", "--repeats", "1", "--prefill", "8", "--new-tokens", "8",
                       "--json", str(out)]) == 0
    res = json.loads(out.read_text())["float32"]
    assert res["checkpoint"] == str(path) and not (tmp_path / "cache").exists()
    runs = {r["framework"]: r for r in res["runs"]}
    assert set(runs) == {"llmparts", "transformers"}
    assert runs["llmparts"]["weight_bytes"] == runs["transformers"]["weight_bytes"] > 0  # the same float32 weights
    assert all(r["decode_tok_s"] > 0 for r in runs.values())


def test_a_yaml_config_file_is_built_not_taken_for_a_checkpoint(tmp_path):
    """A file is a checkpoint only if it is a GGUF; a YAML config file gets random weights written once."""
    import shutil

    import llmparts

    cfg = tmp_path / "mine.yaml"
    shutil.copy(llmparts.config.shipped_configs()["tiny/qwen3"], cfg)
    ckpt = bench.prepare_checkpoint(str(cfg), "float32", cache=tmp_path / "cache")
    assert ckpt.is_dir() and (ckpt / "config.json").is_file() and any(ckpt.glob("*.safetensors"))
    assert bench._max_positions(str(cfg)) == 512
