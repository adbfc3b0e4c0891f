"""Benchmark llmparts against transformers in one run (``llmparts bench``, ``scripts/benchmark.py``).

For a shipped config (random weights, written once as a safetensors checkpoint per dtype), one of
the built-in small MoE / MLA models, or any checkpoint directory or GGUF file (both libraries
dequantize it to the benchmarked dtype), it measures both libraries on the
same files, with the same threads and dtype, alternating them run by run, each run in a fresh
process:

* load: wall time and peak RSS above the process's RSS before loading, against the weight bytes;
* prefill: latency to the first new token for prompts of each ``--prefill`` length (after one
  untimed prompt of that length; the best of at least three prompts and at least one second of
  them, at most ten);
* decode: greedy tokens per second over ``--new-tokens`` tokens, prefill excluded (timed from the
  first generated token to the last);
* the machine's read bandwidth (best of several large reductions), sampled before, every 32 tokens
  during and after the decode, and the decode bound it implies: every weight a token uses read once
  per token, plus the KV cache at that context; with it, at the same moments, the rate at which the
  process reads its own weights, and the bound that rate implies (memory is not equally fast
  everywhere on every machine);
* on CUDA, the peak GPU memory the load allocated, against the weight bytes.

It prints medians with min-max and the ratios llmparts/transformers and llmparts/bound, and writes
all raw runs and the summary as JSON. ``--contexts`` adds a sweep of decode speed against context
length, and ``--plot`` draws it (matplotlib).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import torch

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
PREFILL_TIMED_S = 1.0  # each prefill length is timed over at least this long (3 to 10 prompts), best taken
DECODE_PROMPT = 128  # prompt tokens before the timed decode
CONTEXT_TOKENS = 16  # tokens decoded (and timed) after each --contexts prompt
CACHE = Path(os.environ.get("LLMPARTS_BENCH_CACHE", Path.home() / ".cache" / "llmparts" / "bench"))

# Small MoE / MLA models built by transformers itself (families llmparts cannot export).
BUILTIN: dict[str, dict[str, Any]] = {
    "small-moe": dict(  # Qwen3-MoE layout: 32 experts, top 4
        model_type="qwen3_moe", vocab_size=32000, hidden_size=512, intermediate_size=1536, num_hidden_layers=8,
        num_attention_heads=8, num_key_value_heads=2, head_dim=64, num_experts=32, num_experts_per_tok=4,
        moe_intermediate_size=384, norm_topk_prob=True, max_position_embeddings=8192, tie_word_embeddings=False),
    "small-mla": dict(  # DeepSeek-V3 layout: MLA, dense first layer, grouped sigmoid router, shared expert
        model_type="deepseek_v3", vocab_size=32000, hidden_size=512, intermediate_size=1536, num_hidden_layers=8,
        num_attention_heads=8, num_key_value_heads=8, q_lora_rank=192, kv_lora_rank=128, qk_rope_head_dim=32,
        qk_nope_head_dim=64, v_head_dim=64, n_routed_experts=32, num_experts_per_tok=4, n_group=4, topk_group=2,
        n_shared_experts=1, moe_intermediate_size=384, first_k_dense_replace=1, max_position_embeddings=8192,
        tie_word_embeddings=False),
}


# ------------------------------------------------------------------------------------ helpers
def current_rss() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def peak_rss() -> int:
    """This process's peak RSS since it started or since :func:`reset_peak_rss`: Linux's ``VmHWM``.
    Not ``ru_maxrss``: Linux keeps in it the RSS a process had before ``exec``, its parent's at the
    fork, so a worker spawned by a parent holding a freshly built checkpoint reported the parent's
    size as its own load peak."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * (1 if sys.platform == "darwin" else 1024)


