"""`ipo` (baselines/ipo.py, docs/methods.md §A.5, §B.4.1): a float64 loop reference, TRL's DPOTrainer with
loss_type="ipo" on one collated batch, and the gradient (zero at the optimum)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from tvkd.api import ConfigError, ScoredBatch, build_config
from tvkd.losses import LOSSES

B = 4


def _batch(seed: int = 0) -> ScoredBatch:
    rng = np.random.default_rng(seed)
    lengths = rng.integers(1, 7, size=2 * B)
    mask = torch.arange(6)[None, :] < torch.from_numpy(lengths)[:, None]
    logps = torch.from_numpy(-rng.gamma(2.0, 1.0, size=(2 * B, 6))).float() * mask
    ref = torch.from_numpy(-rng.gamma(2.0, 1.0, size=(2 * B, 6))).float() * mask
    return ScoredBatch(logps=logps.requires_grad_(), mask=mask, ref_logps=ref)


def _loop(batch: ScoredBatch, beta: float, length_normalize: bool) -> list[float]:
    """Per-pair (h − 1/(2β))², token by token in float64."""
    lp, ref, mask = batch.logps.detach().double().tolist(), batch.ref_logps.double().tolist(), batch.mask.tolist()
    scores = []
    for r in range(2 * B):
        total, n = 0.0, 0
        for t in range(len(mask[r])):
            if mask[r][t]:
                total += lp[r][t] - ref[r][t]
                n += 1
        scores.append(total / n if length_normalize else total)
    return [(scores[i] - scores[B + i] - 1 / (2 * beta)) ** 2 for i in range(B)]


@pytest.mark.parametrize("beta", [0.1, 0.5, 2.0])
@pytest.mark.parametrize("length_normalize", [True, False])
def test_ipo_matches_loop(beta, length_normalize):
    batch = _batch()
    cfg = build_config(LOSSES.get("ipo"), {"beta": beta, "length_normalize": length_normalize})
    out = LOSSES.get("ipo")()(batch, cfg)
    assert out.loss.item() == pytest.approx(np.mean(_loop(batch, beta, length_normalize)), rel=1e-6)
    seq = (batch.logps.detach() - batch.ref_logps).double().sum(1)
    torch.testing.assert_close(out.margins.double(), beta * (seq[:B] - seq[B:]), rtol=1e-5, atol=1e-5)


def test_ipo_gradient_and_optimum():
    batch, beta = _batch(1), 0.5
    cfg = build_config(LOSSES.get("ipo"), {"beta": beta})
    LOSSES.get("ipo")()(batch, cfg).loss.backward()
    lengths = batch.mask.sum(1).double()
    seq = ((batch.logps.detach() - batch.ref_logps).double() * batch.mask).sum(1) / lengths
    # ∂L/∂logps[w, t] = 2(h̄ − 1/(2β))/(B·T_w), ∂L/∂logps[l, t] = −2(h̄ − 1/(2β))/(B·T_l)
    coef = 2 * (seq[:B] - seq[B:] - 1 / (2 * beta)) / B
    want = torch.cat([coef / lengths[:B], -coef / lengths[B:]]).unsqueeze(1) * batch.mask
    torch.testing.assert_close(batch.logps.grad.double(), want, rtol=1e-5, atol=1e-8)

    # at the optimum Δ̄_w − Δ̄_l = 1/(2β) = 1 the loss and its gradient are exactly zero
    opt = _batch(1)
    opt.ref_logps = -1.0 * opt.mask
    opt.logps = torch.cat([0.0 * opt.mask[:B], -1.0 * opt.mask[B:]]).requires_grad_()  # Δ̄_w = 1, Δ̄_l = 0
    out = LOSSES.get("ipo")()(opt, cfg)
    out.loss.backward()
    assert out.loss.item() == 0.0 and torch.all(opt.logps.grad == 0)


def test_ipo_config_and_settings():
    cls = LOSSES.get("ipo")
    cfg = build_config(cls, {})
    assert cfg.beta == 0.1 and cfg.length_normalize
    assert cls().needs(cfg).reference and cls().eval_settings(cfg).implicit_reward_beta == 0.1
    with pytest.raises(ConfigError, match="ipo: beta must be > 0"):
        build_config(cls, {"beta": 0})


def test_ipo_equals_trl(tmp_path):
    trl = pytest.importorskip("trl")
    from datasets import Dataset

    from tests.test_dpo_trl import ROWS, _model, _response_logps, _tokenizer

    tokenizer = _tokenizer()
    args = trl.DPOConfig(
        output_dir=str(tmp_path), use_cpu=True, bf16=False, report_to=[], beta=0.1, loss_type=["ipo"],
        per_device_train_batch_size=len(ROWS["prompt"]), max_length=None, save_strategy="no",
        logging_strategy="no", disable_tqdm=True,
    )
    trainer = trl.DPOTrainer(model=_model(tokenizer, 0), ref_model=_model(tokenizer, 1), args=args,
                             train_dataset=Dataset.from_dict(ROWS), processing_class=tokenizer)
    batch = next(iter(trainer.get_train_dataloader()))
    with torch.no_grad():
        trl_loss = trainer.compute_loss(trainer.model, batch)
    ids, attn, comp = batch["input_ids"], batch["attention_mask"], batch["completion_mask"]
    logps, mask = _response_logps(trainer.model, ids, attn, comp)
    ref_logps, _ = _response_logps(trainer.ref_model, ids, attn, comp)
    ours = LOSSES.get("ipo")()(ScoredBatch(logps=logps, mask=mask, ref_logps=ref_logps),
                               build_config(LOSSES.get("ipo"), {"beta": 0.1}))
    assert mask.sum(1).unique().numel() > 1  # responses of different lengths: the averaging matters
    torch.testing.assert_close(ours.loss, trl_loss.float(), rtol=1e-5, atol=1e-5)
