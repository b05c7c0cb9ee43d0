"""LoRA (`train.lora`, peft): only the adapter trains, the reference comes from the base weights with
the adapter disabled (no second model), the options are checked like every config key and recorded."""

from __future__ import annotations

import copy

import pytest
import torch

pytest.importorskip("peft")

from tests.conftest import make_tiny_llama  # noqa: E402
from tests.test_chunked import VOCAB, _features  # noqa: E402
from tvkd.config import TrainConfig, config_from_dict  # noqa: E402
from tvkd.losses import LOSSES, build_config  # noqa: E402
from tvkd.scoring import collate_pairs, state_logits  # noqa: E402
from tvkd.training.trainer import PreferenceCollator, PreferenceTrainer, prepare_policy  # noqa: E402


def _dataset(seed=0):
    import datasets

    g = torch.Generator().manual_seed(seed)
    rows = []
    for i, f in enumerate(_features(seed) * 2):
        rows.append({**f, "pair_index": i,
                     "chosen/ref_logps": (-torch.rand(len(f["chosen_ids"]), generator=g)).tolist(),
                     "rejected/ref_logps": (-torch.rand(len(f["rejected_ids"]), generator=g)).tolist()})
    return datasets.Dataset.from_list(rows)


def _trainer(model, loss_name, tmp_path, steps, **kw):
    from transformers import TrainingArguments

    loss_cls = LOSSES.get(loss_name)
    cfg = build_config(loss_cls, {})
    loss = loss_cls()
    needs = loss.needs(cfg)
    args = TrainingArguments(output_dir=str(tmp_path / "out"), use_cpu=True, report_to="none", max_steps=steps,
                             remove_unused_columns=False, per_device_train_batch_size=3, learning_rate=5e-2,
                             save_strategy="no", disable_tqdm=True, logging_steps=100)
    return PreferenceTrainer(model=model, args=args, train_dataset=_dataset(),
                             data_collator=PreferenceCollator(0, loss.batch_columns(cfg), needs.reference),
                             loss=loss, loss_config=cfg, needs_student_logits=needs.student_logits, **kw)


def test_lora_trains_only_the_adapter_and_its_reference_is_the_base_model(tmp_path):
    base = make_tiny_llama(VOCAB, seed=11)
    before = {n: p.detach().clone() for n, p in base.named_parameters()}
    policy, options = prepare_policy(copy.deepcopy(base).train(), TrainConfig(lora={"r": 4, "lora_alpha": 8}))
    trainable = {n for n, p in policy.named_parameters() if p.requires_grad}
    assert trainable and all("lora_" in n for n in trainable)
    assert options["lora"]["r"] == 4 and options["lora"]["trainable_parameters"] < options["lora"]["all_parameters"]
    # tdpo reads the reference's full distribution online: from the same model, adapter disabled
    trainer = _trainer(policy, "tdpo", tmp_path, steps=3, reference_from_base=True)
    assert trainer.reference_model is None
    adapter_before = {n: p.detach().clone() for n, p in policy.named_parameters() if p.requires_grad}
    trainer.train()
    changed = [n for n, p in policy.named_parameters() if p.requires_grad and not torch.equal(p, adapter_before[n])]
    assert changed, "the adapter did not train"
    for n, p in policy.named_parameters():
        if not p.requires_grad:
            key = n.replace("base_model.model.", "").replace(".base_layer", "")
            assert torch.equal(p, before[key]), f"base weight {key} changed"

    batch = collate_pairs(_features(1), pad_id=0)
    policy.eval()
    ref = trainer._reference_logits(policy, batch)
    want = state_logits(base.eval(), batch["input_ids"], batch["attention_mask"], batch["prompt_lens"], batch["resp_lens"])
    torch.testing.assert_close(ref, want, atol=1e-5, rtol=0)
    adapted = state_logits(policy, batch["input_ids"], batch["attention_mask"], batch["prompt_lens"], batch["resp_lens"])
    assert (adapted - want).abs().max() > 1e-3  # the trained adapter moved the policy away from its reference

    merged = policy.merge_and_unload()  # what train_policy hands to evaluation
    got = state_logits(merged, batch["input_ids"], batch["attention_mask"], batch["prompt_lens"], batch["resp_lens"])
    torch.testing.assert_close(got, adapted, atol=1e-5, rtol=0)


def test_lora_with_chunked_logps_equals_full_logits(tmp_path):
    policy, _ = prepare_policy(make_tiny_llama(VOCAB, seed=12).train(), TrainConfig(lora={"r": 2}))
    batch = collate_pairs(_features(2), pad_id=0)
    batch["ref_logps"] = torch.zeros(batch["response_ids"].shape)
    values = []
    for chunk in (None, 3):
        trainer = _trainer(policy, "dpo", tmp_path, steps=1, logprob_chunk=chunk)
        policy.zero_grad()
        loss = trainer.compute_loss(policy, dict(batch))
        loss.backward()
        values.append((loss.detach(), {n: p.grad.clone() for n, p in policy.named_parameters() if p.requires_grad}))
    (l0, g0), (l1, g1) = values
    assert abs(float(l0 - l1)) <= 1e-5
    assert all((g0[n] - g1[n]).abs().max() <= 1e-5 for n in g0)


def test_lora_options_are_checked_and_identity_neutral_when_off():
    with pytest.raises(Exception, match="lora.rank: not a peft.LoraConfig field"):
        config_from_dict({"train": {"lora": {"rank": 8}}})
    with pytest.raises(Exception, match="logprob_chunk must be"):
        config_from_dict({"train": {"logprob_chunk": 0}})
    plain = config_from_dict({}).to_dict()["train"]
    assert not {"lora", "logprob_chunk", "padding_free", "gradient_checkpointing", "compile"} & set(plain)
    on = config_from_dict({"train": {"lora": {"r": 8}, "logprob_chunk": 512}}).to_dict()["train"]
    assert on["lora"] == {"r": 8} and on["logprob_chunk"] == 512
