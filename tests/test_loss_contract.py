"""The contract every registered loss honours (one test set, parametrised over `LOSSES`).

Each loss gets a batch built only from what it declares (`needs`, `batch_columns`, `prepare`),
so a new loss that forgets to declare an input fails here. Batches are assembled from per-pair
data generated once, so the same pairs can be batched alone, together, or with extra padding.
"""

from __future__ import annotations

import dataclasses

import pytest
import torch
from datasets import Dataset

from tvkd.api import (
    CONTRAST_PREFIX,
    LOSSES,
    TEACHER_REFERENCE_PREFIX,
    LossOutput,
    Needs,
    PreferenceLoss,
    ScoredBatch,
    build_config,
)
from tvkd.registry import UnknownNameError

B, T, V, K = 3, 6, 23, 5
NAMES = LOSSES.names()
# flag settings that change what a loss reads or how it pools: held to the same contract as the defaults
VARIANTS = {
    "dpkd[form=sequence]": ("dpkd", {"form": "sequence"}),
    "adpa[eos_entry=false,importance_sampling=true]": ("adpa", {"eos_entry": False, "importance_sampling": True}),
    "vanilla_kd[topk=null]": ("vanilla_kd", {"topk": None}),
    "dckd[rest_bin=complement]": ("dckd", {"rest_bin": "complement"}),
}
BEHAVIOUR = NAMES + [v for v in VARIANTS if VARIANTS[v][0] in NAMES]


def _loss(name: str) -> tuple[PreferenceLoss, object]:
    name, extra = VARIANTS.get(name, (name, {}))
    cls = LOSSES.get(name)
    options = {"topk": K} if any(f.name == "topk" for f in dataclasses.fields(cls.Config)) else {}
    return cls(), build_config(cls, {**options, **extra})


