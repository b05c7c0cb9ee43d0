"""The results store: one directory per configuration hash, written so that a kill never corrupts it.

Layout::

    <root>/<study or "runs">/<name>-<hash12>/
        config.yaml        the full resolved configuration (secrets removed, see `redact`)
        environment.json   python, platform, threads, device, package versions, git revision, seed, time
        status.json        {"state": "running" | "complete" | "failed", timestamps, error on failure}
        metrics.json       what the evaluators measured
        outputs.jsonl      optional: generations, one JSON object per line
        checkpoint/        optional: the trainer's checkpoints

Lifecycle (a study driver)::

    store = ResultsStore()
    if not store.is_complete(cfg, study="reward-conflict"):
        with store.start(cfg, study="reward-conflict") as run:   # dir cleaned, status "running"
            run.write_metrics(train_and_evaluate(cfg, run.checkpoint_dir))
        # leaving the block marks the run "complete"; an exception marks it "failed"
    df = store.frame("reward-conflict")                         # one row per complete run

Crash safety. Every file is written to a temporary file, fsynced and moved into place with
`os.replace`, and the directory is fsynced after it, so a reader sees the old or the new file,
never a torn one. `metrics.json` is always written before `status.json` says "complete", and a
run counts as complete only when status says so *and* metrics.json parses. A process killed at
any moment therefore leaves either a finished run or a "running"/"failed"/half-written one,
which the next `start` wipes and redoes. While a run is being written, an advisory lock
(`flock` on `<run dir>/.lock`, released by the OS when the process dies) keeps a second
process from starting the same configuration.
"""

from __future__ import annotations

import dataclasses
import datetime as _dt
import enum
import hashlib
import importlib.metadata
import json
import os
import platform
import re
import shutil
import subprocess
import tempfile
import time
import traceback
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import yaml

from tvkd.paths import atomic_write_text, default_file_mode, fingerprint, results_root
from tvkd.storage import fsync_dir

try:  # POSIX only; elsewhere runs are not protected against two concurrent writers
    import fcntl
except ImportError:  # pragma: no cover
    fcntl = None  # type: ignore[assignment]

__all__ = [
    "DEFAULT_IGNORE",
    "ENVIRONMENT_PACKAGES",
    "HashCollisionError",
    "ResultsStore",
    "RunAlreadyCompleteError",
    "RunHandle",
    "RunInProgressError",
    "RunRecord",
    "config_hash",
    "environment",
    "is_secret_key",
    "redact",
]

#: Config keys that change where or how loudly a run reports, not what it computes; they are left
#: out of `config_hash`. A name without a dot matches that key at any depth
#: (``"output_dir"`` matches ``training.output_dir``); a dotted name matches one path from the root.
DEFAULT_IGNORE: frozenset[str] = frozenset(
    {
        # where things are written (caches are content-addressed, so their location is irrelevant)
        "output_dir", "logging_dir", "results_root", "cache_dir", "run_dir", "checkpoint_dir",
        # progress bars and logging
        "progress", "disable_tqdm", "verbose", "quiet", "log_level", "log_level_replica",
        "logging_steps", "logging_strategy", "logging_first_step", "log_every", "report_to", "run_name",
        # checkpoint cadence: saving does not change the optimisation
        "save_steps", "save_strategy", "save_total_limit", "save_only_model",
        # what else the teacher pass computes while it runs: each cached column is the same either way
        "cache.precompute", "cache.value_temperatures", "cache.q_sources",
    }
)

#: Distributions whose versions go into environment.json (null when not installed).
ENVIRONMENT_PACKAGES: tuple[str, ...] = (
    "tvkd", "torch", "transformers", "trl", "datasets", "accelerate", "tokenizers", "safetensors",
    "numpy", "pandas", "pyarrow", "optuna", "ray", "lm-eval", "alpaca-eval", "fschat",
)

STATUS_RUNNING, STATUS_COMPLETE, STATUS_FAILED = "running", "complete", "failed"
STATUS_INTERRUPTED = "interrupted"  # stopped by Ctrl-C or SIGTERM; redone (or resumed) by the next start
# status.json says complete but metrics.json is missing, truncated or not an object: not a finished run
STATUS_UNREADABLE = "unreadable metrics"
_DEFAULT_STUDY = "runs"
_LOCK_NAME = ".lock"


class RunAlreadyCompleteError(FileExistsError):
    """`start` was asked to redo a run that already finished (pass ``overwrite=True`` to redo it)."""


class RunInProgressError(RuntimeError):
    """Another live process holds the run directory's lock."""


class HashCollisionError(RuntimeError):
    """A run directory's stored full hash differs from the configuration's (12-hex prefixes collide)."""


# --------------------------------------------------------------------------------------------
# Plain data, redaction and the configuration hash
# --------------------------------------------------------------------------------------------


