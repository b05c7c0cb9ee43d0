"""Loading models and tokenizers (hub id or local folder) safely, and checking vocabularies.

Security: `trust_remote_code` is off unless asked for, and weights are read only from
safetensors (`use_safetensors=True`), never unpickled.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

import torch

from tvkd.paths import content_digest

log = logging.getLogger(__name__)


def resolve_device(device: str | None = "auto") -> torch.device:
    if device in (None, "auto"):
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def resolve_dtype(dtype: str | None, device: torch.device) -> torch.dtype:
    """'auto' = bf16 on a GPU that supports it, fp32 elsewhere (CPU bf16 is slow and inexact)."""
    if dtype in (None, "auto"):
        if device.type == "cuda" and torch.cuda.is_bf16_supported():
            return torch.bfloat16
        return torch.float32
    table = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
             "float16": torch.float16, "fp16": torch.float16}
    if dtype not in table:
        raise ValueError(f"unknown dtype {dtype!r}; use one of {sorted(table)} or 'auto'")
    return table[dtype]


def load_tokenizer(name_or_path: str | Path, *, trust_remote_code: bool = False) -> Any:
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(str(name_or_path), trust_remote_code=trust_remote_code)
    except OSError as e:
        raise OSError(
            f"could not load a tokenizer from {str(name_or_path)!r}: {e}\n"
            "Give a local folder saved with save_pretrained, or a hub id that is in the local HF cache "
            "(this harness runs offline)."
        ) from None


def load_causal_lm(
    name_or_path: str | Path, *, dtype: str | None = "auto", device: str | None = "auto",
    trust_remote_code: bool = False, eval_mode: bool = True,
) -> Any:
    from transformers import AutoModelForCausalLM

    dev = resolve_device(device)
    try:
        model = AutoModelForCausalLM.from_pretrained(
            str(name_or_path), dtype=resolve_dtype(dtype, dev), trust_remote_code=trust_remote_code,
            use_safetensors=True,
        )
    except Exception as e:  # noqa: BLE001 - a corrupt file raises many types; name the model either way
        raise ModelLoadError(
            f"could not load a causal LM from {str(name_or_path)!r}: {type(e).__name__}: {str(e).splitlines()[0]}. "
            "Weights are read from safetensors only; give a local folder saved with save_pretrained "
            "(safe_serialization) or a hub id in the local HF cache."
        ) from None
    model.to(dev)
    if eval_mode:
        model.eval()
    return model


#: Files of a model folder that say how it was made, not what it is: the testbed's stage record holds the build's
#: wall times, so two builds of the same weights would otherwise be two models (and every run on them a new run).
MODEL_RECORD_FILES = ("stage.json",)


def model_digest(name_or_path: str | Path) -> str:
    """Content key of a model folder (config, tokenizer and weight files; `paths.content_digest`'s rule, less
    `MODEL_RECORD_FILES`), or of the hub id's snapshot in the local Hugging Face cache."""
    path = local_model_path(name_or_path)
    return content_digest(path, exclude=MODEL_RECORD_FILES) if path is not None else f"hub:{name_or_path}"


def local_model_path(name_or_path: str | Path) -> Path | None:
    """A local folder holding the model: the path itself, or the hub id's snapshot in the local cache."""
    path = Path(name_or_path)
    if path.exists():
        return path
    try:
        from huggingface_hub import snapshot_download

        return Path(snapshot_download(str(name_or_path), local_files_only=True))
    except Exception:  # noqa: BLE001 - not a hub id, or not in the cache: the caller says so
        return None


class VocabularyMismatchError(ValueError):
    pass


class ModelLoadError(ValueError):
    """A model folder that cannot be loaded; the message names the folder and the fix."""


def check_model_folder(path: str | Path, what: str) -> None:
    """A model folder has a config and readable safetensors weights (headers only: no weights are loaded)."""
    path = Path(path)
    if not (path / "config.json").is_file():
        raise ModelLoadError(f"{what}: {path} has no config.json; give a folder saved with save_pretrained")
    weights = sorted(path.glob("*.safetensors"))
    if not weights:
        pickles = sorted(p.name for p in path.glob("*.bin")) + sorted(p.name for p in path.glob("*.pt"))
        hint = (f" (it holds pickled weights {pickles}, which are never unpickled here; re-save the model with "
                "save_pretrained(safe_serialization=True))") if pickles else ""
        raise ModelLoadError(f"{what}: {path} has no .safetensors weights{hint}")
    index = path / "model.safetensors.index.json"
    if index.is_file():
        try:
            weight_map = json.loads(index.read_text()).get("weight_map")
            if not isinstance(weight_map, dict):
                raise ValueError("no weight_map")
        except (OSError, ValueError, AttributeError) as e:
            raise ModelLoadError(f"{what}: {index} is not a readable shard index ({e}); re-save or re-download "
                                 "the model") from None
        missing = sorted({str(f) for f in weight_map.values()} - {w.name for w in weights})
        if missing:
            raise ModelLoadError(f"{what}: {index} lists shard(s) {missing[:3]} that are not in {path} "
                                 f"({len(missing)} missing); re-download the model's files (every shard)")
    for w in weights:
        problem = _safetensors_problem(w)
        if problem:
            raise ModelLoadError(f"{what}: {w} is not a valid safetensors file ({problem}); re-save or re-download it")


