"""The CLI reports bad arguments as one `error:` line (exit status 2), not a traceback."""

from __future__ import annotations

import pytest
import torch

import llmparts

from llmparts.cli import main


def test_inspect_a_shipped_config(capsys):
    assert main(["inspect", "tiny/qwen3"]) == 0
    assert "KV cache" in capsys.readouterr().out


@pytest.mark.parametrize("device", ["bogus", f"cuda:{torch.cuda.device_count()}", "meta"])  # (one past the last GPU)
def test_unusable_device(capsys, tmp_path, device):
    assert main(["generate", "--model", str(tmp_path), "--device", device, "hello"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: device") and device in err


def test_a_missing_tokenizer_is_reported_before_the_weights_load(capsys, tmp_path, monkeypatch):
    import llmparts.loading

    from llmparts.loading.export import save_pretrained

    save_pretrained(llmparts.build_model("tiny/qwen3"), tmp_path, "qwen3")
    loads = []
    monkeypatch.setattr(llmparts.loading, "load_pretrained", lambda *a, **k: loads.append(a))
    assert main(["generate", "--model", str(tmp_path), "hello"]) == 2
    assert "no tokenizer found" in capsys.readouterr().err and loads == []


def test_invalid_repo_id(capsys):
    assert main(["download", "../etc"]) == 2
    assert "neither a local path nor a valid Hub repo id" in capsys.readouterr().err


def test_empty_model_source(capsys):
    assert main(["generate", "--model", "", "hello"]) == 2
    assert "model source is empty" in capsys.readouterr().err


@pytest.mark.parametrize("command", ["generate", "chat"])
@pytest.mark.parametrize("flags, name", [
    (["--max-new-tokens", "-3"], "max_new_tokens"), (["--temperature", "inf"], "temperature"),
    (["--top-p", "0"], "top_p"), (["--seed", "-1"], "seed"), (["--stop", ""], "stop"),
])
def test_sampling_flags_are_checked_before_loading(capsys, tmp_path, command, flags, name):
    """A bad flag is reported at once (the model path does not even exist), not after loading the model
    and, for chat, reading the first message."""
    args = [command, "--model", str(tmp_path / "missing"), *flags] + (["hello"] if command == "generate" else [])
    assert main(args) == 2
    err = capsys.readouterr().err
    assert err.startswith("error:") and name in err and "missing" not in err


def test_inspect_a_config_json_and_refuse_other_files(capsys, tmp_path):
    """`inspect DIR/config.json` reads that config (it used to be read as a GGUF file: "bad magic")."""
    from llmparts.loading.export import save_pretrained

    save_pretrained(llmparts.build_model("tiny/qwen3"), tmp_path / "m", "qwen3")
    assert main(["inspect", str(tmp_path / "m" / "config.json")]) == 0
    out = capsys.readouterr().out
    assert main(["inspect", str(tmp_path / "m")]) == 0
    assert capsys.readouterr().out == out
    (tmp_path / "notes.txt").write_text("hello")
    assert main(["inspect", str(tmp_path / "notes.txt")]) == 2
    assert "a file must be a .gguf model or a config.json" in capsys.readouterr().err