def _plain(obj: Any, where: str = "config") -> Any:
    """Turn a config into JSON/YAML-able builtins, failing loudly on anything else.

    Falling back to ``str(obj)`` would make the hash depend on reprs (memory addresses), so an
    unknown type is an error that names where it sits.
    """
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        obj = {f.name: getattr(obj, f.name) for f in dataclasses.fields(obj)}
    if isinstance(obj, Mapping):
        return {str(k): _plain(v, f"{where}.{k}") for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_plain(v, f"{where}[{i}]") for i, v in enumerate(obj)]
    if isinstance(obj, (set, frozenset)):
        return sorted((_plain(v, f"{where}{{}}") for v in obj), key=repr)
    if isinstance(obj, enum.Enum):
        return _plain(obj.value, where)
    if isinstance(obj, os.PathLike):
        return os.fspath(obj)
    if obj is None:
        return None
    if isinstance(obj, str):
        return str(obj)
    if isinstance(obj, bool):  # before int: bool is an int subclass
        return bool(obj)
    if isinstance(obj, int):
        return int(obj)
    if isinstance(obj, float):  # also numpy.float64, a float subclass YAML cannot represent
        return float(obj)
    if getattr(obj, "ndim", None) == 0 and callable(getattr(obj, "item", None)):  # numpy/torch scalars
        return _plain(obj.item(), where)
    raise TypeError(f"{where} = {obj!r} ({type(obj).__name__}) is not a plain config value "
                    f"(use str, int, float, bool, None, lists and dicts)")


# Whole key components that mark a secret; matched after splitting the key on _ - . and camelCase.
_SECRET_WORDS = frozenset(
    {"secret", "secrets", "password", "passwords", "passwd", "passphrase", "pwd", "apikey", "credential",
     "credentials", "auth", "authorization", "cookie", "cookies", "bearer", "privatekey"}
)
_SECRET_PAIRS = frozenset(
    {("api", "key"), ("private", "key"), ("access", "key"), ("secret", "key"), ("client", "secret"),
     ("session", "key"), ("signing", "key"), ("encryption", "key")}
)
# Run-together spellings (``openaiapikey``) that component splitting cannot see.
_SECRET_SUBSTRINGS = ("apikey", "password", "passwd", "secret", "accesstoken", "authtoken", "hftoken")
# "token" is a secret (hf_token, access_token) except as a tokenizer notion (pad_token, eos_token_id).
_TOKEN_NOT_SECRET_BEFORE = frozenset(
    {"pad", "eos", "bos", "unk", "sep", "cls", "mask", "special", "additional", "start", "end", "stop",
     "eot", "image", "audio", "video", "chat", "default", "first", "last", "max", "min", "num", "n",
     "new", "total", "per", "prompt", "response", "generation", "split", "sentinel"}
)
_TOKEN_NOT_SECRET_AFTER = frozenset(
    {"id", "ids", "index", "idx", "length", "len", "count", "type", "level", "limit", "budget", "str", "text"}
)
# Well-known credential formats, caught even under an innocent key name.
_TOKEN_PATTERNS = (
    r"sk-[A-Za-z0-9_-]{16,}",  # OpenAI / Anthropic
    r"hf_[A-Za-z0-9]{30,}",  # Hugging Face
    r"gh[pousr]_[A-Za-z0-9]{30,}", r"github_pat_[A-Za-z0-9_]{30,}",  # GitHub
    r"xox[abprs]-[A-Za-z0-9-]{10,}",  # Slack
    r"AKIA[0-9A-Z]{16}",  # AWS access key id
)
_TOKEN_VALUE = re.compile(r"\s*(?:Bearer\s+)?(?:" + "|".join(_TOKEN_PATTERNS) + r")\s*")
_TOKEN_IN_TEXT = re.compile(r"(?<![A-Za-z0-9])(?:" + "|".join(_TOKEN_PATTERNS) + r")")
# user:password@ in a URL (database storages, proxies): keep the URL, mask the password.
_URL_PASSWORD = re.compile(r"(?P<head>[A-Za-z][A-Za-z0-9+.-]*://[^/\s:@]+):[^@\s/]+@")
REDACTED = "<redacted>"


def _key_components(key: str) -> list[str]:
    spaced = re.sub(r"([a-z0-9])([A-Z])", r"\1_\2", key)
    return [c for c in re.split(r"[^A-Za-z0-9]+", spaced.lower()) if c]


