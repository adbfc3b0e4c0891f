"""`llmparts bench` end to end on a tiny model: both libraries run in their own processes on the same
checkpoint, and the JSON holds what the table is made of. (No timing is asserted: figures are for
reading, not for pass/fail.)"""

from __future__ import annotations

import json

from llmparts import bench


def test_bench_runs_both_libraries_and_writes_json(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(bench, "CACHE", tmp_path / "cache")
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
    summary = res["summary"]
    assert summary["bound_tok_s"] > 0
    assert {"decode_tok_s", "decode/bound", "prefill_16_s", "load_s"} <= set(summary["llmparts"])
    assert "decode_tok_s" in capsys.readouterr().out  # the printed table
