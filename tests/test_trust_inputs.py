"""Every value checked before any work: values that transformers, peft, numpy or a chat template would
refuse only inside training, broken weight files, rows a template cannot render, limits that drop every
pair, a full disk at the last write, and YAML's scientific notation. Each bad input is one `error:`
line naming the key or file and the fix, no traceback, and nothing in the results store."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from safetensors.torch import load_file, save_file

from tests.conftest import make_tiny_tokenizer
from tests.test_trust import ROOT, cli, run_dirs, write_cfg

REFUSES_SYSTEM = (
    "{{ bos_token }}{% for m in messages %}{% if m['role'] == 'system' %}"
    "{{ raise_exception('System role not supported') }}{% endif %}"
    "{{ '<' + m['role'] + '> ' + m['content'] + ' <eot> ' }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<assistant> ' }}{% endif %}"
)
USER_ASSISTANT_ONLY = REFUSES_SYSTEM.replace(
    "m['role'] == 'system'", "m['role'] not in ('user', 'assistant')").replace(
    "'System role not supported'", "'Conversation roles must be user/assistant, got ' + m['role']")
SYNTAX_ERROR = "{% for m in messages %}{{ m['content'] }}"  # no endfor
SANDBOXED = "{% set x = messages.append({'role': 'user', 'content': 'hi'}) %}{{ 'x' }}"


def _pair(i, prompt, chosen="a b c", rejected="c b a"):
    return {"id": f"q{i}", "prompt": prompt, "chosen": [{"role": "assistant", "content": chosen}],
            "rejected": [{"role": "assistant", "content": rejected}]}


def _rows_file(world, tmp_path, odd_row):
    rows = [json.loads(line) for line in Path(world["data"]).read_text().splitlines()]
    rows.insert(3, odd_row)
    path = tmp_path / "pairs_odd.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    return str(path)


def _set_template(world, template):
    tok = make_tiny_tokenizer()
    tok.chat_template = template
    for role in ("student", "teacher"):
        tok.save_pretrained(world[role])


def _system_only_prompt(world, tmp_path):
    _set_template(world, REFUSES_SYSTEM)
    data = _rows_file(world, tmp_path, _pair(99, [{"role": "system", "content": "the cat"}]))
    return {"data.source": data, "data.test_source": data}


def _tool_turn(world, tmp_path):
    _set_template(world, USER_ASSISTANT_ONLY)
    prompt = [{"role": "user", "content": "sort c a b"}, {"role": "assistant", "content": "sort"},
              {"role": "tool", "content": "a b c"}, {"role": "user", "content": "sort c a b"}]
    data = _rows_file(world, tmp_path, _pair(98, prompt))
    return {"data.source": data, "data.test_source": data}


def _missing_weight(world, tmp_path):
    path = Path(world["student"]) / "model.safetensors"
    tensors = load_file(path)
    del tensors["model.layers.0.self_attn.q_proj.weight"]
    save_file(tensors, path, metadata={"format": "pt"})
    return {}


def _shape_mismatch(world, tmp_path):
    path = Path(world["student"]) / "model.safetensors"
    raw = path.read_bytes()
    n = int.from_bytes(raw[:8], "little")
    header = json.loads(raw[8:8 + n])
    name = "model.norm.weight"
    header[name]["shape"] = [header[name]["shape"][0] + 1]  # 17 floats in the 16 floats' byte range
    text = json.dumps(header, separators=(",", ":")).encode()
    assert len(text) <= n
    path.write_bytes(raw[:8] + text.ljust(n, b" ") + raw[8 + n:])
    return {}


def _missing_shard(world, tmp_path):
    folder = Path(world["student"])
    tensors = load_file(folder / "model.safetensors")
    names = sorted(tensors)
    shards = {"model-00001-of-00002.safetensors": names[: len(names) // 2],
              "model-00002-of-00002.safetensors": names[len(names) // 2:]}
    for file, keys in shards.items():
        save_file({k: tensors[k] for k in keys}, folder / file, metadata={"format": "pt"})
    (folder / "model.safetensors").unlink()
    (folder / "model.safetensors.index.json").write_text(json.dumps(
        {"metadata": {}, "weight_map": {k: f for f, keys in shards.items() for k in keys}}))
    (folder / "model-00002-of-00002.safetensors").unlink()
    return {}


def _report_to_wandb(world, tmp_path):
    try:
        import wandb  # noqa: F401
    except ImportError:
        return {"train.report_to": ["wandb"]}
    pytest.skip("wandb is installed here")


INPUT_CASES = {
    # 1. values that pass the config's types and fail inside training
    "seed -1": ({"seed": -1}, "seed must be an integer from 0"),
    "seed 5000000000": ({"seed": 5000000000}, "seed must be an integer from 0"),
    "lora rank 0": ({"train.lora": {"r": 0}}, "lora.r"),
    "push_to_hub offline": ({"train.extra": {"push_to_hub": True}}, "extra.push_to_hub"),
    "bogus lr_scheduler_type": ({"train.lr_scheduler_type": "bogus"}, "train.lr_scheduler_type"),
    "report_to wandb without wandb": (_report_to_wandb, "train.report_to"),
    "bogus optim": ({"train.extra": {"optim": "bogus"}}, "train.extra.optim"),
    "safetensors shapes against byte ranges": (_shape_mismatch, "'model.norm.weight'"),
    "a shard missing from the index": (_missing_shard, "model-00002-of-00002.safetensors"),
    # 2. rows a chat template refuses, and templates that cannot render at all
    "system-only prompt, template refuses system": (_system_only_prompt, "System role not supported"),
    "tool turn, template refuses it": (_tool_turn, "got tool"),
    "template syntax error": ({"tokenize.chat_template": SYNTAX_ERROR}, "does not compile"),
    "template refused by the sandbox": ({"tokenize.chat_template": SANDBOXED}, "SecurityError"),
    # 3. every pair dropped by the length limits
    "every pair too long": ({"tokenize": {"max_length": 8, "max_prompt_length": 1}}, "no pair fits"),
    # 4. a weight missing from a model's file
    "a weight missing": (_missing_weight, "model.layers.0.self_attn.q_proj.weight"),
}


def _assert_refused(capsys, cfg, results, expect):
    code, out, err = cli(capsys, "run", cfg, "--results", results, "--quiet")
    assert code == 2, (out, err)
    assert "Traceback" not in out + err
    assert err.startswith("error: ") and err.count("\n") == 1, err
    assert expect in err, err
    assert not run_dirs(results)
    return err


@pytest.mark.parametrize("case", list(INPUT_CASES))
def test_a_value_refused_inside_training_is_refused_before_any_work(tiny_world, tmp_path, capsys, case):
    over, expect = INPUT_CASES[case]
    if callable(over):
        over = over(tiny_world, tmp_path)
    cfg = write_cfg(tmp_path / "run.yaml", tiny_world, **over)
    capsys.readouterr()
    err = _assert_refused(capsys, cfg, tmp_path / "results", expect)
    if case.startswith(("system-only", "tool turn")):
        assert "row 3 (id 'q9" in err and "pairs_odd.jsonl" in err  # the row and the file
    if case == "every pair too long":
        assert "all 24 dropped" in err and "tokenize.max_prompt_length" in err
        tokenized = tmp_path / "cache" / "tokenized"
        assert not [p for p in tokenized.iterdir() if not p.name.startswith(".")]  # nothing empty is cached
        _assert_refused(capsys, cfg, tmp_path / "results", "no pair fits")  # and the rerun says the same


def test_a_missing_weight_is_allowed_by_strict_weights_false(tiny_world, tmp_path, capsys):
    _missing_weight(tiny_world, tmp_path)
    cfg = write_cfg(tmp_path / "run.yaml", tiny_world, **{"models.strict_weights": False})
    code, out, err = cli(capsys, "run", cfg, "--results", tmp_path / "results", "--dry-run", "--quiet")
    assert code == 0 and "not run yet" in out, err


# --------------------------------------------------------------------------------------------
# 5. A full disk at the final status write


def test_a_full_disk_at_the_last_status_write_names_the_folder_and_loses_nothing(
        tiny_world, tmp_path, capsys, monkeypatch):
    import tvkd.results as results_mod
    from tvkd.results import _RunLock

    original = results_mod._write_json
    full = {"on": False}

    def write_json(path, obj):
        if path.name == "status.json" and (full["on"] or obj.get("state") == "complete"):
            full["on"] = True  # the disk stays full
            raise OSError(28, "No space left on device")
        return original(path, obj)

    monkeypatch.setattr(results_mod, "_write_json", write_json)
    cfg = write_cfg(tmp_path / "run.yaml", tiny_world)
    results = tmp_path / "results"
    code, out, err = cli(capsys, "run", cfg, "--results", results, "--quiet")
    (run,) = run_dirs(results)
    assert code == 2 and "Traceback" not in out + err and err.count("\n") == 1, err
    assert err.startswith("error: no space left on device while writing ") and str(run) in err
    metrics = json.loads((run / "metrics.json").read_text())  # what the run measured is there
    assert "train_loss" in metrics
    _RunLock(run).release()  # the lock is free
    monkeypatch.setattr(results_mod, "_write_json", original)
    assert cli(capsys, "run", cfg, "--results", results, "--quiet")[0] == 0  # the space back, the rerun finishes
    assert json.loads((run / "status.json").read_text())["state"] == "complete"


# --------------------------------------------------------------------------------------------
# 6. Scientific notation


def test_scientific_notation_is_a_number(tiny_world, tmp_path, capsys):
    from tvkd.config import load_config

    cfg = write_cfg(tmp_path / "run.yaml", tiny_world)
    assert load_config(cfg, sets=["train.learning_rate=1e-5"]).train.learning_rate == 1e-5
    code, out, err = cli(capsys, "run", cfg, "--results", tmp_path / "r", "--dry-run", "--quiet",
                         "--set", "train.learning_rate=1e-5", "--set", "loss.beta=2e-1")
    assert code == 0, err
    text = cfg.read_text().replace("learning_rate: 0.001", "learning_rate: 5e-07")
    assert "5e-07" in text
    cfg.write_text(text)
    assert load_config(cfg).train.learning_rate == 5e-07
    quoted = tmp_path / "quoted.yaml"
    quoted.write_text(text.replace("5e-07", "'5e-07'"))
    code, _, err = cli(capsys, "run", quoted, "--dry-run")
    assert code == 2 and "without quotes" in err  # a quoted value is still a string


# --------------------------------------------------------------------------------------------
# Weak items: speed of a typo, identity by content, truncated metrics, non-ASCII names, templates


@pytest.mark.parametrize("setting, message", [
    ("train.learnign_rate=1", "train.learnign_rate: unknown key; valid keys: learning_rate"),
    ("train.learnign_rate=1", "Did you mean 'learning_rate'"),
    ("train.learning_rate=abc", "train.learning_rate: expected a number, got 'abc'"),
    ("data.subsample=1.5", "data: subsample must lie in (0, 1]"),
    ("models.dtype=float64", "dtype must be one of auto"),
    ("seed=-1", "seed"),
    ("train.warmup_steps=1.5", "warmup_steps must be a fraction of all steps in [0, 1) or a whole number of steps"),
])
def test_a_wrong_key_or_value_outside_the_loss_is_answered_without_importing_torch(tmp_path, setting, message):
    """Keys first, then values section by section, the loss (whose options need the loss classes, and torch) last."""
    cfg = tmp_path / "run.yaml"
    cfg.write_text("name: x\nloss: {name: dpo}\n")
    code = ("import sys; from tvkd.cli import main; rc = main(['run', sys.argv[1], '--set', sys.argv[2]]);"
            "heavy = sorted(m for m in ('torch', 'transformers', 'datasets') if m in sys.modules); print(rc, heavy)")
    proc = subprocess.run([sys.executable, "-c", code, str(cfg), setting], cwd=ROOT, capture_output=True,
                          text=True, timeout=120)
    assert proc.stdout.strip() == "2 []", proc.stdout + proc.stderr
    assert message in proc.stderr and proc.stderr.startswith("error: ") and "Traceback" not in proc.stderr


@pytest.mark.parametrize("argv, message", [
    (["--seed", "-1"], "testbed.seed must be an integer from 0 to 2**32 - 1, got -1"),
    (["--set", "label_temperature=abc"], "testbed.label_temperature: expected a number, got 'abc'"),
    (["--set", "samples_per_prompt=1"], "testbed.samples_per_prompt must be >= 2"),
    (["--set", "student_hidden=65"], "testbed.student_hidden must be a multiple of student_heads (2)"),
    (["--set", "max_len=2"], "testbed.max_len must be >= min_len (3)"),
    (["--set", "seed"], "--set 'seed': expected FIELD=VALUE"),
    (["--seed", "2", "--set", "seed=3"], "--seed 2 and --set seed=3 disagree"),
    (["--set", "labl_temperature=0.3"], "unknown testbed option(s) ['labl_temperature']"),
])
def test_a_wrong_testbed_value_is_one_line_before_any_stage(tmp_path, capsys, argv, message):
    code, out, err = cli(capsys, "testbed", "build", "--cache-dir", tmp_path / "cache", *argv)
    assert code == 2 and err.startswith("error: ") and message in err and "Traceback" not in err, err
    assert not (tmp_path / "cache").exists() or not any((tmp_path / "cache").rglob("*.safetensors"))


@pytest.mark.parametrize("argv, message", [
    # bench: an option that would be ignored
    (["bench", "--parts", "cache"], "--parts applies to --shapes paper only"),
    (["bench", "--device", "cpu", "--parts", "x"], "--parts and --device apply to --shapes paper only"),
    (["bench", "--shapes", "paper", "--parts", "cache,nope"], "unknown bench part(s) ['nope']; valid: cache, order"),
    # data inspect: what it cannot show
    (["data", "inspect", "testbed:student_sft"], "testbed:student_sft is a model (or tokenizer) folder of the testbed, "
                                                 "not data; its data parts: testbed:pref_train"),
    (["data", "inspect", "testbed:test_prompts"], "testbed:test_prompts holds prompts only"),
    (["data", "inspect", "testbed:pref_trian"], "unknown testbed part 'pref_trian'"),
    (["data", "inspect", "x.jsonl", "-n", "-1"], "-n must be >= 0"),
    # judge-server: settings out of range
    (["judge-server", "--port", "-1"], "--port must be from 0 to 65535"),
    (["judge-server", "--port", "70000"], "--port must be from 0 to 65535"),
    (["judge-server", "--fail-status", "200"], "--fail-status must be an HTTP error status from 400 to 599"),
    (["judge-server", "--drop-first", "-2"], "--drop-first must be >= 0"),
    (["judge-server", "--max-n", "0"], "--max-n must be >= 1"),
])
def test_a_command_line_mistake_is_one_error_line(capsys, argv, message):
    code, _, err = cli(capsys, *argv)
    assert code == 2 and err.startswith("error: ") and message in err, err


def test_data_inspect_reads_a_testbed_data_part_where_the_testbed_keeps_it(tiny_world, capsys, monkeypatch):
    import tvkd.pipeline

    asked = []
    monkeypatch.setattr(tvkd.pipeline, "resolve", lambda value, *a, **k: asked.append(value) or tiny_world["data"])
    code, out, err = cli(capsys, "data", "inspect", "testbed:student_pref_train", "-n", "1")
    assert code == 0 and asked == ["testbed:student_pref_train"] and "first 1 of" in out, err


def test_a_judge_server_port_in_use_is_one_line(capsys):
    import socket

    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        code, _, err = cli(capsys, "judge-server", "--port", str(port))
    assert code == 2 and f"--port {port}: cannot listen on 127.0.0.1:{port}" in err, err


def test_a_testbed_value_in_a_run_config_is_checked_with_the_config(tmp_path, capsys):
    cfg = tmp_path / "run.yaml"
    cfg.write_text("name: x\nloss: {name: dpo}\ntestbed: {dpo_lr: 1e-5, label_temperature: -0.3}\n")
    code, out, err = cli(capsys, "run", cfg, "--dry-run")
    assert code == 2 and "testbed.label_temperature must be > 0, got -0.3" in err, err


def test_a_key_given_twice_is_an_error_not_the_last_one_silently(tmp_path, capsys):
    cfg = tmp_path / "run.yaml"
    cfg.write_text("name: x\nloss: {name: dpo}\ntrain:\n  learning_rate: 1e-5\nloss: {name: tvkd}\n")
    code, _, err = cli(capsys, "run", cfg, "--dry-run")
    assert code == 2 and "line 5, column 1: the key 'loss' is given twice (first at line 2); keep one" in err, err
    study = tmp_path / "study.yaml"
    study.write_text("name: s\nvariants:\n  - {label: a, label: b}\n")
    code, _, err = cli(capsys, "study", "plan", study)
    assert code == 2 and "the key 'label' is given twice" in err, err
    from tvkd.config import load_yaml  # a merge key's values may still be overridden, as YAML allows

    assert load_yaml("a: &x {b: 1, c: 1}\nd:\n  <<: *x\n  b: 2\n")["d"] == {"b": 2, "c": 1}


def test_a_loss_that_needs_a_teacher_is_answered_before_transformers_is_imported(tmp_path):
    cfg = tmp_path / "run.yaml"
    cfg.write_text("name: x\nloss: {name: tvkd}\nmodels: {student: /nowhere/student}\n")
    code = ("import sys; from tvkd.cli import main; rc = main(['run', sys.argv[1]]);"
            "heavy = sorted(m for m in ('transformers', 'datasets') if m in sys.modules); print(rc, heavy)")
    proc = subprocess.run([sys.executable, "-c", code, str(cfg)], cwd=ROOT, capture_output=True, text=True,
                          timeout=120)
    assert proc.stdout.strip() == "2 []", proc.stdout + proc.stderr
    assert "needs a teacher: set models.teacher" in proc.stderr


def test_a_copy_of_the_data_and_the_model_at_another_path_is_the_same_run(tiny_world, tmp_path, capsys):
    import shutil

    results = tmp_path / "results"
    cfg = write_cfg(tmp_path / "run.yaml", tiny_world)
    assert cli(capsys, "run", cfg, "--results", results, "--quiet")[0] == 0
    (run,) = run_dirs(results)
    copies = tmp_path / "copies"
    copies.mkdir()
    data = shutil.copy(tiny_world["data"], copies / "same_pairs.jsonl")
    student = shutil.copytree(tiny_world["student"], copies / "same_student")
    moved = write_cfg(tmp_path / "moved.yaml", {**tiny_world, "data": str(data), "student": str(student)})
    code, out, _ = cli(capsys, "run", moved, "--results", results, "--dry-run", "--quiet")
    assert code == 0 and out.startswith("run 'tiny': complete"), out
    assert cli(capsys, "run", moved, "--results", results, "--quiet")[0] == 0
    assert run_dirs(results) == [run]  # nothing trained again
    import yaml

    assert yaml.safe_load((run / "config.yaml").read_text())["models"]["student"] == tiny_world["student"]


def test_a_run_stored_when_paths_were_hashed_is_still_found(tmp_path, monkeypatch):
    import tvkd.results as results_mod

    config = {"name": "x", "models": {"student": "/old/place"}, "inputs": {"models.student": "abc123"}}
    store = results_mod.ResultsStore(tmp_path / "results")
    with monkeypatch.context() as m:
        m.setattr(results_mod, "_content_keyed", lambda plain: plain)  # the hash as it was
        handle = store.start(config, study="s", name="x")
        handle.write_metrics({"margin_accuracy": 0.5})
        handle.complete()
    assert store.run_dir(config, study="s", name="x") != handle.run_dir
    assert store.is_complete(config, study="s", name="x")
    assert store.load(config, study="s", name="x").run_dir == handle.run_dir
    moved = {**config, "models": {"student": "/new/place"}}
    assert not store.is_complete(moved, study="s", name="x")  # an old key holds its path


def test_a_truncated_metrics_file_is_not_a_complete_run(tmp_path):
    from tvkd.results import ResultsStore

    store = ResultsStore(tmp_path / "results")
    config = {"name": "x", "seed": 0}
    handle = store.start(config, study="s", name="x")
    handle.write_metrics({"margin_accuracy": 0.5, "train_loss": 0.7})
    handle.complete()
    path = handle.run_dir / "metrics.json"
    path.write_text(path.read_text()[:20])
    record = store.load(config, study="s", name="x", complete_only=False)
    assert not record.complete and record.state == "unreadable metrics"  # what `study plan` shows
    assert not store.is_complete(config, study="s", name="x")
    assert [reason for _, reason in store.garbage()] == ["unreadable status or metrics"]


def test_a_non_ascii_run_name_is_kept_with_a_hash(tiny_world, tmp_path, capsys):
    results = tmp_path / "results"
    cfg = write_cfg(tmp_path / "run.yaml", tiny_world, name="実験")
    assert cli(capsys, "run", cfg, "--results", results, "--quiet")[0] == 0
    (run,) = run_dirs(results)
    assert run.name.startswith("u-") and len(run.name) == len("u-") + 8 + 1 + 12
    other = write_cfg(tmp_path / "other.yaml", tiny_world, name="テスト")
    from tvkd.results import ResultsStore

    assert ResultsStore(results).run_dir({"name": "x"}, name="テスト").name.split("-")[1] != run.name.split("-")[1]
    code, out, _ = cli(capsys, "run", cfg, "--results", results, "--dry-run", "--quiet")
    assert code == 0 and "complete" in out
    assert other.exists()


def test_a_teacher_with_another_chat_template_is_noticed_at_plan_time(tiny_world, tmp_path, capsys, monkeypatch):
    tok = make_tiny_tokenizer()
    tok.chat_template = USER_ASSISTANT_ONLY
    tok.save_pretrained(tiny_world["teacher"])
    cfg = write_cfg(tmp_path / "run.yaml", tiny_world)
    code, out, err = cli(capsys, "run", cfg, "--results", tmp_path / "results", "--dry-run", "--quiet")
    assert code == 0, err
    assert "notice: models.teacher" in err and "chat template that differs from the student's" in err
    assert not run_dirs(tmp_path / "results")

    # in a multi-process launch only the main process says it
    monkeypatch.setenv("RANK", "1")
    code, out, err = cli(capsys, "run", cfg, "--results", tmp_path / "results", "--dry-run", "--quiet")
    assert code == 0 and "notice:" not in err, err


def test_a_misspelt_loss_option_is_named_with_the_option_it_resembles():
    from tvkd.api import LOSSES, ConfigError, build_config

    with pytest.raises(ConfigError, match=r"has no option\(s\) 'alpah' \(did you mean 'alpha'\?\); valid options: "):
        build_config(LOSSES.get("tvkd"), {"alpah": 0.5})
    with pytest.raises(ConfigError) as err:
        build_config(LOSSES.get("tvkd"), {"zzzz": 1})
    assert "did you mean" not in str(err.value)  # nothing alike: no guess