def is_secret_key(key: str) -> bool:
    """Whether a config key's *name* looks like it holds a credential.

    ``api_key``, ``OPENAI_API_KEY``, ``apiKey``, ``hf_token``, ``token``, ``password``,
    ``client_secret``, ``authorization`` are secrets; ``tokenizer``, ``max_new_tokens``,
    ``pad_token``, ``eos_token_id``, ``author`` and ``key`` alone are not.
    """
    comps = _key_components(str(key))
    if any(c in _SECRET_WORDS for c in comps):
        return True
    if any(pair in _SECRET_PAIRS for pair in zip(comps, comps[1:])):
        return True
    joined = "".join(comps)
    if any(s in joined for s in _SECRET_SUBSTRINGS):
        return True
    for i, c in enumerate(comps):
        if c != "token":
            continue
        before = comps[i - 1] if i > 0 else None
        after = comps[i + 1] if i + 1 < len(comps) else None
        if before not in _TOKEN_NOT_SECRET_BEFORE and after not in _TOKEN_NOT_SECRET_AFTER:
            return True
    return False


def _scrub_text(text: str) -> str:
    """Mask credentials that appear inside free text (URLs with passwords, known token formats)."""
    text = _URL_PASSWORD.sub(lambda m: f"{m.group('head')}:{REDACTED}@", text)
    return _TOKEN_IN_TEXT.sub(REDACTED, text)


def redact(obj: Any) -> Any:
    """A copy of ``obj`` with credentials removed, for anything about to be written to disk.

    - a mapping key whose name looks like a secret (`is_secret_key`) is dropped with its value;
    - a key whose string value has a well-known credential format (``sk-…``, ``hf_…``, ``ghp_…``)
      is dropped too, whatever its name; such a string inside a list becomes ``"<redacted>"``;
    - a password inside a URL (``postgresql://user:pw@host/db``) is masked, the rest is kept.

    Mappings and dataclass instances come back as dicts, lists as lists, tuples as tuples; other
    values unchanged. Redaction runs before any other conversion, so a secret of an odd type
    (a ``SecretStr``) is dropped rather than rejected.
    """
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        obj = {f.name: getattr(obj, f.name) for f in dataclasses.fields(obj)}
    if isinstance(obj, Mapping):
        out = {}
        for k, v in obj.items():
            if is_secret_key(str(k)) or (isinstance(v, str) and _TOKEN_VALUE.fullmatch(v)):
                continue
            out[k] = redact(v)
        return out
    if isinstance(obj, (list, tuple)):
        items = [REDACTED if isinstance(v, str) and _TOKEN_VALUE.fullmatch(v) else redact(v) for v in obj]
        return tuple(items) if isinstance(obj, tuple) else items
    if isinstance(obj, str):
        return _scrub_text(obj)
    return obj


def _drop_ignored(obj: Any, ignore: frozenset[str], prefix: str = "") -> Any:
    if isinstance(obj, dict):
        out = {}
        for k, v in obj.items():
            path = f"{prefix}.{k}" if prefix else k
            if k in ignore or path in ignore:
                continue
            out[k] = _drop_ignored(v, ignore, path)
        return out
    if isinstance(obj, list):
        return [_drop_ignored(v, ignore, prefix) for v in obj]
    return obj


def config_hash(config: Mapping[str, Any] | Any, *, ignore: Iterable[str] | None = None, length: int = 12) -> str:
    """Stable hex hash of what a configuration computes.

    Key order, ``2`` vs ``2.0``, lists vs tuples and the keys in ``ignore`` (default
    `DEFAULT_IGNORE`: output paths, progress and logging settings, checkpoint cadence) do not
    change it; neither do secrets, which `redact` removes first. ``length`` ≤ 64 hex digits.
    """
    ignore_set = DEFAULT_IGNORE if ignore is None else frozenset(ignore)
    plain = _content_keyed(_plain(redact(config)))
    return fingerprint(_drop_ignored(plain, ignore_set), length=64)[:length]


def _content_keyed(plain: Any) -> Any:
    """Identity by content: a config holding ``inputs: {"models.student": <fingerprint>, ...}`` (what
    `tvkd.pipeline.run_identity` records) is hashed with those fingerprints, not with the paths at the
    dotted keys they name, so a copy of the same files at another path is the same run. The paths stay
    in the record (config.yaml)."""
    inputs = plain.get("inputs") if isinstance(plain, dict) else None
    if not isinstance(inputs, dict):
        return plain
    out = json.loads(json.dumps(plain))  # a deep copy of plain data
    for dotted in inputs:
        *parents, last = str(dotted).split(".")
        node = out
        for part in parents:
            node = node.get(part) if isinstance(node, dict) else None
        if isinstance(node, dict):
            node.pop(last, None)
    return out


# --------------------------------------------------------------------------------------------
# Environment
# --------------------------------------------------------------------------------------------


def _now() -> str:
    return _dt.datetime.now(_dt.UTC).isoformat(timespec="seconds")


