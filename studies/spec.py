"""Study specs: a study YAML checked before anything runs, and expanded into its runs.

A spec holds the keys below; only ``name`` and one of ``variants`` / ``axes`` are required.

    name: alpha-beta-grid                  # results go to <results>/<name>/
    description: "..."                     # shown by `tvkd study list`
    table: reward_conflict                 # optional: the table generator (reports/) run on the results
    reference_variant: dpo                 # optional: win rates are against this variant (same seed and axis
                                           # values) or this run label (same seed)
    seeds: [0, 1]                          # default [0]
    base: {models: ..., data: ..., loss: ..., train: ...}   # a run config every run starts from
    variants:                              # hand-written rows: a label, descriptive keys, run-config keys
      - {label: dpo, method: dpo, loss: {name: dpo, beta: 0.1}}
    axes:                                  # expanded as a product (x the variants, when both are given)
      loss.alpha: [0.1, 0.5, 1.0]          # a dotted run-config key and its values
      method:                              # a named axis: labelled mappings of run-config keys
        - {label: dpo, loss: {name: dpo}}
        - {label: tvkd, loss: {name: tvkd, aux: soft_value}}
    exclude:                               # combinations dropped from the product (DPO has no α ...)
      - {method: dpo}
    include:                               # combinations added (an axis not named keeps the base's value)
      - {method: dpo}                      # (... so it runs once, as `method=dpo`)
    quick: {seeds: [0], base: {...}, axes: {loss.alpha: [0.5]}}   # --quick: fewer seeds, cheaper base, fewer values
    profiles:                              # --profile <name>: the same study in another setting (below)
      paper: {base: {models: {student: meta-llama/Llama-3.2-1B, ...}}, seeds: [0]}

    resources: {cpu: 1, gpu: 0}            # optional: what one run reserves under the Ray backend
    search: {params: ..., metric: ...}     # optional: an Optuna search over the base (`studies.search`)
    select:                                # optional: per variant, the learning rate (or checkpoint) picked on
      {metric: oracle_score, over: learning_rate, values: [1.0e-5, 3.0e-5, 1.0e-4]}   # validation

This module is the format only: `parse_spec` / `load_spec` check all of it before anything runs
(the top-level keys through the same typed machinery as run configs, `tvkd.api.check_value`; each
problem names its field, e.g. ``study grid.yaml: axes.loss.alpha[2]: expected a number, got 'abc'``)
and `StudyFile.runs` expands it. Running a study is `studies.engine`; planning one, `studies.plan`.

Expansion. Each run starts from ``base`` (``quick.base`` merged in with --quick); a variant's
run-config keys are merged in, then each named axis's value, then each dotted key is set, so
``loss.alpha`` lands in whichever loss the variant or a named axis chose. Mappings merge key by
key, except ``loss``, which a variant or named value replaces whole. Runs come seed-major: for each
seed, for each variant, the product of the axes in declared order (minus ``exclude``), then the
``include`` combinations.

Rules. An ``exclude`` or ``include`` rule maps axis names (and ``variant``, the variant labels,
when the spec has variants) to a value or a list of values: a named axis's values by label, a
dotted key's by value. An exclude rule drops every product combination whose value on each named
axis is one of the listed ones. An include rule adds the product of its listed values; axes it does
not name are left out of the run (the base's value holds, the label omits them, their column is
empty), and a rule that does not name ``variant`` is added for every variant. Includes are not
subject to excludes, and a combination that is already there is not added twice.

Profiles. ``profiles`` maps a profile name to a block that ``--profile <name>`` (``tvkd study
run|plan``, ``tvkd report``) merges over the spec before anything else happens; ``paper`` is the
profile of the paper's own models, data sets and hyper-parameters (hub ids), the default being the
embedded testbed. A block may hold ``description``, ``seeds``, ``base``, ``variants``, ``axes``,
``exclude``, ``include``, ``reference_variant``, ``resources``, ``quick`` and ``select``, and merges thus:

    base, quick        deep-merged over the spec's (as `deep_merge`: ``loss`` is replaced whole)
    select             merged key by key over the spec's (e.g. only ``metric``)
    variants           a list replaces the variants; a mapping {label: {keys}} deep-merges the keys
                       into the variant of that label (an unknown label is an error)
    axes               a mapping {axis: values} replaces (or adds) those axes, the others stay
    seeds, exclude, include, reference_variant, resources, description   replaced

The result is a spec of its own, named ``<name>-<profile>`` (so its runs go to their own folder of
the results store, ``<name>-<profile>-quick`` with --quick), checked like any spec; every profile of
a spec is checked whenever the spec is, each problem named ``profiles.<name>: <field>: ...``. E.g.::

    profiles:
      paper:
        seeds: [0]
        base: {models: {student: meta-llama/Llama-3.2-1B, teacher: my-org/llama-3.1-8b-dpo},
               data: {source: argilla/dpo-mix-7k}, train: {learning_rate: 5.0e-7}}
        variants: {adpa: {loss: {name: adpa, topk: 50}}}      # one variant's keys changed

Selection. ``select`` picks, for each variant, the value with the best mean validation metric over the
seeds (``metric``: ``oracle_score`` or ``rm_score``, read from each run's ``val/<metric>``; higher is better,
a tie goes to the value listed first). ``over: learning_rate`` adds the axis ``train.learning_rate`` with
``values`` (at least two; the spec may not sweep that key itself), so every variant runs at every rate; the
runs need a validation split (``base.data.validation_fraction``), and ``rm_score`` off the testbed needs
``eval.validation_reward_model``. The picking is done where every study's tables are built
(`reports.store.write_study_outputs`, `reports.selection`), whichever backend ran the runs: the tables hold
the picked runs only (their test numbers, each labelled as its variant), plus ``selection.md`` /
``selection.csv``. ``over: checkpoints`` with ``values`` fractions of the training steps (e.g. [0.25, 0.5,
0.75, 1.0]; at least two) sets ``eval.checkpoints`` and ``eval.checkpoint_metric`` in every run (the base
may not set them): each run evaluates its policy on validation at those steps and keeps the weights of its
best one, so each run (each seed) is its own pick, and ``selection.md`` lists each step's validation mean and
how many seeds picked it. A profile's ``select`` is merged key by key over the spec's.

Labels and columns. A run's label is its variant's label followed by ``axis=value`` for each axis
it sets, joined by commas (``soft_value,loss.alpha=0.5``, ``method=tvkd,loss.alpha=0.5``), and it
names the run in the results store. The run's info (the descriptive columns of the study's
tables) holds ``label``, ``variant`` (when there are both variants and axes), one column per axis
(a named axis's value label, a dotted key's value), the descriptive keys of its variant and named
values, and ``seed``. A study with variants only expands exactly as it always did.
"""

from __future__ import annotations

import copy
import dataclasses
import difflib
import itertools
import json
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from tvkd.api import LOSSES, ConfigError, check_value, checked_fields
from tvkd.config import LossConfig, RunConfig, config_from_dict, load_yaml
from tvkd.registry import Registry

__all__ = [
    "RUN_KEYS", "STUDIES", "Axis", "Resources", "Selection", "StudyFile", "StudyRun", "StudySpecError", "deep_merge", "format_value",
    "load_spec", "parse_spec", "read_study", "reference_label",
]

