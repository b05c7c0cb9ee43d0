"""Run configuration: dataclasses that document themselves, loaded from YAML with clear errors.

A run config file looks like (every section optional except models/data/loss):

    # tvkd run configs/tvkd-soft_value.yaml
    name: tvkd-soft_value
    seed: 0
    models: {student: testbed:student_sft, teacher: testbed:teacher_dpo}
    data: {source: testbed:pref_train, test_source: testbed:pref_test}
    loss: {name: tvkd, aux: soft_value, alpha: 0.7}
    train: {learning_rate: 3.0e-5, num_train_epochs: 2, per_device_train_batch_size: 32}

`testbed:<part>` names a part of the embedded testbed (built on demand); anything else is a hub
id or a local path.
"""

from __future__ import annotations

import dataclasses
import difflib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from tvkd.tokenize import TokenizeConfig


def _f(default: Any, help: str, **kw: Any) -> Any:
    if isinstance(default, (list, dict)):
        return field(default_factory=lambda d=default: type(d)(d), metadata={"help": help}, **kw)
    return field(default=default, metadata={"help": help}, **kw)


@dataclass
class ModelsConfig:
    student: str = _f("testbed:student_sft", "Policy initialisation (hub id, local folder or testbed:<part>).")
    reference: str | None = _f(None, "Frozen reference π_ref; default: the student's initialisation.")
    teacher: str | None = _f(None, "The DPO-trained teacher π_T (needed by teacher-based losses).")
    teacher_reference: str | None = _f(None, "The teacher's SFT model π_Tref (DDPO, ADPA).")
    dtype: str = _f("auto", "Compute dtype: auto (bf16 on a GPU that has it, else fp32), float32, bfloat16.")
    trust_remote_code: bool = _f(False, "Allow model code from the hub; off unless you trust the source.")


@dataclass
class DataConfig:
    source: str = _f("testbed:pref_train", "Training pairs: hub id, .jsonl/.parquet file, folder, or testbed:<part>.")
    split: str = _f("train", "Split of `source` used for training.")
    test_source: str | None = _f("testbed:pref_test", "Held-out pairs for margin accuracy (default: source).")
    test_split: str = _f("test", "Split of `test_source` used for evaluation.")
    adapter: str | None = _f(None, "Data set adapter; default: chosen from the hub id or the columns.")
    limit: int | None = _f(None, "Use only the first N training rows (quick checks).")
    test_limit: int | None = _f(500, "Evaluate on at most N test pairs / prompts.")
    subsample: float | None = _f(
        None, "Train on a random fraction of the pairs drawn with the run's seed (so seeds resample the data).")


@dataclass
class LossConfig:
    name: str = _f("tvkd", "A registered loss (see `tvkd losses`).")
    options: dict = _f({}, "The loss's own options (see its Config); given inline next to `name` in YAML.")


@dataclass
class TrainConfig:
    learning_rate: float = _f(5e-7, "Peak learning rate (the paper's 5e-7 for 1B students).")
    num_train_epochs: float = _f(1.0, "Passes over the training pairs.")
    per_device_train_batch_size: int = _f(8, "Pairs per device per step (2x rows: chosen + rejected).")
    gradient_accumulation_steps: int = _f(1, "Steps accumulated per optimizer update.")
    lr_scheduler_type: str = _f("cosine", "transformers scheduler name.")
    warmup_steps: float = _f(0.1, "Linear warm-up: an int is a number of steps, a float in [0, 1) a fraction of all steps.")
    weight_decay: float = _f(0.0, "AdamW weight decay.")
    max_grad_norm: float = _f(1.0, "Gradient clipping.")
    logging_steps: int = _f(10, "Log every N optimizer steps.")
    save_strategy: str = _f("no", "transformers save strategy: no | steps | epoch (checkpoints for resume).")
    save_steps: int = _f(500, "With save_strategy=steps: save every N steps.")
    save_model: bool = _f(False, "Keep the trained weights in the run directory (safetensors).")
    report_to: list = _f([], "transformers report_to integrations, e.g. [wandb, tensorboard].")
    extra: dict = _f({}, "Any other transformers.TrainingArguments field, passed through.")


@dataclass
class CacheConfig:
    precompute: list = _f(
        [], "Aux rewards computed in the same teacher pass as the loss's own whenever a pass runs (each at every "
            "value temperature and Q source below), so a study sweeping aux rewards or β_V needs one pass. The "
            "teacher cache stores one column per aux reward; a column is computed the first time it is asked for.")
    value_temperatures: list = _f([2.0], "β_V values at which `precompute` computes soft_value (paper grid: "
                                         "0.1, 0.2, 0.5, 1, 2, 5).")
    q_sources: list = _f(["logits"], "Q sources at which `precompute` computes Q-dependent aux rewards.")
    batch_size: int = _f(32, "Pairs per cache forward.")
    dtype: str | None = _f(
        None, "Teacher weights/forward dtype for the cache (default: models.dtype). The aux math is fp32 either "
              "way, but a bf16 forward moves the logits: on the testbed teacher 4.7% of soft_value pair offsets "
              "changed sign against fp32 (max |Δ| 0.05). Use float32 when the teacher fits.")