def _package_versions() -> dict[str, str | None]:
    versions: dict[str, str | None] = {}
    for name in ENVIRONMENT_PACKAGES:
        try:
            versions[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            versions[name] = None
    return versions


def _git_revision() -> dict[str, Any] | None:
    """Revision and dirty flag of the checkout holding this package, or None outside a checkout."""
    package_dir = Path(__file__).resolve().parent
    # Optional locks off: `git status` must not take index.lock while others use the checkout.
    env = {**os.environ, "GIT_OPTIONAL_LOCKS": "0", "LC_ALL": "C"}

    def git(*args: str) -> str:
        return subprocess.run(
            ["git", *args], cwd=package_dir, env=env, capture_output=True, text=True, timeout=10, check=True
        ).stdout.strip()

    try:
        top = Path(git("rev-parse", "--show-toplevel")).resolve()
        if top / package_dir.name != package_dir:  # an installed copy inside some other repository
            return None
        revision = git("rev-parse", "HEAD")
        dirty = bool(git("status", "--porcelain", "--untracked-files=no"))
    except (OSError, subprocess.SubprocessError):
        return None
    return {"revision": revision, "dirty": dirty}


def _torch_info(device: str | None) -> tuple[dict[str, Any] | None, str | None]:
    try:
        importlib.metadata.version("torch")
    except importlib.metadata.PackageNotFoundError:
        return None, device
    try:
        import torch
    except Exception as exc:  # a broken install is worth recording, not worth failing a run for
        return {"import_error": f"{type(exc).__name__}: {exc}"}, device
    cuda = torch.cuda.is_available()
    info = {
        "threads": torch.get_num_threads(),
        "interop_threads": torch.get_num_interop_threads(),
        "deterministic_algorithms": torch.are_deterministic_algorithms_enabled(),
        "cuda": torch.version.cuda,
        "cuda_available": cuda,
        "gpus": [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())] if cuda else [],
    }
    return info, device if device is not None else ("cuda" if cuda else "cpu")


def environment(seed: int | None = None, device: str | None = None) -> dict[str, Any]:
    """What produced a run: interpreter, platform, CPUs, torch threads, device, package versions,
    the git revision of the checkout (with a dirty flag), the seed and the time (UTC).

    Environment variables are never recorded: they are where API keys live.
    """
    torch_info, device = _torch_info(device)
    try:
        cpus_available: int | None = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        cpus_available = None
    return {
        "time": _now(),
        "seed": seed,
        "python": platform.python_version(),
        "python_implementation": platform.python_implementation(),
        "platform": platform.platform(),
        "machine": platform.machine(),
        "cpu_count": os.cpu_count(),
        "cpus_available": cpus_available,
        "torch": torch_info,
        "device": device,
        "packages": _package_versions(),
        "git": _git_revision(),
    }


# --------------------------------------------------------------------------------------------
# Atomic files
# --------------------------------------------------------------------------------------------


def _write_text(path: Path, text: str) -> None:
    atomic_write_text(path, text)
    fsync_dir(path.parent)


def _write_json(path: Path, obj: Any) -> None:
    _write_text(path, json.dumps(obj, indent=2, sort_keys=True, ensure_ascii=False) + "\n")


def _read_json(path: Path) -> dict[str, Any] | None:
    """A JSON object from ``path``, or None when it is missing, unreadable or not an object."""
    try:
        obj = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return obj if isinstance(obj, dict) else None


def _read_yaml(path: Path) -> dict[str, Any] | None:
    try:
        obj = yaml.safe_load(path.read_text())
    except (OSError, yaml.YAMLError):
        return None
    return obj if isinstance(obj, dict) else None


