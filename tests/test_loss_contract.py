"""The contract every registered loss honours (one test set, parametrised over `LOSSES`).

Each loss gets a batch built only from what it declares (`needs`, `batch_columns`, `prepare`),
so a new loss that forgets to declare an input fails here.
"""

from __future__ import annotations

import dataclasses

import pytest
import torch
from datasets import Dataset

from tvkd.losses import LOSSES, LossOutput, Needs, PreferenceLoss, ScoredBatch, build_config
from tvkd.registry import UnknownNameError

B, T, V, K = 3, 6, 23, 5
NAMES = LOSSES.names()


def _loss(name: str) -> tuple[PreferenceLoss, object]:
    cls = LOSSES.get(name)
    options = {"topk": K} if any(f.name == "topk" for f in dataclasses.fields(cls.Config)) else {}
    return cls(), build_config(cls, options)


def _dataset(needs: Needs, g: torch.Generator) -> Dataset:
    """A training set holding the cached teacher columns `needs` asks for."""
    lengths = torch.randint(1, T + 1, (2 * B,), generator=g).tolist()
    data: dict[str, list] = {}
    for spec in needs.aux:
        extra = 1 if spec.is_state else 0
        rows = [torch.randn(n + extra, generator=g).tolist() for n in lengths]
        data[f"chosen/{spec.column}"], data[f"rejected/{spec.column}"] = rows[:B], rows[B:]
    data.setdefault("id", list(range(B)))
    return Dataset.from_dict(data)


def _batch(loss: PreferenceLoss, cfg, seed: int = 0) -> ScoredBatch:
    g = torch.Generator().manual_seed(seed)
    needs = loss.needs(cfg)
    lengths = torch.randint(1, T + 1, (2 * B,), generator=g)
    lengths[0] = T
    mask = torch.arange(T).unsqueeze(0) < lengths.unsqueeze(1)
    state_mask = torch.arange(T + 1).unsqueeze(0) <= lengths.unsqueeze(1)
    logits = (torch.randn(2 * B, T, V, generator=g) * 2).requires_grad_(needs.student_logits)
    token_ids = torch.randint(0, V, (2 * B, T), generator=g)
    logps = torch.log_softmax(logits.detach(), -1).gather(-1, token_ids.unsqueeze(-1)).squeeze(-1)
    logps = (logps * mask).requires_grad_(True)
    ref_logps = (torch.randn(2 * B, T, generator=g) - 2) * mask if needs.reference else None

    columns: dict[str, torch.Tensor] = {}
    pair_columns = [c for c, kind in loss.batch_columns(cfg).items() if kind == "pair"]
    if pair_columns:
        prepared = loss.prepare(_dataset(needs, g), cfg, seed=0)
        for c in pair_columns:
            assert c in prepared.column_names, f"prepare must add the pair column {c!r}"
            columns[c] = torch.tensor(prepared[c])
    for c, kind in loss.batch_columns(cfg).items():
        if kind == "token":
            columns[c] = torch.randn(2 * B, T, generator=g) * mask
        elif kind == "state":
            columns[c] = torch.randn(2 * B, T + 1, generator=g) * state_mask
    if needs.topk:
        teacher = torch.randn(2 * B, T, V, generator=g)
        top = torch.log_softmax(teacher, -1).topk(needs.topk, -1)
        columns["topk_ids"], columns["topk_logprobs"] = top.indices, top.values
        columns["topk_rest"] = torch.log1p(-top.values.exp().sum(-1).clamp(max=1 - 1e-6))
    return ScoredBatch(
        logps=logps,
        mask=mask,
        ref_logps=ref_logps,
        logits=logits if needs.student_logits else None,
        columns=columns,
        state_mask=state_mask,
        pair_index=torch.arange(B),
        token_ids=token_ids,
    )


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
    assert (not loss.needs(cfg).reference) == meta["reference_free"]


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


@pytest.mark.parametrize("name", NAMES)
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


@pytest.mark.parametrize("name", NAMES)
def test_gradient_flows_only_into_the_student(name):
    loss, cfg = _loss(name)
    batch = _batch(loss, cfg)
    frozen = [batch.ref_logps] + list(batch.columns.values())
    assert all(t is None or not t.requires_grad for t in frozen)  # teacher/reference need no grad
    loss(batch, cfg).loss.backward()
    if loss.needs(cfg).student_logits:
        grad = batch.logits.grad
    else:
        grad = batch.logps.grad
    assert grad is not None and torch.isfinite(grad).all() and grad.abs().sum() > 0
    # padding never receives gradient
    pad = ~batch.mask
    assert torch.all((grad if grad.dim() == 2 else grad.abs().sum(-1))[pad] == 0)


@pytest.mark.parametrize("name", NAMES)
def test_reference_free_losses_ignore_the_reference(name):
    loss, cfg = _loss(name)
    if loss.needs(cfg).reference:
        pytest.skip("uses the reference")
    batch = _batch(loss, cfg)
    base = loss(batch, cfg).loss
    for ref in (None, torch.randn_like(batch.logps.detach()) * 10):
        batch.ref_logps = ref
        assert torch.equal(loss(batch, cfg).loss, base)


@pytest.mark.parametrize("name", NAMES)
def test_reference_losses_use_the_reference(name):
    loss, cfg = _loss(name)
    if not loss.needs(cfg).reference:
        pytest.skip("reference-free")
    batch = _batch(loss, cfg)
    batch.ref_logps = None
    with pytest.raises(ValueError, match="reference"):
        loss(batch, cfg)
