"""`simpo` (baselines/simpo.py, docs/methods.md §A.5, §A.7, §B.4.2): a float64 loop reference, TRL's CPO
trainer with loss_type="simpo" on one collated batch, and the gradient form."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from tvkd.api import ConfigError, Needs, ScoredBatch, build_config
from tvkd.losses import LOSSES

B = 4


def _batch(seed: int = 0) -> ScoredBatch:
    rng = np.random.default_rng(seed)
    lengths = rng.integers(1, 7, size=2 * B)
    mask = torch.arange(6)[None, :] < torch.from_numpy(lengths)[:, None]
    logps = torch.from_numpy(-rng.gamma(1.0, 0.5, size=(2 * B, 6))).float() * mask
    return ScoredBatch(logps=logps.requires_grad_(), mask=mask)


def _loop(batch: ScoredBatch, beta: float, ratio: float, sft_weight: float) -> float:
    """mean_i −log σ(β((avg_w − avg_l) − γ/β)) + sft_weight · (pooled chosen NLL), in float64."""
    lp, mask = batch.logps.detach().double().tolist(), batch.mask.tolist()
    avg, nll, count = [], 0.0, 0
    for r in range(2 * B):
        tokens = [lp[r][t] for t in range(len(mask[r])) if mask[r][t]]
        avg.append(sum(tokens) / len(tokens))
        if r < B:
            nll -= sum(tokens)
            count += len(tokens)
    losses = [math.log1p(math.exp(-beta * (avg[i] - avg[B + i] - ratio))) for i in range(B)]
    return sum(losses) / B + sft_weight * nll / count


@pytest.mark.parametrize("beta,ratio", [(2.0, 0.5), (2.5, 0.55), (10.0, 0.3), (2.0, 0.0)])
@pytest.mark.parametrize("sft_weight", [0.0, 0.7])
def test_simpo_matches_loop(beta, ratio, sft_weight):
    batch = _batch()
    cfg = build_config(LOSSES.get("simpo"), {"beta": beta, "gamma_beta_ratio": ratio, "sft_weight": sft_weight})
    out = LOSSES.get("simpo")()(batch, cfg)
    assert out.loss.item() == pytest.approx(_loop(batch, beta, ratio, sft_weight), rel=1e-6)
    avg = (batch.logps.detach().double().sum(1) / batch.mask.sum(1)).double()
    torch.testing.assert_close(out.margins.double(), beta * (avg[:B] - avg[B:]), rtol=1e-5, atol=1e-6)


def test_simpo_gradient_form():
    batch, beta, ratio, sft = _batch(1), 2.0, 0.5, 0.3
    cfg = build_config(LOSSES.get("simpo"), {"beta": beta, "gamma_beta_ratio": ratio, "sft_weight": sft})
    LOSSES.get("simpo")()(batch, cfg).loss.backward()
    n = batch.mask.sum(1).double()
    avg = batch.logps.detach().double().sum(1) / n
    # ∂/∂logps[w, t] = −σ(−β·logits)·β/(B·T_w) − sft/N_w,  ∂/∂logps[l, t] = σ(−β·logits)·β/(B·T_l)
    coef = torch.sigmoid(-beta * (avg[:B] - avg[B:] - ratio)) * beta / B
    want = torch.cat([-coef / n[:B] - sft / n[:B].sum(), coef / n[B:]]).unsqueeze(1) * batch.mask
    torch.testing.assert_close(batch.logps.grad.double(), want, rtol=1e-5, atol=1e-8)


def test_simpo_config_and_settings():
    cls = LOSSES.get("simpo")
    cfg = build_config(cls, {})
    assert (cfg.beta, cfg.gamma_beta_ratio, cfg.sft_weight) == (2.0, 0.5, 0.0)
    assert cls().needs(cfg) == Needs() and cls().eval_settings(cfg).implicit_reward_beta == 2.0
    for key, value in [("beta", 0.0), ("gamma_beta_ratio", -0.1), ("sft_weight", -1.0)]:
        with pytest.raises(ConfigError, match=f"simpo: {key} must be"):
            build_config(cls, {key: value})


@pytest.mark.parametrize("sft_weight", [0.0, 0.5])
def test_simpo_equals_trl_cpo(tmp_path, sft_weight):
    """TRL's CPOTrainer(loss_type="simpo") with simpo_gamma = β·(γ/β) (§A.7) and cpo_alpha = sft_weight."""
    pytest.importorskip("trl")
    from datasets import Dataset
    from trl.experimental.cpo import CPOConfig, CPOTrainer

    from tests.test_dpo_trl import ROWS, _model, _response_logps, _tokenizer

    beta, ratio = 2.0, 0.5
    tokenizer = _tokenizer()
    args = CPOConfig(
        output_dir=str(tmp_path), use_cpu=True, bf16=False, report_to=[], beta=beta, loss_type="simpo",
        simpo_gamma=beta * ratio, cpo_alpha=sft_weight, per_device_train_batch_size=len(ROWS["prompt"]),
        max_length=64, save_strategy="no", logging_strategy="no", disable_tqdm=True,
    )
    trainer = CPOTrainer(model=_model(tokenizer, 0), args=args, train_dataset=Dataset.from_dict(ROWS),
                         processing_class=tokenizer)
    batch = next(iter(trainer.get_train_dataloader()))
    with torch.no_grad():
        trl_loss = trainer.compute_loss(trainer.model, batch)
    cat = trainer.concatenated_inputs(batch, padding_value=tokenizer.pad_token_id)
    ids, labels = cat["concatenated_input_ids"], cat["concatenated_labels"]
    logps, mask = _response_logps(trainer.model, ids, cat["concatenated_attention_mask"], labels != -100)
    assert torch.all(ids.gather(1, (labels != -100).cumsum(1).argmax(1, keepdim=True)) == tokenizer.eos_token_id)
    cfg = build_config(LOSSES.get("simpo"), {"beta": beta, "gamma_beta_ratio": ratio, "sft_weight": sft_weight})
    ours = LOSSES.get("simpo")()(ScoredBatch(logps=logps, mask=mask), cfg)
    torch.testing.assert_close(ours.loss, trl_loss.float(), rtol=1e-5, atol=1e-5)