#: The paper's studies: every ``studies/*.yaml`` by its name (the examples under ``studies/examples/`` run by path).
STUDIES: Registry[Path] = Registry("study")
STUDY_DIR = Path(__file__).parent


def _discover() -> None:
    for path in sorted(STUDY_DIR.glob("*.yaml")):
        spec = yaml.safe_load(path.read_text()) or {}
        STUDIES.add(spec.get("name", path.stem), path, description=spec.get("description", ""),
                    table=spec.get("table"))


_discover()

#: Run-config keys the study sets itself (a variant, axis or base may not).
SET_BY_STUDY = ("name", "seed", "study")
#: Keys of a variant (or a named axis value) that are run-config keys; the rest describe the row.
RUN_KEYS = tuple(f.name for f in dataclasses.fields(RunConfig) if f.name not in SET_BY_STUDY)
#: The top level of a study file and the type of each key (checked by `tvkd.api.check_value`, as run configs are).
TOP_TYPES: dict[str, Any] = {
    "name": str, "description": str | None, "table": str | None, "seeds": list, "reference_variant": str | None,
    "base": dict | None, "variants": list | None, "axes": dict | None, "exclude": list | None,
    "include": list | None, "quick": dict | None, "resources": dict | None, "profiles": dict | None,
    "search": dict | None, "select": dict | None,
}
TOP_KEYS = tuple(TOP_TYPES)
QUICK_KEYS = ("seeds", "base", "axes")
#: What a ``profiles.<name>`` block may set (see "Profiles" above).
PROFILE_KEYS = ("description", "seeds", "base", "variants", "axes", "exclude", "include", "reference_variant",
                "resources", "quick", "select")
#: ``select``: its keys, the validation metrics it may pick by, and what it may pick among.
SELECT_KEYS = ("metric", "over", "values")
SELECT_METRICS = ("oracle_score", "rm_score")
SELECT_OVER = ("learning_rate", "checkpoints")
#: The run-config key each kind of ``select.over`` sweeps (an implicit axis of the study).
SELECT_AXES = {"learning_rate": "train.learning_rate"}
#: Columns every run's info may hold; no axis or descriptive key may take these names.
RESERVED_COLUMNS = ("label", "seed", "variant", "run_dir", "record")
VARIANT = "variant"  # the pseudo-axis a rule uses to name variant labels
MAX_LISTED_PROBLEMS = 12


class StudySpecError(ConfigError):
    """A study spec that cannot be run; every line names the file and the field."""

    def __init__(self, source: str, problems: list[str]):
        self.source = source
        self.problems = list(problems)
        shown = [f"study {source}: {p}" for p in problems[:MAX_LISTED_PROBLEMS]]
        if len(problems) > MAX_LISTED_PROBLEMS:
            shown.append(f"study {source}: ... and {len(problems) - MAX_LISTED_PROBLEMS} more problem(s)")
        super().__init__("\n".join(shown))

    def __reduce__(self) -> tuple[Any, ...]:  # picklable (e.g. across processes) despite its own arguments
        return (type(self), (self.source, self.problems))


def reference_label(reference: str, label: str, variant: Any, labels: Any) -> str | None:
    """The run label a row is compared with: ``reference`` itself when it is a run label, else (a variant label)
    that variant's run with this row's axis values; None when the study has no such run."""
    if reference in labels:
        return reference
    if isinstance(variant, str):
        candidate = ",".join([reference, *label.split(",")[1:]])
        return candidate if candidate in labels else None
    return None


def deep_merge(base: dict[str, Any], over: dict[str, Any]) -> dict[str, Any]:
    """`base` with `over` merged in, key by key; ``loss`` (a method choice) is replaced whole."""
    out = copy.deepcopy(base)
    for k, v in (over or {}).items():
        if isinstance(v, dict) and isinstance(out.get(k), dict) and k != "loss":
            out[k] = deep_merge(out[k], v)
        else:
            out[k] = copy.deepcopy(v)
    return out


