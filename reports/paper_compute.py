"""GPU-hours of a study in the paper's setting, estimated offline from model sizes and token counts.

No model and no data set is loaded or downloaded: parameter counts come from the published
architecture of each model the paper uses (`MODELS`: layers, hidden size, MLP size, vocabulary,
attention and key/value heads, tied embeddings — the numbers of each model's ``config.json`` on the
hub), or from the ``config.json`` of a local model folder; token counts from the published sizes of
the paper's data sets (`DATASETS`) and a per-data-set estimate of tokens per sequence, capped at
the run's ``tokenize.max_length``.

For one run with N_s student parameters and T = pairs × 2 sequences × tokens per sequence:

    training                 6 · N_s · T · epochs            (forward + backward, Kaplan et al.)
    frozen forward passes    2 · N · T  for the teacher, the reference and the teacher's SFT model,
                             each only when the loss reads it (`Needs`); a pass the teacher cache keeps
                             is counted once per (model, data, max_length) for the whole plan, a pass
                             the loss makes online at every step (teacher/reference logits) every epoch
    rollouts                 2 · N · pairs · rollout tokens (SeqKD's teacher, ADPA's student answers),
                             on-policy samples 2 · N_s · fraction · pairs · max_new_tokens per epoch (GKD)
    contrast models          TIS-DPO's DPO and reverse-DPO estimators: 2 × 6 · N_s · T · their epochs
    evaluation               2 · N_s · T_test (margin accuracy; + the reference when the loss has one)
                             + 2 · N_s · test prompts · eval.max_new_tokens (greedy generations)
                             + 2 · N_s · validation prompts · eval.max_new_tokens (data.validation_fraction),
                             once more per checkpoint evaluated (eval.checkpoints); the validation reward
                             model's forward is not counted

GPU-hours = FLOPs / (an H100's dense bf16 peak, 989 TFLOP/s, × 40% model FLOPs utilisation) / 3600.
It ignores attention's quadratic term (small at these lengths), the benchmarks run afterwards by
``tvkd eval`` (RM, MT-Bench, AlpacaEval, Open LLM Leaderboard) and any idle time, so read it as the
order of magnitude of the compute a grid needs, not a schedule.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

__all__ = ["DATASETS", "MFU", "MODELS", "PEAK_FLOPS", "DatasetSize", "ModelDims", "RunEstimate", "estimate_runs",
           "format_estimate", "model_parameters"]

#: An H100 SXM's dense bf16 peak (FLOP/s) and the sustained fraction assumed.
PEAK_FLOPS = 989e12
MFU = 0.40
#: What the paper says of its compute (App. E.1, reports/paper_data/hyperparameters.csv).
PAPER_WALL_TIME = "about 2.5 to 3 hours on four RTX 4090s (App. E.1)"


@dataclass(frozen=True)
class ModelDims:
    """A decoder-only transformer's published dimensions (its config.json)."""

    layers: int
    hidden: int
    intermediate: int
    vocab: int
    heads: int
    kv_heads: int
    tied: bool

    @property
    def parameters(self) -> int:
        """Embeddings (+ an untied output layer) + per layer: attention (q, o: h², k, v: h·kv·d) and a
        gated MLP (3·h·i); norms and biases are left out (under 0.01%)."""
        head_dim = self.hidden // self.heads
        attention = 2 * self.hidden * self.hidden + 2 * self.hidden * self.kv_heads * head_dim
        mlp = 3 * self.hidden * self.intermediate
        embeddings = self.vocab * self.hidden * (1 if self.tied else 2)
        return self.layers * (attention + mlp) + embeddings


_LLAMA_1B = ModelDims(16, 2048, 8192, 128256, 32, 8, True)
_LLAMA_3B = ModelDims(28, 3072, 8192, 128256, 24, 8, True)
_LLAMA_8B = ModelDims(32, 4096, 14336, 128256, 32, 8, False)
_MISTRAL_7B = ModelDims(32, 4096, 14336, 32000, 32, 8, False)
_DANUBE3_500M = ModelDims(16, 1536, 4096, 32000, 16, 8, False)

