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
import os
import re
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from tvkd.checks import ConfigError, checked_fields
from tvkd.tokenize import TokenizeConfig

# tvkd.api (and with it torch) is imported when the loss section is checked, last, not when this module
# is: a config file's YAML, key names and every value outside the loss's own options are checked first
# (`load_config`), so a typo or a wrong value answers at once.


class _YamlLoader(yaml.SafeLoader):
    """PyYAML's safe loader, reading YAML 1.2 numbers: ``1e-5`` and ``5e-07`` are floats; a key given twice in
    one mapping is an error (PyYAML keeps the last one silently: two ``loss:`` sections would train one of them).

    YAML 1.1 (PyYAML) takes a float only with a dot (``1.0e-5``) and reads ``1e-5`` as a string,
    while Python, transformers and `tvkd config` write ``5e-07``.
    """

    def construct_mapping(self, node: Any, deep: bool = False) -> Any:
        if isinstance(node, yaml.MappingNode):
            first: dict[Any, int] = {}
            for key_node, _ in node.value:  # the mapping's own keys; a `<<` merge may be overridden, as YAML says
                if key_node.tag == "tag:yaml.org,2002:merge":
                    continue
                key = self.construct_object(key_node, deep=True)
                try:
                    seen = key in first
                except TypeError:  # an unhashable key: PyYAML's own error follows
                    continue
                if seen:
                    raise yaml.constructor.ConstructorError(
                        "while constructing a mapping", node.start_mark,
                        f"the key {key!r} is given twice (first at line {first[key]}); keep one", key_node.start_mark)
                first[key] = key_node.start_mark.line + 1
        return super().construct_mapping(node, deep=deep)


_YamlLoader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"""^(?:[-+]?(?:[0-9][0-9_]*)\.[0-9_]*(?:[eE][-+]?[0-9]+)?
                   |[-+]?(?:[0-9][0-9_]*)(?:[eE][-+]?[0-9]+)
                   |\.[0-9_]+(?:[eE][-+]?[0-9]+)?
                   |[-+]?\.(?:inf|Inf|INF)
                   |\.(?:nan|NaN|NAN))$""", re.X),
    list("-+0123456789."),
)


def load_yaml(stream: Any) -> Any:
    """YAML text (or a file object) as Python values, scientific notation read as numbers (`_YamlLoader`)."""
    return yaml.load(stream, Loader=_YamlLoader)  # noqa: S506 - a SafeLoader subclass


DTYPES = ("auto", "float32", "fp32", "bfloat16", "bf16", "float16", "fp16")

# TrainingArguments fields that the run config sets itself (from its own keys): `train.extra` may not.
MANAGED_TRAINING_ARGUMENTS = {
    "output_dir": "the run folder", "seed": "seed", "data_seed": "seed", "learning_rate": "train.learning_rate",
    "num_train_epochs": "train.num_train_epochs", "per_device_train_batch_size": "train.per_device_train_batch_size",
    "gradient_accumulation_steps": "train.gradient_accumulation_steps", "lr_scheduler_type": "train.lr_scheduler_type",
    "warmup_steps": "train.warmup_steps", "weight_decay": "train.weight_decay", "max_grad_norm": "train.max_grad_norm",
    "logging_steps": "train.logging_steps", "save_strategy": "train.save_strategy", "save_steps": "train.save_steps",
    "report_to": "train.report_to", "remove_unused_columns": "the trainer (it must be false)",
    "use_cpu": "the device found", "bf16": "models.dtype", "disable_tqdm": "--quiet",
    "dataloader_num_workers": "the trainer", "gradient_checkpointing": "train.gradient_checkpointing",
    "activation_checkpointing": "train.gradient_checkpointing",
    "torch_compile": "train.compile",
}


def _at_least(key: str, value: Any, low: int) -> None:
    if value is not None and value < low:
        raise ValueError(f"{key} must be >= {low}, got {value}")


