"""The testbed's training stages on TRL: SFT (``SFTTrainer``) and DPO (``DPOTrainer``).

Both run on CPU in fp32 (``use_cpu=True, bf16=False, gradient_checkpointing=False``), log to
nothing (``report_to=[]``), save no checkpoints, and leave their output folder to the caller,
who deletes it: a stage folder holds only the final model, its tokenizer and the stage record.

SFT loss mask. The loss covers each assistant turn's content and its ``<eot>`` (the template's
``{% generation %}`` span) and, in two-turn conversations, the ``<user>`` token that follows an
assistant ``<eot>``. That last token is the point of the two-turn demonstrations: at γ = 1 the
TVKD offset is the teacher's value at the state after EOS (docs/testbed.md §4), and a teacher that
only ever saw single-turn data ending in ``<eot>`` was never trained at that state. Here it has
learned what follows an ended turn, as a chat LLM has. Prompt words are not trained on: they are
uniform random symbols, i.e. pure noise for the model.
"""

from __future__ import annotations

import contextlib
import os
import warnings
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

from transformers import PreTrainedModel, PreTrainedTokenizerBase

_COMMON = {
    "use_cpu": True,
    "bf16": False,
    "fp16": False,
    # = gradient_checkpointing=False; transformers 5 renamed it and warns on the old name.
    "activation_checkpointing": False,
    "report_to": [],
    "save_strategy": "no",
    "eval_strategy": "no",
    "lr_scheduler_type": "cosine",
    "weight_decay": 0.0,
    "dataloader_num_workers": 0,
    "dataloader_pin_memory": False,
}


def sft_features(
    tokenizer: PreTrainedTokenizerBase, messages: Sequence[dict[str, Any]]
) -> dict[str, list[int]]:
    """``input_ids`` and the loss mask (``assistant_masks``) of one SFT conversation."""
    out = tokenizer.apply_chat_template(
        list(messages), tokenize=True, return_dict=True, return_assistant_tokens_mask=True
    )
    ids, mask = list(out["input_ids"]), list(out["assistant_masks"])
    user_id = tokenizer.convert_tokens_to_ids("<user>")
    for i in range(1, len(ids)):
        # The hand-off after an ended assistant turn: trains the post-EOS (terminal) state.
        if ids[i] == user_id and ids[i - 1] == tokenizer.eos_token_id and mask[i - 1]:
            mask[i] = 1
    return {"input_ids": ids, "assistant_masks": mask}


def _quiet_datasets(progress: bool) -> None:
    import datasets

    if progress:
        datasets.enable_progress_bars()
    else:
        datasets.disable_progress_bars()


def train_sft(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    conversations: Sequence[Sequence[dict[str, Any]]],
    *,
    output_dir: str | os.PathLike,
    epochs: float,
    learning_rate: float,
    batch_size: int,
    warmup_ratio: float,
    seed: int,
    progress: bool,
) -> tuple[PreTrainedModel, list[dict[str, Any]]]:
    """Supervised fine-tuning with TRL's ``SFTTrainer``; returns the model and the loss log."""
    from datasets import Dataset
    from trl import SFTConfig, SFTTrainer

    _quiet_datasets(progress)
    dataset = Dataset.from_list([sft_features(tokenizer, m) for m in conversations])
    args = SFTConfig(
        output_dir=str(output_dir),
        num_train_epochs=epochs,
        learning_rate=learning_rate,
        per_device_train_batch_size=batch_size,
        warmup_steps=warmup_ratio,
        train_sampling_strategy="group_by_length",  # two-turn conversations are twice as long: pad less
        seed=seed,
        data_seed=seed,
        logging_steps=max(1, len(dataset) // batch_size),
        disable_tqdm=not progress,
        max_length=None,
        packing=False,
        assistant_only_loss=False,  # the mask is already in `assistant_masks`, built above
        **_COMMON,
    )
    with _known_warnings():
        trainer = SFTTrainer(model=model, args=args, train_dataset=dataset, processing_class=tokenizer)
        _train(trainer, progress)
    return trainer.model, _losses(trainer)


def train_dpo(
    model: PreTrainedModel,
    ref_model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    pairs: Sequence[dict[str, Any]],
    *,
    output_dir: str | os.PathLike,
    beta: float,
    epochs: float,
    learning_rate: float,
    batch_size: int,
    warmup_steps: int,
    seed: int,
    progress: bool,
) -> tuple[PreTrainedModel, list[dict[str, Any]]]:
    """DPO (sigmoid loss, Rafailov et al. 2023) with TRL's ``DPOTrainer``; reference log-probs precomputed.

    L = −log σ(β·[(log π_θ(y_w|x) − log π_ref(y_w|x)) − (log π_θ(y_l|x) − log π_ref(y_l|x))]).
    """
    from datasets import Dataset
    from trl import DPOConfig, DPOTrainer

    _quiet_datasets(progress)
    dataset = Dataset.from_list(
        [{"prompt": p["prompt"], "chosen": p["chosen"], "rejected": p["rejected"]} for p in pairs]
    )
    args = DPOConfig(
        output_dir=str(output_dir),
        beta=beta,
        loss_type=["sigmoid"],
        num_train_epochs=epochs,
        learning_rate=learning_rate,
        per_device_train_batch_size=batch_size,
        warmup_steps=warmup_steps,
        seed=seed,
        data_seed=seed,
        logging_steps=max(1, len(dataset) // batch_size),
        disable_tqdm=not progress,
        precompute_ref_log_probs=True,  # one reference pass instead of one per step
        precompute_ref_batch_size=256,
        max_length=None,
        **_COMMON,
    )
    with _known_warnings():
        trainer = DPOTrainer(
            model=model, ref_model=ref_model, args=args, train_dataset=dataset, processing_class=tokenizer
        )
        _train(trainer, progress)
    return trainer.model, _losses(trainer)


def _train(trainer: Any, progress: bool) -> None:
    """Run training; without progress, drop the callback that prints every log line."""
    from transformers.trainer_callback import PrinterCallback

    if not progress:
        trainer.remove_callback(PrinterCallback)
    trainer.train()


@contextlib.contextmanager
def _known_warnings() -> Iterator[None]:
    with warnings.catch_warnings():
        # TRL 1.16 still calls the renamed `is_gradient_checkpointing`; nothing to act on here.
        warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*", category=FutureWarning)
        yield


def _losses(trainer: Any) -> list[dict[str, Any]]:
    """The trainer's log history, kept small: the numbers only."""
    return [
        {
            k: (round(v, 6) if isinstance(v, float) else v)
            for k, v in row.items()
            if isinstance(v, (int, float))
        }
        for row in trainer.state.log_history
    ]


def save_model(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, folder: str | os.PathLike) -> None:
    """Save weights (safetensors), config, generation config and the tokenizer into one folder."""
    folder = Path(folder)
    model.save_pretrained(str(folder), safe_serialization=True)
    tokenizer.save_pretrained(str(folder))