def format_value(value: Any) -> str:
    """A value as it reads in a run label: 0.5, 1.0, true, null, testbed:teacher_dpo, [a,b]."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if value is None:
        return "null"
    if isinstance(value, float):
        return repr(value)
    if isinstance(value, (int, str)):
        return str(value)
    return json.dumps(value, separators=(",", ":"), sort_keys=True, default=str)


def _same(a: Any, b: Any) -> bool:
    """Equal as config values: 1 and 1.0 are the same, true and 1 are not."""
    if isinstance(a, bool) or isinstance(b, bool):
        return type(a) is type(b) and a == b
    return a == b


def _given(value: Any) -> str:
    return f"{value!r:.80}"


def _close(word: str, options: list[str]) -> str:
    found = difflib.get_close_matches(str(word), options, n=1)
    return f" (did you mean {found[0]!r}?)" if found else ""


# --------------------------------------------------------------------------------------------
# Run-config keys (for dotted axes)
# --------------------------------------------------------------------------------------------


def _hints(cls: type) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def _is_dict_hint(hint: Any) -> bool:
    return (typing.get_origin(hint) or hint) is dict


def _loss_options() -> dict[str, list[type]]:
    """Option name -> the Config classes of the registered losses that have it."""
    out: dict[str, list[type]] = {}
    for name in LOSSES.names():
        cfg_cls = LOSSES.get(name).Config
        for f in dataclasses.fields(cfg_cls):
            out.setdefault(f.name, []).append(cfg_cls)
    return out


def _config_paths() -> list[str]:
    """Every dotted run-config key an axis may sweep (for "did you mean")."""
    paths = []

    def walk(cls: type, prefix: str) -> None:
        for f in dataclasses.fields(cls):
            if cls is RunConfig and f.name in SET_BY_STUDY:
                continue
            hint = _hints(cls)[f.name]
            if dataclasses.is_dataclass(hint):
                walk(hint, f"{prefix}{f.name}.")
            elif not (cls is LossConfig and f.name == "options"):
                paths.append(f"{prefix}{f.name}")

    walk(RunConfig, "")
    paths.extend(f"loss.{o}" for o in _loss_options())
    return paths


@dataclass(frozen=True)
class _Key:
    kind: str  # "field" (a typed leaf), "loss_option", "free" (a key under a mapping field), "section"
    owner: type | None = None
    attr: str | None = None
    hint: Any = None


def _resolve_key(name: str) -> _Key:
    """What a dotted axis name sets in a run config; ValueError (the reason) when it sets nothing."""
    parts = name.split(".")
    if not all(parts):
        raise ValueError("not a dotted run-config key (an empty part)")
    if parts[0] in SET_BY_STUDY:
        raise ValueError(f"{parts[0]} is set by the study" + ("; list the seeds under `seeds`" if parts[0] == "seed"
                                                              else ""))
    cls: type = RunConfig
    for i, part in enumerate(parts):
        last = i == len(parts) - 1
        here = ".".join(parts[: i + 1])
        if cls is LossConfig and part != "name":
            if part == "options":
                raise ValueError("write a loss option as loss.<option> (e.g. loss.alpha), not loss.options.<option>")
            if not last:
                raise ValueError(f"{here} is a loss option, not a section")
            options = _loss_options()
            if part not in options:
                raise ValueError(f"not an option of any registered loss{_close(here, _config_paths())}")
            return _Key("loss_option", attr=part)
        fields = [f.name for f in dataclasses.fields(cls)]
        if part not in fields:
            raise ValueError(f"not a run-config key{_close(name, _config_paths())}")
        hint = _hints(cls)[part]
        if cls is RunConfig and part == "testbed" and not last:  # testbed overrides: TestbedConfig's fields
            from tvkd.testbed import TestbedConfig  # lazy: transformers (the testbed's builder)

            options = [f.name for f in dataclasses.fields(TestbedConfig)]
            if len(parts) != 2 or parts[1] not in options:
                raise ValueError(f"not a testbed option{_close(parts[1], options)}")
            return _Key("field", owner=TestbedConfig, attr=parts[1], hint=_hints(TestbedConfig)[parts[1]])
        if dataclasses.is_dataclass(hint):
            if last:
                return _Key("section", owner=hint, attr=part)
            cls = hint
            continue
        if last:
            return _Key("field", owner=cls, attr=part, hint=hint)
        if _is_dict_hint(hint):
            return _Key("free")
        raise ValueError(f"{here} is a value, not a section")
    raise AssertionError("unreachable")  # pragma: no cover


def _check_field_value(key: _Key, value: Any, where: str) -> str | None:
    """The problem with one value of a dotted axis (its type, then its range), or None."""
    try:
        if key.kind == "field":
            checked = check_value(value, key.hint, where)
            if key.owner is LossConfig and key.attr == "name":
                if checked not in LOSSES:
                    return f"{where}: {LOSSES.unknown_message(checked)}"
                return None
            try:
                key.owner(**{key.attr: checked})
            except ConfigError as e:
                return f"{where}: {e}"
            except ValueError as e:
                return f"{where}: {e}"
            except TypeError:  # the section needs other keys too: the run configs check it
                return None
        elif key.kind == "loss_option":
            first = None
            for cfg_cls in _loss_options()[key.attr]:
                try:
                    checked = check_value(value, _hints(cfg_cls)[key.attr], where)
                    cfg_cls(**{key.attr: checked})
                    return None
                except ConfigError as e:
                    first = first or str(e)
                except ValueError as e:
                    first = first or f"{where}: {e}"
                except TypeError:
                    return None
            return first
    except ConfigError as e:
        return str(e)
    return None


def _set_path(cfg: dict[str, Any], parts: list[str], value: Any) -> None:
    """Set a dotted key in a run-config mapping (sections created as needed)."""
    node = cfg
    if parts[0] == "loss" and len(parts) == 2 and parts[1] not in ("name", "options"):
        loss = cfg.get("loss")
        if isinstance(loss, dict) and isinstance(loss.get("options"), dict):  # `loss: {name, options: {...}}` form
            node, parts = loss, ["options", parts[1]]
    for p in parts[:-1]:
        child = node.get(p)
        if not isinstance(child, dict):
            child = {}
            node[p] = child
        node = child
    node[parts[-1]] = copy.deepcopy(value)


# --------------------------------------------------------------------------------------------
# The study file
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Resources:
    """What one run reserves when the Ray backend runs it (``resources: {cpu: 1, gpu: 0}``)."""

    cpu: float = 1.0
    gpu: float = 0.0

    def __post_init__(self) -> None:
        if self.cpu <= 0:
            raise ValueError(f"cpu must be > 0 (a trial runs on at least part of a CPU), got {self.cpu:g}")
        if self.gpu < 0:
            raise ValueError(f"gpu must be >= 0, got {self.gpu:g}")

    def as_tune(self) -> dict[str, float]:
        """As `ray.tune.with_resources` takes it."""
        return {"cpu": self.cpu, "gpu": self.gpu}


@dataclass(frozen=True)
class Axis:
    """One axis of a study's product.

    kind "key": ``name`` is a dotted run-config key and each value is set there; kind "named":
    each value is a mapping with a ``label``, run-config keys (merged into the run) and
    descriptive keys (columns of the tables).
    """

    name: str
    kind: str
    values: tuple[Any, ...]
    labels: tuple[str, ...]

    def column(self, index: int | None) -> Any:
        """The run's value in this axis's column: a named value's label, a dotted key's value."""
        if index is None:
            return None
        return self.labels[index] if self.kind == "named" else self.values[index]

    def find(self, value: Any) -> int | None:
        """The index of a value as a rule names it (a label for a named axis), or None."""
        for i, (v, label) in enumerate(zip(self.values, self.labels, strict=True)):
            if (self.kind == "named" and isinstance(value, str) and value == label) or (
                    self.kind == "key" and _same(value, v)):
                return i
        return None

    def run_keys(self, index: int) -> dict[str, Any]:
        return {k: v for k, v in self.values[index].items() if k in RUN_KEYS}

    def descriptive(self, index: int) -> dict[str, Any]:
        return {k: v for k, v in self.values[index].items() if k not in RUN_KEYS and k != "label"}


@dataclass(frozen=True)
class Selection:
    """A study's ``select`` block: per variant, the value of ``over`` with the best mean ``val/<metric>`` over seeds.

    ``over: learning_rate`` adds the axis ``train.learning_rate`` (`axis`) with ``values``; the tables then
    show the test numbers of each variant's picked runs (`reports.selection`). ``over: checkpoints`` sets
    ``eval.checkpoints`` (``values``: fractions of the training steps) in every run, which keeps the weights of
    its best validation checkpoint (`tvkd.evaluation.validation`): every run is then its own pick."""

    metric: str  # oracle_score | rm_score
    over: str  # learning_rate
    values: tuple[Any, ...]

    @property
    def axis(self) -> str | None:
        """The run-config key (an axis of the study) the selection picks a value of; None for checkpoints (each
        run picks its own, `eval.checkpoints`)."""
        return SELECT_AXES.get(self.over)

    @property
    def column(self) -> str:
        """The validation metric picked by (higher is better)."""
        return f"val/{self.metric}"


@dataclass(frozen=True)
class StudyRun:
    """One expanded run: its label, seed, variant and axis values, table columns and run config."""

    label: str
    seed: int
    variant: str | None
    axes: dict[str, Any]
    info: dict[str, Any]
    config: RunConfig


@dataclass(frozen=True)
class _Combo:
    variant: int | None
    values: tuple[int | None, ...]  # one value index per axis; None: not set (an include leaving it out)


@dataclass
class StudyFile:
    """A validated study spec (`parse_spec`); `runs` expands it."""

    name: str
    source: str
    raw: dict[str, Any]
    description: str = ""
    table: str | None = None
    reference_variant: str | None = None
    seeds: list[int] = field(default_factory=lambda: [0])
    base: dict[str, Any] = field(default_factory=dict)
    variants: list[dict[str, Any]] = field(default_factory=list)
    axes: list[Axis] = field(default_factory=list)
    exclude: list[dict[str, set[int]]] = field(default_factory=list)  # axis name (or "variant") -> value indexes
    include: list[dict[str, list[int]]] = field(default_factory=list)
    quick_seeds: list[int] | None = None
    quick_base: dict[str, Any] = field(default_factory=dict)
    quick_axes: dict[str, set[int]] = field(default_factory=dict)
    has_quick: bool = False
    profile: str | None = None  # the profile merged in (`apply_profile`); ``name`` then ends in -<profile>
    profiles: tuple[str, ...] = ()  # the profiles the spec declares
    resources: Resources = field(default_factory=Resources)  # what one run reserves under the Ray backend
    search: dict[str, Any] | None = None  # an Optuna search block (checked by `studies.search`)
    select: Selection | None = None  # per-variant selection on validation (its axis is in `axes`)
    merged: dict[str, StudyFile] = field(default_factory=dict, repr=False)  # each profile, parsed once

    @property
    def base_name(self) -> str:
        """The study's own name, without the profile suffix (its table generators are registered under it)."""
        return self.name.removesuffix(f"-{self.profile}") if self.profile else self.name

    # -- expansion -----------------------------------------------------------------------------

    def combinations(self, quick: bool = False) -> list[_Combo]:
        """(variant, axis values) in run order, excludes dropped, includes added (no repeats)."""
        allowed = [sorted(self.quick_axes[a.name]) if quick and a.name in self.quick_axes else range(len(a.values))
                   for a in self.axes]
        variants: list[int | None] = list(range(len(self.variants))) if self.variants else [None]
        out: list[_Combo] = []
        seen: set[_Combo] = set()

        def add(combo: _Combo) -> None:
            if combo not in seen:
                seen.add(combo)
                out.append(combo)

        for v in variants:
            for values in itertools.product(*allowed):
                combo = _Combo(v, tuple(values))
                if not any(self._matches(rule, combo) for rule in self.exclude):
                    add(combo)
            for rule in self.include:
                if v is not None and VARIANT in rule and v not in rule[VARIANT]:
                    continue
                lists = []
                for a, ok in zip(self.axes, allowed, strict=True):
                    picked = rule.get(a.name)
                    lists.append([None] if picked is None else [i for i in picked if i in ok])
                for values in itertools.product(*lists):
                    add(_Combo(v, tuple(values)))
        return out

    def _matches(self, rule: dict[str, set[int]], combo: _Combo) -> bool:
        for name, indexes in rule.items():
            if name == VARIANT:
                if combo.variant not in indexes:
                    return False
                continue
            pos = next(i for i, a in enumerate(self.axes) if a.name == name)
            if combo.values[pos] not in indexes:
                return False
        return True

    def label_of(self, combo: _Combo) -> str:
        parts = [self.variants[combo.variant]["label"]] if combo.variant is not None else []
        parts += [f"{a.name}={a.labels[i]}" for a, i in zip(self.axes, combo.values, strict=True) if i is not None]
        return ",".join(parts) or self.name  # a search's base run (no variants, no axes): the study's name

    def _run(self, combo: _Combo, base: dict[str, Any], seed: int, study: str, where: str) -> StudyRun:
        variant = self.variants[combo.variant] if combo.variant is not None else None
        label = self.label_of(combo)
        cfg = copy.deepcopy(base)
        if variant is not None:
            cfg = deep_merge(cfg, {k: v for k, v in variant.items() if k in RUN_KEYS})
        set_axes = [(a, i) for a, i in zip(self.axes, combo.values, strict=True) if i is not None]
        for a, i in set_axes:
            if a.kind == "named":
                cfg = deep_merge(cfg, a.run_keys(i))
        for a, i in set_axes:
            if a.kind == "key":
                _set_path(cfg, a.name.split("."), a.values[i])
        cfg.update(name=label, seed=seed, study=study)
        if not self.axes:  # variants only: the info a study has always had
            info = {k: v for k, v in (variant or {"label": label}).items() if k not in RUN_KEYS}
        else:
            info = {"label": label}
            if variant is not None:
                info[VARIANT] = variant["label"]
                info.update({k: v for k, v in variant.items() if k not in RUN_KEYS and k != "label"})
            for a, i in zip(self.axes, combo.values, strict=True):
                info[a.name] = a.column(i)
            for a, i in set_axes:
                if a.kind == "named":
                    for k, v in a.descriptive(i).items():
                        if k in info and not _same(info[k], v):
                            raise StudySpecError(self.source, [
                                f"run {label}: the descriptive key {k!r} is {info[k]!r} and, from axes.{a.name} "
                                f"value {a.labels[i]!r}, {v!r}; give one of them another name"])
                        info[k] = v
        info["seed"] = seed
        return StudyRun(label=label, seed=seed, variant=variant["label"] if variant is not None else None,
                        axes={a.name: a.column(i) for a, i in zip(self.axes, combo.values, strict=True)},
                        info=info, config=config_from_dict(cfg, where=where.replace("{label}", label)))

    def _base(self, quick: bool) -> dict[str, Any]:
        return deep_merge(self.base, self.quick_base) if quick and self.has_quick else copy.deepcopy(self.base)

    def study_name(self, quick: bool = False) -> str:
        """The study folder of the results store (``-quick`` for --quick runs)."""
        return self.name + ("-quick" if quick else "")

    def runs(self, seeds: list[int] | None = None, quick: bool = False) -> list[StudyRun]:
        """Every run in run order: seed-major, then variant, then the axes' product."""
        if seeds is not None:
            problems = _check_seeds(seeds, "seeds (given)")
            if problems:
                raise StudySpecError(self.source, problems)
            seeds = list(seeds)
        else:
            seeds = list(self.quick_seeds if quick and self.quick_seeds is not None else self.seeds)
        base = self._base(quick)
        combos = self.combinations(quick)
        where = f"study {self.source}: " + ("variant {label}" if not self.axes else "run {label}")
        return [self._run(c, base, seed, self.study_name(quick), where) for seed in seeds for c in combos]

    def labels(self, quick: bool = False) -> list[str]:
        return [self.label_of(c) for c in self.combinations(quick)]

    # -- checks that need the expansion ---------------------------------------------------------

    def _check_runs(self) -> list[str]:
        """Build every combination's run config (full grid, and --quick's): what config_from_dict refuses."""
        problems: list[str] = []
        reported: set[str] = set()  # messages of the full grid, not repeated for --quick
        for quick in (False, True) if self.has_quick else (False,):
            combos = self.combinations(quick)
            if not combos:
                problems.append("exclude: drops every combination; no run is left"
                                + (" (with --quick)" if quick else ""))
                continue
            seen: set[str] = set()
            for c in combos:
                label = self.label_of(c)
                if label in seen:
                    problems.append(f"run label {label!r} comes from two different combinations: give the axis "
                                    "values distinct labels")
                seen.add(label)
            base = self._base(quick)
            seed = (self.quick_seeds if quick and self.quick_seeds else self.seeds)[0]
            failed: dict[str, list[str]] = {}  # message -> the labels of the runs it stops
            for c in combos:
                label = self.label_of(c)
                try:
                    self._run(c, base, seed, self.study_name(quick), "{label}")
                except StudySpecError as e:
                    problems.extend(p for p in e.problems if p not in problems)
                except ConfigError as e:
                    text = str(e)
                    failed.setdefault(text[len(label) + 2:] if text.startswith(f"{label}: ") else text, []).append(label)
            what = "variant" if not self.axes else "run"
            flag = " (--quick)" if quick else ""
            for text, stopped in failed.items():
                if quick and text in reported:
                    continue
                reported.add(text)
                if len(stopped) == len(combos) > 1:  # the base (or the quick base) itself
                    problems.append(f"every {what}{flag}: {text}")
                    continue
                shown = ", ".join(stopped[:3]) + (f" and {len(stopped) - 3} more" if len(stopped) > 3 else "")
                hint = ("" if not self.axes else " (drop such combinations with an `exclude` rule, or add them with "
                        "`include`, leaving that axis out)")
                problems.append(f"{what}{'s' if len(stopped) > 1 else ''} {shown}{flag}: {text}{hint}")
        return problems