def check_model_weights(path: str | Path, what: str, *, trust_remote_code: bool = False, strict: bool = True) -> None:
    """Every weight the model's architecture has is in its files, and no file holds a weight it does not have.

    transformers' own loader computes the missing and unexpected names (its renames and tied weights
    included) with the model on the meta device: no weight is materialised, so this costs milliseconds
    where loading the model would cost its size. A model missing a weight would otherwise train from
    a random initialisation of it, silently (transformers reports it only through its logging).
    `strict=False` (``models.strict_weights: false``): such names are logged as a warning instead.
    """
    from transformers import AutoModelForCausalLM
    from transformers.utils import logging as hf_logging

    bars = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    try:
        _, info = AutoModelForCausalLM.from_pretrained(
            str(path), device_map="meta", output_loading_info=True, trust_remote_code=trust_remote_code,
            use_safetensors=True)
    except Exception as e:  # noqa: BLE001 - a config or a shape that does not fit the weights: name the model
        raise ModelLoadError(f"{what}: {path} cannot be loaded as a causal LM ({type(e).__name__}: "
                             f"{' '.join(str(e).split())[:300]}); re-save or re-download it") from None
    finally:
        if bars:
            hf_logging.enable_progress_bar()
    problems = []
    for kind in ("missing_keys", "unexpected_keys", "mismatched_keys"):
        names = sorted(str(k) for k in info.get(kind) or ())
        if names:
            shown = ", ".join(names[:3]) + (f" and {len(names) - 3} more" if len(names) > 3 else "")
            problems.append(f"{len(names)} {kind.replace('_keys', '')} weight(s): {shown}")
    if not problems:
        return
    message = (f"{what}: the weights in {path} do not match its config.json ({'; '.join(problems)}); a missing weight "
               "would train from a random initialisation. Re-save or re-download the model, or set "
               "models.strict_weights: false to accept it")
    if strict:
        raise ModelLoadError(message)
    log.warning(message.replace("; a missing weight would", ": models.strict_weights is false, so a missing weight"
                                " will"))


def _safetensors_problem(path: Path) -> str | None:
    """Why a safetensors file is unusable (bad header, or shorter than its header says), else None.

    Reads the 8-byte header length and the JSON header only (the format's own layout), so a
    truncated download is caught in milliseconds instead of deep inside a model load.
    """
    size = path.stat().st_size
    try:
        with open(path, "rb") as f:
            n = int.from_bytes(f.read(8), "little")
            if n <= 0 or 8 + n > size:
                return f"header length {n} does not fit in {size} bytes"
            header = json.loads(f.read(n))
    except (OSError, ValueError) as e:
        return f"unreadable header: {e}"
    if not isinstance(header, dict):
        return "the header is not a JSON object"
    ends = [t["data_offsets"][1] for k, t in header.items() if k != "__metadata__" and isinstance(t, dict)
            and isinstance(t.get("data_offsets"), list) and len(t["data_offsets"]) == 2]
    if len(ends) != len([k for k in header if k != "__metadata__"]):
        return "a tensor entry has no data offsets"
    if ends and 8 + n + max(ends) > size:
        return f"truncated: the header needs {8 + n + max(ends)} bytes, the file has {size}"
    for name, t in header.items():
        if name == "__metadata__":
            continue
        start, end = t["data_offsets"]
        width = _DTYPE_BYTES.get(str(t.get("dtype")))
        shape = t.get("shape")
        if width is None or not isinstance(shape, list) or not all(isinstance(d, int) and d >= 0 for d in shape):
            continue  # a dtype this check does not know: safetensors itself judges it at load
        want = width
        for d in shape:
            want *= d
        if not (isinstance(start, int) and isinstance(end, int)) or end - start != want:
            return (f"tensor {name!r} of shape {shape} and dtype {t['dtype']} needs {want} bytes, its data offsets "
                    f"{[start, end]} give {end - start if isinstance(end, int) and isinstance(start, int) else '?'}")
    return None


# Bytes per element of the safetensors dtypes (the format's own names).
_DTYPE_BYTES = {"F64": 8, "I64": 8, "U64": 8, "C64": 8, "F32": 4, "I32": 4, "U32": 4, "F16": 2, "BF16": 2, "I16": 2,
                "U16": 2, "I8": 1, "U8": 1, "BOOL": 1, "F8_E4M3": 1, "F8_E5M2": 1, "F8_E8M0": 1}


