"""The ``llmparts`` command line: generate, chat, inspect, convert, download.

``--model`` takes a Hub repo id, a local HF directory or a ``.gguf`` file, and defaults to the
embedded SmolLM2-135M-Instruct GGUF (see :mod:`llmparts.defaults`), which works offline.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path
from typing import Any

from .errors import ContextLengthError, LLMPartsError


def _add_model_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", "-m", default=None,
                   help="Hub repo id, local HF directory or .gguf file (default: embedded SmolLM2-135M-Instruct)")
    p.add_argument("--dtype", default=None, choices=["float32", "bfloat16", "float16"],
                   help="parameter dtype (default: the checkpoint's; float32 for GGUF)")
    p.add_argument("--device", default=None, help="cpu, cuda, cuda:1, ... (default: cpu)")
    p.add_argument("--compile", action="store_true",
                   help="torch.compile the generation step (faster decoding after seconds of compiling)")


def _add_sampling_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--max-new-tokens", type=int, default=None)
    p.add_argument("--temperature", type=float, default=None, help="0 = greedy")
    p.add_argument("--top-k", type=int, default=None)
    p.add_argument("--top-p", type=float, default=None)
    p.add_argument("--min-p", type=float, default=None)
    p.add_argument("--repetition-penalty", type=float, default=None)
    p.add_argument("--seed", type=int, default=None)
    p.add_argument("--stop", action="append", default=None, help="stop string (repeatable)")
    p.add_argument("--system", default=None, help="system prompt (chat templates only)")


def _sampling(args: argparse.Namespace) -> dict[str, Any]:
    return {
        "max_new_tokens": args.max_new_tokens,
        "temperature": args.temperature,
        "top_k": args.top_k,
        "top_p": args.top_p,
        "min_p": args.min_p,
        "repetition_penalty": args.repetition_penalty,
        "seed": args.seed,
        "stop": args.stop,
    }


def _check_sampling(args: argparse.Namespace) -> None:
    """generate()'s own argument checks, before loading a model (unset flags: their neutral values)."""
    from .generation import SamplingParams, check_arguments

    given = lambda value, neutral: neutral if value is None else value  # noqa: E731
    check_arguments(SamplingParams(given(args.temperature, 0.0), given(args.top_k, 0), given(args.top_p, 1.0),
                                   args.min_p, given(args.repetition_penalty, 1.0)),
                    given(args.max_new_tokens, 1), args.stop, args.seed)


def _load(args: argparse.Namespace) -> tuple[Any, Any]:
    from .defaults import default_model_path
    from .loading import load_pretrained
    from .tokenizer import Tokenizer

    from .model import resolve_device

    source = str(default_model_path()) if args.model is None else args.model
    resolve_device(args.device, weights=True)  # the arguments first, then the files
    tok = Tokenizer.from_pretrained(source)  # before the weights: a missing tokenizer fails at once
    model = load_pretrained(source, dtype=args.dtype, device=args.device)
    if getattr(args, "compile", False):
        model.compile_decode()
    return model, tok


def cmd_generate(args: argparse.Namespace) -> int:
    from .generation import generate

    prompt = " ".join(args.prompt)
    if not prompt.strip():
        raise LLMPartsError("generate: the prompt is empty")
    _check_sampling(args)
    model, tok = _load(args)
    kwargs = _sampling(args)
    use_chat = tok.chat_template is not None and not args.raw
    if args.system and not use_chat:
        raise LLMPartsError("generate: --system needs the chat template, "
                            + ("which --raw turns off" if args.raw else "and this model's tokenizer has none"))
    if use_chat:
        messages = ([{"role": "system", "content": args.system}] if args.system else []) + [
            {"role": "user", "content": prompt}
        ]
        stream = generate(model, tok, messages=messages, stream=True, **kwargs)
    else:
        stream = generate(model, tok, prompt, stream=True, **kwargs)
    for piece in stream:
        print(piece, end="", flush=True)
    print()
    return 0