def reset_peak_rss() -> None:
    """Reset the peak (``VmHWM``) to the current RSS (Linux 4.0+; elsewhere a no-op), so that imports
    before a measurement do not count in it."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    except OSError:
        pass


def device_name(device: str) -> str:
    """What ran the benchmark: the GPU's name, or the CPU's model name (Linux) for ``cpu``."""
    if device.startswith("cuda"):
        return torch.cuda.get_device_name(device)
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return f"{line.split(':', 1)[1].strip()}, {os.cpu_count()} CPUs"
    except OSError:
        pass
    import platform

    return platform.processor() or platform.machine()


def _sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def measure_bandwidth(threads: int, mib: int = 1024, passes: int = 6, repeats: int = 3, device: str = "cpu") -> float:
    """Sustained read bandwidth in bytes/s: the best rate, over ``repeats`` tries and three reductions
    (sum, max, dot), of ``passes`` back-to-back full reads of a ``mib`` MiB buffer (as decoding reads
    every weight, token after token). On shared (virtual) machines it drifts by 2x from one minute to
    the next, so each benchmark run samples it before, during and after its own decode timing."""
    torch.set_num_threads(threads)
    buf = torch.ones(mib * 2**20 // 4, dtype=torch.float32, device=device)
    best = 0.0
    for op in (torch.sum, torch.amax, lambda b: torch.dot(b, b)):
        op(buf)
        _sync(device)
        for _ in range(repeats):
            t = time.perf_counter()
            for _ in range(passes):
                op(buf)
            _sync(device)
            best = max(best, passes * buf.nbytes / (time.perf_counter() - t))
    del buf
    return best


def weight_storages(model: Any) -> list[torch.Tensor]:
    """Every distinct storage behind the model's parameters, as a flat byte tensor (tied and joint
    weights, or views into one mapped file, counted once)."""
    seen: dict[int, torch.Tensor] = {}
    for p in model.parameters():
        st = p.untyped_storage()
        if st.data_ptr() not in seen and st.nbytes():
            seen[st.data_ptr()] = torch.empty(0, dtype=torch.uint8, device=p.device).set_(st)
    return list(seen.values())


def measure_weight_read(storages: list[torch.Tensor], repeats: int = 2, device: str = "cpu") -> float:
    """Read rate in bytes/s of the model's own weights: the best of ``repeats`` passes that reduce
    every weight storage once (a float32 view of its bytes where the size allows). The machine's
    read bandwidth (:func:`measure_bandwidth`) is measured on a fresh buffer; on a virtual machine
    whose memory is not uniformly fast (pages backed differently by the host) the weights can read
    slower or faster than that buffer, and decode cannot beat reading them."""
    views = [b.view(torch.float32) if b.numel() % 4 == 0 else b for b in storages]
    total = sum(b.numel() for b in storages)
    best = 0.0
    for _ in range(repeats + 1):  # (the first pass warms up)
        t = time.perf_counter()
        for v in views:
            torch.amax(v) if v.dtype == torch.uint8 else torch.sum(v)
        _sync(device)
        best = max(best, total / (time.perf_counter() - t))
    return best


def warm_page_cache(checkpoint: Path) -> None:
    """Read every weight file once, so that neither library's load time includes the disk."""
    for f in [checkpoint] if checkpoint.is_file() else sorted(checkpoint.glob("*.safetensors")):
        with open(f, "rb") as fh:
            while fh.read(64 * 2**20):
                pass


def _is_checkpoint(name: str) -> bool:
    """Whether ``name`` is an existing checkpoint (a directory or a GGUF file), not a config to build."""
    return Path(name).is_dir() or (Path(name).is_file() and Path(name).suffix.lower() == ".gguf")


def prepare_checkpoint(name: str, dtype: str, cache: Path | None = None) -> Path:
    """A checkpoint for ``name``: an existing directory or GGUF file, a built-in model, or a shipped config
    with random weights (seed 0), written once per dtype under ``cache`` (default :data:`CACHE`)."""
    if _is_checkpoint(name):
        return Path(name)
    out = (cache or CACHE) / f"{name}-{dtype}"
    if (out / "config.json").is_file() and any(out.glob("*.safetensors")):
        return out
    out.mkdir(parents=True, exist_ok=True)
    if name in BUILTIN:
        import transformers

        torch.manual_seed(0)
        cfg = transformers.AutoConfig.for_model(**BUILTIN[name])
        model = transformers.AutoModelForCausalLM.from_config(cfg, dtype=DTYPES[dtype])
        with torch.no_grad():
            for n, p in model.named_parameters():
                if n.endswith("mlp.gate.weight"):  # routers: separated scores, as in trained models
                    p.normal_(0.0, 0.5)  # (near-tied random routers make every rounding flip an expert)
                elif p.dim() >= 2:
                    p.normal_(0.0, 0.02)
        model.save_pretrained(out)
    else:
        from .loading.export import save_pretrained
        from .model import build_model

        model = build_model(name, dtype=DTYPES[dtype], seed=0)
        save_pretrained(model, out, model_type=_family_of(model), dtype=DTYPES[dtype])
    return out


