"""The results store: stable hashes, atomic files, crash recovery, frames, redaction, environment."""

from __future__ import annotations

import dataclasses
import importlib.metadata
import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from tvkd.results import (
    DEFAULT_IGNORE,
    ENVIRONMENT_PACKAGES,
    HashCollisionError,
    ResultsStore,
    RunAlreadyCompleteError,
    RunInProgressError,
    config_hash,
    environment,
    is_secret_key,
    redact,
)

REPO = Path(__file__).resolve().parents[1]
CFG = {"method": "tvkd", "aux": "soft_value", "seed": 0, "training": {"beta": 0.1, "alpha": 0.7, "lr": 2.0}}


def _all_text(run_dir: Path) -> str:
    return "\n".join(p.read_text(errors="replace") for p in run_dir.rglob("*") if p.is_file())


# ------------------------------------------------------------------------------------------ hash


def test_config_hash_ignores_order_number_spelling_and_sequence_type():
    a = {"seed": 0, "training": {"lr": 2, "alpha": 0.7, "beta": 0.1}, "aux": "soft_value", "method": "tvkd",
         "temps": [1, 2]}
    b = {"method": "tvkd", "aux": "soft_value", "training": {"beta": 0.1, "alpha": 0.7, "lr": 2.0}, "seed": 0,
         "temps": (1.0, 2.0)}
    assert config_hash(a) == config_hash(b)
    assert len(config_hash(a)) == 12 and len(config_hash(a, length=64)) == 64
    assert config_hash(a, length=64).startswith(config_hash(a))


def test_config_hash_changes_with_anything_that_changes_results():
    base = config_hash(CFG)
    assert config_hash({**CFG, "seed": 1}) != base
    assert config_hash({**CFG, "training": {**CFG["training"], "beta": 0.2}}) != base
    assert config_hash({**CFG, "extra": None}) != base
    assert config_hash({**CFG, "seed": True}) != config_hash({**CFG, "seed": 1})  # bool is not an int here


def test_config_hash_default_ignore_set():
    noisy = {**CFG, "output_dir": "/tmp/x", "report_to": ["wandb"], "progress": False,
             "training": {**CFG["training"], "logging_steps": 5, "output_dir": "/elsewhere", "save_steps": 7}}
    assert config_hash(noisy) == config_hash(CFG)
    assert {"output_dir", "logging_steps", "progress", "report_to"} <= DEFAULT_IGNORE


def test_config_hash_custom_ignore_with_dotted_paths():
    a = {"eval": {"batch_size": 8}, "train": {"batch_size": 8}}
    b = {"eval": {"batch_size": 64}, "train": {"batch_size": 8}}
    c = {"eval": {"batch_size": 8}, "train": {"batch_size": 64}}
    assert config_hash(a, ignore={"eval.batch_size"}) == config_hash(b, ignore={"eval.batch_size"})
    assert config_hash(a, ignore={"eval.batch_size"}) != config_hash(c, ignore={"eval.batch_size"})
    assert config_hash({**a, "output_dir": "x"}, ignore=set()) != config_hash(a, ignore=set())


def test_config_hash_accepts_dataclasses_and_rejects_opaque_objects():
    @dataclasses.dataclass
    class Loss:
        name: str = "tvkd"
        alpha: float = 0.7

    assert config_hash({"loss": Loss()}) == config_hash({"loss": {"name": "tvkd", "alpha": 0.7}})
    with pytest.raises(TypeError, match=r"config\.model"):
        config_hash({"model": object()})


def test_secrets_do_not_change_the_hash():
    assert config_hash({**CFG, "judge": {"api_key": "sk-abcdefghijklmnopqrstuvwx"}}) == config_hash({**CFG, "judge": {}})


# ---------------------------------------------------------------------------------- lifecycle


