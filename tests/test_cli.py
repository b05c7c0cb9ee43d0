"""The command line: help that teaches, listings, clear errors for bad input."""

from __future__ import annotations

import pytest

from tvkd.cli import main


def run(capsys, *argv):
    code = main(list(argv))
    out = capsys.readouterr()
    return code, out.out, out.err


def test_help_teaches(capsys):
    with pytest.raises(SystemExit) as e:
        main(["--help"])
    assert e.value.code == 0
    out = capsys.readouterr().out
    for word in ("testbed build", "data inspect", "study run reward-conflict", "TVKD_CACHE"):
        assert word in out


def test_listings(capsys):
    code, out, _ = run(capsys, "losses")
    assert code == 0 and {"tvkd", "tvkd_released", "dpo", "sft"} <= set(line.split(":")[0] for line in out.splitlines())
    code, out, _ = run(capsys, "aux-rewards")
    assert code == 0 and all(n in out for n in ("logits", "log_prob", "max", "margin", "expectation", "soft_value"))
    code, out, _ = run(capsys, "config")
    assert "loss.name" in out and "train.learning_rate" in out
    code, out, _ = run(capsys, "study", "list")
    assert "reward-conflict" in out


def test_data_inspect_on_fixture(capsys):
    code, out, _ = run(capsys, "data", "inspect", "tests/fixtures/argilla/dpo-mix-7k", "--split", "test", "-n", "1")
    assert code == 0 and "dpo_mix_7k" in out


def test_bad_config_key_is_named(tmp_path, capsys):
    cfg = tmp_path / "bad.yaml"
    cfg.write_text("name: x\ntrain: {learning_rat: 0.1}\n")
    code, _, err = run(capsys, "run", str(cfg))
    assert code == 2 and "learning_rat" in err and "Did you mean 'learning_rate'" in err


def test_unknown_loss_and_missing_file(tmp_path, capsys):
    cfg = tmp_path / "bad.yaml"
    cfg.write_text("name: x\nloss: {name: tvdk}\n")
    code, _, err = run(capsys, "run", str(cfg), "--results", str(tmp_path / "r"))
    assert code == 2 and "unknown loss 'tvdk'" in err and "tvkd" in err
    code, _, err = run(capsys, "run", str(tmp_path / "nope.yaml"))
    assert code == 2 and "not found" in err


def test_unknown_study(capsys):
    code, _, err = run(capsys, "study", "run", "reward-conflit")
    assert code == 2 and "reward-conflict" in err


def test_example_run_config_parses():
    from pathlib import Path

    from tvkd.config import load_config
    from tvkd.losses import LOSSES, build_config

    for path in sorted(Path("studies/runs").glob("*.yaml")):
        first = path.read_text().splitlines()[0]
        assert first.startswith("# tvkd run "), f"{path} must start with the command that runs it"
        cfg = load_config(path)
        build_config(LOSSES.get(cfg.loss.name), cfg.loss.options)


def test_data_inspect_takes_an_adapter_and_names_the_valid_ones(capsys):
    code, out, _ = run(capsys, "data", "inspect", "tests/fixtures/argilla/dpo-mix-7k", "--split", "test",
                       "--adapter", "dpo_mix_7k", "-n", "1")
    assert code == 0 and "dpo_mix_7k" in out
    code, _, err = run(capsys, "data", "inspect", "tests/fixtures/argilla/dpo-mix-7k", "--split", "test",
                       "--adapter", "dpo_mix7k")
    assert code == 2 and err.startswith("error: ") and "dpo_mix_7k" in err and "Traceback" not in err
