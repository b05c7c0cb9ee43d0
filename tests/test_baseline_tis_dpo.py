"""TIS-DPO: token weights (official transforms), the weighted margin against a loop reference, and the
contrast-model stage end to end (trained once, reused)."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from datasets import Dataset

from baselines.tis_dpo import token_weights
from tvkd.api import LOSSES, ScoredBatch, build_config


def test_rank_transform_is_linear_in_rank_over_the_range():
    w = token_weights(np.array([0.3, -1.0, 2.0, 0.5]), "rank")
    np.testing.assert_allclose(w, [0.9, 0.7, 1.3, 1.1])
    assert token_weights(np.array([5.0]), "rank").tolist() == [1.0]


def test_binary_transform_keeps_the_top_percent():
    raw = np.array([0.3, -1.0, 2.0, 0.5])
    assert token_weights(raw, "binary", top_percent=100).tolist() == [1, 1, 1, 1]  # official default: DPO
    assert token_weights(raw, "binary", top_percent=50).tolist() == [0, 0, 1, 1]


def test_prepare_negates_the_chosen_side():
    cls = LOSSES.get("tis_dpo")
    cfg = build_config(cls, {})
    ds = Dataset.from_dict({
        "chosen/contrast:dpo_logps": [[-1.0, -2.0, -3.0]], "chosen/contrast:rev_logps": [[-2.0, -1.0, -3.5]],
        "rejected/contrast:dpo_logps": [[-1.0, -2.0]], "rejected/contrast:rev_logps": [[-2.0, -1.0]]})
    out = cls().prepare(ds, cfg, seed=0)
    # chosen raw = −(rev − dpo) = [1, −1, 0.5] -> ranks [2, 0, 1]; rejected raw = [−1, 1] -> ranks [0, 1]
    np.testing.assert_allclose(out["chosen/tis_weight"][0], [1.3, 0.7, 1.0])
    np.testing.assert_allclose(out["rejected/tis_weight"][0], [0.7, 1.3])


def test_loss_matches_loop_reference():
    g = torch.Generator().manual_seed(0)
    lengths = torch.tensor([3, 2, 1, 3])
    mask = torch.arange(3)[None] < lengths[:, None]
    logps = (torch.randn(4, 3, generator=g) - 1) * mask
    ref = (torch.randn(4, 3, generator=g) - 1) * mask
    w = torch.rand(4, 3, generator=g) * mask
    cfg = build_config(LOSSES.get("tis_dpo"), {"beta": 0.3})
    out = LOSSES.get("tis_dpo")()(ScoredBatch(logps=logps, mask=mask, ref_logps=ref, columns={"tis_weight": w}), cfg)
    total = 0.0
    for i in range(2):
        u = sum(float(w[i, t]) * float(logps[i, t] - ref[i, t]) for t in range(int(lengths[i])))
        u -= sum(float(w[2 + i, t]) * float(logps[2 + i, t] - ref[2 + i, t]) for t in range(int(lengths[2 + i])))
        total += math.log1p(math.exp(-0.3 * u))
    assert out.loss.item() == pytest.approx(total / 2, rel=1e-6)


def test_with_unit_weights_it_is_dpo():
    g = torch.Generator().manual_seed(1)
    mask = torch.ones(4, 3, dtype=torch.bool)
    batch = ScoredBatch(logps=torch.randn(4, 3, generator=g), mask=mask, ref_logps=torch.randn(4, 3, generator=g),
                        columns={"tis_weight": torch.ones(4, 3)})
    tis = LOSSES.get("tis_dpo")()(batch, build_config(LOSSES.get("tis_dpo"), {"beta": 0.1})).loss
    dpo = LOSSES.get("dpo")()(batch, build_config(LOSSES.get("dpo"), {"beta": 0.1})).loss
    torch.testing.assert_close(tis, dpo, rtol=1e-6, atol=1e-7)


def test_contrast_models_are_trained_once_and_reused(tiny_world, tmp_path):
    from tvkd.config import config_from_dict
    from tvkd.pipeline import execute
    from tvkd.results import ResultsStore

    def cfg(lr):
        return config_from_dict({
            "name": "tis", "num_threads": 1,
            "models": {"student": tiny_world["student"]},
            "data": {"source": tiny_world["data"], "test_source": tiny_world["data"], "test_split": "train",
                     "test_limit": 4},
            "tokenize": {"max_length": 32, "max_prompt_length": 16},
            "loss": {"name": "tis_dpo", "contrast_learning_rate": 1e-3},
            "train": {"learning_rate": lr, "num_train_epochs": 1, "per_device_train_batch_size": 4},
            "eval": {"max_new_tokens": 3, "teacher_scores": False},
        })

    store = ResultsStore(tmp_path / "results")
    rec = execute(cfg(1e-3), store=store, progress=False)
    assert rec.complete and np.isfinite(rec.metrics["train_loss"])
    models = sorted(p.name.rsplit("-", 1)[1] for p in (tmp_path / "cache" / "contrast_models").iterdir()
                    if not p.name.startswith("."))
    assert models == ["dpo", "rev"]
    stamps = {p: (p / "done.json").stat().st_mtime_ns for p in (tmp_path / "cache" / "contrast_models").iterdir()
              if (p / "done.json").exists()}
    execute(cfg(5e-4), store=store, progress=False)  # another run on the same data: the models are reused
    assert {p: (p / "done.json").stat().st_mtime_ns for p in stamps} == stamps


def loop_binary(raw, top_percent):
    """The documented rule, written as a loop: keep int(n·p/100) tokens, largest values first, ties by position."""
    n = len(raw)
    keep = int(n * top_percent / 100)
    order = sorted(range(n), key=lambda i: (-raw[i], i))
    return [1.0 if i in order[:keep] else 0.0 for i in range(n)]


def loop_rank(raw, low=0.7, high=1.3):
    n = len(raw)
    order = sorted(range(n), key=lambda i: (raw[i], i))  # ascending, ties by position
    return [low + (high - low) * order.index(i) / (n - 1) for i in range(n)]


@pytest.mark.parametrize("raw", [[0.0] * 6, [1.0, 0.5, 1.0, 0.5, 1.0], [0.2, 0.2, -1.0, 0.2], [3.0, 1.0, 2.0]])
@pytest.mark.parametrize("top_percent", [100.0, 70.0, 50.0, 20.0])
def test_binary_ties_keep_the_earliest_tokens(raw, top_percent):
    got = token_weights(np.array(raw), "binary", top_percent=top_percent).tolist()
    assert got == loop_binary(raw, top_percent)


def test_binary_ties_and_count_by_hand():
    # all tied (untrained contrast models): the first int(n·p/100) positions, not the last
    assert token_weights(np.zeros(5), "binary", top_percent=40).tolist() == [1, 1, 0, 0, 0]
    # a tie group across the cut: the earlier member is kept
    assert token_weights(np.array([0.5, 2.0, 0.5, -1.0]), "binary", top_percent=50).tolist() == [1, 1, 0, 0]
    # the official count rounds down: 50 % of 3 tokens keeps 1
    assert token_weights(np.array([0.1, 0.3, 0.2]), "binary", top_percent=50).tolist() == [0, 1, 0]


@pytest.mark.parametrize("raw", [[0.0] * 4, [1.0, 0.5, 1.0, 0.5, 1.0], [0.2, 0.2, -1.0, 0.2]])
def test_rank_ties_give_the_earlier_token_the_lower_rank(raw):
    np.testing.assert_allclose(token_weights(np.array(raw), "rank"), loop_rank(raw), rtol=0, atol=1e-12)