def reference_vocab_check(reference: str | Path, student: str | Path, student_tokenizer: Any, *,
                          trust_remote_code: bool = False) -> None:
    """The reference must share the student's vocabulary: its log-probs are compared token by token."""
    from transformers import AutoConfig

    if Path(str(reference)).resolve() == Path(str(student)).resolve():
        return
    ref_tok = load_tokenizer(reference, trust_remote_code=trust_remote_code)
    rows_r = AutoConfig.from_pretrained(str(reference), trust_remote_code=trust_remote_code).vocab_size
    rows_s = AutoConfig.from_pretrained(str(student), trust_remote_code=trust_remote_code).vocab_size
    shared_vocab_size(ref_tok, student_tokenizer, rows_r, rows_s, teacher_name="reference", student_name="student")


def shared_vocab_size(teacher_tok: Any, student_tok: Any, teacher_rows: int, student_rows: int,
                      teacher_name: str = "teacher", student_name: str = "student") -> int:
    """Number of logit rows to compare teacher and student on, or a clear error.

    Token-level teacher signals need one vocabulary. Allowed: identical tokenizers, even when an
    embedding matrix is padded past the tokenizer (e.g. 152064 vs 151936 rows): the extra rows,
    which no token maps to, are dropped and a message says so.
    """
    tv, sv = teacher_tok.get_vocab(), student_tok.get_vocab()
    if tv != sv:
        only_t = sorted(set(tv) - set(sv))[:5]
        only_s = sorted(set(sv) - set(tv))[:5]
        moved = [t for t in tv if t in sv and tv[t] != sv[t]][:5]
        raise VocabularyMismatchError(
            f"{teacher_name} and {student_name} do not share a vocabulary ({len(tv)} vs {len(sv)} tokens; "
            f"only in {teacher_name}: {only_t}, only in {student_name}: {only_s}, different ids: {moved}). "
            "Token-level signals (per-position log-probs, aux rewards, top-k) need the same tokenizer; pick a "
            "pair of one model family (a teacher of another tokenizer serves only sequence-level values: "
            "tvkd.cross_tokenizer)."
        )
    n = len(teacher_tok)
    if teacher_rows < n or student_rows < n:
        raise VocabularyMismatchError(
            f"embedding matrices smaller than the tokenizer ({n} tokens): {teacher_name} {teacher_rows} rows, "
            f"{student_name} {student_rows} rows"
        )
    if teacher_rows != student_rows:
        log.warning(
            "%s has %d logit rows and %s %d for a %d-token tokenizer: using the first %d (padding rows dropped)",
            teacher_name, teacher_rows, student_name, student_rows, n, min(teacher_rows, student_rows),
        )
    return min(teacher_rows, student_rows)


def teacher_vocab_size(teacher: str | Path, student: str | Path, student_tokenizer: Any, *,
                       trust_remote_code: bool = False) -> int | None:
    """The teacher logit rows shared with the student (None: all of them), or a clear error.

    Reads only tokenizers and configs, so a mismatch costs no model load.
    """
    from transformers import AutoConfig

    teacher_tok = load_tokenizer(teacher, trust_remote_code=trust_remote_code)
    vt = AutoConfig.from_pretrained(str(teacher), trust_remote_code=trust_remote_code).vocab_size
    vs = AutoConfig.from_pretrained(str(student), trust_remote_code=trust_remote_code).vocab_size
    vocab = shared_vocab_size(teacher_tok, student_tokenizer, vt, vs)
    return vocab if vocab != vt else None


def config_summary(model: Any) -> dict[str, Any]:
    cfg = model.config
    return json.loads(json.dumps({
        "model_type": getattr(cfg, "model_type", None),
        "num_parameters": sum(p.numel() for p in model.parameters()),
        "vocab_size": getattr(cfg, "vocab_size", None),
        "name_or_path": getattr(cfg, "_name_or_path", None),
    }, default=str))


class ModelSource:
    """A model the pipeline may need: its content key (for cache keys) and a loader run on first use.

    A cached pass never loads the model; `release` frees it once its passes are done (the
    teacher while the student trains). `key` holds the weights' digest and the forward dtype,
    because bf16 and fp32 logits differ.
    """

    def __init__(self, name: str, key: str, loader: Any, path: str | None = None, dtype: str | None = None):
        self.name = name
        self.key = key
        self._loader = loader
        self._model: Any = None
        self.path = path  # the folder or hub id it loads from (None: in memory), for loaders of their own (vLLM)
        self.dtype = dtype

    @classmethod
    def from_path(cls, path: str | Path, *, dtype: str | None = "auto", trust_remote_code: bool = False,
                  device: str | None = "auto") -> ModelSource:
        def load() -> Any:
            return load_causal_lm(path, dtype=dtype, device=device, trust_remote_code=trust_remote_code)

        return cls(str(path), f"{model_digest(path)}:{dtype}", load, path=str(path), dtype=dtype)

    @classmethod
    def in_memory(cls, model: Any, key: str) -> ModelSource:
        return cls(key, key, lambda: model)

    def get(self) -> Any:
        if self._model is None:
            self._model = self._loader()
        return self._model

    __call__ = get  # a zero-argument loader, as the caches take

    def release(self) -> None:
        self._model = None

    def __repr__(self) -> str:
        return f"ModelSource({self.name!r}, key={self.key!r})"
