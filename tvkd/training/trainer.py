"""The one trainer: a `transformers.Trainer` whose step is one concatenated forward over
[chosen; rejected], per-token fp32 log-probs, a `ScoredBatch`, and the loss chosen by name.

Everything else (accelerate, multi-GPU, DeepSpeed/FSDP, gradient accumulation, checkpoint and
resume, `report_to`) comes from `transformers.Trainer` unchanged.
"""

from __future__ import annotations

import json
import math
import random
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from transformers import Trainer

from tvkd.api import LossOutput, PreferenceLoss, ScoredBatch
from tvkd.scoring import collate_pairs, state_logits, student_scores, token_logps

SIDES = ("chosen", "rejected")


class NonFiniteLossError(FloatingPointError):
    """Training stopped on a NaN/inf loss; the message names the step, the pairs and the last checkpoint."""


def _pad_rows(rows: Sequence[Any], width: int, tail: tuple[int, ...] = (), dtype=torch.float32) -> torch.Tensor:
    out = torch.zeros((len(rows), width, *tail), dtype=dtype)
    for i, r in enumerate(rows):
        t = torch.as_tensor(r, dtype=dtype)
        if t.numel():
            out[i, : t.shape[0]] = t
    return out


@dataclass
class PreferenceCollator:
    """Pads B pairs into 2B rows (chosen first) plus the cached columns a loss asked for.

    `batch_columns`: name -> "pair" (a per-pair scalar column ``name``), "token" ([2B, T] from
    ``chosen/name`` and ``rejected/name``), "state" ([2B, T+1]) or "topk" ([2B, T, k]).
    """

    pad_id: int
    batch_columns: dict[str, str]
    reference: bool = False

    def __call__(self, features: Sequence[dict[str, Any]]) -> dict[str, Any]:
        batch: dict[str, Any] = collate_pairs(features, self.pad_id)
        T = batch["response_ids"].shape[1]
        if self.reference:
            rows = [f["chosen/ref_logps"] for f in features] + [f["rejected/ref_logps"] for f in features]
            batch["ref_logps"] = _pad_rows(rows, T)
        if "pair_index" in features[0]:
            batch["pair_index"] = torch.tensor([int(f["pair_index"]) for f in features])
        for name, kind in self.batch_columns.items():
            key = f"col:{name}"
            if kind == "pair":
                batch[key] = torch.tensor([float(f[name]) for f in features], dtype=torch.float32)
                continue
            rows = [f[f"{side}/{name}"] for side in SIDES for f in features]
            if kind == "token":
                batch[key] = _pad_rows(rows, T)
            elif kind == "state":
                batch[key] = _pad_rows(rows, T + 1)
            elif kind == "topk":
                k = len(rows[0][0]) if len(rows[0]) else 1
                is_int = name.endswith("_ids")
                batch[key] = _pad_rows(rows, T, (k,), dtype=torch.long if is_int else torch.float32)
            else:
                raise ValueError(f"unknown batch column kind {kind!r} for {name!r}")
        return batch


def training_columns(dataset: Any, batch_columns: dict[str, str], reference: bool) -> Any:
    """Keep only what the collator reads: fetching unused list columns row by row costs every step."""
    keep = {"prompt_ids", "chosen_ids", "rejected_ids", "pair_index"}
    if reference:
        keep |= {"chosen/ref_logps", "rejected/ref_logps"}
    for name, kind in batch_columns.items():
        keep |= {name} if kind == "pair" else {f"{side}/{name}" for side in SIDES}
    missing = sorted(c for c in keep - set(dataset.column_names) if c != "pair_index")
    if missing:
        raise KeyError(f"the training set lacks column(s) {missing} that the loss needs; "
                       f"it has {dataset.column_names}")
    return dataset.select_columns([c for c in dataset.column_names if c in keep])


