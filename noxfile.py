"""Sessions: `nox -s tests` (fast suite), `tests-slow`, `lint`, `testbed`, `study-reward-conflict`, `bench`.

Every session builds its own virtualenv the same way: torch==2.13.0 first (a CPU build on a CPU
box; a looser spec would pull a multi-GB CUDA build), then this package with the pinned stack in
constraints.txt.
"""

from __future__ import annotations

import os

import nox

nox.options.sessions = ["tests"]
nox.options.reuse_existing_virtualenvs = True

PYTHON = "3.11"
TORCH = "torch==2.13.0"
# Offline by design: every model and data set comes from the testbed or a local folder.
OFFLINE_ENV = {"HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false",
               "RAY_AUTH_MODE": "disabled"}


def install(session: nox.Session, extras: str = "test") -> None:
    session.install("-q", TORCH)
    session.install("-q", "-c", "constraints.txt", "-e", f".[{extras}]")


def env() -> dict[str, str]:
    return {**OFFLINE_ENV, **{k: v for k, v in os.environ.items() if k.startswith("TVKD_")}}


@nox.session(python=PYTHON)
def tests(session: nox.Session) -> None:
    """The fast test suite (what CI runs)."""
    install(session, "test,sweeps,benchmarks")
    session.run("pytest", "-q", *session.posargs, env=env())


@nox.session(name="tests-slow", python=PYTHON)
def tests_slow(session: nox.Session) -> None:
    """Slow tests only: full testbed builds over several seeds, end-to-end studies."""
    install(session, "test,sweeps,benchmarks")
    session.run("pytest", "-q", "-m", "slow", *session.posargs, env=env())


@nox.session(python=PYTHON)
def lint(session: nox.Session) -> None:
    session.install("-q", "-c", "constraints.txt", "ruff")
    session.run("ruff", "check", "tvkd", "baselines", "studies", "reports", "tests", "noxfile.py")


@nox.session(python=PYTHON)
def testbed(session: nox.Session) -> None:
    """Build (or reuse) the embedded testbed: tokenizer, data, SFT/DPO teacher, SFT student."""
    install(session, "test")
    session.run("tvkd", "testbed", "build", *session.posargs, env=env())


@nox.session(name="study-reward-conflict", python=PYTHON)
def study_reward_conflict(session: nox.Session) -> None:
    """The main job: testbed -> teacher cache -> TVKD x six aux rewards + DPO + control -> tables."""
    install(session, "test")
    session.run("tvkd", "study", "run", "reward-conflict", *session.posargs, env=env())


@nox.session(python=PYTHON)
def bench(session: nox.Session) -> None:
    """Speed and memory ratios measured in one process (each printed with its target)."""
    install(session, "test")
    session.run("tvkd", "bench", *session.posargs, env=env())