def _one_of(key: str, value: Any, valid: tuple[str, ...]) -> None:
    if value not in valid:
        close = difflib.get_close_matches(str(value), valid, n=1)
        raise ValueError(f"{key} must be one of {', '.join(valid)}, got {value!r}"
                         + (f". Did you mean {close[0]!r}?" if close else ""))


def _hub_offline() -> bool:
    return any(os.environ.get(v, "").strip().lower() in ("1", "true", "yes", "on")
               for v in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE"))


def check_training_arguments(extra: dict[str, Any]) -> None:
    """`train.extra` keys against `transformers.TrainingArguments`, before anything is loaded (their values
    are checked by building the arguments once at plan time: `tvkd.training.trainer.check_arguments`)."""
    if extra.get("push_to_hub") and _hub_offline():
        raise ValueError("extra.push_to_hub: the Hugging Face hub is offline here (HF_HUB_OFFLINE); nothing can be "
                         "pushed. Drop it, keep the weights with train.save_model: true and upload them yourself")
    from transformers import TrainingArguments

    valid = {f.name for f in dataclasses.fields(TrainingArguments) if f.init}
    for key in extra:
        if key in MANAGED_TRAINING_ARGUMENTS:
            raise ValueError(f"extra.{key}: set by the run config itself; use {MANAGED_TRAINING_ARGUMENTS[key]}")
        if key not in valid:
            close = difflib.get_close_matches(key, sorted(valid), n=1)
            raise ValueError(f"extra.{key}: not a transformers.TrainingArguments field"
                             + (f". Did you mean {close[0]!r}?" if close else ""))


LORA_DEFAULTS = {"r": 16, "lora_alpha": 32, "lora_dropout": 0.0, "target_modules": "all-linear"}


def check_lora(options: dict[str, Any]) -> dict[str, Any]:
    """`train.lora` against `peft.LoraConfig` (the defaults above filled in); the peft keyword arguments."""
    try:
        from peft import LoraConfig
    except ImportError:
        raise ValueError("lora: needs peft, which is not installed; pip install 'tvkd[scale]' (or peft)") from None
    valid = {f.name for f in dataclasses.fields(LoraConfig) if f.init}
    for key in options:
        if key in ("task_type", "inference_mode"):
            raise ValueError(f"lora.{key}: set by the trainer (a causal LM adapter in training mode)")
        if key not in valid:
            close = difflib.get_close_matches(key, sorted(valid), n=1)
            raise ValueError(f"lora.{key}: not a peft.LoraConfig field" + (f". Did you mean {close[0]!r}?" if close else ""))
    kwargs = {**LORA_DEFAULTS, **options}
    r = kwargs.get("r")
    if isinstance(r, bool) or not isinstance(r, int) or r < 1:
        raise ValueError(f"lora.r: the adapter's rank must be an integer >= 1, got {r!r}")
    if isinstance(kwargs.get("lora_alpha"), (int, float)) and not kwargs["lora_alpha"] > 0:
        raise ValueError(f"lora.lora_alpha must be > 0, got {kwargs['lora_alpha']!r}")
    dropout = kwargs.get("lora_dropout")
    if isinstance(dropout, (int, float)) and not 0 <= dropout < 1:
        raise ValueError(f"lora.lora_dropout must lie in [0, 1), got {dropout!r}")
    try:
        LoraConfig(task_type="CAUSAL_LM", **kwargs)
    except (TypeError, ValueError) as e:
        raise ValueError(f"lora: {e}") from None
    return kwargs


# New options whose default computes exactly what runs did before they existed: left out of a config's
# dict (and so of its identity) while at that default, so adding them did not make every finished run new.
IDENTITY_NEUTRAL_DEFAULTS = {"models": {"strict_weights": True},
                             "data": {"validation_fraction": None},
                             "eval": {"validation_reward_model": None, "checkpoints": [],
                                      "checkpoint_metric": "oracle_score"},
                             "train": {"logprob_chunk": None, "padding_free": False, "gradient_checkpointing": False,
                                       "lora": {}, "compile": False, "length_buckets": False},
                             # Runs before `response_tail` existed cut a template's text after end-of-turn; with the
                             # testbed's template (nothing after it) and Llama-3's or Mistral's both forms give the
                             # same ids. A run on a ChatML/Gemma model made before it keeps its key and its cut form.
                             "tokenize": {"response_tail": "trl"}}


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
    strict_weights: bool = _f(
        True, "A model folder whose weights miss a weight of its architecture, or hold one it does not have, is "
              "an error before any work (a missing weight would train from a random init); false: a warning.")

    def __post_init__(self) -> None:
        _one_of("dtype", self.dtype, DTYPES)


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
    validation_fraction: float | None = _f(
        None, "Hold out about this fraction of the training prompts (every pair of a held-out prompt) as a "
              "validation split, never trained on: chosen by a content hash of the prompt, so every seed and method "
              "holds out the same prompts; taken out before `subsample`. The run is also evaluated on it (val/ "
              "metrics: val/oracle_score on the testbed, val/rm_score with eval.validation_reward_model), what a "
              "study's `select` picks by. null: no validation split.")

    def __post_init__(self) -> None:
        if self.subsample is not None and not 0 < self.subsample <= 1:
            raise ValueError(f"subsample must lie in (0, 1] (a fraction of the pairs), got {self.subsample}")
        if self.validation_fraction is not None and (
                isinstance(self.validation_fraction, bool) or not 0 < self.validation_fraction < 1):
            raise ValueError(f"validation_fraction must lie in (0, 1) (a fraction of the training prompts held out), "
                             f"got {self.validation_fraction!r}; null: no validation split")
        _at_least("limit", self.limit, 1)
        _at_least("test_limit", self.test_limit, 1)


@dataclass
class LossConfig:
    name: str = _f("tvkd", "A registered loss (see `tvkd losses`).")
    options: dict = _f({}, "The loss's own options (see its Config); given inline next to `name` in YAML.")

    def check(self) -> None:
        """The name names a registered loss and the options fit its Config (types, ranges, unknown names).
        Called last by `RunConfig`: it imports the loss classes, and with them torch."""
        from tvkd.api import LOSSES, build_config

        try:
            cls = LOSSES.get(self.name)
        except KeyError as e:  # the registry's message lists the names and a "did you mean"
            raise ConfigError(f"loss.name: {e}") from None
        build_config(cls, self.options, where="loss")  # types and ranges of every option


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
    keep_checkpoints: bool = _f(False, "Keep the trainer's checkpoints in the run folder after the run finishes "
                                       "(by default they exist only while it runs, for resume).")
    extra: dict = _f({}, "Any other transformers.TrainingArguments field, passed through.")
    # At scale (README: "At scale"). Each is off by default and, while off, leaves a run's identity unchanged.
    logprob_chunk: int | None = _f(
        None, "Student log-probs through the LM head this many positions at a time (e.g. 1024), never forming the "
              "[2B, T, V] logits: memory grows with T*d, not T*V (tvkd.chunked; one more head matmul). Losses that "
              "read the student's whole distribution (student logits: wpo, tdpo, gkd, dpkd, dckd, adpa, vanilla_kd, "
              "tvkd_released) still form them. null: off.")
    padding_free: bool = _f(
        False, "Run the 2B sequences of a batch packed into one row, position ids restarting per sequence "
               "(flash-attention varlen on a GPU, a block-diagonal mask on CPU): no compute on padding.")
    length_buckets: bool = _f(
        False, "Batch pairs of similar length together (a seeded, length-grouped order: tvkd.training.sampler), so "
               "batches carry less padding; the order, and so the run's numbers, differ from the default random one.")
    gradient_checkpointing: bool = _f(
        False, "Recompute each decoder layer's activations in the backward pass (less memory, ~30% more compute).")
    lora: dict = _f(
        {}, "Train a LoRA adapter instead of every weight (peft.LoraConfig fields, e.g. {r: 16, lora_alpha: 32, "
            "target_modules: all-linear}); reference log-probs then come from the base weights with the adapter "
            "disabled (no second model). Needs the `scale` extra (peft). {}: full fine-tuning.")
    compile: bool = _f(
        False, "torch.compile the student's decoder layers (opt-in: pays off on a GPU for long runs; the first "
               "steps compile).")

    def __post_init__(self) -> None:
        if self.logprob_chunk is not None and (isinstance(self.logprob_chunk, bool) or self.logprob_chunk < 1):
            raise ValueError(f"logprob_chunk must be a number of positions >= 1 or null, got {self.logprob_chunk!r}")
        if self.lora:
            check_lora(self.lora)
        if not self.learning_rate > 0:
            raise ValueError(f"learning_rate must be > 0, got {self.learning_rate}")
        if not self.num_train_epochs > 0:
            raise ValueError(f"num_train_epochs must be > 0, got {self.num_train_epochs}")
        _at_least("per_device_train_batch_size", self.per_device_train_batch_size, 1)
        _at_least("gradient_accumulation_steps", self.gradient_accumulation_steps, 1)
        _at_least("logging_steps", self.logging_steps, 1)
        _at_least("save_steps", self.save_steps, 1)
        for key in ("warmup_steps", "weight_decay", "max_grad_norm"):
            if getattr(self, key) < 0:
                raise ValueError(f"{key} must be >= 0, got {getattr(self, key)}")
        if self.warmup_steps >= 1 and not float(self.warmup_steps).is_integer():
            raise ValueError(f"warmup_steps must be a fraction of all steps in [0, 1) or a whole number of steps, "
                             f"got {self.warmup_steps}")
        _one_of("save_strategy", self.save_strategy, ("no", "steps", "epoch"))
        if self.extra:
            check_training_arguments(self.extra)


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

    def __post_init__(self) -> None:
        for t in self.value_temperatures:
            if isinstance(t, bool) or not isinstance(t, (int, float)) or not t > 0:
                raise ValueError(f"value_temperatures must be positive numbers, got {t!r}")
        if self.precompute or self.q_sources != ["logits"]:  # the default needs no registry (nor torch)
            from tvkd.api import AUX_REWARDS, Q_SOURCES

            for name in self.precompute:
                if name not in AUX_REWARDS:
                    raise ValueError(f"precompute: {AUX_REWARDS.unknown_message(name)}")
            for q in self.q_sources:
                _one_of("q_sources", q, Q_SOURCES)
        _at_least("batch_size", self.batch_size, 1)
        if self.dtype is not None:
            _one_of("dtype", self.dtype, DTYPES)


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
    validation_reward_model: str | None = _f(
        None, "The reward model that scores the greedy answers to the validation prompts (val/rm_score; with "
              "data.validation_fraction): 'oracle' (the testbed's r*), or the hub id / folder of a 1-output "
              "sequence-classification reward model (as `tvkd eval --bench rm`). null: the oracle on testbed runs, "
              "no val/rm_score elsewhere.")
    checkpoints: list = _f(
        [], "Checkpoint selection on validation (with data.validation_fraction): at each of these fractions of the "
            "training steps (in (0, 1], e.g. [0.25, 0.5, 0.75, 1.0]) the policy is evaluated on the validation "
            "split, and the run keeps (and is tested with) the weights of the best val/<checkpoint_metric>; the "
            "candidates' scores go to metrics.json (val/checkpoints). []: the final weights.")
    checkpoint_metric: str = _f("oracle_score", "What `checkpoints` picks by: oracle_score | rm_score (higher is "
                                                "better).")

    def __post_init__(self) -> None:
        _at_least("max_new_tokens", self.max_new_tokens, 1)
        _at_least("batch_size", self.batch_size, 1)
        _at_least("value_alignment", self.value_alignment, 0)
        _one_of("ties", self.ties, ("half", "loss"))
        _one_of("checkpoint_metric", self.checkpoint_metric, ("oracle_score", "rm_score"))
        for i, f in enumerate(self.checkpoints):
            if isinstance(f, bool) or not isinstance(f, (int, float)) or not 0 < f <= 1:
                raise ValueError(f"checkpoints[{i}] must be a fraction of the training steps in (0, 1], got {f!r}")
            if f in self.checkpoints[:i]:
                raise ValueError(f"checkpoints[{i}]: {f!r} is listed twice")


@dataclass
class RunConfig:
    name: str = _f("run", "A short name for the run (used in the run directory's name).")
    seed: int = _f(0, "Seed for the data order, the data.subsample draw, sampling, and any weights the run "
                      "initialises itself (LoRA adapters); a student loaded from a checkpoint starts from the same "
                      "weights at every seed.")
    study: str | None = _f(None, "The study this run belongs to (groups runs in the results store).")
    num_threads: int | None = _f(
        None, "CPU threads for torch (default: torch's). Tiny models run fastest on 1: thread hand-offs cost "
              "more than their small matmuls, and oversubscribed OpenMP threads spin-wait.")
    testbed: dict = _f({}, "TestbedConfig overrides for every testbed:<part> of this run, e.g. {label_temperature: "
                           "0.3} (the fields of `tvkd testbed build --set`); each stage is rebuilt only if it reads them.")
    eval_only: bool = _f(False, "Evaluate models.student as it is (a teacher row of a table): no caches, no "
                                "training; the loss only sets the evaluators' β.")
    models: ModelsConfig = field(default_factory=ModelsConfig)
    data: DataConfig = field(default_factory=DataConfig)
    tokenize: TokenizeConfig = field(default_factory=TokenizeConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    cache: CacheConfig = field(default_factory=CacheConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)

    def __post_init__(self) -> None:
        if not self.name.strip():
            raise ValueError("name must not be empty")
        if self.testbed:
            from tvkd.testbed import TestbedConfig

            fields = {f.name for f in dataclasses.fields(TestbedConfig)}
            for key in self.testbed:
                if key not in fields:
                    close = difflib.get_close_matches(key, sorted(fields), n=1)
                    raise ValueError(f"testbed.{key}: not a testbed option"
                                     + (f". Did you mean {close[0]!r}?" if close else f"; valid: {', '.join(sorted(fields))}"))
            TestbedConfig(**self.testbed)  # each value's type and range (names the field), before any stage
        _at_least("num_threads", self.num_threads, 1)
        if self.eval.checkpoints and self.data.validation_fraction is None:
            raise ValueError("eval.checkpoints: checkpoints are picked on the validation split; set "
                             "data.validation_fraction (e.g. 0.1)")
        if self.eval.checkpoints and self.eval_only:
            raise ValueError("eval.checkpoints: an eval_only run trains nothing, so there is no checkpoint to pick; "
                             "drop eval.checkpoints")
        if self.eval.checkpoints and self.train.save_strategy != "no":
            raise ValueError("eval.checkpoints: the candidates' weights are kept in memory, so a run resumed from a "
                             "checkpoint would lose those evaluated before; set train.save_strategy: no")
        if not 0 <= self.seed < 2**32:
            raise ValueError(f"seed must be an integer from 0 to 2**32 - 1 = {2**32 - 1} (the range numpy and torch "
                             f"seed with), got {self.seed}")
        self.loss.check()  # last: the only check that imports torch

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        for section, defaults in IDENTITY_NEUTRAL_DEFAULTS.items():
            for key, default in defaults.items():
                if d[section].get(key, default) == default:
                    d[section].pop(key, None)
        return d


def _build(cls: type, data: Any, file: str, path: str) -> Any:
    """A config dataclass from a mapping: every key, type and value checked, errors naming file and key."""
    if data is None:
        return cls()
    if not isinstance(data, dict):
        raise ConfigError(f"{file}: {path} must be a mapping of keys, got {data!r}")

    hints = typing.get_type_hints(cls)
    sections = {k for k in data if k in hints and dataclasses.is_dataclass(hints[k])}
    kwargs = checked_fields(cls, {k: v for k, v in data.items() if k not in sections}, f"{file}: {path}")
    for key in sections:
        kwargs[key] = _build(hints[key], data[key], file, f"{path}{key}.")
    try:
        return cls(**kwargs)
    except ConfigError as e:  # already names its key
        raise ConfigError(f"{file}: {e}") from None
    except (TypeError, ValueError, KeyError) as e:
        raise ConfigError(f"{file}: {path.rstrip('.') or 'config'}: {e}") from None


def check_keys(data: Any, where: str = "config", cls: type | None = None, path: str = "") -> None:
    """Every key of a config mapping names a field (the same message `build` gives), without importing
    `tvkd.api`, torch or transformers: a misspelt key answers in a fraction of a second. Values, and the
    loss's own options, are checked when the config is built."""
    cls = cls or RunConfig
    if not isinstance(data, dict):
        return
    hints = typing.get_type_hints(cls)
    fields = [f.name for f in dataclasses.fields(cls)]
    for key, value in data.items():
        if key not in fields:
            close = difflib.get_close_matches(str(key), fields, n=1)
            hint = f" Did you mean {close[0]!r}?" if close else ""
            raise ConfigError(f"{where}: {path}{key}: unknown key; valid keys: {', '.join(fields)}.{hint}")
        if dataclasses.is_dataclass(hints[key]) and hints[key] is not LossConfig:  # loss options: the loss's own
            check_keys(value, where, hints[key], f"{path}{key}.")


def config_from_dict(data: Any, where: str = "config") -> RunConfig:
    """A `RunConfig` from a parsed YAML mapping; `where` (the file name) prefixes every error."""
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ConfigError(f"{where}: the top level must be a mapping of sections (name, seed, models, data, loss, "
                          f"train, ...), got {type(data).__name__} {data!r:.60}")
    data = dict(data)
    loss = data.get("loss")
    if isinstance(loss, dict) and "options" not in loss:
        # YAML convenience: `loss: {name: tvkd, alpha: 0.5}` puts options next to the name.
        loss = dict(loss)
        name = loss.pop("name", "tvkd")
        data["loss"] = {"name": name, "options": loss}
    return _build(RunConfig, data, where, "")


def apply_sets(data: dict[str, Any], sets: list[str] | None) -> dict[str, Any]:
    """Apply ``--set dotted.key=value`` overrides (values parsed as YAML) to a config mapping."""
    for item in sets or []:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise ConfigError(f"--set {item!r}: expected KEY=VALUE with a dotted key, e.g. loss.alpha=0.5")
        try:
            parsed = load_yaml(value)
        except yaml.YAMLError as e:
            raise ConfigError(f"--set {item!r}: the value is not valid YAML ({e.problem})") from None
        node = data
        parts = key.split(".")
        for i, p in enumerate(parts[:-1]):
            child = node.setdefault(p, {})
            if not isinstance(child, dict):
                raise ConfigError(f"--set {item!r}: {'.'.join(parts[: i + 1])} is a value ({child!r}), not a "
                                  f"section; set it directly, e.g. --set {'.'.join(parts[: i + 1])}=...")
            node = child
        node[parts[-1]] = parsed
    return data


def load_config(path: str | Path, sets: list[str] | None = None) -> RunConfig:
    """Read a run config file (plus ``--set`` overrides); every problem is a ConfigError naming the file."""
    path = Path(path)
    try:
        with open(path, encoding="utf-8") as f:
            data = load_yaml(f)
    except FileNotFoundError:
        raise ConfigError(f"config file not found: {path}") from None
    except IsADirectoryError:
        raise ConfigError(f"{path} is a folder; give a YAML run config file") from None
    except UnicodeDecodeError as e:
        raise ConfigError(f"{path}: not UTF-8 text (byte {e.start}); save the config as UTF-8") from None
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        at = f" at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
        problem = getattr(e, "problem", None) or str(e).splitlines()[0]
        raise ConfigError(f"{path}: not valid YAML{at}: {problem}") from None
    if data is None:
        data = {}
    if isinstance(data, dict):
        data = apply_sets(data, sets)
        check_keys(data, str(path))
    return config_from_dict(data, where=str(path))


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