def _family_of(model: Any) -> str:
    from .loading.families import family_for, supported_model_types

    for mt in supported_model_types():  # the first family whose config_to_hf can express the model
        fam = family_for(mt)
        if fam.config_to_hf is None:
            continue
        try:
            from .loading.export import _check_expressible

            _check_expressible(model.config, fam.config_to_hf(model.config), mt)
            return mt
        except Exception:  # noqa: BLE001 - try the next family
            continue
    raise SystemExit(f"no family can write {model.config.name!r} as a transformers checkpoint")


# ------------------------------------------------------------------------------------- worker
class _Timestamps:
    """A transformers streamer that records when each generated token arrives."""

    def __init__(self, device: str = "cpu", probe: "_BandwidthProbe | None" = None) -> None:
        self.times: list[float] = []
        self.first = True
        self.device = device
        self.probe = probe

    def put(self, value: Any) -> None:
        if self.first:  # generate() first pushes the prompt
            self.first = False
            return
        _sync(self.device)
        self.times.append(self.probe.tick() if self.probe else time.perf_counter())

    def end(self) -> None:
        pass


class _BandwidthProbe:
    """Samples the read bandwidth every ``every`` generated tokens, in the middle of a decode: the
    bandwidth of a shared machine can change within seconds, so the bound of a run is the mean of
    samples taken before, during and after its decode. ``tick()`` returns the token's timestamp
    with the time spent probing removed, so the probes do not slow the measured rate."""

    def __init__(self, threads: int, device: str, every: int, storages: list[torch.Tensor] | None = None) -> None:
        self.threads, self.device, self.every = threads, device, every
        self.storages = storages or []
        self.samples: list[float] = []
        self.weight_samples: list[float] = []  # the weights' own read rate (measure_weight_read)
        self.paused = 0.0
        self.count = 0

    def sample(self) -> None:
        t0 = time.perf_counter()
        self.samples.append(measure_bandwidth(self.threads, mib=512, passes=4, repeats=2, device=self.device))
        if self.storages:
            self.weight_samples.append(measure_weight_read(self.storages, device=self.device))
        self.paused += time.perf_counter() - t0

    def tick(self) -> float:
        now = time.perf_counter() - self.paused
        self.count += 1
        if self.every and self.count % self.every == 0:
            self.sample()
        return now


def _rate(times: list[float]) -> float:
    return (len(times) - 1) / (times[-1] - times[0]) if len(times) > 1 else float("nan")