class PreferenceTrainer(Trainer):
    """`transformers.Trainer` with the registered preference loss as its objective.

    Logs, averaged over the logging interval: the loss's own metrics (margin, reward accuracy,
    Ψ statistics, ...), plus chosen/rejected log-prob means.
    """

    def __init__(self, *args: Any, loss: PreferenceLoss, loss_config: Any, needs_student_logits: bool = False,
                 reference_model: Any = None, teacher_model: Any = None, teacher_vocab: int | None = None,
                 on_policy: Any = None, eos_id: int | None = None, logprob_chunk: int | None = None,
                 padding_free: bool = False, reference_from_base: bool = False, length_buckets: bool = False,
                 **kwargs: Any):
        super().__init__(*args, **kwargs)
        self.length_buckets = length_buckets  # tvkd.training.sampler: similar lengths batched together
        self.loss_fn = loss
        # At scale (tvkd.chunked, scoring.student_states): both read the student's hidden states, never
        # its [2B, T, V] logits; a loss that reads the whole distribution still gets them (unchunked).
        self.logprob_chunk = logprob_chunk
        self.padding_free = padding_free
        self.logprob_path = "full logits"
        self.reference_from_base = reference_from_base
        self.loss_config = loss_config
        self.needs_student_logits = needs_student_logits
        # Frozen models run online at every step (Needs.reference_logits / teacher_logits): a cache of
        # their full distributions would hold T·V floats per response.
        self.reference_model = self._frozen(reference_model)
        self.teacher_model = self._frozen(teacher_model)
        self.teacher_vocab = teacher_vocab
        self.on_policy = on_policy  # api.OnPolicy or None
        self.eos_id = eos_id
        if on_policy is not None and eos_id is None:
            raise ValueError("on-policy sampling needs the end-of-turn id (eos_id)")
        # per training batch: (value, weight); the weight is 1, or a DDP process's share of an uneven last step
        # (`_real_rows`), so that the logged means are those of one process
        self._metric_sums: dict[str, list[tuple[float, float]]] = defaultdict(list)
        self._micro = (-1, 0)  # (global step, micro-batch within its gradient accumulation): see _real_rows

    def _real_rows(self, rows: int) -> tuple[int, int] | None:
        """Under DDP, for the local batch about to be trained on: (pairs of it that are real, real pairs in the
        global batch), or None when the global batch is full.

        accelerate evens the last batches of an epoch out by appending pairs from the epoch's start
        (`BatchSamplerShard`, ``even_batches``): the local batch of micro-step m on process k holds the pairs at
        positions (m·W + k)·B ... of the epoch's order, the real ones first, then those repeats. One process
        trains on the short last batch alone; here each process keeps its real pairs only and weighs its loss
        by W·r_k / N, so that DDP's mean over processes is the mean over the N real pairs, as one process has it.
        """
        world = int(self.args.world_size)
        if world <= 1 or self.train_dataset is None:
            return None
        gs = int(self.state.global_step)
        step, j = self._micro
        self._micro = (gs, j + 1 if step == gs else 0)
        b, ga, n = int(self.args.per_device_train_batch_size), int(self.args.gradient_accumulation_steps), \
            len(self.train_dataset)
        local_batches = math.ceil(math.ceil(n / b) / world)  # per process per epoch, evened out
        updates = max(1, math.ceil(local_batches / ga))
        m = (gs % updates) * ga + self._micro[1]  # the micro-batch's place in the epoch
        real_global = min(world * b, max(0, n - m * world * b))
        if real_global >= world * b or rows != b:
            return None
        mine = min(b, max(0, n - (m * world + int(self.args.process_index)) * b))
        return mine, real_global

    def _get_train_sampler(self, train_dataset: Any = None) -> Any:
        if not self.length_buckets:
            return super()._get_train_sampler(train_dataset)
        from tvkd.training.sampler import LengthBucketSampler, pair_lengths

        data = train_dataset if train_dataset is not None else self.train_dataset
        seed = self.args.data_seed if self.args.data_seed is not None else self.args.seed
        return LengthBucketSampler(pair_lengths(data), self.args.train_batch_size * self.args.gradient_accumulation_steps,
                                   seed)

    def _frozen(self, model: Any) -> Any:
        if model is None:
            return None
        model = model.to(self.args.device).eval()
        for p in model.parameters():
            p.requires_grad_(False)
        return model

    @torch.no_grad()
    def _online_logits(self, model: Any, inputs: dict[str, Any], vocab: int | None = None) -> torch.Tensor:
        z = state_logits(model, inputs["input_ids"], inputs["attention_mask"], inputs["prompt_lens"],
                         inputs["resp_lens"])
        return z[..., :vocab] if vocab is not None else z

    def _student_scores(self, model: Any, inputs: dict[str, Any]) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(per-token log-probs [2B, T], logits [2B, T, V] if the loss reads them), by the configured path."""
        if self.logprob_chunk or self.padding_free:
            got = student_scores(model, inputs, chunk=self.logprob_chunk, packed=self.padding_free,
                                 logits=self.needs_student_logits)
            if got is not None:
                parts = ["padding-free" if self.padding_free else "padded"]
                if self.logprob_chunk and not self.needs_student_logits:
                    parts.append(f"chunked({self.logprob_chunk})")
                else:
                    parts.append("full logits" + (" (the loss reads the student's logits)"
                                                  if self.logprob_chunk else ""))
                self.logprob_path = ", ".join(parts)
                return got
            self.logprob_path = "full logits (the model's LM head is not a plain linear layer)"
        z = state_logits(model, inputs["input_ids"], inputs["attention_mask"], inputs["prompt_lens"],
                         inputs["resp_lens"])
        return token_logps(z, inputs["response_ids"], inputs["response_mask"]), (z if self.needs_student_logits else None)

    def _reference_logits(self, model: Any, inputs: dict[str, Any]) -> torch.Tensor | None:
        """π_ref logits online (Needs.reference_logits): from the frozen reference model, or, when the student
        trains a LoRA adapter (`train.lora`), from the student itself with the adapter disabled (its base
        weights are the reference), so no second model is held in memory."""
        if self.reference_model is not None:
            return self._online_logits(self.reference_model, inputs)
        if not self.reference_from_base:
            return None
        inner = self.accelerator.unwrap_model(model)
        with torch.no_grad(), inner.disable_adapter():
            return state_logits(model, inputs["input_ids"], inputs["attention_mask"], inputs["prompt_lens"],
                                inputs["resp_lens"])

    def scored_batch(self, model: Any, inputs: dict[str, Any]) -> ScoredBatch:
        logps, z = self._student_scores(model, inputs)
        mask = inputs["response_mask"]
        T1 = mask.shape[1] + 1
        state_mask = torch.arange(T1, device=mask.device)[None, :] <= inputs["resp_lens"][:, None]
        return ScoredBatch(
            logps=logps,
            mask=mask,
            ref_logps=inputs.get("ref_logps"),
            logits=z,
            columns={k[4:]: v for k, v in inputs.items() if k.startswith("col:")},
            state_mask=state_mask,
            pair_index=inputs.get("pair_index"),
            token_ids=inputs["response_ids"],
            ref_logits=self._reference_logits(model, inputs),
            teacher_logits=(self._online_logits(self.teacher_model, inputs, self.teacher_vocab)
                            if self.teacher_model is not None else None),
        )

    def _sample_on_policy(self, model: Any, inputs: dict[str, Any]) -> dict[str, Any]:
        """The batch with its responses replaced by samples of the current student (GKD's on-policy step).

        The coin and the sampling seed come from Python's `random`, whose state a checkpoint saves,
        so a resumed run draws the same coins as an uninterrupted one (as TRL's GKDTrainer draws them).
        """
        from tvkd.generation import generate_ids

        B = inputs["input_ids"].shape[0] // 2
        prompts = [inputs["input_ids"][i, : int(inputs["prompt_lens"][i])].tolist() for i in range(B)]
        pad_id = int(self.data_collator.pad_id)
        samples = generate_ids(self.accelerator.unwrap_model(model), prompts, eos_id=self.eos_id, pad_id=pad_id,
                               max_new_tokens=self.on_policy.max_new_tokens, do_sample=True,
                               temperature=self.on_policy.temperature, seed=random.randrange(2**31),
                               batch_size=B, backend="hf")  # the live student: its weights change every step
        feats = [{"prompt_ids": p, "chosen_ids": s[0], "rejected_ids": s[0]} for p, s in zip(prompts, samples)]
        new = {k: v.to(inputs["input_ids"].device) for k, v in collate_pairs(feats, pad_id).items()}
        keep = {k: v for k, v in inputs.items() if k == "pair_index" or (k.startswith("col:") and v.dim() == 1)}
        return {**new, **keep}

    def compute_loss(self, model: Any, inputs: dict[str, Any], return_outputs: bool = False,
                     num_items_in_batch: Any = None) -> Any:
        real = self._real_rows(int(inputs["input_ids"].shape[0]) // 2) if model.training else None
        if real is not None:
            mine, total = real
            if mine == 0:  # only repeats here: a zero loss that still takes part in DDP's gradient reduction
                return self.scored_batch(model, inputs).logps.sum() * 0.0
            inputs = _first_pairs(inputs, mine, getattr(self.data_collator, "batch_columns", {}))
            weight = float(self.args.world_size) * mine / total
        w = weight if real is not None else 1.0
        sampled = False
        if self.on_policy is not None and model.training and random.random() < self.on_policy.fraction:
            inputs, sampled = self._sample_on_policy(model, inputs), True
        batch = self.scored_batch(model, inputs)
        out: LossOutput = self.loss_fn(batch, self.loss_config)
        if not torch.isfinite(out.loss.detach()).all():
            self._raise_non_finite(out, inputs)
        if model.training:
            with torch.no_grad():
                seq = batch.sequence_logps()
                cw, rj = batch.split(seq)
                self._metric_sums["logps/chosen"].append((cw.mean().item(), w))
                self._metric_sums["logps/rejected"].append((rj.mean().item(), w))
                if self.on_policy is not None:
                    self._metric_sums["on_policy"].append((float(sampled), w))
                for k, v in out.metrics.items():
                    self._metric_sums[k].append(
                        (float(v.detach().float().mean().item()) if torch.is_tensor(v) else float(v), w))
        loss = out.loss * weight if real is not None else out.loss
        return (loss, {"margins": out.margins}) if return_outputs else loss

    def _raise_non_finite(self, out: LossOutput, inputs: dict[str, Any]) -> None:
        import glob
        import os

        ckpts = sorted(glob.glob(os.path.join(self.args.output_dir, "checkpoint-*")),
                       key=lambda p: int(p.rsplit("-", 1)[-1]) if p.rsplit("-", 1)[-1].isdigit() else -1)
        pairs = inputs.get("pair_index")
        raise NonFiniteLossError(
            f"loss is {out.loss.item()} at step {self.state.global_step} (epoch {self.state.epoch or 0:.2f}) "
            f"for training pairs {pairs.tolist() if pairs is not None else '?'}; training stopped before the "
            f"optimizer step. Last good checkpoint: {ckpts[-1] if ckpts else 'none (save_strategy=no)'}. "
            "Try a lower learning rate, check those pairs' cached teacher values for inf/NaN, or a smaller alpha."
        )

    def log(self, logs: dict[str, float], *args: Any, **kwargs: Any) -> None:
        if "loss" in logs:  # a training log (every process logs together): add the loss's own metrics
            sums: dict[str, tuple[float, float]] = {}
            for k, vals in self._metric_sums.items():
                finite = [(v, w) for v, w in vals if math.isfinite(v)]
                sums[k] = (sum(v * w for v, w in finite), sum(w for _, w in finite))
            if self.args.world_size > 1:  # DDP: the means over every process's pairs, as the loss is
                sums = _merge_across_processes(sums, self.args.world_size)
            for k, (total, n) in sums.items():
                if n:
                    logs[k] = total / n
            self._metric_sums.clear()
        super().log(logs, *args, **kwargs)

    def _save_checkpoint(self, model: Any, trial: Any) -> None:
        super()._save_checkpoint(model, trial)
        # The loss summed over every step so far (this process's share): the Trainer's train_loss of a
        # resumed attempt covers only the steps after the checkpoint, this file gives the steps before.
        from pathlib import Path

        folder = Path(self.args.output_dir) / f"checkpoint-{self.state.global_step}"
        folder.mkdir(parents=True, exist_ok=True)
        total = self.loss_before_resume + self._total_loss_scalar + float(self._tr_loss.item())
        (folder / LOSS_SUM_FILE.format(rank=self.args.process_index)).write_text(
            json.dumps({"global_step": self.state.global_step, "loss_sum": total}) + "\n")

    loss_before_resume: float = 0.0  # the loss summed over the steps before the checkpoint resumed from

    def _load_rng_state(self, checkpoint: str | None) -> None:
        # A non-main DDP process resumes from the main process's checkpoint but keeps its RNG state in
        # its own output dir (it writes nothing in the run folder): read it from there.
        if checkpoint is not None and self.args.world_size > 1 and self.args.process_index > 0:
            from pathlib import Path

            own = Path(self.args.output_dir) / Path(checkpoint).name
            if (own / f"rng_state_{self.args.process_index}.pth").is_file():
                checkpoint = str(own)
        super()._load_rng_state(checkpoint)


def _first_pairs(inputs: dict[str, Any], k: int, columns: dict[str, str]) -> dict[str, Any]:
    """The batch `PreferenceCollator` makes of the first ``k`` pairs alone: rows [0, k) and [B, B + k) of the
    [2B, ...] tensors (chosen first), [0, k) of the per-pair ones, cut to these rows' own padded widths."""
    b = int(inputs["input_ids"].shape[0]) // 2
    out: dict[str, Any] = {}
    for key, v in inputs.items():
        if torch.is_tensor(v) and v.dim() > 0 and v.shape[0] == 2 * b:
            out[key] = torch.cat([v[:k], v[b: b + k]])
        elif torch.is_tensor(v) and v.dim() > 0 and v.shape[0] == b:
            out[key] = v[:k]
        else:
            out[key] = v
    t = int(out["resp_lens"].max())  # the widths collate_pairs gives these rows
    width = int((out["prompt_lens"] + out["resp_lens"]).max())
    for key in ("input_ids", "attention_mask"):
        out[key] = out[key][:, :width]
    for key in ("response_ids", "response_mask", "ref_logps"):
        if key in out:
            out[key] = out[key][:, :t]
    for name, kind in columns.items():
        key = f"col:{name}"
        if key in out and kind in ("token", "topk", "state"):
            out[key] = out[key][:, : t + (kind == "state")]
    return out


def _merge_across_processes(sums: dict[str, tuple[float, float]], world_size: int
                            ) -> dict[str, tuple[float, float]]:
    """{metric: (sum, count)} summed over every process (a collective on the default group)."""
    import torch.distributed as dist

    gathered: list[Any] = [None] * world_size
    dist.all_gather_object(gathered, sums)
    out: dict[str, tuple[float, float]] = {}
    for part in gathered:
        for k, (total, n) in (part or {}).items():
            t, c = out.get(k, (0.0, 0.0))
            out[k] = (t + total, c + n)
    return out


LOSS_SUM_FILE = "tvkd_loss_sum_{rank}.json"


def _loss_sum_before(resume: Any, out_dir: Any, rank: int) -> float | None:
    """The training loss summed over the steps before checkpoint `resume` (this process's share), or None
    for a checkpoint that does not record it. A non-main DDP process reads its own copy (`out_dir`)."""
    from pathlib import Path

    for folder in (Path(out_dir) / Path(resume).name, Path(resume)):
        path = folder / LOSS_SUM_FILE.format(rank=rank)
        try:
            record = json.loads(path.read_text())
        except (OSError, ValueError):
            continue
        if isinstance(record, dict) and isinstance(record.get("loss_sum"), (int, float)):
            return float(record["loss_sum"])
    return None


def last_checkpoint(out_dir: Any) -> Any:
    """The newest complete ``checkpoint-<step>`` folder under `out_dir`, or None."""
    from pathlib import Path

    found = [p for p in Path(out_dir).glob("checkpoint-*")
             if p.name.split("-")[-1].isdigit() and (p / "trainer_state.json").is_file()]
    return max(found, key=lambda p: int(p.name.split("-")[-1]), default=None)


class _NoArgumentsPickle:
    """Deletes the `training_args.bin` transformers writes into each checkpoint.

    It is a pickle of the TrainingArguments, credentials included (`hub_token`); resuming does
    not read it, and a results store must hold no secret and nothing that needs unpickling.
    """

    def __new__(cls):
        from transformers import TrainerCallback

        class Callback(TrainerCallback):
            def on_save(self, args, state, control, **kwargs):
                from pathlib import Path

                for p in Path(args.output_dir).glob("**/training_args.bin"):
                    p.unlink(missing_ok=True)

        return Callback()


def _checkpointing_arguments(on: bool) -> dict[str, Any]:
    """TrainingArguments for activation (gradient) checkpointing, under the name this transformers uses;
    non-reentrant, which needs no input gradients (LoRA) and gives the same gradients as without it."""
    import dataclasses

    from transformers import TrainingArguments

    fields = {f.name for f in dataclasses.fields(TrainingArguments)}
    name = "activation_checkpointing" if "activation_checkpointing" in fields else "gradient_checkpointing"
    return {name: on, f"{name}_kwargs": {"use_reentrant": False} if on else None}


def training_arguments(cfg: Any, out_dir: Any, *, progress: bool = False) -> Any:
    """The `transformers.TrainingArguments` of a run (`cfg`: its `RunConfig`), checkpointing into `out_dir`."""
    from transformers import TrainingArguments

    from tvkd.modeling import resolve_device

    m, t = cfg.models, cfg.train
    device = resolve_device("auto")
    return TrainingArguments(
        output_dir=str(out_dir), seed=cfg.seed, data_seed=cfg.seed, learning_rate=t.learning_rate,
        num_train_epochs=t.num_train_epochs, per_device_train_batch_size=t.per_device_train_batch_size,
        gradient_accumulation_steps=t.gradient_accumulation_steps, lr_scheduler_type=t.lr_scheduler_type,
        warmup_steps=t.warmup_steps, weight_decay=t.weight_decay, max_grad_norm=t.max_grad_norm,
        logging_steps=t.logging_steps, save_strategy=t.save_strategy, save_steps=t.save_steps,
        report_to=list(t.report_to) or "none", remove_unused_columns=False, use_cpu=device.type == "cpu",
        bf16=device.type == "cuda" and m.dtype in ("auto", "bf16", "bfloat16") and torch.cuda.is_bf16_supported(),
        disable_tqdm=not progress, dataloader_num_workers=0, **_checkpointing_arguments(t.gradient_checkpointing),
        # DDP: every weight of the student gets a gradient each step, so DDP need not search the graph
        # for unused ones (transformers' default for a model without gradient checkpointing is to)
        **{"ddp_find_unused_parameters": False, **t.extra},
    )


def check_arguments(cfg: Any) -> None:
    """Build the run's `TrainingArguments` once, in a dry mode (nothing is written), so that transformers' own
    checks of every value (`train.lr_scheduler_type`, `train.extra.optim`, ...) and of the `train.report_to`
    integrations run before the run folder exists. A refusal is a ValueError naming the key."""
    import tempfile
    from pathlib import Path

    from transformers.integrations import get_reporting_integration_callbacks

    t = cfg.train
    try:
        args = training_arguments(cfg, Path(tempfile.gettempdir()) / "tvkd-dry-run-not-written")
    except Exception as e:  # noqa: BLE001 - transformers raises ValueError, TypeError, ImportError, ...
        raise ValueError(f"{_argument_key(e, cfg)}: transformers.TrainingArguments refuses it: "
                         f"{' '.join(str(e).split())}") from None
    try:
        for callback in get_reporting_integration_callbacks(args.report_to):
            callback()  # each checks that its package is installed (WandbCallback needs wandb)
    except Exception as e:  # noqa: BLE001 - RuntimeError for a missing package, ValueError for an unknown name
        raise ValueError(f"train.report_to {list(t.report_to)}: {' '.join(str(e).split())}; install it, or remove "
                         "it from train.report_to") from None


def _argument_key(error: BaseException, cfg: Any) -> str:
    """The config key whose value a TrainingArguments error names (its value appears in the message)."""
    text = str(error)
    t = cfg.train
    candidates = [(f"train.extra.{k}", v) for k, v in (t.extra or {}).items()] + [
        (f"train.{k}", getattr(t, k)) for k in ("lr_scheduler_type", "save_strategy", "warmup_steps")]
    for key, value in candidates:
        if key.rsplit(".", 1)[-1] in text or (isinstance(value, str) and value and value in text):
            return key
    return "train"


def varlen_attention(padding_free: bool, device_type: str, dtype: Any) -> bool:
    """Whether a padding-free student should attend through flash-attention's varlen kernels: padding-free
    on, a CUDA device, a 16-bit dtype (flash-attention's), and `flash_attn` installed. Under sdpa a
    packed row gets a block-diagonal mask over the whole pack, whose attention costs (Σ S)² instead
    of Σ S² (`tvkd bench --shapes paper` measures both)."""
    import importlib.util

    return (bool(padding_free) and device_type == "cuda" and dtype in (torch.bfloat16, torch.float16)
            and importlib.util.find_spec("flash_attn") is not None)


def prepare_policy(policy: Any, train_cfg: Any) -> tuple[Any, dict[str, Any]]:
    """The student as `train_cfg` (a `TrainConfig`) trains it: a LoRA adapter (`train.lora`, peft) and
    compiled decoder layers (`train.compile`); and the options as recorded in the run's metrics."""
    options: dict[str, Any] = {
        "dtype": str(next(policy.parameters()).dtype).replace("torch.", ""),
        "logprob_chunk": train_cfg.logprob_chunk, "padding_free": train_cfg.padding_free,
        "gradient_checkpointing": train_cfg.gradient_checkpointing, "compile": train_cfg.compile,
    }
    if getattr(train_cfg, "length_buckets", False):
        options["length_buckets"] = True
    param = next(policy.parameters())  # the Trainer moves the policy to the GPU when there is one
    if varlen_attention(train_cfg.padding_free, "cuda" if torch.cuda.is_available() else param.device.type,
                        param.dtype):
        policy.set_attn_implementation("flash_attention_2")
        options["attention"] = "flash_attention_2"
    if train_cfg.lora:
        from peft import LoraConfig, get_peft_model

        from tvkd.config import check_lora

        kwargs = check_lora(train_cfg.lora)
        policy = get_peft_model(policy, LoraConfig(task_type="CAUSAL_LM", **kwargs))
        trainable = sum(p.numel() for p in policy.parameters() if p.requires_grad)
        total = sum(p.numel() for p in policy.parameters())
        options["lora"] = {**{k: (list(v) if isinstance(v, (set, tuple)) else v) for k, v in kwargs.items()},
                           "trainable_parameters": trainable, "all_parameters": total}
    if train_cfg.compile:
        decoder = policy.get_decoder() if hasattr(policy, "get_decoder") else None
        layers = getattr(decoder, "layers", None)
        if layers is None:
            raise ValueError("train.compile: the model has no decoder layers to compile (get_decoder().layers)")
        for layer in layers:  # the layers, not the whole model: the LM head's pre-hook stays outside the graph
            layer.compile()
    return policy, options


def train_policy(student: str, train: Any, loss: PreferenceLoss, loss_cfg: Any, *, cfg: Any, out_dir: Any,
                 pad_id: int, progress: bool, say: Any = print, reference: Any = None, teacher: Any = None,
                 teacher_vocab: int | None = None, eos_id: int | None = None,
                 callbacks: list | None = None, resume: Any = "auto") -> tuple[Any, dict[str, Any]]:
    """Train the student from `student` (a folder or hub id) on `train`; (trained policy, metrics).

    `cfg` is the run's `RunConfig` (models, train and seed sections). Checkpoints go to
    `out_dir`; a run restarted with a checkpoint there resumes from the last one (optimizer,
    scheduler, RNG states and data order included, so it ends where an uninterrupted run would).
    `resume`: "auto" (that last checkpoint), or the checkpoint folder to resume from, or None.

    Under a multi-process launch (see `tvkd.distributed`) the Trainer trains with DDP:
    ``per_device_train_batch_size`` pairs per process per step, so the global batch is that x
    processes x gradient accumulation, and each process reads its own share of the same seeded
    order (`data_seed`). Every process must call this with the same `resume`; the losses and the
    loss's metrics logged, and ``train_loss``, are means over every process's pairs.
    """
    from pathlib import Path

    from transformers.trainer_callback import PrinterCallback

    from tvkd.modeling import load_causal_lm

    m, t = cfg.models, cfg.train
    needs = loss.needs(loss_cfg)
    policy = load_causal_lm(student, dtype=m.dtype, trust_remote_code=m.trust_remote_code, eval_mode=False)
    policy, options = prepare_policy(policy, t)
    out_dir = Path(out_dir)
    args = training_arguments(cfg, out_dir, progress=progress)
    collator = PreferenceCollator(pad_id=pad_id, batch_columns=loss.batch_columns(loss_cfg), reference=needs.reference)
    online = {}
    if needs.reference_logits and t.lora:
        online["reference_from_base"] = True  # the adapter disabled gives the initial weights: no second model
    elif needs.reference_logits:
        online["reference_model"] = reference.get()
    if needs.teacher_logits:
        online.update(teacher_model=teacher.get(), teacher_vocab=teacher_vocab)
    if needs.on_policy is not None:
        online.update(on_policy=needs.on_policy, eos_id=eos_id)
    trainer = PreferenceTrainer(model=policy, args=args, train_dataset=train, data_collator=collator, loss=loss,
                                loss_config=loss_cfg, needs_student_logits=needs.student_logits,
                                callbacks=[_NoArgumentsPickle(), *(callbacks or [])], logprob_chunk=t.logprob_chunk,
                                padding_free=t.padding_free, length_buckets=getattr(t, "length_buckets", False),
                                **online)
    if not progress:
        trainer.remove_callback(PrinterCallback)
    if isinstance(resume, str) and resume == "auto":
        resume = last_checkpoint(out_dir) if t.save_strategy != "no" else None
    resume = Path(resume) if resume is not None else None
    if resume is not None:
        say(f"  resuming from {resume.name} (step {resume.name.split('-')[-1]} of an interrupted attempt)")
    resumed_step = int(resume.name.split("-")[-1]) if resume is not None else 0
    before = _loss_sum_before(resume, out_dir, args.process_index) if resume is not None else 0.0
    trainer.loss_before_resume = before or 0.0
    result = trainer.train(resume_from_checkpoint=str(resume) if resume is not None else None)
    world = max(1, int(args.world_size))
    train_loss = float(result.training_loss)  # the Trainer's: the mean over the steps of this attempt only
    if resume is not None and before is not None:
        steps_now = int(result.global_step) - resumed_step
        train_loss = (before + train_loss * steps_now) / max(int(result.global_step), 1)
    if world > 1:
        # The Trainer's train_loss adds each process's own loss of the steps after the last log; the
        # logged part is already the all-process mean, so the mean over processes is the global value.
        import torch.distributed as dist

        total = torch.tensor([train_loss], dtype=torch.float64, device=args.device)
        dist.all_reduce(total)
        train_loss = float(total.item()) / world
    metrics: dict[str, Any] = {
        "resumed_from_step": resumed_step,
        "train_loss": train_loss,
        "train_steps": int(result.global_step),
        "train_pairs": len(train),
        "train_seconds": float(result.metrics.get("train_runtime", 0.0)),
        "train_processes": world,
        "train_global_batch": t.per_device_train_batch_size * world * t.gradient_accumulation_steps,
    }
    if resume is not None and before is None:  # a checkpoint written before the loss sum was recorded
        metrics["train_loss_steps"] = f"{resumed_step + 1}-{int(result.global_step)} (the resumed part only)"
    metrics["train_options"] = {**options, "bf16_autocast": bool(args.bf16), "logprob_path": trainer.logprob_path}
    logged = [h for h in trainer.state.log_history if "loss" in h]
    if logged:
        metrics["train_log_first"] = {k: v for k, v in logged[0].items() if isinstance(v, (int, float))}
        metrics["train_log_last"] = {k: v for k, v in logged[-1].items() if isinstance(v, (int, float))}
    if t.lora:  # evaluation and saving see a plain model: the adapter folded into the base weights
        policy = trainer.accelerator.unwrap_model(policy).merge_and_unload()
    policy.eval()
    for source in (reference, teacher):
        if source is not None:
            source.release()
    return policy, metrics