#: The paper's models by hub id (lower case), with their published dimensions.
MODELS: dict[str, ModelDims] = {
    "meta-llama/llama-3.2-1b": _LLAMA_1B,
    "meta-llama/llama-3.2-1b-instruct": _LLAMA_1B,
    "meta-llama/llama-3.2-3b": _LLAMA_3B,
    "meta-llama/llama-3.2-3b-instruct": _LLAMA_3B,
    "meta-llama/llama-3.1-8b": _LLAMA_8B,
    "meta-llama/llama-3.1-8b-instruct": _LLAMA_8B,
    "mistralai/mistral-7b-v0.2": _MISTRAL_7B,  # the paper's "Mistral-7B-v0.2"; the base weights
    "mistral-community/mistral-7b-v0.2": _MISTRAL_7B,
    "mistralai/mistral-7b-instruct-v0.2": _MISTRAL_7B,
    "h2oai/h2o-danube3-500m-base": _DANUBE3_500M,
    "h2oai/h2o-danube3-500m-chat": _DANUBE3_500M,
    "sfairxc/fsfairx-llama3-rm-v0.1": _LLAMA_8B,  # the paper's reward model (RM column), for reference
}


@dataclass(frozen=True)
class DatasetSize:
    """A data set's published size and an estimate of its tokens per sequence (prompt + one response)."""

    train_pairs: int
    test_pairs: int
    tokens_per_sequence: int
    basis: str


#: The paper's preference data sets by hub id (lower case).
DATASETS: dict[str, DatasetSize] = {
    "argilla/dpo-mix-7k": DatasetSize(
        6750, 750, 600, "6,750 train / 750 test pairs (the data set card); ~600 tokens per prompt + response, an "
                        "estimate for its Capybara / Orca / UltraFeedback mix (not stated in the paper)"),
    "nvidia/helpsteer2": DatasetSize(
        10162, 519, 900, "20,324 train / 1,038 validation rated responses = 10,162 / 519 prompt pairs (the data set "
                         "card), an upper bound: pairs of equal helpfulness are dropped and the paper does not say "
                         "how many; ~900 tokens per prompt + response (long multi-turn prompts), an estimate"),
}


def _lookup_model(name: str | None) -> tuple[int | None, str]:
    """(parameters, where the count comes from) for a hub id or a local model folder; None when unknown."""
    if not name:
        return None, "none"
    key = str(name).strip().lower()
    if key in MODELS:
        return MODELS[key].parameters, "published dimensions"
    config = Path(name) / "config.json"
    if config.is_file():  # a local folder (e.g. the user's own DPO teacher): its dimensions, no weights loaded
        c = json.loads(config.read_text())
        try:
            dims = ModelDims(c["num_hidden_layers"], c["hidden_size"], c["intermediate_size"], c["vocab_size"],
                             c["num_attention_heads"], c.get("num_key_value_heads") or c["num_attention_heads"],
                             bool(c.get("tie_word_embeddings", False)))
        except KeyError as e:
            return None, f"{config} has no {e.args[0]}"
        return dims.parameters, f"{config}"
    return None, "not in the table of published dimensions (reports/paper_compute.py MODELS) and no local folder"


def model_parameters(name: str | None) -> int | None:
    """The parameter count of a known hub id or a local model folder (its config.json), else None."""
    return _lookup_model(name)[0]


@dataclass
class RunEstimate:
    """The FLOPs of one run by part, its GPU-hours, and what could not be estimated."""

    label: str
    seed: int
    student_params: int | None = None
    teacher_params: int | None = None
    train_tokens: float | None = None
    epochs: float = 0.0
    flops: dict[str, float] = field(default_factory=dict)
    unknown: list[str] = field(default_factory=list)

    @property
    def total_flops(self) -> float:
        return float(sum(self.flops.values()))

    @property
    def gpu_hours(self) -> float | None:
        return None if self.unknown else self.total_flops / (PEAK_FLOPS * MFU) / 3600