@dataclass
class EvalConfig:
    margin_accuracy: bool = _f(True, "Student implicit-reward margin accuracy on the test pairs (ties count 1/2).")
    generate: bool = _f(True, "Greedy generations on the test prompts (for oracle score / win rates).")
    max_new_tokens: int = _f(64, "Generation budget per prompt.")
    batch_size: int = _f(128, "Prompts / pairs per evaluation batch.")
    teacher_scores: bool = _f(
        True, "Table 3: margin accuracy of the teacher's sum / mean log-prob and shaping sum on the test pairs.")
    value_alignment: int = _f(0, "Value-alignment and policy KL on N training chosen responses (0: off).")
    ties: str = _f("half", "Margin-accuracy ties: half (count 1/2) | loss (count 0).")


@dataclass
class RunConfig:
    name: str = _f("run", "A short name for the run (used in the run directory's name).")
    seed: int = _f(0, "Seed for init, data order, subsampling and sampling.")
    study: str | None = _f(None, "The study this run belongs to (groups runs in the results store).")
    num_threads: int | None = _f(
        None, "CPU threads for torch (default: torch's). Tiny models run fastest on 1: thread hand-offs cost "
              "more than their small matmuls, and oversubscribed OpenMP threads spin-wait.")
    models: ModelsConfig = field(default_factory=ModelsConfig)
    data: DataConfig = field(default_factory=DataConfig)
    tokenize: TokenizeConfig = field(default_factory=lambda: TokenizeConfig(max_length=256, max_prompt_length=128))
    loss: LossConfig = field(default_factory=LossConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    cache: CacheConfig = field(default_factory=CacheConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


class ConfigError(ValueError):
    pass


def _build(cls: type, data: dict[str, Any], where: str) -> Any:
    if data is None:
        return cls()
    if not isinstance(data, dict):
        raise ConfigError(f"{where}: expected a mapping, got {type(data).__name__}")
    fields = {f.name: f for f in dataclasses.fields(cls)}
    kwargs = {}
    for key, value in data.items():
        if key not in fields:
            close = difflib.get_close_matches(key, list(fields), n=1)
            hint = f" Did you mean {close[0]!r}?" if close else ""
            raise ConfigError(f"{where}: unknown key {key!r}; valid keys: {', '.join(fields)}.{hint}")
        ftype = fields[key].type
        sub = {"ModelsConfig": ModelsConfig, "DataConfig": DataConfig, "TokenizeConfig": TokenizeConfig,
               "LossConfig": LossConfig, "TrainConfig": TrainConfig, "CacheConfig": CacheConfig,
               "EvalConfig": EvalConfig}.get(ftype if isinstance(ftype, str) else getattr(ftype, "__name__", ""))
        kwargs[key] = _build(sub, value, f"{where}.{key}") if sub else value
    try:
        return cls(**kwargs)
    except (TypeError, ValueError) as e:
        raise ConfigError(f"{where}: {e}") from None


def config_from_dict(data: dict[str, Any], where: str = "config") -> RunConfig:
    data = dict(data or {})
    loss = data.get("loss")
    if isinstance(loss, dict) and "options" not in loss:
        # YAML convenience: `loss: {name: tvkd, alpha: 0.5}` puts options next to the name.
        loss = dict(loss)
        name = loss.pop("name", "tvkd")
        data["loss"] = {"name": name, "options": loss}
    return _build(RunConfig, data, where)


def load_config(path: str | Path) -> RunConfig:
    path = Path(path)
    try:
        data = yaml.safe_load(path.read_text())
    except FileNotFoundError:
        raise ConfigError(f"config file not found: {path}") from None
    except yaml.YAMLError as e:
        raise ConfigError(f"{path}: not valid YAML: {e}") from None
    return config_from_dict(data or {}, where=str(path))


def dump_config(cfg: RunConfig) -> str:
    return yaml.safe_dump(cfg.to_dict(), sort_keys=False)


def describe(cls: type, prefix: str = "") -> list[str]:
    """Help lines for every field of a config dataclass (used by the CLI)."""
    lines = []
    for f in dataclasses.fields(cls):
        default = f.default if f.default is not dataclasses.MISSING else (
            f.default_factory() if f.default_factory is not dataclasses.MISSING else None)
        if dataclasses.is_dataclass(default):
            lines.extend(describe(type(default), f"{prefix}{f.name}."))
        else:
            lines.append(f"  {prefix}{f.name} (default {default!r}): {f.metadata.get('help', '')}")
    return lines