# --------------------------------------------------------------------------------------------
# Parsing and validation
# --------------------------------------------------------------------------------------------


def _check_seeds(seeds: Any, where: str) -> list[str]:
    if not isinstance(seeds, (list, tuple)) or not seeds:
        return [f"{where}: expected a non-empty list of integers, got {_given(seeds)}"]
    problems = []
    for i, s in enumerate(seeds):
        if isinstance(s, bool) or not isinstance(s, int):
            problems.append(f"{where}[{i}]: expected an integer, got {_given(s)}")
        elif s in seeds[:i]:
            problems.append(f"{where}[{i}]: seed {s} is listed twice")
    return problems


def _check_run_mapping(data: Any, where: str, problems: list[str], *, search: bool = False) -> bool:
    """A base / quick.base mapping: run-config keys only. A search's base keeps its ``seed`` (every trial
    trains at it; a search has no `seeds` list)."""
    if not isinstance(data, dict):
        problems.append(f"{where}: expected a mapping of run-config keys, got {_given(data)}")
        return False
    for k in data:
        if k == "seed" and search:
            continue
        if k in SET_BY_STUDY:
            problems.append(f"{where}.{k}: set by the study (name: the run label, seed: `seeds`, study: `name`)")
        elif k not in RUN_KEYS:
            problems.append(f"{where}.{k}: not a run-config key{_close(k, list(RUN_KEYS))}")
    return True


