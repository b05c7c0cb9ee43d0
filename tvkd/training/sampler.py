"""A length-bucketed, seeded order of the training pairs (`train.length_buckets`): less padding per batch.

A batch is padded to its longest sequence (prompt + the longer response), so a random batch of
DPO-MIX-like lengths (a long tail) spends much of its compute on padding. This order is
transformers' `get_length_grouped_indices`: a random permutation, cut into mega-batches of 50
batches (the whole set when it has fewer), each sorted by length (longest first), the longest
pair of all in the first batch, so an out-of-memory shows at step 1. Batches then hold pairs of similar length, and the order is still
random at the scale of mega-batches.

Seeded: the permutation of epoch e comes from a generator seeded with (seed, e), not from the
global RNG, so a run's order is a function of its seed alone and a resumed run sees the same
batches (the Trainer calls `set_epoch` on the sampler each epoch). Under DDP the Trainer's data
loader hands consecutive batches of this order to the processes in turn, as with its default sampler.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from typing import Any

import torch
from torch.utils.data import Sampler


def pair_lengths(dataset: Any) -> list[int]:
    """Tokens of each pair's longer sequence: prompt + max(chosen, rejected) (what a batch is padded to)."""
    cols = dataset.select_columns(["prompt_ids", "chosen_ids", "rejected_ids"]) if hasattr(dataset, "select_columns") \
        else dataset
    if hasattr(cols, "column_names"):
        rows = zip(cols["prompt_ids"], cols["chosen_ids"], cols["rejected_ids"])
    else:
        rows = ((r["prompt_ids"], r["chosen_ids"], r["rejected_ids"]) for r in cols)
    return [len(p) + max(len(c), len(r)) for p, c, r in rows]


class LengthBucketSampler(Sampler[int]):
    """Indices in `get_length_grouped_indices` order, from a generator seeded with (seed, epoch)."""

    def __init__(self, lengths: Sequence[int], batch_size: int, seed: int, mega_batch_mult: int | None = None):
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        self.lengths = list(lengths)
        self.batch_size = int(batch_size)
        self.seed = int(seed)
        self.mega_batch_mult = mega_batch_mult
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    def __len__(self) -> int:
        return len(self.lengths)

    def __iter__(self) -> Iterator[int]:
        from transformers.trainer_pt_utils import get_length_grouped_indices

        g = torch.Generator().manual_seed(self.seed * 1_000_003 + self.epoch)
        # 50 batches a mega-batch (the whole set when it has fewer; transformers' own default would cut a
        # small set into 4 mega-batches of a batch or two each, which buckets nothing)
        mult = self.mega_batch_mult or max(1, min(50, -(-len(self.lengths) // self.batch_size)))
        return iter(get_length_grouped_indices(self.lengths, self.batch_size, mult, generator=g))


def padding_fraction(lengths: Sequence[int], order: Sequence[int], batch_size: int) -> float:
    """The share of padded positions when `order` is cut into batches of `batch_size` (each padded to its longest)."""
    real = padded = 0
    for s in range(0, len(order), batch_size):
        batch = [lengths[i] for i in order[s:s + batch_size]]
        real += sum(batch)
        padded += max(batch) * len(batch)
    return 1.0 - real / max(padded, 1)
