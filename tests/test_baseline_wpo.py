"""`wpo` (baselines/wpo.py, docs/methods.md §A.5, §A.7, §B.4.3): a float64 loop reference, TRL's DPOTrainer
with use_weighting=True (no clamp) on collated batches, and the gradient = weight × DPO gradient."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from baselines.wpo import pair_weights
from tvkd.api import ConfigError, ScoredBatch, build_config
from tvkd.losses import LOSSES
from tvkd.scoring import token_logps

B, T, V = 3, 5, 7


def _batch(seed: int = 0) -> ScoredBatch:
    """B pairs of fp32 logits; pair 0 takes the argmax tokens, so its weight exceeds 1."""
    rng = np.random.default_rng(seed)
    lengths = torch.from_numpy(rng.integers(1, T + 1, size=2 * B))
    lengths[0] = T
    mask = torch.arange(T)[None, :] < lengths[:, None]
    logits = torch.from_numpy(rng.normal(size=(2 * B, T, V)) * 2).float()
    ids = torch.from_numpy(rng.integers(0, V, size=(2 * B, T)))
    ids[[0, B]] = logits[[0, B]].argmax(-1)
    ref = torch.from_numpy(-rng.gamma(2.0, 1.0, size=(2 * B, T))).float() * mask
    return ScoredBatch(logps=token_logps(logits, ids, mask), mask=mask, ref_logps=ref,
                       logits=logits.requires_grad_(), token_ids=ids)


def _loop(batch: ScoredBatch, beta: float, clamp: bool) -> tuple[list[float], list[float]]:
    """(per-pair weights, per-pair weighted DPO losses), position by position in float64."""
    z, ids = batch.logits.detach().double().tolist(), batch.token_ids.tolist()
    ref, mask = batch.ref_logps.double().tolist(), batch.mask.tolist()
    w, delta = [], []
    for r in range(2 * B):
        aligned, ratio, n = 0.0, 0.0, 0
        for t in range(T):
            if not mask[r][t]:
                continue
            lse = math.log(sum(math.exp(x) for x in z[r][t]))
            logp = z[r][t][ids[r][t]] - lse
            sum_sq = sum(math.exp(x - lse) ** 2 for x in z[r][t])
            aligned += logp - math.log(sum_sq)
            ratio += logp - ref[r][t]
            n += 1
        w.append(math.exp(aligned / n))
        delta.append(ratio)
    weights = [w[i] * w[B + i] for i in range(B)]
    weights = [min(1.0, x) for x in weights] if clamp else weights
    losses = [weights[i] * math.log1p(math.exp(-beta * (delta[i] - delta[B + i]))) for i in range(B)]
    return weights, losses


@pytest.mark.parametrize("clamp", [True, False])
@pytest.mark.parametrize("beta", [0.1, 0.5])
def test_wpo_matches_loop(clamp, beta):
    batch = _batch()
    weights, losses = _loop(batch, beta, clamp)
    assert max(weights) >= 1.0 and min(weights) < 1.0  # the clamp matters on this batch
    out = LOSSES.get("wpo")()(batch, build_config(LOSSES.get("wpo"), {"beta": beta, "clamp": clamp}))
    assert out.loss.item() == pytest.approx(np.mean(losses), rel=1e-6)
    torch.testing.assert_close(pair_weights(batch, clamp).double(), torch.tensor(weights, dtype=torch.float64),
                               rtol=1e-6, atol=0)


@pytest.mark.parametrize("clamp", [True, False])
def test_wpo_gradient_is_weight_times_dpo_gradient(clamp):
    """The weight is detached: ∇L_WPO = (1/B) Σ_i weight_i · ∇L_DPO(pair i)."""
    batch, beta = _batch(1), 0.1
    LOSSES.get("wpo")()(batch, build_config(LOSSES.get("wpo"), {"beta": beta, "clamp": clamp})).loss.backward()
    weights = pair_weights(batch, clamp)
    assert weights.unique().numel() == B and not weights.requires_grad
    dpo, dpo_cfg = LOSSES.get("dpo")(), build_config(LOSSES.get("dpo"), {"beta": beta})
    for i in range(B):
        rows = [i, B + i]
        z = batch.logits.detach()[rows].requires_grad_()
        dpo(ScoredBatch(logps=token_logps(z, batch.token_ids[rows], batch.mask[rows]), mask=batch.mask[rows],
                        ref_logps=batch.ref_logps[rows]), dpo_cfg).loss.backward()
        torch.testing.assert_close(batch.logits.grad[rows], weights[i] * z.grad / B, rtol=1e-5, atol=1e-9)


def test_wpo_config_and_settings():
    cls = LOSSES.get("wpo")
    cfg = build_config(cls, {})
    assert cfg.beta == 0.01 and cfg.clamp  # docs/methods.md §A.5: the recipes' β
    needs = cls().needs(cfg)
    assert needs.reference and needs.student_logits and cls().eval_settings(cfg).implicit_reward_beta == 0.01
    with pytest.raises(ConfigError, match="wpo: beta must be > 0"):
        build_config(cls, {"beta": -1.0})
    batch = _batch()
    batch.logits = None
    with pytest.raises(ValueError, match="wpo needs the student logits"):
        cls()(batch, cfg)


def _scored(trainer, batch) -> ScoredBatch:
    """Response-aligned student logits, token ids and log-probs, and reference log-probs (docs/methods.md §A.1)."""
    from tests.test_dpo_trl import _response_logps

    ids, attn, comp = batch["input_ids"], batch["attention_mask"], batch["completion_mask"]
    with torch.no_grad():
        full = trainer.model(input_ids=ids, attention_mask=attn).logits.float()
    positions = [comp[r].nonzero().squeeze(-1) for r in range(ids.shape[0])]  # contiguous, after the prompt
    width = max(len(p) for p in positions)
    logits = torch.zeros(ids.shape[0], width, full.shape[-1])
    tokens = torch.zeros(ids.shape[0], width, dtype=torch.long)
    mask = torch.zeros(ids.shape[0], width, dtype=torch.bool)
    for r, pos in enumerate(positions):
        logits[r, : len(pos)], tokens[r, : len(pos)], mask[r, : len(pos)] = full[r, pos - 1], ids[r, pos], True
    ref_logps, ref_mask = _response_logps(trainer.ref_model, ids, attn, comp)
    assert torch.equal(mask, ref_mask)
    return ScoredBatch(logps=token_logps(logits, tokens, mask), mask=mask, ref_logps=ref_logps, logits=logits,
                       token_ids=tokens)


def test_wpo_equals_trl_use_weighting(tmp_path):
    """Current TRL multiplies w(y_w)·w(y_l) without the clamp: equal to clamp=false; clamp=true is min(1, ·)."""
    trl = pytest.importorskip("trl")
    from datasets import Dataset

    from tests.test_dpo_trl import ROWS, _model, _tokenizer

    tokenizer = _tokenizer()

    def trainer(use_weighting: bool):
        args = trl.DPOConfig(
            output_dir=str(tmp_path), use_cpu=True, bf16=False, report_to=[], beta=0.1, loss_type=["sigmoid"],
            use_weighting=use_weighting, per_device_train_batch_size=len(ROWS["prompt"]), max_length=None,
            save_strategy="no", logging_strategy="no", disable_tqdm=True,
        )
        return trl.DPOTrainer(model=_model(tokenizer, 0), ref_model=_model(tokenizer, 1), args=args,
                              train_dataset=Dataset.from_dict(ROWS), processing_class=tokenizer)

    weighted, plain = trainer(True), trainer(False)
    wpo, cls = LOSSES.get("wpo")(), LOSSES.get("wpo")
    # one collated batch: the loss
    batch = next(iter(weighted.get_train_dataloader()))
    with torch.no_grad():
        trl_loss = weighted.compute_loss(weighted.model, batch)
    scored = _scored(weighted, batch)
    ours = wpo(scored, build_config(cls, {"beta": 0.1, "clamp": False}))
    torch.testing.assert_close(ours.loss, trl_loss.float(), rtol=1e-5, atol=1e-5)
    assert wpo(scored, build_config(cls, {"beta": 0.1})).loss < trl_loss - 1e-4  # official: clamped
    # pair by pair: TRL's weight is its weighted loss over its unweighted one
    trl_weights, our_weights, clamped = [], [], []
    for i in range(len(ROWS["prompt"])):
        pair = weighted.data_collator([weighted.train_dataset[i]])
        with torch.no_grad():
            trl_weights.append(weighted.compute_loss(weighted.model, pair) / plain.compute_loss(plain.model, pair))
        scored = _scored(weighted, pair)
        our_weights.append(pair_weights(scored, clamp=False))
        clamped.append(pair_weights(scored, clamp=True))
    trl_w, our_w, clamped = torch.stack(trl_weights).float(), torch.cat(our_weights), torch.cat(clamped)
    assert (trl_w > 1).any() and (trl_w < 1).any()  # the clamp matters on these pairs
    torch.testing.assert_close(our_w, trl_w, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(clamped, trl_w.clamp(max=1.0), rtol=1e-5, atol=1e-6)