def run_worker(framework: str, ckpt: Path, dtype: str, threads: int, prefill: list[int], new_tokens: int,
               contexts: list[int], compile: bool, device: str = "cpu") -> dict[str, Any]:
    torch.set_num_threads(threads)
    torch.manual_seed(0)
    if framework == "transformers":
        import transformers

        transformers.logging.set_verbosity_error()
    cuda = device.startswith("cuda")
    if cuda:
        torch.cuda.reset_peak_memory_stats(device)
    reset_peak_rss()
    rss0 = current_rss()
    t0 = time.perf_counter()
    if framework == "llmparts":
        import llmparts

        model = llmparts.load_pretrained(ckpt, dtype=DTYPES[dtype], device=device)
        vocab = model.config.vocab_size
    else:
        import transformers

        where = dict(pretrained_model_name_or_path=ckpt.parent, gguf_file=ckpt.name) if ckpt.is_file() else \
            dict(pretrained_model_name_or_path=ckpt)  # a GGUF file: dequantized to dtype, as llmparts does
        model = transformers.AutoModelForCausalLM.from_pretrained(**where, dtype=DTYPES[dtype], device_map=device).eval()
        vocab = model.config.vocab_size
    _sync(device)
    load_s = time.perf_counter() - t0
    load_peak = peak_rss() - rss0
    load_peak_device = torch.cuda.max_memory_allocated(device) if cuda else None
    compile_s = None
    if compile and framework == "llmparts":
        t0 = time.perf_counter()
        compiled = model.compile_decode()
        compile_s = time.perf_counter() - t0 if compiled else None
    seen: set[int] = set()
    weight_bytes = 0
    for p in model.parameters():
        if id(p) not in seen:
            seen.add(id(p))
            weight_bytes += p.nbytes
    gen = torch.Generator().manual_seed(1)

    def ids(n: int) -> torch.Tensor:
        return torch.randint(0, vocab, (1, n), generator=gen).to(device)

    def timed_generate(prompt: torch.Tensor, n: int, probe: _BandwidthProbe | None = None) -> list[float]:
        """Timestamps: [start, token 1, token 2, ...] (minus the time ``probe`` spent sampling)."""
        times = [time.perf_counter()]
        with torch.no_grad():  # as generate() does (compile_decode compiles for no_grad tensors)
            if framework == "llmparts":
                from llmparts.generation import SamplingParams, decode_steps

                mask = torch.ones_like(prompt)
                for _ in decode_steps(model, prompt, mask, n, SamplingParams(),
                                      torch.empty(0, dtype=torch.long, device=device), 0, vocab, None,
                                      torch.zeros(1, dtype=torch.bool, device=device)):
                    _sync(device)
                    times.append(probe.tick() if probe else time.perf_counter())
            else:
                streamer = _Timestamps(device, probe)
                model.generate(prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=n, min_new_tokens=n,
                               do_sample=False, streamer=streamer, pad_token_id=0)
                times += streamer.times
        return times

    timed_generate(ids(8), 4)  # warm-up (allocator, kernels, compilation)
    out: dict[str, Any] = {"framework": framework, "dtype": dtype, "threads": threads, "load_s": load_s,
                           "compile_s": compile_s, "load_peak_rss": load_peak, "load_peak_device_memory": load_peak_device,
                           "weight_bytes": weight_bytes, "prefill_s": {},
                           "decode_tok_s": None, "context_tok_s": {}}
    for n in prefill:  # steady state: one untimed prompt of this length (a fresh process's first large
        timed_generate(ids(n), 1)  # prompts are slower), then the best of at least three prompts and at
        times = []  # least PREFILL_TIMED_S seconds of them (at most ten): short prompts on a noisy machine
        while len(times) < 3 or (sum(times) < PREFILL_TIMED_S and len(times) < 10):
            t = timed_generate(ids(n), 1)
            times.append(t[1] - t[0])
        out["prefill_s"][str(n)] = min(times)
    probe = _BandwidthProbe(threads, device, every=32, storages=weight_storages(model))
    probe.sample()  # (shifts every tick timestamp by the same amount: rates are unaffected)
    times = timed_generate(ids(DECODE_PROMPT), new_tokens, probe)
    out["decode_tok_s"] = _rate(times[1:])
    probe.sample()
    out["bandwidth_samples"] = probe.samples  # before, every 32 tokens, after
    out["bandwidth"] = statistics.mean(probe.samples)
    out["weight_read_samples"] = probe.weight_samples
    out["weight_read"] = statistics.mean(probe.weight_samples)
    for c in contexts:
        times = timed_generate(ids(c), CONTEXT_TOKENS)
        out["context_tok_s"][str(c)] = _rate(times[1:])
    return out


# ------------------------------------------------------------------------------------- parent
def _spawn(args: argparse.Namespace, framework: str, ckpt: Path, dtype: str) -> dict[str, Any]:
    cmd = [sys.executable, "-m", "llmparts.bench", "--worker", framework, "--checkpoint", str(ckpt), "--dtype", dtype,
           "--threads", str(args.threads), "--prefill", ",".join(map(str, args.prefill)),
           "--new-tokens", str(args.new_tokens), "--contexts", ",".join(map(str, args.contexts)),
           "--device", args.device]
    if args.compile:
        cmd.append("--compile")
    env = dict(os.environ, OMP_NUM_THREADS=str(args.threads), TOKENIZERS_PARALLELISM="false")
    res = subprocess.run(cmd, capture_output=True, text=True, env=env)
    if res.returncode != 0:
        raise SystemExit(f"{framework} worker failed ({dtype}):\n{res.stderr[-4000:]}")
    return json.loads(res.stdout.strip().splitlines()[-1])


