"""The paper's tables as package data: every CSV parses with the columns the loader expects, the cell
counts match the transcription notes, and a built (non-editable) wheel ships and finds them."""

from __future__ import annotations

import csv
import io
import math
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

from reports.paper import CELL_COLUMNS, PAPER_TABLES, data_file, hyperparameters, load_table, notes

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("name", list(PAPER_TABLES))
def test_every_table_parses_with_its_coordinates(name):
    spec = PAPER_TABLES[name]
    df = load_table(name)
    assert list(df.columns) == [*spec.coordinates, "value", "value_text", "highlight", "uncertain", "note",
                                "source_line"]
    assert len(df) == spec.rows  # NOTES.md "Row counts"
    assert not df.duplicated(list(spec.coordinates)).any(), "two cells share coordinates"
    # the float is the printed text, read independently
    raw = list(csv.DictReader(io.StringIO(data_file(spec.filename))))
    assert set(CELL_COLUMNS) <= set(raw[0])
    for row, (value, text) in zip(raw, zip(df["value"], df["value_text"])):
        assert text == row["value"]
        assert (math.isnan(value) and row["value"] == "") or value == float(row["value"])
    assert set(df["highlight"]) <= {"", "bold", "underline"}
    assert (df.loc[df["uncertain"], "note"] != "").all(), "an uncertain cell without its reason"


def test_known_cells_and_the_blank_one():
    t5 = load_table("Table 5").pivot(index="name", columns="metric", values="value")
    assert t5.loc["Ours", "AE"] == 50.0 and t5.loc["Logits", "Margin Acc."] == 18.29
    t1 = load_table("1")
    assert t1.query("dataset == 'DPOMIX' and method == 'TVKD(Ours)' and metric == 'MT'")["value"].item() == 3.97
    t6 = load_table("table6")
    assert t6.query("method == 'DPO teacher' and task == 'TruthfulQA'")["value_text"].item() == "04.200"
    t4 = load_table("table4")
    blank = t4[t4["value"].isna()]
    assert len(blank) == 1 and bool(blank["uncertain"].item())
    with pytest.raises(KeyError, match="table10"):
        load_table("table10")


def test_hyperparameters_and_notes():
    hp = hyperparameters()
    assert list(hp.columns) == ["setting", "value", "where_in_paper"] and len(hp) == 42
    assert hp.set_index("setting").loc["DPO teacher beta (β)", "value"] == "0.05"
    assert "Row counts" in notes()


def test_a_built_wheel_ships_the_tables(tmp_path):
    """Build a wheel from a copy of the sources, install it (not editable) and load a table from it."""
    src = tmp_path / "src"
    src.mkdir()
    for part in ("tvkd", "baselines", "studies", "reports"):
        shutil.copytree(ROOT / part, src / part, ignore=shutil.ignore_patterns("__pycache__", "runs"))
    for part in ("pyproject.toml", "README.md"):
        shutil.copy(ROOT / part, src / part)
    wheels = tmp_path / "wheels"
    build = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q",
                            "-w", str(wheels), str(src)], capture_output=True, text=True, timeout=300)
    assert build.returncode == 0, build.stderr[-2000:]
    (wheel,) = wheels.glob("tvkd-*.whl")
    names = set(zipfile.ZipFile(wheel).namelist())
    for spec in PAPER_TABLES.values():
        assert f"reports/paper_data/{spec.filename}" in names
    assert {"reports/paper_data/hyperparameters.csv", "reports/paper_data/NOTES.md"} <= names
    target = tmp_path / "site"
    with zipfile.ZipFile(wheel) as z:  # what `pip install --no-deps` unpacks (no network, no resolver)
        z.extractall(target)
    probe = ("import reports.paper as p, sys; assert p.__file__.startswith(sys.argv[1]), p.__file__; "
             "print(len(p.load_table('table1')), len(p.hyperparameters()))")
    out = subprocess.run([sys.executable, "-c", probe, str(target)], cwd=tmp_path, capture_output=True, text=True,
                         env={"PYTHONPATH": str(target), "PATH": "/usr/bin:/bin"}, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.split() == ["120", "42"]