class Pairs:
    """B random pairs: per row (2 per pair) a length, token ids, student/reference/teacher logits and
    cached columns; `batch(rows_of_pairs, width)` pads any subset of them into a ScoredBatch."""

    def __init__(self, loss: PreferenceLoss, cfg, seed: int = 0, pairs: int = B):
        g = torch.Generator().manual_seed(seed)
        self.loss, self.cfg, self.n = loss, cfg, pairs
        self.needs: Needs = loss.needs(cfg)
        rows = 2 * pairs
        self.lengths = torch.randint(1, T + 1, (rows,), generator=g)
        self.lengths[0] = T
        self.student = torch.randn(rows, T, V, generator=g) * 2
        self.ids = torch.randint(0, V, (rows, T), generator=g)
        self.ref_logps = torch.randn(rows, T, generator=g) - 2
        self.ref_logits = torch.randn(rows, T, V, generator=g) * 2
        self.teacher = torch.randn(rows, T, V, generator=g) * 2
        self.token_cols = {c: torch.randn(rows, T + 1, generator=g) for c, k in loss.batch_columns(cfg).items()
                           if k in ("token", "state")}
        data: dict[str, list] = {"id": list(range(pairs))}
        for spec, prefix in [(s, "") for s in self.needs.aux] + \
                            [(s, TEACHER_REFERENCE_PREFIX) for s in self.needs.teacher_reference_aux]:
            extra = 1 if spec.is_state else 0
            values = [torch.randn(int(n) + extra, generator=g).tolist() for n in self.lengths]
            data[f"chosen/{prefix}{spec.column}"] = values[:pairs]
            data[f"rejected/{prefix}{spec.column}"] = values[pairs:]
        if self.needs.contrast is not None:
            for name in ("dpo", "rev"):
                values = [(torch.randn(int(n), generator=g) - 2).tolist() for n in self.lengths]
                data[f"chosen/{CONTRAST_PREFIX}{name}_logps"] = values[:pairs]
                data[f"rejected/{CONTRAST_PREFIX}{name}_logps"] = values[pairs:]
        self.dataset = loss.prepare(Dataset.from_dict(data), cfg, seed=0)
        self.tref = torch.randn(rows, T, V, generator=g) * 2  # the teacher's SFT model

    def batch(self, pairs: list[int] | None = None, width: int = T, grad: bool = True) -> ScoredBatch:
        pairs = list(range(self.n)) if pairs is None else pairs
        rows = pairs + [p + self.n for p in pairs]
        lengths = self.lengths[rows]
        mask = torch.arange(width).unsqueeze(0) < lengths.unsqueeze(1)
        state_mask = torch.arange(width + 1).unsqueeze(0) <= lengths.unsqueeze(1)

        def pad(t: torch.Tensor, w: int) -> torch.Tensor:  # garbage (not zeros) in the padding
            out = torch.full((len(rows), w, *t.shape[2:]), 7.5, dtype=t.dtype)
            out[:, : min(w, t.shape[1])] = t[rows][:, :w]
            return out

        ids = pad(self.ids, width).long() % V
        logits = pad(self.student, width).requires_grad_(self.needs.student_logits and grad)
        logps = torch.log_softmax(logits.detach(), -1).gather(-1, ids.unsqueeze(-1)).squeeze(-1)
        logps = (logps * mask).requires_grad_(grad)
        columns: dict[str, torch.Tensor] = {}
        for c, kind in self.loss.batch_columns(self.cfg).items():
            if kind == "pair":
                assert c in self.dataset.column_names, f"prepare must add the pair column {c!r}"
                columns[c] = torch.tensor(self.dataset[c])[pairs]
            elif kind == "token" and f"chosen/{c}" in self.dataset.column_names:  # made by prepare
                prepared = torch.zeros(2 * self.n, T)
                for r, row in enumerate(list(self.dataset[f"chosen/{c}"]) + list(self.dataset[f"rejected/{c}"])):
                    prepared[r, : len(row)] = torch.tensor(row)
                columns[c] = pad(prepared, width) * mask
            elif kind == "token":
                columns[c] = pad(self.token_cols[c][:, :T], width) * mask
            elif kind == "state":
                columns[c] = pad(self.token_cols[c], width + 1) * state_mask
        for prefix, k, source in (("", self.needs.topk, self.teacher),
                                  ("tref:", self.needs.teacher_reference_topk, self.tref)):
            if k:
                top = torch.log_softmax(pad(source, width), -1).topk(k, -1)
                columns[f"{prefix}topk_ids"], columns[f"{prefix}topk_logprobs"] = top.indices, top.values
                columns[f"{prefix}topk_rest"] = torch.log1p(-top.values.exp().sum(-1).clamp(max=1 - 1e-6))
        return ScoredBatch(
            logps=logps, mask=mask,
            ref_logps=pad(self.ref_logps, width) * mask if self.needs.reference else None,
            logits=logits if self.needs.student_logits else None,
            columns=columns, state_mask=state_mask, pair_index=torch.tensor(pairs), token_ids=ids,
            ref_logits=pad(self.ref_logits, width) if self.needs.reference_logits else None,
            teacher_logits=pad(self.teacher, width) if self.needs.teacher_logits else None,
        )


def _batch(loss: PreferenceLoss, cfg, seed: int = 0) -> ScoredBatch:
    return Pairs(loss, cfg, seed).batch()


@pytest.mark.parametrize("name", NAMES)
def test_registered_with_metadata(name):
    cls = LOSSES.get(name)
    assert issubclass(cls, PreferenceLoss) and cls.name == name
    meta = LOSSES.meta(name)
    assert isinstance(meta["needs"], str) and meta["needs"]
    assert isinstance(meta["citation"], str) and meta["citation"]
    assert isinstance(meta["reference_free"], bool)
    assert cls.__doc__ and cls.__module__ and __import__(cls.__module__, fromlist=["x"]).__doc__
    loss, cfg = _loss(name)
    needs = loss.needs(cfg)
    assert (not (needs.reference or needs.reference_logits)) == meta["reference_free"]


@pytest.mark.parametrize("name", NAMES)
def test_config_documents_itself(name):
    cfg_cls = LOSSES.get(name).Config
    assert dataclasses.is_dataclass(cfg_cls)
    for f in dataclasses.fields(cfg_cls):
        assert f.metadata.get("help"), f"{name}.{f.name} has no help text"
        assert f.default is not dataclasses.MISSING, f"{name}.{f.name} has no default"


@pytest.mark.parametrize("name", NAMES)
def test_unknown_option_is_a_clear_error(name):
    with pytest.raises(ValueError, match=r"no option\(s\) 'bogus_option'.*valid options"):
        build_config(LOSSES.get(name), {"bogus_option": 1})


def test_unknown_loss_suggests():
    with pytest.raises(UnknownNameError, match="Did you mean 'tvkd'"):
        LOSSES.get("tvdk")