def _stats(values: list[float]) -> dict[str, float]:
    return {"median": statistics.median(values), "min": min(values), "max": max(values)}


def summarize(runs: list[dict[str, Any]], kv_bytes_per_token: int, active_bytes: int) -> dict[str, Any]:
    """Medians and ranges per library. The decode bound of a run is the bandwidth measured in that run
    over the bytes one token reads (active weights, plus the KV cache at the context)."""
    def bound(rate: float, context: int) -> float:
        return rate / (active_bytes + kv_bytes_per_token * context)

    by_fw: dict[str, dict[str, list[float]]] = {}
    for r in runs:
        d = by_fw.setdefault(r["framework"], {})
        d.setdefault("load_s", []).append(r["load_s"])
        if r.get("compile_s") is not None:
            d.setdefault("compile_decode_s", []).append(r["compile_s"])
        d.setdefault("load_peak_rss/weights", []).append(r["load_peak_rss"] / r["weight_bytes"])
        if r.get("load_peak_device_memory") is not None:  # CUDA: the allocator's peak during the load
            d.setdefault("load_peak_gpu_mem/weights", []).append(r["load_peak_device_memory"] / r["weight_bytes"])
        for n, s in r["prefill_s"].items():
            d.setdefault(f"prefill_{n}_s", []).append(s)
        d.setdefault("decode_tok_s", []).append(r["decode_tok_s"])
        d.setdefault("decode/bound", []).append(r["decode_tok_s"] / bound(r["bandwidth"], 128 + 64))
        d.setdefault("bandwidth_GB_s", []).append(r["bandwidth"] / 1e9)
        if r.get("weight_read"):  # the same bound from the rate at which this process reads its own weights
            d.setdefault("decode/weight_read_bound", []).append(r["decode_tok_s"] / bound(r["weight_read"], 128 + 64))
            d.setdefault("weight_read_GB_s", []).append(r["weight_read"] / 1e9)
        for c, v in r["context_tok_s"].items():
            d.setdefault(f"decode_at_{c}_tok_s", []).append(v)
            d.setdefault(f"decode_at_{c}/bound", []).append(v / bound(r["bandwidth"], int(c) + 8))
    summary: dict[str, Any] = {fw: {k: _stats(v) for k, v in d.items()} for fw, d in by_fw.items()}
    bw = statistics.median(r["bandwidth"] for r in runs)
    summary["bandwidth_GB_s"] = bw / 1e9
    summary["bound_tok_s"] = bw / (active_bytes + kv_bytes_per_token * (128 + 64))
    summary["bound_at_tok_s"] = {c: bw / (active_bytes + kv_bytes_per_token * (int(c) + 8)) for c in runs[0]["context_tok_s"]}
    lo, hi = min(r["bandwidth"] for r in runs), max(r["bandwidth"] for r in runs)
    summary["bound_at_tok_s_range"] = {
        c: [b / (active_bytes + kv_bytes_per_token * (int(c) + 8)) for b in (lo, hi)] for c in runs[0]["context_tok_s"]
    }
    return summary


