"""Runs you can trust: identity by content, --force, resume, no secret in the store, every input
checked before any work (one `error:` line, nothing in the store), signals, gc."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml

from tests.conftest import make_tiny_llama, make_tiny_tokenizer
from tvkd.cli import main
from tvkd.results import ResultsStore

ROOT = Path(__file__).resolve().parents[1]


def write_cfg(path: Path, world: dict, **over) -> Path:
    cfg = {
        "name": "tiny", "seed": 0, "num_threads": 1,
        "models": {"student": world["student"], "teacher": world["teacher"]},
        "data": {"source": world["data"], "test_source": world["data"], "test_split": "train", "test_limit": 8},
        "tokenize": {"max_length": 32, "max_prompt_length": 16},
        "loss": {"name": "dpo"},
        "train": {"learning_rate": 1e-3, "num_train_epochs": 1, "per_device_train_batch_size": 4, "logging_steps": 2},
        "eval": {"max_new_tokens": 4, "teacher_scores": False},
    }
    for key, value in over.items():
        node = cfg
        *parents, last = key.split(".")
        for p in parents:
            node = node.setdefault(p, {})
        node[last] = value
    path.write_text(yaml.safe_dump(cfg))
    return path


def cli(capsys, *argv) -> tuple[int, str, str]:
    code = main([str(a) for a in argv])
    out = capsys.readouterr()
    return code, out.out, out.err


def run_dirs(results: Path) -> list[Path]:
    return sorted(p for p in results.glob("*/*") if p.is_dir()) if results.exists() else []


# --------------------------------------------------------------------------------------------
# Identity by content


def test_a_data_file_changed_in_place_is_a_new_run(tiny_world, tmp_path, capsys):
    results = tmp_path / "results"
    cfg = write_cfg(tmp_path / "run.yaml", tiny_world)
    assert cli(capsys, "run", cfg, "--results", results, "--quiet")[0] == 0
    first = run_dirs(results)
    assert len(first) == 1
    before = json.loads((first[0] / "metrics.json").read_text())
    stamp = (first[0] / "metrics.json").stat().st_mtime_ns

    t0 = time.perf_counter()
    code, out, _ = cli(capsys, "run", cfg, "--results", results, "--quiet")
    unchanged_s = time.perf_counter() - t0
    assert code == 0 and run_dirs(results) == first  # unchanged: nothing trained
    assert (first[0] / "metrics.json").stat().st_mtime_ns == stamp
    print(f"unchanged rerun: {unchanged_s:.2f}s")

    data = Path(tiny_world["data"])
    rows = [json.loads(line) for line in data.read_text().splitlines()]
    for r in rows:  # swap chosen and rejected, in place
        r["chosen"], r["rejected"] = r["rejected"], r["chosen"]
    data.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    assert cli(capsys, "run", cfg, "--results", results, "--quiet")[0] == 0
    dirs = run_dirs(results)
    assert len(dirs) == 2
    after = json.loads((next(d for d in dirs if d != first[0]) / "metrics.json").read_text())
    assert after["train_loss"] != before["train_loss"]
    assert after["margin_accuracy"] != before["margin_accuracy"]


def test_weights_overwritten_in_place_are_a_new_run(tiny_world, tmp_path, capsys):
    results = tmp_path / "results"
    cfg = write_cfg(tmp_path / "run.yaml", tiny_world)
    assert cli(capsys, "run", cfg, "--results", results, "--quiet")[0] == 0
    first = run_dirs(results)
    before = json.loads((first[0] / "metrics.json").read_text())
    # same architecture, other weights, saved over the student's model.safetensors
    make_tiny_llama(len(make_tiny_tokenizer()), seed=99, layers=1, hidden=16).save_pretrained(tiny_world["student"])
    code, out, _ = cli(capsys, "run", cfg, "--results", results, "--dry-run")
    assert code == 0 and "not run yet" in out and "models.student" in out
    assert cli(capsys, "run", cfg, "--results", results, "--quiet")[0] == 0
    dirs = run_dirs(results)
    assert len(dirs) == 2
    after = json.loads((next(d for d in dirs if d != first[0]) / "metrics.json").read_text())
    assert after["train_loss"] != before["train_loss"]
    record = yaml.safe_load((next(d for d in dirs if d != first[0]) / "config.yaml").read_text())
    assert set(record["inputs"]) == {"models.student", "models.reference", "models.teacher", "data.source",
                                     "data.test_source"}


def test_dry_run_shows_fingerprints_and_writes_nothing(tiny_world, tmp_path, capsys):
    results = tmp_path / "results"
    cfg = write_cfg(tmp_path / "run.yaml", tiny_world)
    code, out, _ = cli(capsys, "run", cfg, "--results", results, "--dry-run", "--quiet")
    assert code == 0 and "not run yet" in out and "data.source" in out
    assert not run_dirs(results)


def test_force_reruns(tiny_world, tmp_path, capsys):
    results = tmp_path / "results"
    cfg = write_cfg(tmp_path / "run.yaml", tiny_world)
    assert cli(capsys, "run", cfg, "--results", results, "--quiet")[0] == 0
    (run,) = run_dirs(results)
    stamp = (run / "metrics.json").stat().st_mtime_ns
    code, out, _ = cli(capsys, "run", cfg, "--results", results, "--force", "--quiet")
    assert code == 0 and run_dirs(results) == [run]
    assert (run / "metrics.json").stat().st_mtime_ns != stamp
    assert json.loads((run / "status.json").read_text())["attempt"] == 2


# --------------------------------------------------------------------------------------------
# Resume


def test_a_killed_run_resumes_from_its_checkpoint_and_ends_like_an_uninterrupted_one(
        tiny_world, tmp_path, capsys, monkeypatch):
    import tvkd.training.trainer as trainer_mod

    over = {"train.save_strategy": "steps", "train.save_steps": 2, "train.num_train_epochs": 2}
    cfg = write_cfg(tmp_path / "run.yaml", tiny_world, **over)
    clean = tmp_path / "clean"
    assert cli(capsys, "run", cfg, "--results", clean, "--quiet")[0] == 0
    (clean_run,) = run_dirs(clean)
    want = json.loads((clean_run / "metrics.json").read_text())
    assert not (clean_run / "checkpoint").exists()  # a finished run keeps no checkpoints

    original = trainer_mod.PreferenceTrainer.compute_loss
    seen: list[int] = []

    def killed_after_step_5(self, *a, **k):
        seen.append(self.state.global_step)
        if self.state.global_step == 5:
            raise KeyboardInterrupt("killed")
        return original(self, *a, **k)

    monkeypatch.setattr(trainer_mod.PreferenceTrainer, "compute_loss", killed_after_step_5)
    results = tmp_path / "results"
    code, _, err = cli(capsys, "run", cfg, "--results", results, "--quiet")
    assert code == 130 and "interrupted" in err
    (run,) = run_dirs(results)
    assert json.loads((run / "status.json").read_text())["state"] == "interrupted"
    assert sorted(p.name for p in (run / "checkpoint").iterdir()) == ["checkpoint-2", "checkpoint-4"]

    seen.clear()
    monkeypatch.setattr(trainer_mod.PreferenceTrainer, "compute_loss", lambda self, *a, **k: (
        seen.append(self.state.global_step), original(self, *a, **k))[1])
    code, out, _ = cli(capsys, "run", cfg, "--results", results)
    assert code == 0 and "resuming from checkpoint-4" in out
    assert seen[0] == 4  # the second process starts at step 4, not 0
    got = json.loads((run / "metrics.json").read_text())
    assert got["resumed_from_step"] == 4 and got["train_steps"] == want["train_steps"]
    for key in ("margin_accuracy", "oracle_margin_accuracy", "response_words"):
        assert got[key] == want[key], key
    assert got["implicit_reward_margin"] == pytest.approx(want["implicit_reward_margin"], abs=1e-5)
    # the mean over every step, the ones before the checkpoint included (not only the resumed part's)
    assert got["train_loss"] == pytest.approx(want["train_loss"], rel=1e-6) and "train_loss_steps" not in got
    outs = [json.loads(line) for line in (run / "outputs.jsonl").read_text().splitlines()]
    assert outs == [json.loads(line) for line in (clean_run / "outputs.jsonl").read_text().splitlines()]
    assert not (run / "checkpoint").exists()


# --------------------------------------------------------------------------------------------
# Secrets


def test_no_secret_anywhere_in_the_run_folder(tiny_world, tmp_path, capsys, monkeypatch):
    token = "hf_" + "Zq9" * 12
    monkeypatch.setenv("HF_TOKEN", token)
    monkeypatch.setenv("OPENAI_API_KEY", "sk-" + "x7" * 12)
    cfg = write_cfg(tmp_path / "run.yaml", tiny_world, **{
        "train.save_strategy": "steps", "train.save_steps": 2, "train.keep_checkpoints": True,
        "train.extra": {"hub_token": token}})
    results = tmp_path / "results"
    assert cli(capsys, "run", cfg, "--results", results, "--quiet")[0] == 0
    (run,) = run_dirs(results)
    files = [p for p in run.rglob("*") if p.is_file()]
    assert any("checkpoint-" in str(p) for p in files)  # checkpoints were kept, and searched
    for p in files:
        data = p.read_bytes()
        assert token.encode() not in data and b"x7x7x7x7x7x7" not in data, p
    assert not [p for p in files if p.name == "training_args.bin"]


# --------------------------------------------------------------------------------------------
# Every input checked before any work: one error line, nothing in the store


def _bad_reference_tokenizer(world, tmp_path):
    tok = make_tiny_tokenizer()
    tok.add_tokens(["zebra"])
    model = make_tiny_llama(len(tok), seed=5, layers=1, hidden=16)
    path = tmp_path / "other_tok"
    model.save_pretrained(path)
    tok.save_pretrained(path)
    return {"models.reference": str(path)}


def _small_reference(world, tmp_path):
    tok = make_tiny_tokenizer()
    model = make_tiny_llama(len(tok) - 3, seed=5, layers=1, hidden=16)
    path = tmp_path / "small_ref"
    model.save_pretrained(path)
    tok.save_pretrained(path)
    return {"models.reference": str(path)}


def _truncated_teacher(world, tmp_path):
    w = Path(world["teacher"]) / "model.safetensors"
    w.write_bytes(w.read_bytes()[: w.stat().st_size // 2])
    return {"loss": {"name": "tvkd", "aux": "soft_value"}}


def _corrupt_student(world, tmp_path):
    (Path(world["student"]) / "model.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00not json at all!")
    return {}


def _pickled_student(world, tmp_path):
    (Path(world["student"]) / "model.safetensors").rename(Path(world["student"]) / "pytorch_model.bin")
    return {}


def _folder_unknown_split(world, tmp_path):
    folder = tmp_path / "pairs_folder"
    folder.mkdir()
    (folder / "train.jsonl").write_text(Path(world["data"]).read_text())
    return {"data.source": str(folder), "data.test_source": str(folder), "data.test_split": "validation"}


def _folder_malformed(world, tmp_path):
    folder = tmp_path / "bad_folder"
    folder.mkdir()
    (folder / "train.jsonl").write_text(Path(world["data"]).read_text() + "{not json\n")
    return {"data.source": str(folder), "data.test_source": str(folder)}


def _blank_lines(world, tmp_path):
    p = tmp_path / "blank.jsonl"
    p.write_text("\n\n   \n\n")
    return {"data.source": str(p)}


def _bad_utf8(world, tmp_path):
    p = tmp_path / "bad.jsonl"
    p.write_bytes(Path(world["data"]).read_bytes() + b'{"prompt": "\xff\xfe"}\n')
    return {"data.source": str(p)}


def _kd_with_a_teacher_of_another_tokenizer(world, tmp_path):
    from tvkd.testbed.vocab import other_vocabulary

    template = ("{{ bos_token }}{% for m in messages %}{{ '<|' + m['role'] + '|> ' + m['content'] + ' <|eot|> ' }}"
                "{% endfor %}{% if add_generation_prompt %}{{ '<|assistant|> ' }}{% endif %}")
    other = other_vocabulary(world["teacher"], tmp_path / "teacher_other", template=template)
    return {"models.teacher": str(other), "loss": {"name": "vanilla_kd"}}


BAD_CONFIGS = {
    "alpha -1": ({"loss": {"name": "tvkd", "alpha": -1}}, "alpha"),
    "gamma -1": ({"loss": {"name": "tvkd", "gamma": -1}}, "gamma"),
    "epochs 0": ({"train.num_train_epochs": 0}, "num_train_epochs"),
    "alpha abc": ({"loss": {"name": "tvkd", "alpha": "abc"}}, "loss.alpha"),
    "beta string": ({"loss": {"name": "tvkd", "beta": "0.1"}}, "without quotes"),
    "seed abc": ({"seed": "abc"}, "seed"),
    "negative lr": ({"train.learning_rate": -1e-3}, "learning_rate"),
    "batch 0": ({"train.per_device_train_batch_size": 0}, "per_device_train_batch_size"),
    "subsample 2": ({"data.subsample": 2}, "subsample"),
    "unknown extra": ({"train.extra": {"warmup_ration": 0.1}}, "extra.warmup_ration"),
    "managed extra": ({"train.extra": {"learning_rate": 0.1}}, "train.learning_rate"),
    "unknown loss": ({"loss": {"name": "tvdk"}}, "Did you mean 'tvkd'"),
    "unknown aux": ({"loss": {"name": "tvkd", "aux": "soft_valu"}}, "Did you mean 'soft_value'"),
    "kd without a teacher": ({"loss": {"name": "vanilla_kd"}, "models.teacher": None}, "'vanilla_kd' needs a teacher"),
    "ddpo without the teacher's SFT model": ({"loss": {"name": "ddpo"}}, "'ddpo' needs the teacher's SFT model"),
    "unknown baseline flag": ({"loss": {"name": "dckd", "kl_weight": 1}}, "'dckd' has no option(s) 'kl_weight'"),
    "bad baseline value": ({"loss": {"name": "tis_dpo", "transform": "ranked"}}, "tis_dpo: transform"),
    "reference vocabulary": (_bad_reference_tokenizer, "zebra"),
    "kd teacher of another tokenizer": (_kd_with_a_teacher_of_another_tokenizer, "its tokenizer differs from the "
                                        "student's (22 vs 22 tokens), and loss 'vanilla_kd' distils the teacher's top-"),
    "reference rows": (_small_reference, "smaller than the tokenizer"),
    "truncated safetensors": (_truncated_teacher, "models.teacher"),
    "corrupt safetensors": (_corrupt_student, "models.student"),
    "pickled weights": (_pickled_student, "safetensors"),
    "missing model": ({"models.teacher": "someone/not-a-model"}, "local Hugging Face cache"),
    "folder unknown split": (_folder_unknown_split, "validation"),
    "folder malformed jsonl": (_folder_malformed, "train.jsonl"),
    "blank lines": (_blank_lines, "blank.jsonl"),
    "bad utf-8": (_bad_utf8, "UTF-8"),
}


@pytest.mark.parametrize("case", list(BAD_CONFIGS))
def test_bad_input_is_one_error_line_and_leaves_nothing(tiny_world, tmp_path, capsys, case):
    over, expect = BAD_CONFIGS[case]
    if callable(over):
        over = over(tiny_world, tmp_path)
    cfg = write_cfg(tmp_path / "run.yaml", tiny_world, **over)
    results = tmp_path / "results"
    capsys.readouterr()  # what the setup printed
    code, out, err = cli(capsys, "run", cfg, "--results", results, "--quiet")
    assert code == 2, (out, err)
    assert "Traceback" not in out + err
    assert err.startswith("error: ") and err.count("\n") == 1, err
    assert expect in err, err
    assert not run_dirs(results)


def test_bad_yaml_and_bad_sets(tmp_path, capsys, tiny_world):
    bad = tmp_path / "broken.yaml"
    bad.write_text("name: x\nloss: {name: dpo\n")
    code, _, err = cli(capsys, "run", bad)
    assert code == 2 and str(bad) in err and "line" in err and "<unicode string>" not in err
    listy = tmp_path / "list.yaml"
    listy.write_text("- a\n- b\n")
    code, _, err = cli(capsys, "run", listy)
    assert code == 2 and "top level must be a mapping" in err
    cfg = write_cfg(tmp_path / "run.yaml", tiny_world)
    code, _, err = cli(capsys, "run", cfg, "--set", "seed.x=1")
    assert code == 2 and "seed is a value" in err
    code, _, err = cli(capsys, "run", cfg, "--set", "novalue")
    assert code == 2 and "KEY=VALUE" in err


def test_tokenize_defaults_are_what_config_shows_and_one_key_keeps_the_others(capsys):
    from tvkd.config import RunConfig, config_from_dict

    assert (RunConfig().tokenize.max_length, RunConfig().tokenize.max_prompt_length) == (1024, 512)
    code, out, _ = cli(capsys, "config")
    assert "tokenize.max_length (default 1024)" in out and "tokenize.max_prompt_length (default 512)" in out
    cfg = config_from_dict({"tokenize": {"max_length": 2000}})
    assert (cfg.tokenize.max_length, cfg.tokenize.max_prompt_length, cfg.tokenize.truncation) == (2000, 512,
                                                                                                  "keep_start")


def test_a_second_copy_of_a_running_run_is_one_error_line(tiny_world, tmp_path, capsys):
    from tvkd.config import load_config
    from tvkd.pipeline import identity

    cfg_path = write_cfg(tmp_path / "run.yaml", tiny_world)
    cfg = load_config(cfg_path)
    store = ResultsStore(tmp_path / "results")
    handle = store.start(identity(cfg), study=cfg.study, name=cfg.name)  # "another process" holds it
    try:
        code, _, err = cli(capsys, "run", cfg_path, "--results", tmp_path / "results", "--quiet")
        assert code == 2 and "another live process" in err and "Traceback" not in err
    finally:
        handle.fail("test")


def test_nan_loss_is_one_error_line(tiny_world, tmp_path, capsys, monkeypatch):
    import baselines.dpo as dpo_mod

    original = dpo_mod.DPO.__call__

    def nan_loss(self, batch, c):
        out = original(self, batch, c)
        out.loss = out.loss * torch.tensor(float("nan"))
        return out

    monkeypatch.setattr(dpo_mod.DPO, "__call__", nan_loss)
    cfg = write_cfg(tmp_path / "run.yaml", tiny_world)
    code, _, err = cli(capsys, "run", cfg, "--results", tmp_path / "results", "--quiet")
    assert code == 2 and err.startswith("error: loss is nan at step 0") and err.count("\n") == 1


def test_a_full_disk_names_the_place(tiny_world, tmp_path, capsys, monkeypatch):
    import datasets

    def full(self, *a, **k):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(datasets.Dataset, "save_to_disk", full)
    monkeypatch.setenv("TVKD_CACHE", str(tmp_path / "fresh-cache"))
    cfg = write_cfg(tmp_path / "run.yaml", tiny_world)
    code, _, err = cli(capsys, "run", cfg, "--results", tmp_path / "results", "--quiet")
    assert code == 2 and "no space left on device while writing" in err and "fresh-cache" in err


def test_environment_records_the_threads_the_run_used(tiny_world, tmp_path, capsys):
    threads = torch.get_num_threads()
    try:
        cfg = write_cfg(tmp_path / "run.yaml", tiny_world, num_threads=1)
        torch.set_num_threads(2)
        assert cli(capsys, "run", cfg, "--results", tmp_path / "results", "--quiet")[0] == 0
        (run,) = run_dirs(tmp_path / "results")
        assert json.loads((run / "environment.json").read_text())["torch"]["threads"] == 1
    finally:
        torch.set_num_threads(threads)


# --------------------------------------------------------------------------------------------
# Signals and gc


def test_sigterm_marks_the_run_interrupted_and_releases_its_lock(tiny_world, tmp_path):
    cfg = write_cfg(tmp_path / "run.yaml", tiny_world, **{"train.num_train_epochs": 400})
    results = tmp_path / "results"
    env = {**os.environ, "TVKD_CACHE": os.environ["TVKD_CACHE"]}
    proc = subprocess.Popen([sys.executable, "-m", "tvkd.cli", "run", str(cfg), "--results", str(results)],
                            cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        deadline = time.time() + 240
        while time.time() < deadline:
            dirs = run_dirs(results)
            if dirs and (dirs[0] / "status.json").exists() and \
                    json.loads((dirs[0] / "status.json").read_text()).get("state") == "running":
                break
            time.sleep(0.2)
        time.sleep(3)  # inside training
        proc.send_signal(signal.SIGTERM)
        out, _ = proc.communicate(timeout=120)
    finally:
        proc.kill()
    assert proc.returncode == 130, out[-2000:]
    assert "Traceback" not in out and "interrupted (received signal SIGTERM)" in out
    (run,) = run_dirs(results)
    assert json.loads((run / "status.json").read_text())["state"] == "interrupted"
    from tvkd.results import _RunLock

    _RunLock(run).release()  # the lock is free


def test_gc_removes_failed_interrupted_and_leftover_checkpoints(tmp_path, capsys):
    store = ResultsStore(tmp_path / "results")
    for name, finish in (("failed", "fail"), ("interrupted", "interrupt"), ("done", "complete"),
                         ("kept", "complete")):
        h = store.start({"name": name, "train": {"keep_checkpoints": name == "kept"}}, study="s", name=name)
        (h.run_dir / "checkpoint" / "checkpoint-2").mkdir(parents=True)
        if finish == "complete":
            h.write_metrics({"x": 1})
            h.complete()
        else:
            getattr(h, finish)("test")
    code, out, _ = cli(capsys, "results", "gc", "--results", tmp_path / "results", "--dry-run")
    assert code == 0 and out.count("would remove") == 4  # 3 items + the summary line
    assert len(run_dirs(tmp_path / "results")) == 4
    code, out, _ = cli(capsys, "results", "gc", "--results", tmp_path / "results")
    left = run_dirs(tmp_path / "results")
    assert [p.name.split("-")[0] for p in left] == ["done", "kept"]
    assert not (left[0] / "checkpoint").exists() and (left[1] / "checkpoint").exists()
    assert (left[0] / "metrics.json").exists()


def test_eval_only_evaluates_the_model_as_it_is(tiny_world, tmp_path, capsys):
    cfg = write_cfg(tmp_path / "run.yaml", tiny_world, eval_only=True,
                    **{"eval.margin_accuracy": False, "models.student": tiny_world["teacher"]})
    assert cli(capsys, "run", cfg, "--results", tmp_path / "results", "--quiet")[0] == 0
    (run,) = run_dirs(tmp_path / "results")
    metrics = json.loads((run / "metrics.json").read_text())
    assert metrics["eval_only"] is True and "train_loss" not in metrics and "response_words" in metrics
    assert not (tmp_path / "cache" / "reference_cache").exists()  # no cache was built


def test_a_top_k_as_large_as_the_vocabulary_is_refused_before_work(tiny_world, tmp_path, capsys):
    cfg = write_cfg(tmp_path / "run.yaml", tiny_world, loss={"name": "vanilla_kd", "topk": 50})
    code, _, err = cli(capsys, "run", cfg, "--results", tmp_path / "results", "--quiet")
    assert code == 2 and "top-k 50 must be smaller than the teacher's vocabulary (22 tokens)" in err
    assert not run_dirs(tmp_path / "results")