def test_run_lifecycle_and_layout(tmp_path):
    store = ResultsStore(tmp_path)
    run_dir = store.run_dir(CFG, study="reward-conflict")
    assert run_dir == tmp_path / "reward-conflict" / f"tvkd-{config_hash(CFG)}"
    assert store.run_dir(CFG).parent.name == "runs"
    assert store.load(CFG, study="reward-conflict") is None and not store.is_complete(CFG, study="reward-conflict")

    run = store.start(CFG, study="reward-conflict")
    assert run.run_dir == run_dir
    status = json.loads((run_dir / "status.json").read_text())
    assert status["state"] == "running" and status["config_hash"] == config_hash(CFG, length=64)
    assert {"config.yaml", "environment.json", "status.json"} <= {p.name for p in run_dir.iterdir()}
    assert not store.is_complete(CFG, study="reward-conflict")

    run.write_metrics({"margin_accuracy": 0.7})
    run.write_metrics({"oracle_score": 0.5}, merge=True)
    run.write_outputs([{"prompt": "sort b a", "response": "a b", "oracle": 1.0}, {"prompt": "x", "response": ""}])
    run.complete()

    record = store.load(CFG, study="reward-conflict")
    assert record is not None and record.complete and record.state == "complete"
    assert record.metrics == {"margin_accuracy": 0.7, "oracle_score": 0.5}
    assert record.config == CFG
    assert record.outputs()[0]["response"] == "a b" and len(record.outputs()) == 2
    assert record.environment["seed"] == 0
    assert record.status["finished_at"] and record.status["duration_s"] >= 0
    assert store.is_complete(CFG, study="reward-conflict")
    with pytest.raises(RuntimeError, match="already complete"):
        run.write_metrics({"x": 1})
    with pytest.raises(RunAlreadyCompleteError):
        store.start(CFG, study="reward-conflict")
    redo = store.start(CFG, study="reward-conflict", overwrite=True)
    assert not (run_dir / "metrics.json").exists() and not store.is_complete(CFG, study="reward-conflict")
    redo.fail("abandoned")


def test_context_manager_completes_or_fails(tmp_path):
    store = ResultsStore(tmp_path)
    with store.start(CFG) as run:
        run.write_metrics({"m": 1.0})
    assert store.is_complete(CFG)

    other = {**CFG, "seed": 1}
    with pytest.raises(ValueError, match="diverged"):
        with store.start(other) as run:
            run.write_metrics({"m": 1.0})
            raise ValueError("loss diverged")
    record = store.load(other, complete_only=False)
    assert record.state == "failed" and "ValueError: loss diverged" in record.status["error"]
    assert "Traceback" in record.status["traceback"]
    assert not store.is_complete(other)  # metrics.json exists, but the status says failed

    third = {**CFG, "seed": 2}
    with pytest.raises(RuntimeError, match="without write_metrics"):
        with store.start(third):
            pass
    assert store.load(third, complete_only=False).state == "failed"


def test_failed_run_is_redone_clean_and_may_keep_its_checkpoint(tmp_path):
    store = ResultsStore(tmp_path)
    run = store.start(CFG)
    (run.checkpoint_dir / "checkpoint-10").mkdir()
    run.write_outputs([{"response": "stale"}])
    run.fail(RuntimeError("killed by the scheduler"))

    again = store.start(CFG, keep_checkpoint=True)
    assert (again.run_dir / "checkpoint" / "checkpoint-10").is_dir()
    assert not (again.run_dir / "outputs.jsonl").exists()
    assert json.loads((again.run_dir / "status.json").read_text())["attempt"] == 2
    again.fail("again")

    third = store.start(CFG)
    assert not (third.run_dir / "checkpoint").exists()
    third.write_metrics({"m": 0.0})
    third.complete()


def test_second_writer_is_refused_while_the_first_lives(tmp_path):
    store = ResultsStore(tmp_path)
    first = store.start(CFG)
    with pytest.raises(RunInProgressError):
        store.start(CFG)
    first.write_metrics({"m": 1})
    first.complete()
    assert store.is_complete(CFG)


def test_interrupted_write_leaves_the_previous_file(tmp_path, monkeypatch):
    store = ResultsStore(tmp_path)
    run = store.start(CFG)
    run.write_metrics({"m": 1.0})

    def boom(src, dst):
        raise OSError("disk full")

    monkeypatch.setattr(os, "replace", boom)
    with pytest.raises(OSError, match="disk full"):
        run.write_metrics({"m": 2.0})
    with pytest.raises(OSError, match="disk full"):
        run.write_outputs([{"a": 1}])
    monkeypatch.undo()
    assert json.loads((run.run_dir / "metrics.json").read_text()) == {"m": 1.0}
    assert not [p for p in run.run_dir.iterdir() if p.name.endswith(".tmp")]  # temp files cleaned up
    assert not (run.run_dir / "outputs.jsonl").exists()
    run.complete()


