"""Contrast models: a DPO model and a reverse-DPO model trained from the student's initialisation on
the training pairs, and their per-token log-probs of every response (TIS-DPO's token weights).

TIS-DPO (Liu et al., 2025; docs/methods.md §B.4.5) estimates how much each token matters from
log π_rev(y_t) − log π_dpo(y_t), where π_dpo is DPO-trained on the pairs and π_rev on the same pairs
with chosen and rejected swapped. Both are trained here by this harness's own trainer and `dpo`
loss (the reference is the initialisation, its log-probs from the reference cache), saved as model
folders, and content-addressed by (tokenized pairs, initialisation, training settings), so every
TIS-DPO run on the same data reuses them. The per-token log-probs come from the reference-cache
pass over each model.

The schedule is cosine with no warm-up: a linear warm-up starts at a learning rate of 0, so on a
small data set (one or a few batches) the models would take their only step at 0, stay equal to
the initialisation, and every raw importance would be tied at 0, leaving the token weights to
the tie-breaking rule. The mean |log π_model − log π_ref| per token is reported for both models.
"""

from __future__ import annotations

import copy
import shutil
from pathlib import Path
from typing import Any

from tvkd.api import CONTRAST_PREFIX, LOSSES, ContrastModels, build_config
from tvkd.paths import cache_root, fingerprint
from tvkd.storage import cached_stage
from tvkd.tokenize import TokenizedData

CONTRAST_VERSION = 2  # 2: no warm-up (version 1 could take its only step at a learning rate of 0)
SIDES = ("chosen", "rejected")


def _swapped(dataset: Any) -> Any:
    """The pairs with chosen and rejected exchanged (every per-side column too)."""
    mapping = {}
    for c in dataset.column_names:
        for a, b in (("chosen", "rejected"), ("rejected", "chosen")):
            if c.startswith(a):
                mapping[c] = b + c[len(a):]
    tmp = {c: f"__swap__{c}" for c in mapping}
    return dataset.rename_columns(tmp).rename_columns({f"__swap__{c}": t for c, t in mapping.items()})


def _train_dpo(dataset: Any, init: Any, spec: ContrastModels, pad_id: int, out: Path, seed: int,
               progress: bool) -> None:
    from transformers import TrainingArguments
    from transformers.trainer_callback import PrinterCallback

    from tvkd.training.trainer import PreferenceCollator, PreferenceTrainer, training_columns

    loss_cls = LOSSES.get("dpo")
    loss, cfg = loss_cls(), build_config(loss_cls, {"beta": spec.beta})
    policy = copy.deepcopy(init.get()).float().train()  # the initialisation stays untouched for the run
    args = TrainingArguments(output_dir=str(out / "trainer"), seed=seed, data_seed=seed,
                             learning_rate=spec.learning_rate, num_train_epochs=spec.epochs,
                             per_device_train_batch_size=spec.batch_size, lr_scheduler_type="cosine",
                             warmup_steps=0, save_strategy="no", report_to="none", remove_unused_columns=False,
                             use_cpu=next(policy.parameters()).device.type == "cpu", disable_tqdm=not progress,
                             logging_steps=10_000)
    trainer = PreferenceTrainer(model=policy, args=args, train_dataset=training_columns(dataset, {}, True),
                                data_collator=PreferenceCollator(pad_id, {}, True), loss=loss, loss_config=cfg)
    trainer.remove_callback(PrinterCallback)
    trainer.train()
    shutil.rmtree(out / "trainer", ignore_errors=True)
    policy.save_pretrained(str(out))


def _mean_abs_shift(model_logps: Any, reference_logps: Any) -> float:
    """Mean over response tokens of |log π_model − log π_ref| (0: the model did not move)."""
    import numpy as np

    total, count = 0.0, 0
    for side in SIDES:
        for m, r in zip(model_logps[f"{side}/ref_logps"], reference_logps[f"{side}/ref_logps"]):
            total += float(np.abs(np.asarray(m, float) - np.asarray(r, float)).sum())
            count += len(m)
    return total / max(count, 1)


def contrast_logps(tokenized: TokenizedData, reference_logps: Any, init: Any, spec: ContrastModels, *, pad_id: int,
                   seed: int = 0, batch_size: int = 32, cache_dir: str | Path | None = None,
                   progress: bool = True, say: Any = lambda msg: None) -> Any:
    """``{side}/contrast:dpo_logps`` and ``{side}/contrast:rev_logps`` for every pair (a `datasets.Dataset`).

    `reference_logps`: the reference cache of `tokenized` under `init` (``{side}/ref_logps``);
    `init`: the student's initialisation (`ModelSource` of a local folder).
    """
    import datasets

    from tvkd.cache.teacher import build_reference_cache
    from tvkd.modeling import ModelSource

    root = (Path(cache_dir) if cache_dir else cache_root() / "contrast_models")
    key = fingerprint(CONTRAST_VERSION, tokenized.fingerprint, init.key, vars(spec), seed)
    pairs = datasets.concatenate_datasets([tokenized.dataset, reference_logps], axis=1)
    parts = []
    for name, data in (("dpo", pairs), ("rev", _swapped(pairs))):
        stage = cached_stage(root / f"{key}-{name}",
                             lambda tmp, data=data: _train_dpo(data, init, spec, pad_id, tmp, seed, progress),
                             describe=f"the {name} contrast model")
        say(f"  contrast model {name} ({'cached' if stage.cached else 'trained'}): {stage.path}")
        init.release()
        model = ModelSource.from_path(stage.path, dtype="float32")
        lp = build_reference_cache(tokenized.dataset, tokenized.fingerprint, model, model.key, pad_id=pad_id,
                                   batch_size=batch_size, progress=progress)
        parts.append(lp.dataset.rename_columns({f"{s}/ref_logps": f"{s}/{CONTRAST_PREFIX}{name}_logps"
                                                for s in SIDES}))
        shift = _mean_abs_shift(lp.dataset, reference_logps)
        say(f"  contrast model {name}: mean |log-ratio to the initialisation| {shift:.3g} per token")
    return datasets.concatenate_datasets(parts, axis=1)