def _check_row(row: Any, where: str, problems: list[str]) -> str | None:
    """A variant or a named axis value: a mapping with a label, run-config keys and plain descriptive keys."""
    if not isinstance(row, dict):
        problems.append(f"{where}: expected a mapping with a label, got {_given(row)}")
        return None
    label = row.get("label")
    if "label" not in row:
        problems.append(f"{where}: no label (every {'variant' if 'variants' in where else 'value'} needs one)")
        label = None
    elif not isinstance(label, str) or not label.strip():
        problems.append(f"{where}.label: expected a non-empty string, got {_given(label)}")
        label = None
    for k, v in row.items():
        if k == "label":
            continue
        if not isinstance(k, str):
            problems.append(f"{where}: key {k!r} is not a string")
        elif k in SET_BY_STUDY:
            problems.append(f"{where}.{k}: set by the study (name: the label, seed: `seeds`, study: `name`)")
        elif k in RUN_KEYS:
            continue
        elif isinstance(v, (dict, list, tuple)):
            problems.append(f"{where}.{k}: not a run-config key{_close(k, list(RUN_KEYS))}; descriptive keys hold "
                            "plain values (a string, number, boolean or null)")
        elif k in RESERVED_COLUMNS:
            problems.append(f"{where}.{k}: {k!r} is a column the study sets itself; rename this key")
    return label


def _parse_axis(name: Any, values: Any, problems: list[str]) -> Axis | None:
    where = f"axes.{name}"
    if not isinstance(name, str) or not name.strip():
        problems.append(f"axes: axis name {name!r} must be a non-empty string")
        return None
    if name in SET_BY_STUDY:
        problems.append(f"{where}: {name} is set by the study" + ("; list the seeds under `seeds`" if name == "seed"
                                                                   else ""))
        return None
    if name in RESERVED_COLUMNS:
        problems.append(f"{where}: {name!r} is a column the study sets itself; call the axis something else")
        return None
    if any(c in name for c in ",="):
        problems.append(f"{where}: an axis name may not contain ',' or '=' (they separate a run label's parts)")
        return None
    if not isinstance(values, (list, tuple)):
        problems.append(f"{where}: expected a list of values, got {_given(values)}")
        return None
    if not values:
        problems.append(f"{where}: empty; an axis needs at least one value")
        return None
    labelled = [isinstance(v, dict) and "label" in v for v in values]
    if all(labelled):
        labels = []
        for i, v in enumerate(values):
            label = _check_row(v, f"{where}[{i}]", problems)
            if label is not None and label in labels:
                problems.append(f"{where}[{i}].label: {label!r} repeats {where}[{labels.index(label)}].label")
            labels.append(label or f"?{i}")
        return Axis(name, "named", tuple(values), tuple(labels))
    try:
        key = _resolve_key(name)
    except ValueError as e:
        if any(labelled):
            bad = labelled.index(False)
            problems.append(f"{where}[{bad}]: a named axis's values are mappings with a label, got "
                            f"{_given(values[bad])}")
        else:
            problems.append(f"{where}: {e}; a named axis would need a list of mappings, each with a label, e.g. "
                            f"[{{label: a, loss: {{...}}}}, ...]")
        return None
    if key.kind == "section":
        problems.append(f"{where}: a whole section of the run config; sweep one of its keys ({name}.<key>) or give "
                        f"each value a label (a named axis)")
        return None
    ok = True
    for i, v in enumerate(values):
        if isinstance(v, dict) and "label" in v:
            problems.append(f"{where}[{i}]: a labelled mapping among the plain values of the run-config key {name}")
            ok = False
            continue
        problem = _check_field_value(key, v, f"{where}[{i}]")
        if problem:
            problems.append(problem)
            ok = False
        for j in range(i):
            if _same(values[j], v):
                problems.append(f"{where}[{i}]: {_given(v)} repeats {where}[{j}]")
                ok = False
                break
    labels = [format_value(v) for v in values]
    if ok and len(set(labels)) != len(labels):
        problems.append(f"{where}: two values read the same in a run label ({', '.join(labels)})")
    return Axis(name, "key", tuple(values), tuple(labels))


def _parse_rule(rule: Any, where: str, axes: list[Axis], variant_labels: list[str], problems: list[str],
                broken: set[str] = frozenset()) -> dict[str, list[int]] | None:
    if not isinstance(rule, dict) or not rule:
        problems.append(f"{where}: expected a mapping from axis names to a value or a list of values, got "
                        f"{_given(rule)}")
        return None
    names = [a.name for a in axes] + ([VARIANT] if variant_labels else [])
    out: dict[str, list[int]] = {}
    for name, given in rule.items():
        if name in broken:  # an axis already reported: its values cannot be checked
            continue
        if name not in names:
            valid = ", ".join(names) if names else "none"
            problems.append(f"{where}.{name}: not an axis of this study{_close(str(name), names)}; axes: {valid}")
            continue
        if name == VARIANT:
            axis = Axis(VARIANT, "named", tuple({"label": v} for v in variant_labels), tuple(variant_labels))
        else:
            axis = next(a for a in axes if a.name == name)
        # a list is a list of values, unless it is itself one of the axis's values
        items = [given] if not isinstance(given, (list, tuple)) or axis.find(given) is not None else list(given)
        if not items:
            problems.append(f"{where}.{name}: empty list of values")
            continue
        indexes = []
        for j, item in enumerate(items):
            i = axis.find(item)
            at = f"{where}.{name}" + (f"[{j}]" if isinstance(given, (list, tuple)) and len(items) > 1 else "")
            if i is None:
                shown = ", ".join(axis.labels)
                what = "label" if axis.kind == "named" else "value"
                close = _close(format_value(item), list(axis.labels))
                problems.append(f"{at}: {_given(item)} is not a {what} of "
                                f"{'variants' if name == VARIANT else 'axes.' + name} ({shown}){close}")
            elif i not in indexes:
                indexes.append(i)
        out[name] = indexes
    return out