CRASH_SCRIPT = textwrap.dedent(
    """
    import os, signal, sys
    from tvkd.results import ResultsStore
    store = ResultsStore(sys.argv[1])
    run = store.start({"method": "tvkd", "seed": 7})
    run.write_metrics({"margin_accuracy": 0.9})
    os.kill(os.getpid(), signal.SIGKILL)  # killed after the metrics, before complete()
    """
)


def test_killed_process_leaves_a_run_that_is_redone(tmp_path):
    proc = subprocess.run([sys.executable, "-c", CRASH_SCRIPT, str(tmp_path)], cwd=REPO, capture_output=True,
                          timeout=120)
    assert proc.returncode == -9, proc.stderr.decode()
    cfg = {"method": "tvkd", "seed": 7}
    store = ResultsStore(tmp_path)
    record = store.load(cfg, complete_only=False)
    assert record.state == "running" and record.metrics == {"margin_accuracy": 0.9}
    assert not record.complete and not store.is_complete(cfg)
    assert store.frame().empty

    run = store.start(cfg)  # the dead process's lock is gone with it
    assert not (run.run_dir / "metrics.json").exists()  # started clean
    run.write_metrics({"margin_accuracy": 0.8})
    run.complete()
    assert store.frame()["margin_accuracy"].tolist() == [0.8]


@pytest.mark.parametrize("damage", ["corrupt", "missing", "not-an-object"])
def test_complete_status_with_unreadable_metrics_is_not_complete(tmp_path, damage):
    store = ResultsStore(tmp_path)
    with store.start(CFG) as run:
        run.write_metrics({"m": 1.0})
    metrics = run.run_dir / "metrics.json"
    if damage == "corrupt":
        metrics.write_text('{"m": 1.')
    elif damage == "missing":
        metrics.unlink()
    else:
        metrics.write_text("[1, 2]")
    assert not store.is_complete(CFG) and store.frame().empty
    again = store.start(CFG)  # no overwrite needed: it never counted as complete
    again.write_metrics({"m": 2.0})
    again.complete()
    assert store.is_complete(CFG)


def test_hash_collision_is_reported(tmp_path):
    store = ResultsStore(tmp_path)
    with store.start(CFG) as run:
        run.write_metrics({"m": 1.0})
    status = json.loads((run.run_dir / "status.json").read_text())
    status["config_hash"] = "0" * 64
    (run.run_dir / "status.json").write_text(json.dumps(status))
    with pytest.raises(HashCollisionError):
        store.is_complete(CFG)
    with pytest.raises(HashCollisionError):
        store.start(CFG)


def test_names_and_studies_cannot_escape_the_root(tmp_path):
    store = ResultsStore(tmp_path)
    path = store.run_dir(CFG, study="../../etc", name="a/b c")
    assert tmp_path in path.parents and path.parent.parent == tmp_path
    assert path.name.startswith("a_b_c-")
    assert store.run_dir({"loss": {"name": "simpo"}}).name.startswith("simpo-")
    assert store.run_dir({"x": 1}).name.startswith("run-")


# -------------------------------------------------------------------------------------- frame


def test_frame_has_one_row_per_complete_run(tmp_path):
    store = ResultsStore(tmp_path)
    for seed in (0, 1):
        cfg = {**CFG, "seed": seed, "temps": [1, 2]}
        with store.start(cfg, study="rc") as run:
            run.write_metrics({"margin_accuracy": 0.6 + seed / 10, "eval": {"kl": 0.1}})
    store.start({**CFG, "seed": 2}, study="rc").fail("crashed")  # not complete: not in the frame
    with store.start({"method": "dpo", "seed": 0}, study="other") as run:
        run.write_metrics({"margin_accuracy": 0.5})

    df = store.frame("rc")
    assert len(df) == 2
    assert list(df.columns[:3]) == ["study", "run_dir", "config_hash"]
    assert {"config.method", "config.aux", "config.seed", "config.training.beta", "config.temps",
            "margin_accuracy", "eval.kl"} <= set(df.columns)
    assert sorted(df["config.seed"]) == [0, 1]
    assert df.loc[df["config.seed"] == 1, "margin_accuracy"].item() == pytest.approx(0.7)
    assert df["config.temps"].iloc[0] == (1, 2)  # hashable, so it can be grouped by
    assert all(Path(p).is_dir() for p in df["run_dir"])
    assert df.groupby("config.temps").size().item() == 2

    everything = store.frame()
    assert len(everything) == 3 and set(everything["study"]) == {"rc", "other"}
    assert everything.loc[everything["study"] == "other", "config.aux"].isna().all()
    assert len(store.records("rc")) == 3 and {r.state for r in store.records("rc")} == {"complete", "failed"}
    assert ResultsStore(tmp_path / "empty").frame().empty


