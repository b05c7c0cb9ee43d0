"""The trainer's whole step (tokenize -> cache -> collate -> forward -> loss) equals TRL's DPOTrainer."""

from __future__ import annotations

import copy

import datasets
import pytest
import torch

from tests.conftest import make_tiny_llama, make_tiny_tokenizer
from tvkd.cache.teacher import build_reference_cache
from tvkd.data import PreferenceExample
from tvkd.losses import LOSSES, build_config
from tvkd.tokenize import TokenizeConfig, tokenize_preferences
from tvkd.training.trainer import PreferenceCollator, PreferenceTrainer, training_columns

ROWS = [("sort c a b", "a b c", "c b a"), ("reverse a b", "b a", "a b a b"), ("hello world", "world", "the cat"),
        ("the cat", "yes", "no maybe no")]


def conv(p, c, r):
    return {"prompt": [{"role": "user", "content": p}], "chosen": [{"role": "assistant", "content": c}],
            "rejected": [{"role": "assistant", "content": r}]}


@pytest.mark.parametrize("beta", [0.1, 0.5])
def test_full_step_equals_trl_dpo(tmp_path, beta):
    from transformers import TrainingArguments
    from trl import DPOConfig, DPOTrainer

    tok = make_tiny_tokenizer()
    policy = make_tiny_llama(len(tok), seed=5)
    # a reference that differs from the policy, so the loss is not log 2
    reference = make_tiny_llama(len(tok), seed=6)
    trl_args = DPOConfig(output_dir=str(tmp_path / "trl"), use_cpu=True, bf16=False, report_to=[], beta=beta,
                         per_device_train_batch_size=len(ROWS), max_length=64, disable_dropout=True)
    trl = DPOTrainer(model=copy.deepcopy(policy), ref_model=copy.deepcopy(reference), args=trl_args,
                     train_dataset=datasets.Dataset.from_list([conv(*r) for r in ROWS]), processing_class=tok)
    trl_batch = next(iter(trl.get_train_dataloader()))
    trl.model.eval()
    trl_loss = trl.compute_loss(trl.model, trl_batch)

    exs = [PreferenceExample(id=str(i), **conv(*r), meta={}) for i, r in enumerate(ROWS)]
    td = tokenize_preferences(exs, tok, TokenizeConfig(64, 32), cache_dir=tmp_path / "tok", progress=False)
    rc = build_reference_cache(td.dataset, td.fingerprint, reference, "ref", pad_id=tok.pad_token_id,
                               cache_dir=tmp_path / "rc", progress=False)
    ds = datasets.concatenate_datasets([td.dataset, rc.dataset], axis=1).add_column("pair_index", list(range(len(ROWS))))
    loss_cls = LOSSES.get("dpo")
    cfg = build_config(loss_cls, {"beta": beta})
    loss = loss_cls()
    ds = training_columns(loss.prepare(ds, cfg, seed=0), loss.batch_columns(cfg), True)
    args = TrainingArguments(output_dir=str(tmp_path / "ours"), use_cpu=True, report_to="none",
                             remove_unused_columns=False, per_device_train_batch_size=len(ROWS))
    ours = PreferenceTrainer(model=copy.deepcopy(policy), args=args, train_dataset=ds,
                             data_collator=PreferenceCollator(tok.pad_token_id, loss.batch_columns(cfg), True),
                             loss=loss, loss_config=cfg)
    batch = ours.data_collator([ds[i] for i in range(len(ROWS))])
    ours.model.eval()
    our_loss = ours.compute_loss(ours.model, batch)
    assert abs(trl_loss.item() - torch.log(torch.tensor(2.0)).item()) > 1e-4
    torch.testing.assert_close(our_loss, trl_loss, rtol=1e-5, atol=1e-6)


def test_training_columns_names_what_is_missing(tmp_path):
    ds = datasets.Dataset.from_dict({"prompt_ids": [[1]], "chosen_ids": [[2]], "rejected_ids": [[3]]})
    with pytest.raises(KeyError, match="tvkd_offset"):
        training_columns(ds, {"tvkd_offset": "pair"}, False)
    with pytest.raises(KeyError, match="chosen/ref_logps"):
        training_columns(ds, {}, True)