class _RunLock:
    """An exclusive advisory lock on ``<run dir>/.lock``; the OS drops it when the process dies."""

    def __init__(self, run_dir: Path):
        self._fd: int | None = os.open(run_dir / _LOCK_NAME, os.O_RDWR | os.O_CREAT, 0o644)
        if fcntl is None:  # pragma: no cover
            return
        try:
            fcntl.flock(self._fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            os.close(self._fd)
            self._fd = None
            raise RunInProgressError(f"{run_dir} is being written by another live process") from None

    def release(self) -> None:
        if self._fd is not None:
            os.close(self._fd)  # closing the descriptor releases the flock
            self._fd = None


def _clean(run_dir: Path, keep: set[str]) -> None:
    for entry in run_dir.iterdir():
        if entry.name in keep:
            continue
        if entry.is_dir() and not entry.is_symlink():
            shutil.rmtree(entry)
        else:
            entry.unlink(missing_ok=True)


_SAFE_NAME = re.compile(r"[^A-Za-z0-9._=+-]+")


def _safe_component(text: str, what: str) -> str:
    """A single, harmless path component (no separators, no leading dots, bounded length).

    A name with non-ASCII characters (``実験``) keeps its ASCII part and gets 8 hex digits of the
    name's hash, so two such names never share a label (``実験`` -> ``u-3f2a…``)."""
    text = str(text)
    safe = _SAFE_NAME.sub("_", text).strip("._")[:80]
    if not text.isascii() and text.strip():
        digest = hashlib.sha256(text.encode("utf-8")).hexdigest()[:8]
        safe = f"{safe[:71] or 'u'}-{digest}"
    if not safe:
        raise ValueError(f"{what} {text!r} has no usable characters for a directory name")
    return safe


def _name_of(run_dir: Path) -> str:
    """The label part of ``<name>-<hash12>``."""
    return re.sub(r"-[0-9a-f]{12}$", "", run_dir.name)


def _default_name(config: Mapping[str, Any]) -> str:
    for key in ("name", "method", "loss"):
        value = config.get(key)
        if isinstance(value, Mapping):
            value = value.get("name")
        if isinstance(value, str) and value:
            return value
    return "run"


def _find_seed(config: Any) -> int | None:
    """The top-level ``seed``, else the first ``seed`` found breadth-first."""
    queue = [config]
    while queue:
        node = queue.pop(0)
        if isinstance(node, dict):
            if isinstance(node.get("seed"), int) and not isinstance(node.get("seed"), bool):
                return node["seed"]
            queue.extend(v for v in node.values() if isinstance(v, dict))
    return None


# --------------------------------------------------------------------------------------------
# Records and handles
# --------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class RunRecord:
    """What one run directory holds, read back. Missing or corrupt files read as None."""

    run_dir: Path
    study: str
    name: str
    status: dict[str, Any]
    config: dict[str, Any] | None
    metrics: dict[str, Any] | None
    environment: dict[str, Any] | None

    @property
    def state(self) -> str:
        """The status state ("running", "complete", "failed", "interrupted"); "unknown" if status.json is
        unreadable, and "unreadable metrics" when it says complete but metrics.json does not parse (a
        truncated file): such a run is not complete, and the next start redoes it."""
        state = self.status.get("state")
        if state == STATUS_COMPLETE and self.metrics is None:
            return STATUS_UNREADABLE
        return state if isinstance(state, str) else "unknown"

    @property
    def complete(self) -> bool:
        """Status says complete and metrics.json parsed: the only state a report may use."""
        return self.state == STATUS_COMPLETE and self.metrics is not None

    @property
    def config_hash(self) -> str | None:
        return self.status.get("config_hash")

    @property
    def checkpoint_dir(self) -> Path:
        return self.run_dir / "checkpoint"

    def outputs(self, name: str = "outputs.jsonl") -> list[dict[str, Any]]:
        """The rows of outputs.jsonl, or of another JSONL file of the run ([] when the run wrote none)."""
        path = self.run_dir / name
        if not path.exists():
            return []
        with open(path, encoding="utf-8") as f:
            return [json.loads(line) for line in f if line.strip()]

    @classmethod
    def read(cls, run_dir: Path) -> RunRecord:
        run_dir = Path(run_dir)
        return cls(
            run_dir=run_dir,
            study=run_dir.parent.name,
            name=_name_of(run_dir),
            status=_read_json(run_dir / "status.json") or {},
            config=_read_yaml(run_dir / "config.yaml"),
            metrics=_read_json(run_dir / "metrics.json"),
            environment=_read_json(run_dir / "environment.json"),
        )


class RunHandle:
    """A run being written. Finish it with `complete` or `fail`, or use it as a context manager:
    a clean exit completes it (metrics must have been written), an exception marks it failed.
    """

    def __init__(self, run_dir: Path, status: dict[str, Any], lock: _RunLock):
        self.run_dir = run_dir
        self._status = status
        self._lock = lock
        self._finished = False
        self._t0 = time.monotonic()

    @property
    def checkpoint_dir(self) -> Path:
        """``<run dir>/checkpoint``, created on first use (give it to the trainer as output_dir)."""
        path = self.run_dir / "checkpoint"
        path.mkdir(exist_ok=True)
        return path

    @property
    def state(self) -> str:
        return self._status["state"]

    @property
    def finished(self) -> bool:
        """Whether its final status was written (complete, failed, interrupted) or it was abandoned."""
        return self._finished

    def _check_open(self) -> None:
        if self._finished:
            raise RuntimeError(f"run {self.run_dir} is already {self._status['state']}; start it again to redo it")

    def write_metrics(self, metrics: Mapping[str, Any], *, merge: bool = False) -> Path:
        """Write metrics.json atomically (``merge=True`` adds to the metrics already written)."""
        self._check_open()
        plain = _plain(metrics, "metrics")
        if not isinstance(plain, dict):
            raise TypeError(f"metrics must be a mapping, got {type(metrics).__name__}")
        path = self.run_dir / "metrics.json"
        if merge:
            plain = {**(_read_json(path) or {}), **plain}
        _write_json(path, plain)
        return path

    def write_outputs(self, rows: Iterable[Mapping[str, Any]], name: str = "outputs.jsonl") -> Path:
        """Write outputs.jsonl (or another JSONL file: one JSON object per row), via a temp file moved in place."""
        self._check_open()
        if "/" in name or not name.endswith(".jsonl"):
            raise ValueError(f"an outputs file is a plain .jsonl name in the run folder, got {name!r}")
        path = self.run_dir / name
        fd, tmp = tempfile.mkstemp(dir=self.run_dir, prefix=f".{name}.", suffix=".tmp")
        try:
            os.fchmod(fd, default_file_mode())  # readable by the group, as open() would make it
            with os.fdopen(fd, "w", encoding="utf-8") as f:
                for i, row in enumerate(rows):
                    plain = _plain(row, f"outputs[{i}]")
                    if not isinstance(plain, dict):
                        raise TypeError(f"outputs[{i}] must be a mapping, got {type(row).__name__}")
                    f.write(json.dumps(plain, ensure_ascii=False) + "\n")
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, path)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise
        fsync_dir(self.run_dir)
        return path

    def _finish(self, state: str, **fields: Any) -> None:
        """Write the final status, then mark the handle finished. A failed write (a full disk) leaves the
        handle open, so the caller can still record the failure, and names the folder."""
        now = _now()
        status = {**self._status, "state": state, "updated_at": now, "finished_at": now,
                  "duration_s": round(time.monotonic() - self._t0, 3), **fields}
        try:
            _write_json(self.run_dir / "status.json", status)
        except OSError as e:
            if e.filename is None:
                e.filename = str(self.run_dir / "status.json")
            raise
        self._status = status
        self._finished = True
        self._lock.release()

    def abandon(self) -> None:
        """Release the run's lock without writing its status (when even that write fails): the folder keeps
        what it had, its status says "running", and the next start (or `gc`) takes it over."""
        if not self._finished:
            self._finished = True
            self._lock.release()

    def complete(self) -> None:
        """Mark the run complete. Refused (the run stays redoable) when metrics.json is missing."""
        self._check_open()
        if _read_json(self.run_dir / "metrics.json") is None:
            raise RuntimeError(f"run {self.run_dir} has no readable metrics.json; call write_metrics first")
        self._finish(STATUS_COMPLETE, error=None)

    def fail(self, exc: BaseException | str) -> None:
        """Mark the run failed with the error (and traceback) scrubbed of credentials."""
        self._check_open()
        if isinstance(exc, BaseException):
            message = f"{type(exc).__name__}: {exc}"
            tb = "".join(traceback.format_exception(type(exc), exc, exc.__traceback__))
        else:
            message, tb = str(exc), None
        self._finish(STATUS_FAILED, error=_scrub_text(message), traceback=_scrub_text(tb) if tb else None)

    def interrupt(self, exc: BaseException | str = "interrupted") -> None:
        """Mark the run interrupted (Ctrl-C, SIGTERM) and release its lock; the next start redoes or resumes it."""
        self._check_open()
        message = f"{type(exc).__name__}: {exc}" if isinstance(exc, BaseException) else str(exc)
        self._finish(STATUS_INTERRUPTED, error=_scrub_text(message))

    def __enter__(self) -> RunHandle:
        return self

    def __exit__(self, exc_type, exc, tb) -> bool:
        if self._finished:
            return False
        if exc is not None:
            self.fail(exc)
            return False
        if _read_json(self.run_dir / "metrics.json") is None:
            error = RuntimeError(f"run {self.run_dir} ended without write_metrics")
            self.fail(error)
            raise error
        self.complete()
        return False

    def __repr__(self) -> str:
        return f"RunHandle({str(self.run_dir)!r}, state={self._status['state']!r})"


