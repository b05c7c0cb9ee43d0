"""The training set a loss asked for: the one place where `Needs` become caches and columns.

    tokenized pairs
      + reference log-probs      (Needs.reference: the reference cache)
      + teacher columns          (Needs.aux / Needs.topk: the teacher cache, one stage per column)
      -> pair_index, seeded subsample
      -> loss.prepare            (per-pair columns, e.g. the TVKD offset)
      -> only the columns the collator reads

Both `tvkd.pipeline` and `tvkd.bench` build their training sets here, so what a run trains on
and what the benchmark measures are assembled by the same code.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from tvkd.api import TEACHER_REFERENCE_PREFIX, AuxSpec, Needs, PreferenceLoss
from tvkd.cache.teacher import CacheResult, build_reference_cache, build_teacher_cache
from tvkd.cross_tokenizer import CrossTokenizerError, TeacherTokens, join_by_id, token_level_reason
from tvkd.modeling import ModelSource
from tvkd.tokenize import TokenizedData
from tvkd.training.trainer import training_columns


@dataclass(frozen=True)
class CacheOptions:
    batch_size: int = 32  # pairs per cache forward
    also: tuple[AuxSpec, ...] = ()  # further aux columns computed if a teacher pass runs anyway
    cache_dir: str | None = None  # default: $TVKD_CACHE


@dataclass
class TrainingSet:
    full: Any  # datasets.Dataset after `prepare`: every column, one row per training pair
    train: Any  # the columns the collator reads (what the trainer gets)
    needs: Needs
    caches: dict[str, CacheResult] = field(default_factory=dict)
    tokenized: TokenizedData | None = None  # the pairs trained on (with any rollouts in place)


def assemble_training_set(
    tokenized: TokenizedData,
    loss: PreferenceLoss,
    loss_cfg: Any,
    *,
    reference: ModelSource | None,
    teacher: ModelSource | None,
    pad_id: int,
    teacher_reference: ModelSource | None = None,
    student: ModelSource | None = None,
    eos_id: int | None = None,
    teacher_vocab: int | None = None,
    teacher_tokens: TeacherTokens | None = None,
    cache: CacheOptions = CacheOptions(),
    subsample: float | None = None,
    seed: int = 0,
    progress: bool = True,
    say: Callable[[str], None] = lambda msg: None,
) -> TrainingSet:
    """Compute (or load) exactly what `loss.needs(loss_cfg)` declares and join it to the pairs.

    `teacher_vocab`: the number of teacher logit rows shared with the student (checked by the
    caller), or None for all of them. `teacher_tokens`: the pairs in the teacher's own tokenization, for a
    teacher with another tokenizer (`tvkd.cross_tokenizer`): its cache is built on them and joined to the
    pairs by example id; only sequence-level teacher needs are allowed then.
    """
    import datasets

    needs = loss.needs(loss_cfg)
    reason = token_level_reason(loss.name, loss_cfg, needs) if teacher_tokens is not None else None
    if reason:
        raise CrossTokenizerError(f"the teacher's tokenizer differs from the student's, and loss {loss.name!r} {reason}")
    tokenized = _with_rollouts(tokenized, needs, teacher=teacher, student=student, pad_id=pad_id, eos_id=eos_id,
                               cache=cache, progress=progress, say=say)
    parts = [tokenized.dataset]
    caches: dict[str, CacheResult] = {}
    if needs.reference:
        if reference is None:
            raise ValueError(f"loss {loss.name!r} needs reference log-probs: set models.reference or models.student")
        rc = build_reference_cache(tokenized.dataset, tokenized.fingerprint, reference, reference.key,
                                   pad_id=pad_id, batch_size=cache.batch_size, cache_dir=_sub(cache, "reference"),
                                   progress=progress)
        say(f"  reference cache ({'cached' if rc.cached else 'built'}): {rc.path}")
        caches["reference"] = rc
        parts.append(rc.dataset)
    if needs.teacher and teacher is None:
        raise ValueError(f"loss {loss.name!r} needs a teacher: set models.teacher")
    if needs.aux or needs.topk:
        own = teacher_tokens.train if teacher_tokens is not None else tokenized
        tc = build_teacher_cache(own.dataset, own.fingerprint, teacher, teacher.key, needs.aux,
                                 topk=needs.topk, also=cache.also,
                                 vocab_size=teacher_vocab if teacher_tokens is None else None,
                                 pad_id=pad_id if teacher_tokens is None else teacher_tokens.pad_id,
                                 batch_size=cache.batch_size, cache_dir=_sub(cache, "teacher"), progress=progress)
        built = f"computed {', '.join(tc.built)}" if tc.built else "cached"
        say(f"  teacher cache ({built}): {tc.stats['bytes_per_token']:.1f} bytes per response token, {tc.path}"
            + (" (on the teacher's own tokenization, joined by example id)" if teacher_tokens is not None else ""))
        caches["teacher"] = tc
        columns = tc.dataset
        if teacher_tokens is not None:
            columns = join_by_id(columns, list(own.dataset["id"]), list(tokenized.dataset["id"]))
        parts.append(columns)
        teacher.release()  # free the teacher while the student trains
    if needs.teacher_reference:
        if teacher_reference is None:
            raise ValueError(f"loss {loss.name!r} needs the teacher's SFT model: set models.teacher_reference")
        tr = build_teacher_cache(tokenized.dataset, tokenized.fingerprint, teacher_reference, teacher_reference.key,
                                 needs.teacher_reference_aux, topk=needs.teacher_reference_topk,
                                 vocab_size=teacher_vocab, pad_id=pad_id,
                                 batch_size=cache.batch_size, cache_dir=_sub(cache, "teacher"), progress=progress)
        built = f"computed {', '.join(tr.built)}" if tr.built else "cached"
        say(f"  teacher-reference cache ({built}): {tr.path}")
        caches["teacher_reference"] = tr
        parts.append(tr.dataset.rename_columns({c: c.replace("/", "/" + TEACHER_REFERENCE_PREFIX, 1)
                                                for c in tr.dataset.column_names}))
        teacher_reference.release()
    if needs.contrast is not None:
        from tvkd.contrast import contrast_logps

        if "reference" not in caches or student is None:
            raise ValueError(f"loss {loss.name!r} needs contrast models: it must also declare the reference")
        parts.append(contrast_logps(tokenized, caches["reference"].dataset, student, needs.contrast, pad_id=pad_id,
                                    seed=seed, batch_size=cache.batch_size, cache_dir=_sub(cache, "contrast"),
                                    progress=progress, say=say))
    full = datasets.concatenate_datasets(parts, axis=1) if len(parts) > 1 else parts[0]
    full = full.add_column("pair_index", list(range(len(full))))
    if subsample:
        full = subsample_pairs(full, subsample, seed)
        say(f"  subsample: {len(full)} of {len(tokenized.dataset)} pairs (seed {seed})")
    full = loss.prepare(full, loss_cfg, seed=seed)
    train = training_columns(full, loss.batch_columns(loss_cfg), needs.reference)
    return TrainingSet(full=full, train=train, needs=needs, caches=caches, tokenized=tokenized)


def _with_rollouts(tokenized: TokenizedData, needs: Needs, *, teacher: ModelSource | None,
                   student: ModelSource | None, pad_id: int, eos_id: int | None, cache: CacheOptions,
                   progress: bool, say: Callable[[str], None]) -> TokenizedData:
    """The pairs with the sides `needs` asks to be rolled out replaced by greedy rollouts (cached)."""
    from tvkd.rollouts import greedy_rollouts

    for side, who, model in (("chosen", needs.chosen_from, teacher), ("rejected", needs.rejected_from, student)):
        if who is None:
            continue
        if model is None or eos_id is None:
            raise ValueError(f"rollouts of the {side} side need the {who} model and the end-of-turn id")
        tokenized = greedy_rollouts(tokenized, model, side=side, eos_id=eos_id, pad_id=pad_id,
                                    max_new_tokens=needs.rollout_max_new_tokens, cache_dir=_sub(cache, "rollouts"),
                                    progress=progress, who=who)
        say(f"  {side} side = {who} greedy rollouts ({'cached' if tokenized.cached else 'generated'}; "
            f"{tokenized.counts.get(f'{side}_rollouts_hit_budget', 0)} hit the {needs.rollout_max_new_tokens}-token budget)")
        model.release()
    return tokenized


def subsample_pairs(dataset: Any, fraction: float, seed: int) -> Any:
    """A seeded random `fraction` of the pairs (in their original order), renumbered."""
    rng = np.random.default_rng(seed)
    k = max(1, int(round(fraction * len(dataset))))
    dataset = dataset.select(sorted(rng.choice(len(dataset), size=k, replace=False).tolist()))
    return dataset.remove_columns("pair_index").add_column("pair_index", list(range(len(dataset))))


def _sub(cache: CacheOptions, kind: str) -> str | None:
    return f"{cache.cache_dir}/{kind}" if cache.cache_dir else None
