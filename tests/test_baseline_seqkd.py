"""SeqKD: the chosen side becomes the teacher's greedy rollout (cached), and the loss is its token-mean NLL."""

from __future__ import annotations

import json

import pytest
import torch

from tests.conftest import make_tiny_tokenizer
from tvkd.api import LOSSES, ScoredBatch, build_config
from tvkd.config import config_from_dict
from tvkd.generation import generate_ids
from tvkd.pipeline import execute
from tvkd.results import ResultsStore


def test_loss_is_the_token_mean_nll_of_the_chosen_side():
    logps = torch.tensor([[-1.0, -2.0, 0.0], [-0.5, 0.0, 0.0], [-9.0, -9.0, -9.0], [-9.0, 0.0, 0.0]])
    mask = torch.tensor([[1, 1, 0], [1, 0, 0], [1, 1, 1], [1, 0, 0]], dtype=torch.bool)
    loss = LOSSES.get("seqkd")()
    out = loss(ScoredBatch(logps=logps, mask=mask), build_config(LOSSES.get("seqkd"), {}))
    assert out.loss.item() == pytest.approx((1.0 + 2.0 + 0.5) / 3)


def test_rollouts_replace_the_chosen_side_and_are_reused(tiny_world, tmp_path):
    cfg = config_from_dict({
        "name": "seqkd", "num_threads": 1,
        "models": {"student": tiny_world["student"], "teacher": tiny_world["teacher"]},
        "data": {"source": tiny_world["data"], "test_source": tiny_world["data"], "test_split": "train",
                 "test_limit": 4},
        "tokenize": {"max_length": 32, "max_prompt_length": 16},
        "loss": {"name": "seqkd", "max_new_tokens": 5},
        "train": {"learning_rate": 1e-3, "num_train_epochs": 1, "per_device_train_batch_size": 4},
        "eval": {"max_new_tokens": 3, "teacher_scores": False},
    })
    store = ResultsStore(tmp_path / "results")
    rec = execute(cfg, store=store, progress=False)
    assert rec.complete and rec.metrics["train_loss"] > 0
    # the rollouts equal the teacher's greedy ids, computed independently here
    from transformers import AutoModelForCausalLM

    tok = make_tiny_tokenizer()
    teacher = AutoModelForCausalLM.from_pretrained(tiny_world["teacher"])
    rows = [json.loads(line) for line in open(tiny_world["data"])]
    prompt = tok.apply_chat_template(rows[0]["prompt"], add_generation_prompt=True, tokenize=True, return_dict=False)
    (want,) = generate_ids(teacher, [list(prompt)], eos_id=tok.eos_token_id, pad_id=tok.pad_token_id,
                           max_new_tokens=5)[0]
    if want[-1] != tok.eos_token_id:
        want = want + [tok.eos_token_id]
    import datasets

    stages = list((tmp_path / "cache" / "rollouts").glob("*/data"))
    assert len(stages) == 1
    got = datasets.load_from_disk(str(stages[0]))["response_ids"][0]
    assert got == want
    # a second run with another learning rate reuses the rollouts (no new stage)
    cfg2 = config_from_dict({**cfg.to_dict(), "train": {**cfg.to_dict()["train"], "learning_rate": 5e-4},
                             "loss": {"name": "seqkd", "max_new_tokens": 5}})
    execute(cfg2, store=store, progress=False)
    assert len(list((tmp_path / "cache" / "rollouts").glob("*/data"))) == 1