@pytest.mark.parametrize("name", BEHAVIOUR)
def test_finite_scalar_loss_and_metrics(name):
    loss, cfg = _loss(name)
    out = loss(_batch(loss, cfg), cfg)
    assert isinstance(out, LossOutput)
    assert out.loss.shape == () and out.loss.dtype == torch.float32 and torch.isfinite(out.loss)
    assert out.loss.requires_grad
    for key, value in out.metrics.items():
        assert isinstance(key, str)
        assert isinstance(value, torch.Tensor) and value.shape == () and not value.requires_grad, key
        assert torch.isfinite(value), key
    if out.margins is not None:
        assert out.margins.shape == (B,) and not out.margins.requires_grad


@pytest.mark.parametrize("name", BEHAVIOUR)
def test_deterministic(name):
    loss, cfg = _loss(name)
    pairs = Pairs(loss, cfg, seed=3)
    assert torch.equal(loss(pairs.batch(), cfg).loss, loss(pairs.batch(), cfg).loss)


@pytest.mark.parametrize("name", BEHAVIOUR)
def test_gradient_flows_only_into_the_student(name):
    loss, cfg = _loss(name)
    batch = _batch(loss, cfg)
    frozen = [batch.ref_logps, batch.ref_logits, batch.teacher_logits] + list(batch.columns.values())
    assert all(t is None or not t.requires_grad for t in frozen)  # teacher/reference need no grad
    loss(batch, cfg).loss.backward()
    grad = batch.logits.grad if loss.needs(cfg).student_logits else batch.logps.grad
    assert grad is not None and torch.isfinite(grad).all() and grad.abs().sum() > 0
    # padding never receives gradient
    pad = ~batch.mask
    assert torch.all((grad if grad.dim() == 2 else grad.abs().sum(-1))[pad] == 0)


@pytest.mark.parametrize("name", BEHAVIOUR)
def test_padding_does_not_change_the_loss(name):
    """The same pairs padded to a wider batch (with garbage in the padding) give the same loss and margins."""
    loss, cfg = _loss(name)
    pairs = Pairs(loss, cfg, seed=1)
    a, b = loss(pairs.batch(width=T), cfg), loss(pairs.batch(width=T + 3), cfg)
    torch.testing.assert_close(a.loss, b.loss, rtol=1e-5, atol=1e-6)
    if a.margins is not None:
        torch.testing.assert_close(a.margins, b.margins, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("name", BEHAVIOUR)
def test_a_pair_alone_and_in_a_batch_has_the_same_margin(name):
    loss, cfg = _loss(name)
    pairs = Pairs(loss, cfg, seed=2)
    together = loss(pairs.batch(), cfg).margins
    if together is None:
        pytest.skip("the loss reports no per-pair margins")
    for i in range(B):
        alone = loss(pairs.batch([i]), cfg).margins
        torch.testing.assert_close(alone, together[i: i + 1], rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("name", BEHAVIOUR)
def test_inputs_a_loss_does_not_declare_do_not_matter(name):
    """A loss that declares no reference (or no online teacher/reference logits) ignores whatever they hold."""
    loss, cfg = _loss(name)
    needs = loss.needs(cfg)
    batch = _batch(loss, cfg)
    base = loss(batch, cfg).loss
    g = torch.Generator().manual_seed(9)
    if not needs.reference:
        for ref in (None, torch.randn(batch.logps.shape, generator=g) * 10):
            batch.ref_logps = ref
            assert torch.equal(loss(batch, cfg).loss, base)
    if not needs.reference_logits:
        batch.ref_logits = torch.randn(*batch.mask.shape, V, generator=g)
        assert torch.equal(loss(batch, cfg).loss, base)
    if not needs.teacher_logits:
        batch.teacher_logits = torch.randn(*batch.mask.shape, V, generator=g)
        assert torch.equal(loss(batch, cfg).loss, base)


@pytest.mark.parametrize("name", BEHAVIOUR)
def test_declared_inputs_are_required(name):
    loss, cfg = _loss(name)
    needs = loss.needs(cfg)
    if not (needs.reference or needs.reference_logits or needs.teacher_logits):
        pytest.skip("declares no per-step model input")
    batch = _batch(loss, cfg)
    batch.ref_logps = batch.ref_logits = batch.teacher_logits = None
    with pytest.raises(ValueError, match="reference|teacher"):
        loss(batch, cfg)