def _tokens(cfg: Any) -> tuple[int, int, float, str, int] | None:
    """(train pairs, test pairs, tokens per sequence, basis, validation pairs) for the run's data, or None when
    unknown."""
    size = DATASETS.get(str(cfg.data.source).strip().lower())
    if size is None:
        return None
    pairs = size.train_pairs
    validation = 0
    if cfg.data.validation_fraction:  # held out of the pairs read, before the subsample (tvkd.data.holdout)
        validation = int(round(min(pairs, cfg.data.limit or pairs) * cfg.data.validation_fraction))
        pairs -= validation
    if cfg.data.subsample:
        pairs = int(round(pairs * cfg.data.subsample))
    if cfg.data.limit:
        pairs = min(pairs, cfg.data.limit)
    test = size.test_pairs
    test_source = cfg.data.test_source
    if test_source and str(test_source).strip().lower() != str(cfg.data.source).strip().lower():
        other = DATASETS.get(str(test_source).strip().lower())
        test = other.test_pairs if other else test
    if cfg.eval.margin_accuracy or cfg.eval.generate:
        test = min(test, cfg.data.test_limit) if cfg.data.test_limit else test
    per_sequence = min(size.tokens_per_sequence, cfg.tokenize.max_length)
    return pairs, test, per_sequence, size.basis, validation


def estimate_run(cfg: Any, label: str, seed: int, cached: set[tuple[str, ...]]) -> RunEstimate:
    """One run's FLOPs by part; ``cached`` holds the teacher-cache passes already counted (updated here)."""
    from tvkd.api import LOSSES, Needs, build_config  # lazy: torch (the loss plug-ins)

    est = RunEstimate(label=label, seed=seed)
    m = cfg.models
    n_s, where = _lookup_model(m.student)
    est.student_params = n_s
    if n_s is None:
        est.unknown.append(f"student {m.student}: {where}")
    tokens = _tokens(cfg)
    if tokens is None:
        est.unknown.append(f"data {cfg.data.source}: not a data set of known size (reports/paper_compute.py DATASETS)")
    if est.unknown:
        return est
    pairs, test_pairs, per_seq, _, val_pairs = tokens
    train_tokens = pairs * 2 * per_seq
    test_tokens = test_pairs * 2 * per_seq
    est.train_tokens = float(train_tokens)
    loss_cls = LOSSES.get(cfg.loss.name)
    needs = Needs() if cfg.eval_only else loss_cls().needs(build_config(loss_cls, cfg.loss.options))
    reference = m.reference or m.student

    def params(role: str, name: str | None) -> int | None:
        n, why = _lookup_model(name)
        if n is None:
            est.unknown.append(f"{role} {name}: {why}")
        return n

    def cached_pass(role: str, name: str | None, key: str) -> None:
        n = params(role, name)
        ident = (role, str(name), str(cfg.data.source), str(cfg.tokenize.max_length), key)
        if n is not None and ident not in cached:
            cached.add(ident)
            est.flops[f"{role} pass"] = est.flops.get(f"{role} pass", 0.0) + 2.0 * n * train_tokens

    if not cfg.eval_only:
        epochs = float(cfg.train.num_train_epochs)
        est.epochs = epochs
        est.flops["training"] = 6.0 * n_s * train_tokens * epochs
        if needs.teacher:
            n_t = params("teacher", m.teacher)
            est.teacher_params = n_t
            if needs.aux and n_t is not None:  # one pass computes every aux column the cache is asked for
                cached_pass("teacher", m.teacher, "aux")
            if needs.topk and n_t is not None:
                cached_pass("teacher", m.teacher, f"topk{needs.topk}")
            if needs.teacher_logits and n_t is not None:
                est.flops["teacher online"] = 2.0 * n_t * train_tokens * epochs
            if needs.chosen_from == "teacher" and n_t is not None:
                est.flops["teacher rollouts"] = 2.0 * n_t * pairs * needs.rollout_max_new_tokens
        if needs.reference:
            cached_pass("reference", reference, "logps")
        if needs.reference_logits:
            n_r = params("reference", reference)
            if n_r is not None:
                est.flops["reference online"] = 2.0 * n_r * train_tokens * epochs
        if needs.teacher_reference_aux:
            cached_pass("teacher_reference", m.teacher_reference, "aux")
        if needs.teacher_reference_topk:
            cached_pass("teacher_reference", m.teacher_reference, f"topk{needs.teacher_reference_topk}")
        if needs.rejected_from == "student":
            est.flops["student rollouts"] = 2.0 * n_s * pairs * needs.rollout_max_new_tokens
        if needs.on_policy is not None:
            est.flops["on-policy samples"] = (2.0 * n_s * needs.on_policy.fraction * pairs
                                              * needs.on_policy.max_new_tokens * epochs)
        if needs.contrast is not None:
            est.flops["contrast models"] = 2 * 6.0 * n_s * train_tokens * needs.contrast.epochs
    evaluation = 0.0
    if cfg.eval.margin_accuracy:  # the student and its reference (the student's initialisation by default)
        evaluation += 2 * 2.0 * n_s * test_tokens
    if cfg.eval.generate:
        evaluation += 2.0 * n_s * test_pairs * cfg.eval.max_new_tokens
    # greedy answers to the validation prompts: after training, and at each checkpoint evaluated (eval.checkpoints)
    evaluation += (1 + len(cfg.eval.checkpoints)) * 2.0 * n_s * val_pairs * cfg.eval.max_new_tokens
    est.flops["evaluation"] = evaluation
    return est


