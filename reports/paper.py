"""The paper's published numbers (Tables 1–9 of Kwon et al., 2025), shipped as package data.

The CSVs under ``reports/paper_data/`` are the tables transcribed cell by cell from the paper's
text (``NOTES.md`` beside them says how, and which cells are uncertain). Each is in long form: one
row per numeric cell, the cell's coordinates in named columns (e.g. ``dataset``, ``method``,
``metric`` for Table 1), the printed text in ``value``, and ``highlight`` / ``uncertain`` /
``note`` / ``source_line``. `load_table` returns one as a tidy DataFrame:

    coordinates…   as printed (strings)
    value          the printed number as a float (NaN for the one blank cell, Table 4's teacher KL)
    value_text     the printed text, unchanged ("04.200", "41.5": digits as printed)
    highlight      "bold" | "underline" | "" (what the extraction shows; bold was lost everywhere)
    uncertain      bool: the cell is ambiguous or conflicts with another place in the paper
    note           why it is uncertain ("" otherwise)
    source_line    the line of the extracted text it comes from

    >>> from reports.paper import load_table
    >>> t5 = load_table("table5")          # 18 rows: six aux rewards x three metrics
    >>> t5.pivot(index="name", columns="metric", values="value")

`hyperparameters` gives what the paper states about its setup (``setting``, ``value``,
``where_in_paper``; "not stated" where it says nothing), `notes` the transcription notes.
"""

from __future__ import annotations

import io
from dataclasses import dataclass
from importlib import resources

import pandas as pd

__all__ = ["PAPER_TABLES", "PaperTable", "data_file", "hyperparameters", "load_table", "notes"]

DATA_PACKAGE = "reports"
DATA_DIR = "paper_data"
#: Columns every table CSV has after its coordinates.
CELL_COLUMNS = ("value", "highlight", "uncertain", "note", "source_line")
HYPERPARAMETER_COLUMNS = ("setting", "value", "where_in_paper")


@dataclass(frozen=True)
class PaperTable:
    """One table of the paper: its CSV, the columns that locate a cell, and what it shows."""

    name: str  # "table5": the CSV's stem
    paper: str  # "Table 5"
    coordinates: tuple[str, ...]  # the columns that together name one cell
    caption: str
    rows: int  # cells the transcription holds (NOTES.md, "Row counts")

    @property
    def filename(self) -> str:
        return f"{self.name}.csv"


PAPER_TABLES: dict[str, PaperTable] = {t.name: t for t in (
    PaperTable("table1", "Table 1", ("dataset", "method", "metric"),
               "Overall preference distillation performance (LLaMA-3.1-8B -> LLaMA-3.2-1B): RM, MT-Bench, "
               "AlpacaEval win rate against ADPA, Open LLM Leaderboard, on DPOMIX and HelpSteer2", 120),
    PaperTable("table2", "Table 2", ("teacher", "student", "method", "metric"),
               "Ablation over three teacher -> student pairs on DPOMIX: RM and MT-Bench", 24),
    PaperTable("table3", "Table 3", ("scoring_term", "reward_formulation_per_caption", "metric"),
               "Accuracy of identifying preferred responses by log-prob, length-normalised log-prob and the "
               "shaping term", 3),
    PaperTable("table4", "Table 4", ("metric", "model"),
               "Value-function alignment (KL to the teacher's value) and MT-Bench", 6),
    PaperTable("table5", "Table 5", ("type", "name", "auxiliary_reward", "metric"),
               "The six auxiliary rewards in the Table 1 setting: margin accuracy, MT-Bench, AlpacaEval against "
               "TVKD (soft value)", 18),
    PaperTable("table6", "Table 6", ("method", "task"),
               "Open LLM Leaderboard per task, trained on DPOMIX", 105),
    PaperTable("table7", "Table 7", ("method", "task"),
               "Open LLM Leaderboard per task, trained on HelpSteer2", 105),
    PaperTable("table8", "Table 8", ("method", "teacher_type", "metric"),
               "RM score of DCKD and TVKD (printed 'TPKD') across teacher types", 6),
    PaperTable("table9", "Table 9", ("method", "teacher_type", "metric"),
               "MT-Bench of DCKD and TVKD (printed 'TPKD') across teacher types", 6),
)}


def data_file(filename: str) -> str:
    """The text of one file of the packaged paper data (works from a wheel as from a checkout)."""
    return resources.files(DATA_PACKAGE).joinpath(DATA_DIR, filename).read_text(encoding="utf-8")


def _table(name: str) -> PaperTable:
    key = str(name).strip().lower().replace(" ", "")
    if key.isdigit():
        key = f"table{key}"
    if key not in PAPER_TABLES:
        raise KeyError(f"no paper table {name!r}; the paper's tables: {', '.join(PAPER_TABLES)}")
    return PAPER_TABLES[key]


def load_table(name: str) -> pd.DataFrame:
    """One paper table as a tidy frame (see the module docstring); ``name`` is "table5", "5" or "Table 5"."""
    table = _table(name)
    raw = pd.read_csv(io.StringIO(data_file(table.filename)), dtype=str, keep_default_na=False)
    missing = [c for c in (*table.coordinates, *CELL_COLUMNS) if c not in raw.columns]
    if missing:
        raise ValueError(f"paper data {table.filename}: columns {missing} are missing; it has {list(raw.columns)}")
    out = raw[list(table.coordinates)].copy()
    out["value"] = pd.to_numeric(raw["value"].str.strip().replace("", None), errors="raise").astype("float64")
    out["value_text"] = raw["value"]
    out["highlight"] = raw["highlight"]
    out["uncertain"] = raw["uncertain"].map({"0": False, "1": True, "": False}).astype(bool)
    out["note"] = raw["note"]
    out["source_line"] = pd.to_numeric(raw["source_line"], errors="raise").astype("int64")
    return out


def hyperparameters() -> pd.DataFrame:
    """What the paper states about its setup: ``setting``, ``value`` (text as printed), ``where_in_paper``."""
    raw = pd.read_csv(io.StringIO(data_file("hyperparameters.csv")), dtype=str, keep_default_na=False)
    missing = [c for c in HYPERPARAMETER_COLUMNS if c not in raw.columns]
    if missing:
        raise ValueError(f"paper data hyperparameters.csv: columns {missing} are missing")
    return raw[list(HYPERPARAMETER_COLUMNS)]


def notes() -> str:
    """The transcription notes (NOTES.md): conventions, uncertain cells, cross-checks."""
    return data_file("NOTES.md")