# ---------------------------------------------------------------------------------- redaction


@pytest.mark.parametrize(
    "key", ["api_key", "OPENAI_API_KEY", "apiKey", "hf_token", "token", "hub_token", "access_token", "password",
            "db_passwd", "client_secret", "authorization", "use_auth_token", "openaiapikey", "private_key"]
)
def test_secret_key_names(key):
    assert is_secret_key(key)


@pytest.mark.parametrize(
    "key", ["tokenizer", "max_new_tokens", "pad_token", "eos_token_id", "num_tokens", "token_level", "author",
            "key", "keys", "monkey", "chat_template", "seed", "base_url"]
)
def test_ordinary_key_names(key):
    assert not is_secret_key(key)


def test_redact_removes_secret_keys_at_any_depth():
    config = {
        "judge": {"model": "gpt-4o", "api_key": "abc123", "base_url": "https://api.example/v1",
                  "headers": {"Authorization": "Bearer abc"}},
        "storage": "postgresql://optuna:hunter2@db:5432/study",
        "hub": [{"HF_TOKEN": "abc"}, "hf_" + "a" * 34],
        "note": "sk-" + "x" * 30,  # a credential under an innocent name
        "tokenizer": {"pad_token": "<pad>", "max_new_tokens": 64},
        "pair": ("a", "b"),
    }
    clean = redact(config)
    assert clean == {
        "judge": {"model": "gpt-4o", "base_url": "https://api.example/v1", "headers": {}},
        "storage": "postgresql://optuna:<redacted>@db:5432/study",
        "hub": [{}, "<redacted>"],
        "tokenizer": {"pad_token": "<pad>", "max_new_tokens": 64},
        "pair": ("a", "b"),
    }
    assert config["judge"]["api_key"] == "abc123"  # the input is not modified


def test_secrets_never_reach_the_run_directory(tmp_path):
    secret = "sk-" + "S" * 40
    cfg = {**CFG, "judge": {"api_key": secret, "model": "gpt-4o"}, "storage": "mysql://u:hunter2@h/db"}
    store = ResultsStore(tmp_path)
    with pytest.raises(ConnectionError):
        with store.start(cfg) as run:
            run.write_metrics({"m": 1})
            raise ConnectionError(f"judge refused key {secret} at mysql://u:hunter2@h/db")
    text = _all_text(run.run_dir)
    assert secret not in text and "hunter2" not in text
    assert store.load(cfg, complete_only=False).config["judge"] == {"model": "gpt-4o"}


# -------------------------------------------------------------------------------- environment


def test_environment_records_versions_and_no_environment_variables(monkeypatch):
    monkeypatch.setenv("OPENAI_API_KEY", "sk-envsecretenvsecretenvsecret")
    monkeypatch.setenv("TVKD_PROBE_VARIABLE", "probe-value-1234")
    env = environment(seed=3, device="cpu")
    assert set(ENVIRONMENT_PACKAGES) <= set(env["packages"])
    for name in ("pandas", "pyarrow", "torch"):
        assert env["packages"][name] == importlib.metadata.version(name)
    assert env["seed"] == 3 and env["device"] == "cpu"
    assert env["python"] == f"{sys.version_info.major}.{sys.version_info.minor}.{sys.version_info.micro}"
    assert env["cpu_count"] == os.cpu_count() and env["torch"]["threads"] >= 1
    if env["git"] is not None:
        assert len(env["git"]["revision"]) == 40 and isinstance(env["git"]["dirty"], bool)
    text = json.dumps(env)
    assert "envsecret" not in text and "probe-value-1234" not in text and "TVKD_PROBE_VARIABLE" not in text
    assert not {"env", "environ", "environment_variables"} & set(env)


def test_environment_json_is_written_with_the_run_seed(tmp_path):
    store = ResultsStore(tmp_path)
    with store.start({"method": "dpo", "training": {"seed": 11}}, device="cpu") as run:
        run.write_metrics({"m": 1})
    env = json.loads((run.run_dir / "environment.json").read_text())
    assert env["seed"] == 11 and env["device"] == "cpu" and env["packages"]["pandas"]