def cmd_chat(args: argparse.Namespace) -> int:
    from .generation import generate

    _check_sampling(args)
    model, tok = _load(args)
    if tok.chat_template is None:
        raise LLMPartsError("chat: this model's tokenizer has no chat template; use `llmparts generate` instead")
    system = [{"role": "system", "content": args.system}] if args.system else []
    history: list[dict[str, str]] = []
    print("Chat with the model. /reset clears the history, /exit (or Ctrl-D) quits.", file=sys.stderr)
    while True:
        try:
            line = input("> ")
        except (EOFError, KeyboardInterrupt):
            print(file=sys.stderr)
            return 0
        if not line.strip():
            continue
        if line.strip() in ("/exit", "/quit"):
            return 0
        if line.strip() == "/reset":
            history.clear()
            print("(history cleared)", file=sys.stderr)
            continue
        history.append({"role": "user", "content": line})
        reply = []
        try:
            for piece in generate(model, tok, messages=system + history, stream=True, **_sampling(args)):
                reply.append(piece)
                print(piece, end="", flush=True)
        except ContextLengthError as e:
            history.pop()
            print(f"error: {e}; this message was dropped, /reset clears the history", file=sys.stderr)
            continue
        print()
        history.append({"role": "assistant", "content": "".join(reply)})


def cmd_inspect(args: argparse.Namespace) -> int:
    from .config import load_config, shipped_configs
    from .describe import describe
    from .model import build_model

    source = args.source
    if source == "all":
        return _inspect_all(args)
    if source in shipped_configs() or source.endswith((".yaml", ".yml")):
        cfg = load_config(source, args.override)
    else:
        from .loading import config_of

        cfg = config_of(source)
        if args.override:
            cfg = cfg.with_overrides(args.override)
    print(describe(cfg))
    meta = build_model(cfg, device="meta")
    per_token = meta.cache_values_per_token()
    print(f"  KV cache: {per_token * 2:,} bytes per token in bfloat16 ({per_token * 4:,} in float32); "
          "window layers hold at most `window` tokens")
    return 0


def _inspect_all(args: argparse.Namespace) -> int:
    """One line per shipped config: parameters, active parameters per token, KV-cache bytes per token."""
    from .config import load_config, shipped_configs
    from .model import build_model

    print(f"{'config':<18} {'attention':<9} {'parameters':>17} {'active/token':>17} {'KV bytes/token (bf16)':>22}")
    for name in sorted(n for n in shipped_configs() if "/" not in n):
        meta = build_model(load_config(name, args.override), device="meta")
        kinds = "+".join(sorted({b.attn.spec.type for b in meta.layers}))
        print(f"{name:<18} {kinds:<9} {meta.num_parameters():>17,} {meta.num_active_parameters():>17,} "
              f"{meta.cache_values_per_token() * 2:>22,}")
    print("window layers stop growing at `window` tokens; MLA caches one latent per token per layer")
    return 0


def cmd_convert(args: argparse.Namespace) -> int:
    from .loading.export import convert_gguf
    from .model import resolve_dtype

    dtype = resolve_dtype(args.dtype or "float32")
    t = time.time()
    out = convert_gguf(args.gguf, args.out, dtype)
    print(f"wrote {out} in {time.time() - t:.1f}s (transformers: AutoModelForCausalLM.from_pretrained({str(out)!r}))")
    return 0


def cmd_download(args: argparse.Namespace) -> int:
    from .loading.hub import download

    print(download(args.repo_id, revision=args.revision))
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="llmparts", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("generate", help="generate text from a prompt (streams to stdout)")
    _add_model_args(p)
    _add_sampling_args(p)
    p.add_argument("--raw", action="store_true", help="do not apply the chat template")
    p.add_argument("prompt", nargs="+")
    p.set_defaults(func=cmd_generate)

    p = sub.add_parser("chat", help="interactive chat with streaming and history")
    _add_model_args(p)
    _add_sampling_args(p)
    p.set_defaults(func=cmd_chat)

    p = sub.add_parser("inspect", help="resolved layers, parameter count and KV-cache size of a config or model")
    p.add_argument("source", help="shipped config name, YAML path, HF directory, .gguf file, Hub repo id, "
                   "or 'all' for a table of every shipped config")
    p.add_argument("--override", "-o", action="append", default=None, help="e.g. attention.window=512")
    p.set_defaults(func=cmd_inspect)

    p = sub.add_parser("convert", help="GGUF file -> Hugging Face directory loadable by transformers")
    p.add_argument("gguf")
    p.add_argument("out")
    p.add_argument("--dtype", default=None, choices=["float32", "bfloat16", "float16"])
    p.set_defaults(func=cmd_convert)

    sub.add_parser("bench", help="benchmark against transformers (llmparts bench --help)", add_help=False)

    p = sub.add_parser("download", help="download a Hub model's config, tokenizer and safetensors")
    p.add_argument("repo_id")
    p.add_argument("--revision", default=None)
    p.set_defaults(func=cmd_download)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["bench"]:  # its own parser (also scripts/benchmark.py)
        from .bench import main as bench_main

        return bench_main(argv[1:])
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except LLMPartsError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