def _parse_select(spec: dict[str, Any], axes: list[Axis], problems: list[str]) -> Selection | None:
    """The ``select`` block (its keys, metric, what it picks among and the values), or None (problems named)."""
    block = spec["select"]
    if not isinstance(block, dict):
        problems.append(f"select: expected a mapping ({', '.join(SELECT_KEYS)}), got {_given(block)}")
        return None
    n = len(problems)
    for k in block:
        if k not in SELECT_KEYS:
            problems.append(f"select.{k}: unknown key{_close(str(k), list(SELECT_KEYS))}; valid keys: "
                            f"{', '.join(SELECT_KEYS)}")
    for k, valid in (("metric", SELECT_METRICS), ("over", SELECT_OVER)):
        if k not in block:
            problems.append(f"select.{k}: missing; one of {', '.join(valid)}")
        elif block[k] not in valid:
            problems.append(f"select.{k}: {_given(block[k])} is not one of {', '.join(valid)}"
                            f"{_close(str(block[k]), list(valid))}")
    over = block.get("over")
    if over == "checkpoints":
        values = block.get("values")
        if values is None:
            problems.append("select.values: missing; the fractions of the training steps at which to evaluate a "
                            "checkpoint, e.g. [0.25, 0.5, 0.75, 1.0]")
        elif not isinstance(values, list) or len(values) < 2:
            problems.append(f"select.values: {_given(values)}; a list of at least two fractions of the training "
                            "steps in (0, 1], e.g. [0.25, 0.5, 0.75, 1.0]")
        else:
            for i, f in enumerate(values):
                if isinstance(f, bool) or not isinstance(f, (int, float)) or not 0 < f <= 1:
                    problems.append(f"select.values[{i}]: {_given(f)} is not a fraction of the training steps in "
                                    "(0, 1]")
                elif f in values[:i]:
                    problems.append(f"select.values[{i}]: {_given(f)} repeats select.values[{values.index(f)}]")
        base_eval = (spec.get("base") or {}).get("eval") if isinstance(spec.get("base"), dict) else None
        if isinstance(base_eval, dict) and ("checkpoints" in base_eval or "checkpoint_metric" in base_eval):
            problems.append("select: over checkpoints sets eval.checkpoints and eval.checkpoint_metric itself; drop "
                            "them from base.eval")
    if spec.get("search") is not None:
        problems.append("select: a study with a search block picks by its own objective; drop one of search / select")
    if over in SELECT_AXES:
        axis = SELECT_AXES[over]
        if any(a.name == axis for a in axes):
            problems.append(f"select: over {over} sweeps {axis} itself (select.values); drop axes.{axis}")
        values = block.get("values")
        if values is None:
            problems.append(f"select.values: missing; the {over.replace('_', ' ')}s to pick among, e.g. "
                            "[1.0e-5, 3.0e-5, 1.0e-4]")
        else:
            found: list[str] = []
            parsed = _parse_axis(axis, values, found)
            problems.extend(p.replace(f"axes.{axis}", "select.values", 1) for p in found)
            if parsed is not None and not found and len(parsed.values) < 2:
                problems.append(f"select.values: {_given(values)}; a selection needs at least two values to pick among")
    if len(problems) > n:
        return None
    return Selection(metric=block["metric"], over=over, values=tuple(block["values"]))


def _uses_testbed(cfg: RunConfig) -> bool:
    """Whether a run reads the testbed (as `tvkd.pipeline.uses_testbed`: any testbed:<part> among its inputs)."""
    m, d = cfg.models, cfg.data
    return any(isinstance(v, str) and v.startswith("testbed:")
               for v in (m.student, m.reference, m.teacher, m.teacher_reference, d.source, d.test_source))


def _check_select_runs(spec: StudyFile) -> list[str]:
    """Every run of a study with ``select`` has the validation split and can compute the metric picked by."""
    problems: list[str] = []
    sel = spec.select
    for quick in (False, True) if spec.has_quick else (False,):
        seeds = spec.quick_seeds if quick and spec.quick_seeds else spec.seeds
        flag = " (--quick)" if quick else ""
        runs = spec.runs(seeds=[seeds[0]], quick=quick)
        no_split = [r.label for r in runs if r.config.data.validation_fraction is None]
        if no_split:
            problems.append(f"select{flag}: picks on a validation split, but run(s) {', '.join(no_split[:3])}"
                            f"{' ...' if len(no_split) > 3 else ''} have none; set base.data.validation_fraction "
                            "(e.g. 0.1)")
        off = [r.label for r in runs if not _uses_testbed(r.config)]
        if sel.metric == "oracle_score" and off:
            problems.append(f"select.metric{flag}: oracle_score exists on testbed runs only; run(s) "
                            f"{', '.join(off[:3])}{' ...' if len(off) > 3 else ''} read no testbed part: pick by "
                            "rm_score (with base.eval.validation_reward_model)")
        if sel.metric == "rm_score":
            no_rm = [r.label for r in runs if r.config.eval.validation_reward_model is None
                     and not _uses_testbed(r.config)]
            if no_rm:
                problems.append(f"select.metric{flag}: rm_score needs a reward model outside the testbed; run(s) "
                                f"{', '.join(no_rm[:3])}{' ...' if len(no_rm) > 3 else ''} set none: set "
                                "base.eval.validation_reward_model (a hub id or folder)")
        if problems:
            break
    return problems