# --------------------------------------------------------------------------------------------
# The store
# --------------------------------------------------------------------------------------------


def _flatten(obj: Any, prefix: str, out: dict[str, Any]) -> None:
    if isinstance(obj, dict):
        for k, v in obj.items():
            _flatten(v, f"{prefix}.{k}" if prefix else str(k), out)
    elif isinstance(obj, list):  # tuples are hashable, so pandas can group by them
        out[prefix] = tuple(obj)
    else:
        out[prefix] = obj


class ResultsStore:
    """Run directories under ``root`` (default `tvkd.paths.results_root()`), keyed by config hash.

    ``ignore`` is the set of config keys left out of the hash (default `DEFAULT_IGNORE`). The
    ``name`` of a run only labels its directory; by default it is the config's ``name``,
    ``method`` or ``loss`` (or ``loss.name``). Give the same study and name when looking a run up.
    """

    def __init__(self, root: Path | str | None = None, *, ignore: Iterable[str] | None = None):
        self.root = Path(root).expanduser() if root is not None else results_root()
        self.ignore = DEFAULT_IGNORE if ignore is None else frozenset(ignore)

    def __repr__(self) -> str:
        return f"ResultsStore({str(self.root)!r})"

    def _resolve(self, config: Any, study: str | None, name: str | None) -> tuple[dict, str, Path]:
        safe = _plain(redact(config))
        if not isinstance(safe, dict):
            raise TypeError(f"a run config must be a mapping or dataclass, got {type(config).__name__}")
        full = config_hash(safe, ignore=self.ignore, length=64)
        study_dir = _safe_component(study, "study") if study is not None else _DEFAULT_STUDY
        label = _safe_component(name if name is not None else _default_name(safe), "run name")
        return safe, full, self.root / study_dir / f"{label}-{full[:12]}"

    def run_dir(self, config: Any, study: str | None = None, name: str | None = None) -> Path:
        """The directory of this configuration's run (it need not exist)."""
        return self._resolve(config, study, name)[2]

    def _read_checked(self, run_dir: Path, full: str) -> RunRecord:
        record = RunRecord.read(run_dir)
        if record.config_hash not in (None, full):
            raise HashCollisionError(
                f"{run_dir} holds a run of another configuration (full hash {record.config_hash}, "
                f"expected {full}); move it away or give this run another name"
            )
        return record

    def load(self, config: Any, study: str | None = None, name: str | None = None, *,
             complete_only: bool = True) -> RunRecord | None:
        """The run of this configuration, or None if it has no directory (or, by default, is not complete)."""
        safe, full, run_dir = self._resolve(config, study, name)
        if not run_dir.is_dir():
            legacy = self._path_keyed_run(safe, run_dir)
            if legacy is None:
                return None
            run_dir, full = legacy
        record = self._read_checked(run_dir, full)
        if complete_only and not record.complete:
            return None
        return record

    def _path_keyed_run(self, safe: dict, run_dir: Path) -> tuple[Path, str] | None:
        """A complete run of this configuration stored before inputs were keyed by content alone (its hash
        also held the input paths, `_content_keyed`): found, so that it is not trained again."""
        if not isinstance(safe.get("inputs"), dict):
            return None
        full = fingerprint(_drop_ignored(safe, self.ignore), length=64)
        legacy = run_dir.with_name(f"{_name_of(run_dir)}-{full[:12]}")
        if legacy == run_dir or not legacy.is_dir() or not RunRecord.read(legacy).complete:
            return None
        return legacy, full

    def is_complete(self, config: Any, study: str | None = None, name: str | None = None) -> bool:
        """Whether this configuration has a finished run (status complete and metrics readable)."""
        return self.load(config, study, name, complete_only=True) is not None

    def start(self, config: Any, study: str | None = None, name: str | None = None, *,
              seed: int | None = None, device: str | None = None, overwrite: bool = False,
              keep_checkpoint: bool = False) -> RunHandle:
        """Create (or wipe and recreate) the run directory and mark it running.

        Writes config.yaml (redacted), environment.json (``seed`` defaults to the config's
        ``seed``) and status.json. A directory left ``running`` or ``failed`` by an earlier attempt
        is cleaned first; ``keep_checkpoint=True`` keeps its ``checkpoint/`` so the trainer can
        resume. A complete run is only redone with ``overwrite=True``.

        Raises RunAlreadyCompleteError, RunInProgressError (another process holds the run) or
        HashCollisionError.
        """
        safe, full, run_dir = self._resolve(config, study, name)
        run_dir.mkdir(parents=True, exist_ok=True)
        lock = _RunLock(run_dir)
        try:
            previous = self._read_checked(run_dir, full)
            if previous.complete and not overwrite:
                raise RunAlreadyCompleteError(
                    f"{run_dir} is already complete; skip it (is_complete) or pass overwrite=True to redo it"
                )
            now = _now()
            attempt = previous.status.get("attempt", 0)
            status = {
                "state": STATUS_RUNNING, "config_hash": full, "study": run_dir.parent.name,
                "name": _name_of(run_dir), "started_at": now, "updated_at": now,
                "finished_at": None, "error": None, "pid": os.getpid(),
                "attempt": (attempt if isinstance(attempt, int) else 0) + 1,
            }
            # Demote the status before deleting anything, so a kill during cleanup cannot leave a
            # "complete" status beside missing or stale files.
            _write_json(run_dir / "status.json", status)
            keep = {_LOCK_NAME, "status.json"} | ({"checkpoint"} if keep_checkpoint else set())
            _clean(run_dir, keep)
            _write_text(run_dir / "config.yaml", yaml.safe_dump(safe, sort_keys=False, allow_unicode=True))
            run_seed = seed if seed is not None else _find_seed(safe)
            _write_json(run_dir / "environment.json", environment(seed=run_seed, device=device))
        except BaseException:
            lock.release()
            raise
        return RunHandle(run_dir, status, lock)

    def _run_dirs(self, study: str | None) -> list[Path]:
        if not self.root.is_dir():
            return []
        if study is not None:
            study_dirs = [self.root / _safe_component(study, "study")]
        else:
            study_dirs = sorted(p for p in self.root.iterdir() if p.is_dir() and not p.name.startswith("."))
        runs = []
        for study_dir in study_dirs:
            if not study_dir.is_dir():
                continue
            runs.extend(
                p for p in sorted(study_dir.iterdir())
                if p.is_dir() and not p.name.startswith(".")
                and ((p / "status.json").exists() or (p / "config.yaml").exists())
            )
        return runs

    def merge_metrics(self, run_dir: str | os.PathLike, metrics: Mapping[str, Any], *,
                      replace: Iterable[str] = (), replace_prefixes: Iterable[str] = ()) -> dict[str, Any]:
        """Add metrics to a finished run's metrics.json (atomically, under the run's lock); returns the merged
        metrics. The keys in ``replace`` and those starting with one of ``replace_prefixes`` are removed first (an
        evaluation's results replace all of its earlier ones at once, never a part of them); any other key is kept
        unless measured again. An interrupted merge leaves the old file."""
        run_dir = Path(run_dir)
        record = RunRecord.read(run_dir)
        if not record.complete:
            raise ValueError(f"{run_dir} is not a finished run (state {record.state!r}); run it first")
        drop, prefixes = set(replace), tuple(replace_prefixes)
        lock = _RunLock(run_dir)
        try:
            old = {k: v for k, v in (_read_json(run_dir / "metrics.json") or {}).items()
                   if k not in drop and not (prefixes and k.startswith(prefixes))}
            merged = {**old, **_plain(metrics, "metrics")}
            _write_json(run_dir / "metrics.json", merged)
        finally:
            lock.release()
        return merged

    def garbage(self, study: str | None = None) -> list[tuple[Path, str]]:
        """What `gc` would remove: (path, reason) for every run folder that is failed, interrupted,
        left "running" by a dead process, or unreadable, and for the checkpoints of finished runs that
        did not ask to keep them (``train.keep_checkpoints``)."""
        found = []
        for run_dir in self._run_dirs(study):
            record = RunRecord.read(run_dir)
            state = record.state
            if state in (STATUS_FAILED, STATUS_INTERRUPTED):
                found.append((run_dir, state))
            elif state == STATUS_RUNNING:
                try:
                    lock = _RunLock(run_dir)
                except RunInProgressError:
                    continue  # a live process is writing it
                lock.release()
                found.append((run_dir, "left running by a process that is gone"))
            elif state in (STATUS_UNREADABLE, "unknown"):
                found.append((run_dir, "unreadable status or metrics"))
            elif state == STATUS_COMPLETE and (run_dir / "checkpoint").is_dir():
                keep = ((record.config or {}).get("train") or {}).get("keep_checkpoints")
                if not keep:
                    found.append((run_dir / "checkpoint", "checkpoints of a finished run"))
        return found

    def gc(self, study: str | None = None, *, dry_run: bool = False) -> list[tuple[Path, str]]:
        """Remove `garbage` (nothing with ``dry_run``); returns what was (or would be) removed."""
        found = self.garbage(study)
        if not dry_run:
            for path, _ in found:
                shutil.rmtree(path, ignore_errors=True)
        return found

    def records(self, study: str | None = None) -> list[RunRecord]:
        """Every run directory of a study (all studies when None), in any state, sorted by path."""
        return [RunRecord.read(p) for p in self._run_dirs(study)]

    def frame(self, study: str | None = None):
        """One row per complete run: ``study``, ``run_dir``, ``config_hash``, the config flattened
        to ``config.<dotted key>`` columns (lists become tuples), then the metrics (nested ones
        dotted). Incomplete runs are left out; an empty store gives an empty frame.
        """
        import pandas as pd  # imported here: training processes need the store, not pandas

        meta = ["study", "run_dir", "config_hash"]
        rows = []
        for record in self.records(study):
            if not record.complete:
                continue
            row: dict[str, Any] = {"study": record.study, "run_dir": str(record.run_dir),
                                   "config_hash": record.config_hash}
            config_cols: dict[str, Any] = {}
            _flatten(record.config or {}, "config", config_cols)
            metric_cols: dict[str, Any] = {}
            _flatten(record.metrics, "", metric_cols)
            clash = set(metric_cols) & (set(meta) | set(config_cols))
            if clash:
                raise ValueError(f"{record.run_dir}: metric names {sorted(clash)} clash with frame columns")
            rows.append({**row, **dict(sorted(config_cols.items())), **dict(sorted(metric_cols.items()))})
        if not rows:
            return pd.DataFrame(columns=meta)
        df = pd.DataFrame(rows)
        config_cols = sorted(c for c in df.columns if c.startswith("config."))
        metric_cols = sorted(c for c in df.columns if c not in meta and not c.startswith("config."))
        return df[meta + config_cols + metric_cols].reset_index(drop=True)
