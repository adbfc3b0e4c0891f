"""Peak RSS while loading a checkpoint: llmparts vs transformers, each in a fresh process.

Creates a random checkpoint of a shipped config once (safetensors, HF layout) in a cache directory
outside the repo, then loads it in child processes and reports the peak resident memory above the
process's baseline after imports, as a multiple of the weights' size in the target dtype.

    python scripts/measure_load_memory.py --config qwen3-0.6b --dtype bfloat16
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

CHILD = r"""
import json, sys, time, torch
from llmparts.bench import current_rss, peak_rss, reset_peak_rss  # VmHWM: not the parent's RSS (see peak_rss)
which, path, dtype = sys.argv[1], sys.argv[2], getattr(torch, sys.argv[3])
if which == "llmparts":
    import llmparts
    load = lambda: llmparts.load_pretrained(path, dtype=dtype)
else:
    import transformers
    load = lambda: transformers.AutoModelForCausalLM.from_pretrained(path, dtype=dtype)
reset_peak_rss()
base = current_rss() // 1024
t = time.perf_counter()
model = load()
seconds = time.perf_counter() - t
peak = peak_rss() // 1024
nbytes = sum(p.numel() * p.element_size() for p in model.parameters())
print(json.dumps({"base_kb": base, "peak_kb": peak, "weights_bytes": nbytes, "seconds": seconds}))
"""


def make_checkpoint(config: str, dtype: str, root: Path) -> Path:
    import torch

    import llmparts
    from llmparts.loading.export import save_pretrained

    out = root / f"{config}-{dtype}"
    if (out / "config.json").is_file():
        return out
    model = llmparts.build_model(config, dtype=getattr(torch, dtype), seed=0)
    model_type = "qwen3" if config.startswith("qwen3") else "llama"
    save_pretrained(model, out, model_type)
    return out


def measure(which: str, path: Path, dtype: str) -> dict:
    res = subprocess.run([sys.executable, "-c", CHILD, which, str(path), dtype], capture_output=True, text=True)
    if res.returncode:
        raise SystemExit(f"{which} failed:\n{res.stderr[-3000:]}")
    return json.loads(res.stdout.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--config", default="qwen3-0.6b")
    ap.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float32", "float16"])
    ap.add_argument("--cache", default=os.environ.get("LLMPARTS_BENCH_CACHE", str(Path.home() / ".cache/llmparts/bench")))
    ap.add_argument("--json", default=None, help="also write the results here")
    args = ap.parse_args()
    path = make_checkpoint(args.config, args.dtype, Path(args.cache))
    results = {}
    for which in ("llmparts", "transformers"):
        r = measure(which, path, args.dtype)
        r["load_kb"] = r["peak_kb"] - r["base_kb"]
        r["ratio"] = r["load_kb"] * 1024 / r["weights_bytes"]
        results[which] = r
        print(f"{which:12s} weights {r['weights_bytes'] / 2**20:8.1f} MiB | peak RSS {r['peak_kb'] / 1024:8.1f} MiB "
              f"(baseline {r['base_kb'] / 1024:6.1f}) | load adds {r['load_kb'] / 1024:8.1f} MiB = "
              f"{r['ratio']:.2f}x weights | {r['seconds']:.1f} s")
    print(f"llmparts / transformers peak load memory: {results['llmparts']['load_kb'] / results['transformers']['load_kb']:.2f}")
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