def _check_profiles(spec: dict[str, Any], problems: list[str], requested: str | None = None) -> list[str]:
    """The shape of the ``profiles`` block; returns the names of the profiles that can be merged.

    A variant label that the spec does not have is an error only in the ``requested`` profile: a spec
    derived from another by dropping variants keeps the other profiles usable."""
    profiles = spec.get("profiles")
    if profiles is None:
        return []
    if not isinstance(profiles, dict) or not profiles:
        problems.append(f"profiles: expected a mapping of profile name -> block ({', '.join(PROFILE_KEYS)}), "
                        f"got {_given(profiles)}")
        return []
    ok = []
    for name, block in profiles.items():
        where = f"profiles.{name}"
        if not isinstance(name, str) or not name.strip() or any(c in name for c in "/\\ "):
            problems.append(f"profiles: profile name {name!r} must be a word (it names a results folder)")
            continue
        if not isinstance(block, dict):
            problems.append(f"{where}: expected a mapping ({', '.join(PROFILE_KEYS)}), got {_given(block)}")
            continue
        bad = [k for k in block if k not in PROFILE_KEYS]
        for k in bad:
            problems.append(f"{where}.{k}: not a key a profile may set{_close(str(k), list(PROFILE_KEYS))}; "
                            f"valid keys: {', '.join(PROFILE_KEYS)}")
        for k in ("base", "quick", "select"):
            if block.get(k) is not None and not isinstance(block[k], dict):
                problems.append(f"{where}.{k}: expected a mapping (merged over the spec's {k}), got {_given(block[k])}")
                bad.append(k)
        if block.get("axes") is not None and not isinstance(block["axes"], dict):
            problems.append(f"{where}.axes: expected a mapping of axis name -> values (replacing those axes), got "
                            f"{_given(block['axes'])}")
            bad.append("axes")
        variants = block.get("variants")
        if isinstance(variants, dict):
            labels = [v.get("label") for v in spec.get("variants") or [] if isinstance(v, dict)]
            for label, keys in variants.items():
                if label not in labels and name != requested:
                    continue
                if label not in labels:
                    problems.append(f"{where}.variants.{label}: not a variant label of the spec"
                                    f"{_close(str(label), [str(x) for x in labels])}; labels: "
                                    f"{', '.join(map(str, labels)) or 'none'} (give a list to replace the variants)")
                    bad.append("variants")
                elif not isinstance(keys, dict):
                    problems.append(f"{where}.variants.{label}: expected a mapping of keys merged into that variant, "
                                    f"got {_given(keys)}")
                    bad.append("variants")
        elif variants is not None and not isinstance(variants, list):
            problems.append(f"{where}.variants: expected a list (replacing the variants) or a mapping "
                            f"{{label: keys}} (merged into those variants), got {_given(variants)}")
            bad.append("variants")
        if not bad:
            ok.append(name)
    return ok


def apply_profile(spec: dict[str, Any], profile: str) -> dict[str, Any]:
    """The spec with ``profiles.<profile>`` merged in (see "Profiles" in the module docstring): a spec of its
    own, named ``<name>-<profile>``, without ``profiles``. KeyError names the profiles there are."""
    profiles = spec.get("profiles") or {}
    if not isinstance(profiles, dict) or profile not in profiles:
        names = list(profiles) if isinstance(profiles, dict) else []
        raise KeyError(f"study {spec.get('name', '?')}: no profile {profile!r}{_close(profile, names)}; it has "
                       f"{', '.join(names) if names else 'none'} (profiles are declared under `profiles:` in its YAML)")
    block = profiles[profile] or {}
    out = {k: copy.deepcopy(v) for k, v in spec.items() if k != "profiles"}
    for key, value in block.items():
        if key in ("base", "quick"):
            out[key] = deep_merge(out.get(key) or {}, value or {})
        elif key == "select" and isinstance(value, dict) and isinstance(out.get("select"), dict):
            out["select"] = {**out["select"], **copy.deepcopy(value)}
        elif key == "variants" and isinstance(value, dict):
            out["variants"] = [deep_merge(v, value[v["label"]]) if isinstance(v, dict) and v.get("label") in value
                               else v for v in out.get("variants") or []]
        elif key == "axes" and isinstance(value, dict):
            out["axes"] = {**(out.get("axes") or {}), **copy.deepcopy(value)}
        else:
            out[key] = copy.deepcopy(value)
    if isinstance(out.get("name"), str):
        out["name"] = f"{out['name']}-{profile}"
    return out