def print_table(name: str, dtype: str, summary: dict[str, Any]) -> None:
    ours, ref = summary.get("llmparts", {}), summary.get("transformers", {})
    print(f"\n{name} {dtype}: read bandwidth {summary['bandwidth_GB_s']:.1f} GB/s (median of runs), "
          f"decode bound {summary['bound_tok_s']:.2f} tok/s")
    print(f"{'metric':<24} {'llmparts median [min-max]':>27} {'transformers median [min-max]':>30} {'ratio':>7}")
    for key in ours or ref:
        o, r = ours.get(key), ref.get(key)
        cell = lambda s: f"{s['median']:.3g} [{s['min']:.3g}-{s['max']:.3g}]" if s else "-"  # noqa: E731
        ratio = ""
        if o and r and not key.endswith(("bound", "GB_s")):
            faster = key.endswith("tok_s")  # rates: llmparts / transformers; times and memory: inverse
            ratio = f"{(o['median'] / r['median']) if faster else (r['median'] / o['median']):.2f}x"
        print(f"{key:<24} {cell(o):>27} {cell(r):>30} {ratio:>7}")
    print("ratio: how many times better llmparts is (rate / rate, or transformers' time or memory / llmparts');\n"
          "/bound: decode rate over the bandwidth bound of the same run (weights + KV cache read once per token);\n"
          "/weight_read_bound: the same with the rate at which that process reads its own weights as the bandwidth")


def plot(results: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.2))
    for key, res in results.items():
        s = res["summary"]
        contexts = sorted(int(c) for c in s["bound_at_tok_s"])
        if not contexts:
            continue
        for fw, style in (("llmparts", "o-"), ("transformers", "s--")):
            if fw in s:
                ax.plot(contexts, [s[fw][f"decode_at_{c}_tok_s"]["median"] for c in contexts], style,
                        label=f"{fw} {res['dtype']}")
        ax.plot(contexts, [s["bound_at_tok_s"][str(c)] for c in contexts], ":", color="gray",
                label=f"bandwidth bound {res['dtype']} (median; band: min-max over runs)")
        band = [s["bound_at_tok_s_range"][str(c)] for c in contexts]
        ax.fill_between(contexts, [b[0] for b in band], [b[1] for b in band], color="gray", alpha=0.15)
    ax.set_xscale("log", base=2)
    ax.set_xlabel("context length (tokens)")
    ax.set_ylabel("greedy decode (tokens/s)")
    first = next(iter(results.values()))
    where = f" on {first['device_name']}" if "device_name" in first else ""  # (runs before Q did not record it)
    ax.set_title(f"{first['model']}{where}: decode speed vs context")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def _ints(text: str) -> list[int]:
    return [int(x) for x in text.split(",") if x.strip()]


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="llmparts bench", description=__doc__.split("\n\n")[0])
    p.add_argument("model", nargs="?", default="qwen3-0.6b",
                   help="shipped config name (random weights), built-in small-moe / small-mla, a checkpoint dir "
                        "or a .gguf file")
    p.add_argument("--dtype", default="float32,bfloat16", help="comma-separated: float32,bfloat16,float16")
    p.add_argument("--threads", type=int, default=min(2, os.cpu_count() or 1))
    p.add_argument("--device", default="cpu", help="cpu or cuda (both libraries, same device)")
    p.add_argument("--repeats", type=int, default=3, help="runs per library and dtype (alternating)")
    p.add_argument("--prefill", type=_ints, default=[128, 512])
    p.add_argument("--new-tokens", type=int, default=128)
    p.add_argument("--contexts", type=_ints, default=[], help="decode-vs-context sweep, e.g. 128,512,1024,2048,4096")
    p.add_argument("--compile", action="store_true", help="llmparts: torch.compile the decode step")
    p.add_argument("--only", choices=["llmparts", "transformers"], default=None)
    p.add_argument("--json", type=Path, default=None, help="write raw runs and summary here")
    p.add_argument("--plot", type=Path, default=None, help="PNG of decode tok/s vs context (needs --contexts)")
    p.add_argument("--worker", choices=["llmparts", "transformers"], help=argparse.SUPPRESS)
    p.add_argument("--checkpoint", type=Path, help=argparse.SUPPRESS)
    return p


def _max_positions(model: str) -> int:
    """The positions the benchmarked model holds (its config's max_seq_len)."""
    from .config import load_config
    from .loading import config_of

    if _is_checkpoint(model):
        return config_of(model).max_seq_len
    if model in BUILTIN:
        return BUILTIN[model]["max_position_embeddings"]
    return load_config(model).max_seq_len


