"""Our `dpo` equals TRL's DPOTrainer loss (loss_type="sigmoid") on one collated batch.

A tiny random Llama and a word-level tokenizer; TRL tokenizes plain-text rows (appending the
EOS string, docs/methods.md §A.1), collates [chosen rows; rejected rows], and computes its loss with a
separate reference model. We recompute per-token log-probs from the same `input_ids` and
`completion_mask` (logits at index i predict token i + 1), lay them out response-aligned as a
`ScoredBatch`, and compare.
"""

from __future__ import annotations

import pytest
import torch

transformers = pytest.importorskip("transformers")
trl = pytest.importorskip("trl")

from datasets import Dataset  # noqa: E402
from tokenizers import Tokenizer, models, pre_tokenizers  # noqa: E402

from tvkd.losses import LOSSES, ScoredBatch, build_config  # noqa: E402

WORDS = "the a cat dog sat ran on mat away down up fast slow red blue big small is was very and".split()
ROWS = {
    "prompt": ["the cat", "a dog", "the red mat", "a big cat is"],
    "chosen": [" sat on the mat", " ran away fast", " is red", " very big"],
    "rejected": [" ran", " sat down on a blue mat", " was very small and slow", " small"],
}


def _tokenizer():
    vocab = {tok: i for i, tok in enumerate(["<pad>", "<eos>", "<unk>", *WORDS])}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return transformers.PreTrainedTokenizerFast(
        tokenizer_object=tok, eos_token="<eos>", pad_token="<pad>", unk_token="<unk>"
    )


def _model(tokenizer, seed: int):
    torch.manual_seed(seed)
    config = transformers.LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=64,
        pad_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.eos_token_id,
        bos_token_id=None,
    )
    return transformers.LlamaForCausalLM(config).eval()


def _response_logps(model, input_ids, attention_mask, completion_mask) -> tuple[torch.Tensor, torch.Tensor]:
    """Response-aligned [2B, T] log π(a_t|s_t) and mask (docs/methods.md §A.1)."""
    with torch.no_grad():
        logits = model(input_ids=input_ids, attention_mask=attention_mask).logits
    # logits at index i predict token i + 1
    token_logps = torch.log_softmax(logits[:, :-1].float(), -1).gather(-1, input_ids[:, 1:, None]).squeeze(-1)
    positions = [completion_mask[r].nonzero().squeeze(-1) for r in range(input_ids.shape[0])]
    width = max(len(p) for p in positions)
    out = torch.zeros(input_ids.shape[0], width)
    mask = torch.zeros(input_ids.shape[0], width, dtype=torch.bool)
    for r, pos in enumerate(positions):
        assert pos.min() >= 1 and torch.all(pos.diff() == 1)  # one contiguous response after the prompt
        out[r, : len(pos)] = token_logps[r, pos - 1]
        mask[r, : len(pos)] = True
    return out, mask


def test_dpo_equals_trl_sigmoid(tmp_path):
    tokenizer = _tokenizer()
    model, ref_model = _model(tokenizer, 0), _model(tokenizer, 1)
    args = trl.DPOConfig(
        output_dir=str(tmp_path),
        use_cpu=True,
        bf16=False,
        report_to=[],
        beta=0.1,
        loss_type=["sigmoid"],
        per_device_train_batch_size=len(ROWS["prompt"]),
        max_length=None,
        save_strategy="no",
        logging_strategy="no",
        disable_tqdm=True,
    )
    trainer = trl.DPOTrainer(
        model=model,
        ref_model=ref_model,
        args=args,
        train_dataset=Dataset.from_dict(ROWS),
        processing_class=tokenizer,
    )
    batch = next(iter(trainer.get_train_dataloader()))
    assert (batch["input_ids"] != tokenizer.unk_token_id).all()
    with torch.no_grad():
        trl_loss = trainer.compute_loss(trainer.model, batch)

    ids, attn, comp = batch["input_ids"], batch["attention_mask"], batch["completion_mask"]
    logps, mask = _response_logps(trainer.model, ids, attn, comp)
    ref_logps, ref_mask = _response_logps(trainer.ref_model, ids, attn, comp)
    assert torch.equal(mask, ref_mask)
    # every response ends in EOS (TRL appends it to plain-text completions)
    last_index = (comp * torch.arange(comp.shape[1])).argmax(1)
    assert torch.all(ids.gather(1, last_index[:, None]) == tokenizer.eos_token_id)

    ours = LOSSES.get("dpo")()(
        ScoredBatch(logps=logps, mask=mask, ref_logps=ref_logps),
        build_config(LOSSES.get("dpo"), {"beta": 0.1}),
    )
    assert abs(trl_loss.item() - 0.6931) > 1e-3  # the two models differ: not the trivial log 2
    torch.testing.assert_close(ours.loss, trl_loss.float(), rtol=1e-6, atol=1e-6)