def parse_spec(spec: Any, source: str | None = None, profile: str | None = None) -> StudyFile:
    """A validated `StudyFile` from a parsed study YAML; every problem found is named in one `StudySpecError`.

    Checked before anything runs: unknown top-level keys, the seeds, the base, each variant (a
    label, no repeats), each axis (a dotted run-config key with values of its type, or labelled
    mappings), the exclude / include rules (known axes and values), the quick block, and the run
    config of every combination (`config_from_dict`), with and without --quick, and every profile's
    merged spec the same way. ``profile``: the spec with that profile merged in (`apply_profile`).
    """
    if profile is not None:
        if not isinstance(spec, dict):
            return parse_spec(spec, source)  # the shape error, as without a profile
        whole = parse_spec(spec, source)  # the spec and all its profiles, each parsed once: problems named there
        merged = apply_profile(spec, profile)  # an unknown profile: KeyError naming those there are
        problems: list[str] = []
        _check_profiles(spec, problems, requested=profile)
        if problems:
            raise StudySpecError(source or str(spec.get("name", "spec")), problems)
        out = whole.merged.get(profile) or parse_spec(merged, source)
        out.profile, out.profiles = profile, whole.profiles
        return out
    if source is None:
        named = isinstance(spec, dict) and isinstance(spec.get("name"), str)
        source = spec["name"] if named else "spec"
    if not isinstance(spec, dict):
        raise StudySpecError(source, [f"the top level must be a mapping of keys ({', '.join(TOP_KEYS)}), "
                                      f"got {_given(spec)}"])
    problems: list[str] = []
    mistyped: set[str] = set()  # reported once: the checks below skip them (and what depends on them)
    for k, v in spec.items():
        if k not in TOP_KEYS:
            problems.append(f"{k}: unknown key{_close(str(k), list(TOP_KEYS))}; valid keys: {', '.join(TOP_KEYS)}")
            continue
        try:
            check_value(v, TOP_TYPES[k], k)
        except ConfigError as e:
            problems.append(str(e))
            mistyped.add(k)
    if mistyped:
        spec = {k: v for k, v in spec.items() if k not in mistyped}
        if "axes" in mistyped:  # rules name axes: nothing to check them against
            spec = {k: v for k, v in spec.items() if k not in ("exclude", "include")}
    name = spec.get("name")
    if name is None:
        stem = Path(source).stem if source.endswith((".yaml", ".yml")) else None
        if stem:
            name = stem
        elif "name" not in mistyped:
            problems.append("name: missing (the study's name: its folder in the results store)")
    elif not name.strip():
        problems.append(f"name: expected a non-empty string, got {_given(name)}")
    seeds = spec.get("seeds") if spec.get("seeds") is not None else [0]
    problems.extend(_check_seeds(seeds, "seeds"))
    resources = Resources()
    if spec.get("resources") is not None:
        try:  # each key's type, then its range, as a run config's section
            resources = Resources(**checked_fields(Resources, spec["resources"], "resources."))
        except ConfigError as e:
            problems.append(str(e))
        except ValueError as e:
            problems.append(f"resources: {e}")
    base = spec.get("base") if spec.get("base") is not None else {}
    _check_run_mapping(base, "base", problems, search=spec.get("search") is not None)
    if spec.get("search") is not None and spec.get("seeds") is not None:
        problems.append("seeds: a search trains every trial at one seed, base.seed (default 0); drop seeds")

    variants = spec.get("variants")
    variant_labels: list[str] = []
    if variants is not None:
        if not isinstance(variants, list) or not variants:
            problems.append(f"variants: expected a non-empty list of mappings, each with a label, got "
                            f"{_given(variants)}")
            variants = []
        for i, v in enumerate(variants):
            label = _check_row(v, f"variants[{i}]", problems)
            if label is not None and label in variant_labels:
                problems.append(f"variants[{i}].label: {label!r} repeats variants[{variant_labels.index(label)}].label")
            variant_labels.append(label or f"?{i}")
    axes: list[Axis] = []
    broken: set[str] = set()  # axes that did not parse (reported once, not again in every rule)
    raw_axes = spec.get("axes")
    if raw_axes is not None:
        if not isinstance(raw_axes, dict) or not raw_axes:
            problems.append(f"axes: expected a non-empty mapping of axis name -> list of values, got {_given(raw_axes)}")
        else:
            for axis_name, values in raw_axes.items():
                axis = _parse_axis(axis_name, values, problems)
                if axis is not None:
                    axes.append(axis)
                else:
                    broken.add(axis_name)
    selection = None
    if spec.get("select") is not None:
        selection = _parse_select(spec, axes, problems)
        if selection is not None and selection.axis is not None:
            axes.append(Axis(selection.axis, "key", selection.values, tuple(format_value(v) for v in selection.values)))
        elif selection is not None and isinstance(base, dict):  # every run evaluates them, keeps the best
            base = deep_merge(base, {"eval": {"checkpoints": list(selection.values),
                                              "checkpoint_metric": selection.metric}})
    if variants is None and raw_axes is None and spec.get("search") is None and not {"variants", "axes"} & mistyped:
        problems.append("variants / axes: a study needs variants, axes or both (or a search block)")
    # descriptive keys must not take an axis's column
    axis_names = {a.name for a in axes}
    for i, v in enumerate(variants or []):
        if isinstance(v, dict) and axes:
            for k in v:
                if k in axis_names and k not in RUN_KEYS:
                    problems.append(f"variants[{i}].{k}: a descriptive key named like the axis {k!r}; rename one")
                elif k == VARIANT:
                    problems.append(f"variants[{i}].{k}: 'variant' is the column of the variant label; rename it")
    for a in axes:
        if a.kind == "named":
            for i, v in enumerate(a.values):
                for k in v:
                    if k in axis_names and k not in RUN_KEYS:
                        problems.append(f"axes.{a.name}[{i}].{k}: a descriptive key named like the axis {k!r}; "
                                        "rename one")
        if a.name == VARIANT and variants is not None:
            problems.append(f"axes.{VARIANT}: the name rules use for the variant labels; call the axis something else")

    rules: dict[str, list[dict[str, list[int]]]] = {"exclude": [], "include": []}
    axes_unreadable = raw_axes is not None and not (isinstance(raw_axes, dict) and raw_axes)
    for key in ("exclude", "include"):
        given = spec.get(key)
        if given is None or axes_unreadable:  # rules name axes: nothing to check them against
            continue
        if not isinstance(given, list):
            problems.append(f"{key}: expected a list of rules (mappings from axis names to values), got {_given(given)}")
            continue
        for i, rule in enumerate(given):
            parsed = _parse_rule(rule, f"{key}[{i}]", axes, variant_labels if variants is not None else [], problems,
                                 broken)
            if parsed is not None:
                rules[key].append(parsed)

    quick = spec.get("quick")
    quick_seeds = None
    quick_base: dict[str, Any] = {}
    quick_axes: dict[str, set[int]] = {}
    if quick is not None:
        if not isinstance(quick, dict):
            problems.append(f"quick: expected a mapping ({', '.join(QUICK_KEYS)}), got {_given(quick)}")
            quick = {}
        for k in quick:
            if k not in QUICK_KEYS:
                problems.append(f"quick.{k}: unknown key{_close(str(k), list(QUICK_KEYS))}; "
                                f"valid keys: {', '.join(QUICK_KEYS)}")
        if "seeds" in quick:
            quick_seeds = quick["seeds"]
            problems.extend(_check_seeds(quick_seeds, "quick.seeds"))
        if quick.get("base") is not None and _check_run_mapping(quick["base"], "quick.base", problems):
            quick_base = quick["base"]
        if quick.get("axes") is not None and not axes_unreadable:
            if not isinstance(quick["axes"], dict):
                problems.append(f"quick.axes: expected a mapping of axis name -> a subset of its values, got "
                                f"{_given(quick['axes'])}")
            else:
                for axis_name, subset in quick["axes"].items():
                    parsed = _parse_rule({axis_name: subset}, "quick.axes", axes, [], problems, broken)
                    if parsed and axis_name in parsed:
                        quick_axes[axis_name] = set(parsed[axis_name])

    if problems:
        raise StudySpecError(source, problems)
    out = StudyFile(
        name=name, source=source, raw=spec, description=spec.get("description") or "", table=spec.get("table"),
        reference_variant=spec.get("reference_variant"), seeds=list(seeds), base=base,
        variants=list(variants or []), axes=axes,
        exclude=[{k: set(v) for k, v in r.items()} for r in rules["exclude"]], include=rules["include"],
        quick_seeds=list(quick_seeds) if quick_seeds is not None else None, quick_base=quick_base,
        quick_axes=quick_axes, has_quick=bool(quick), resources=resources, search=spec.get("search"),
        select=selection,
    )
    problems = out._check_runs()
    if selection is not None and not problems:
        problems.extend(_check_select_runs(out))
    ref = out.reference_variant
    if ref is not None and not problems:
        known = list(dict.fromkeys([v["label"] for v in out.variants] + out.labels()
                                   + (out.labels(quick=True) if out.has_quick else [])))
        if ref not in known:
            shown = ", ".join(known[:8]) + (f" and {len(known) - 8} more" if len(known) > 8 else "")
            problems.append(f"reference_variant: {ref!r} is not the label of any run of this study"
                            f"{_close(ref, known)}; every row's win rate is against it (run labels: {shown})")
    for p in _check_profiles(spec, problems):  # each profile's merged spec, checked like the spec
        try:
            out.merged[p] = parse_spec(apply_profile(spec, p), source)
        except StudySpecError as e:
            problems.extend(f"profiles.{p}: {x}" for x in e.problems)
    if problems:
        raise StudySpecError(source, problems)
    out.profiles = tuple(spec.get("profiles") or ())
    return out


def read_study(name: str | Path) -> tuple[Any, str]:
    """(the parsed YAML, not yet checked, and its source name) of a registered study name or a study YAML path."""
    path = Path(name)
    if path.suffix in (".yaml", ".yml") and path.exists():
        source = str(name)
    elif path.suffix in (".yaml", ".yml"):
        raise StudySpecError(str(name), ["file not found (give a study YAML that exists, or a registered study: "
                                         f"{', '.join(STUDIES.names())})"])
    else:
        path = STUDIES.get(str(name))
        source = path.name
    try:
        return load_yaml(path.read_text(encoding="utf-8")), source  # 1e-5 is a number, as in run configs
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        at = f" at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
        raise StudySpecError(source, [f"not valid YAML{at}: {getattr(e, 'problem', None) or e}"]) from None
    except UnicodeDecodeError as e:
        raise StudySpecError(source, [f"not UTF-8 text (byte {e.start}); save the study file as UTF-8"]) from None


def load_spec(name: str | Path | dict[str, Any] | StudyFile, profile: str | None = None) -> StudyFile:
    """A checked study file from a registered study name, a study YAML file, a parsed mapping or a
    `StudyFile`; ``profile``: with that profile merged in (a `StudyFile` given must already have it)."""
    if isinstance(name, StudyFile):
        if profile is not None and name.profile != profile:
            raise ValueError(f"study {name.source}: loaded with profile {name.profile!r}, asked for {profile!r}")
        return name
    if isinstance(name, dict):
        return parse_spec(name, profile=profile)
    raw, source = read_study(name)
    return parse_spec(raw, source=source, profile=profile)