def estimate_runs(runs: list[tuple[str, int, Any]]) -> list[RunEstimate]:
    """Estimates for [(label, seed, RunConfig)], in order; shared cache passes are counted once."""
    cached: set[tuple[str, ...]] = set()
    return [estimate_run(cfg, label, seed, cached) for label, seed, cfg in runs]


def _count(n: float | None) -> str:
    if n is None:
        return "?"
    for unit, size in (("T", 1e12), ("B", 1e9), ("M", 1e6), ("k", 1e3)):
        if abs(n) >= size:
            return f"{n / size:.2f}{unit}"
    return f"{n:.0f}"


def format_estimate(estimates: list[RunEstimate], data_sources: list[str] | None = None) -> str:
    """The per-run table (label, seed, student and teacher parameters, train tokens, epochs, PFLOPs,
    GPU-hours), the total, and how it is estimated."""
    header = ["run", "seed", "student", "teacher", "train tokens", "epochs", "PFLOP", "GPU-h"]
    rows = []
    for e in estimates:
        hours = e.gpu_hours
        rows.append([e.label, str(e.seed), _count(e.student_params), _count(e.teacher_params) if e.teacher_params
                     else "-", _count(e.train_tokens), f"{e.epochs:g}" if e.epochs else "-",
                     f"{e.total_flops / 1e15:,.1f}" if not e.unknown else "?",
                     f"{hours:.3g}" if hours is not None else "?"])
    widths = [max(len(x) for x in col) for col in zip(header, *rows, strict=True)]
    lines = ["GPU-hours (estimate; no model or data set is loaded):"]
    for row in [header, *rows]:
        lines.append("  " + "  ".join(x.ljust(w) if i == 0 else x.rjust(w)
                                      for i, (x, w) in enumerate(zip(row, widths, strict=True))).rstrip())
    known = [e for e in estimates if not e.unknown]
    total = sum(e.gpu_hours for e in known)
    lines.append(f"total: ~{total:,.1f} GPU-hours for {len(known)} run(s)"
                 + (f"; {len(estimates) - len(known)} run(s) not estimated" if len(known) < len(estimates) else ""))
    for e in estimates:
        for u in e.unknown:
            lines.append(f"  not estimated: {e.label} seed {e.seed}: {u}")
    lines.append(f"How: FLOPs = 6·N_student·tokens·epochs (training) + 2·N·tokens per frozen forward pass the loss "
                 f"reads (teacher, reference, the teacher's SFT model; a cached pass counted once per model and data) "
                 f"+ rollouts + evaluation (margin accuracy, greedy generations); GPU-hours = FLOPs / "
                 f"({PEAK_FLOPS / 1e12:.0f} TFLOP/s, an H100's dense bf16 peak, × {MFU:.0%} MFU) / 3600.")
    lines.append("  N from the models' published dimensions (layers, hidden, MLP, vocabulary, heads / KV heads) or a "
                 "local config.json; tokens = pairs × 2 sequences × min(tokens per sequence, tokenize.max_length).")
    for source in dict.fromkeys(data_sources or []):
        size = DATASETS.get(str(source).strip().lower())
        if size is not None:
            lines.append(f"  {source}: {size.basis}.")
    lines.append("  Not counted: the benchmarks run afterwards by `tvkd eval` (RM, MT-Bench, AlpacaEval, Open LLM "
                 "Leaderboard), attention's quadratic term, padding to the longest sequence of a batch, idle time.")
    lines.append(f"  A lower bound in practice: the paper reports {PAPER_WALL_TIME} for one TVKD run; measured run times "
                 "replace this estimate in `tvkd study plan` once runs of the study are in the store.")
    return "\n".join(lines)