def check_args(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    """Refuse bad arguments (``parser.error``: usage, the flag, its value and the fix; exit status 2)
    before any checkpoint is written or worker started."""
    from .errors import LLMPartsError

    dtypes = args.dtype.split(",")
    if not all(d in DTYPES for d in dtypes):
        parser.error(f"--dtype {args.dtype!r}: give one or more of {', '.join(DTYPES)}, comma-separated")
    for flag, value, least in (("--threads", args.threads, 1), ("--repeats", args.repeats, 1),
                               ("--new-tokens", args.new_tokens, 2)):  # a decode rate needs two tokens
        if value < least:
            parser.error(f"{flag} {value}: must be at least {least}")
    for flag, values in (("--prefill", args.prefill), ("--contexts", args.contexts)):
        if any(v < 1 for v in values):
            parser.error(f"{flag} {','.join(map(str, values))}: prompt lengths must be positive")
    if args.plot and not args.contexts:
        parser.error(f"--plot {args.plot}: the plot is of the --contexts sweep; add e.g. --contexts 128,512,1024")
    if args.device != "cpu" and not args.device.startswith("cuda"):
        parser.error(f"--device {args.device!r}: use cpu or cuda (cuda:N)")
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        parser.error(f"--device {args.device}: this torch ({torch.__version__}) sees no CUDA device; use --device cpu")
    if args.worker:
        return
    try:
        limit = _max_positions(args.model)
    except LLMPartsError as e:
        parser.error(f"model {args.model!r}: {e}")
    needs = [(n + 1, f"--prefill {n}") for n in args.prefill]  # the prompt and one new token
    needs += [(DECODE_PROMPT + args.new_tokens, f"--new-tokens {args.new_tokens} after a {DECODE_PROMPT}-token prompt")]
    needs += [(c + CONTEXT_TOKENS, f"--contexts {c} (+{CONTEXT_TOKENS} decoded)") for c in args.contexts]
    need, what = max(needs)
    if need > limit:
        parser.error(f"{what} needs {need} positions; {args.model} holds {limit} (max_seq_len): use shorter lengths")


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    check_args(parser, args)
    if args.worker:
        res = run_worker(args.worker, args.checkpoint, args.dtype, args.threads, args.prefill, args.new_tokens,
                         args.contexts, args.compile, args.device)
        print(json.dumps(res))
        return 0
    from .loading import config_of
    from .model import CausalLM

    frameworks = [args.only] if args.only else ["llmparts", "transformers"]
    results: dict[str, Any] = {}
    for dtype in args.dtype.split(","):
        ckpt = prepare_checkpoint(args.model, dtype)
        warm_page_cache(ckpt)
        cfg = config_of(ckpt)
        with torch.device("meta"):
            meta = CausalLM(cfg)
        size = torch.empty(0, dtype=DTYPES[dtype]).element_size()
        embed = 0 if cfg.tie_embeddings else cfg.vocab_size * cfg.d_model  # rows looked up, not read whole
        active_bytes = (meta.num_active_parameters() - embed) * size
        kv_bytes = meta.cache_values_per_token() * size
        runs = []
        for r in range(args.repeats):
            order = frameworks if r % 2 == 0 else frameworks[::-1]
            for fw in order:
                runs.append(_spawn(args, fw, ckpt, dtype))
                res = runs[-1]
                prefill = ", ".join(f"{n}: {s:.2f} s" for n, s in res["prefill_s"].items())
                print(f"  run {r + 1}/{args.repeats} {fw:<12} {dtype}: decode {res['decode_tok_s']:.2f} tok/s, "
                      f"prefill {prefill}, load {res['load_s']:.1f} s, bandwidth {res['bandwidth'] / 1e9:.1f} GB/s",
                      flush=True)
        summary = summarize(runs, kv_bytes, active_bytes)
        results[dtype] = {"model": args.model, "dtype": dtype, "checkpoint": str(ckpt), "runs": runs,
                          "summary": summary, "active_weight_bytes": active_bytes, "kv_bytes_per_token": kv_bytes,
                          "threads": args.threads, "compile": args.compile, "torch": torch.__version__,
                          "device": args.device, "device_name": device_name(args.device)}
        print_table(f"{args.model} on {results[dtype]['device_name']}", dtype, summary)
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(results, indent=2))
    if args.plot:
        plot(results, args.plot)
    return 0


if __name__ == "__main__":
    sys.exit(main())
