"""Chunked log-probs (`train.logprob_chunk`) and padding-free batches (`train.padding_free`) equal the
padded full-logits path: the log-prob function against log_softmax and autograd, and the trainer's
loss and every parameter gradient (DPO, TVKD with state-potential offsets over s_0..s_T, WPO which
reads the logits) in fp32, on pairs of different prompt and response lengths (padding everywhere)."""

from __future__ import annotations

import copy

import pytest
import torch

from tests.conftest import make_tiny_llama
from tvkd.chunked import chunked_token_logps
from tvkd.losses import LOSSES, build_config
from tvkd.scoring import collate_pairs, pack_rows
from tvkd.shaping import pair_offset_rows
from tvkd.training.trainer import PreferenceCollator, PreferenceTrainer

TOL = 1e-5


@pytest.mark.parametrize("chunk", [1, 3, 7, 100])
@pytest.mark.parametrize("bias", [False, True])
def test_chunked_logps_and_gradients_equal_log_softmax(chunk, bias):
    g = torch.Generator().manual_seed(0)
    n, d, v = 11, 6, 29
    h = torch.randn(n, d, generator=g, dtype=torch.float64, requires_grad=True)
    w = torch.randn(v, d, generator=g, dtype=torch.float64, requires_grad=True)
    b = torch.randn(v, generator=g, dtype=torch.float64, requires_grad=True) if bias else None
    ids = torch.randint(0, v, (n,), generator=g)
    up = torch.randn(n, generator=g, dtype=torch.float64)  # a different upstream gradient at every position

    z = h @ w.t() + (b if bias else 0)
    ref = torch.log_softmax(z, -1).gather(-1, ids[:, None]).squeeze(-1)
    ref_grads = torch.autograd.grad((ref * up).sum(), [h, w] + ([b] if bias else []))
    out = chunked_token_logps(h, w, b, ids, chunk)
    grads = torch.autograd.grad((out.double() * up).sum(), [h, w] + ([b] if bias else []))
    assert out.dtype == torch.float32
    torch.testing.assert_close(out.double(), ref, atol=1e-6, rtol=0)
    for a, r in zip(grads, ref_grads):
        torch.testing.assert_close(a, r, atol=1e-6, rtol=1e-6)


def test_chunked_rejects_bad_chunk():
    with pytest.raises(ValueError, match="chunk must be >= 1"):
        chunked_token_logps(torch.zeros(2, 3), torch.zeros(5, 3), None, torch.zeros(2, dtype=torch.long), 0)


def test_pack_rows_restarts_positions():
    ids = torch.tensor([[5, 6, 7, 0], [8, 9, 0, 0], [1, 2, 3, 4]])
    am = (ids != 0).long()
    am[2] = 1
    packed, pos, starts = pack_rows(ids, am)
    assert packed.tolist() == [[5, 6, 7, 8, 9, 1, 2, 3, 4]]
    assert pos.tolist() == [[0, 1, 2, 0, 1, 0, 1, 2, 3]]
    assert starts.tolist() == [0, 3, 5]


VOCAB = 67
# (prompt, chosen, rejected) token lengths: every row padded somewhere, prompts of different length.
SHAPES = [(3, 5, 2), (6, 1, 4), (2, 7, 7)]


def _features(seed: int = 0):
    g = torch.Generator().manual_seed(seed)

    def ids(k):
        return torch.randint(4, VOCAB, (k,), generator=g).tolist()

    feats = []
    for p, c, r in SHAPES:
        # responses end in EOS (id 3), as tokenized responses do
        feats.append({"prompt_ids": [2] + ids(p - 1), "chosen_ids": ids(c - 1) + [3], "rejected_ids": ids(r - 1) + [3]})
    return feats


def _batch(loss_name: str, seed: int = 0):
    feats = _features(seed)
    g = torch.Generator().manual_seed(seed + 1)
    batch = collate_pairs(feats, pad_id=0)
    batch["ref_logps"] = -torch.rand(batch["response_ids"].shape, generator=g) * batch["response_mask"]
    if loss_name == "tvkd":
        # a state potential over s_0..s_T (T+1 values, the last after EOS), as the teacher cache stores it
        pots = [torch.randn(int(n) + 1, generator=g).tolist() for n in batch["resp_lens"]]
        b = len(feats)
        offsets = pair_offset_rows(pots[:b], pots[b:], "state", gamma=0.9)  # γ < 1: every state counts
        batch["col:tvkd_offset"] = torch.tensor(offsets, dtype=torch.float32)
    return batch


def _loss_and_grads(model, loss_name, batch, tmp_path, **options):
    from transformers import TrainingArguments

    loss_cls = LOSSES.get(loss_name)
    cfg = build_config(loss_cls, {"alpha": 0.7} if loss_name == "tvkd" else {"beta": 0.1})  # β 0.1: far from log 2
    loss = loss_cls()
    needs = loss.needs(cfg)
    args = TrainingArguments(output_dir=str(tmp_path / "out"), use_cpu=True, report_to="none",
                             remove_unused_columns=False, per_device_train_batch_size=len(SHAPES))
    trainer = PreferenceTrainer(model=model, args=args, train_dataset=[{}],
                                data_collator=PreferenceCollator(0, loss.batch_columns(cfg), needs.reference),
                                loss=loss, loss_config=cfg, needs_student_logits=needs.student_logits, **options)
    model.zero_grad()
    value = trainer.compute_loss(model, dict(batch))
    value.backward()
    grads = {n: p.grad.detach().clone() for n, p in model.named_parameters()}
    return value.detach(), grads, trainer.logprob_path


@pytest.mark.parametrize("loss_name", ["dpo", "tvkd", "wpo"])
@pytest.mark.parametrize("options", [{"logprob_chunk": 4}, {"padding_free": True},
                                     {"logprob_chunk": 5, "padding_free": True}], ids=["chunk", "packed", "both"])
def test_trainer_paths_equal_the_padded_full_logits_path(tmp_path, loss_name, options):
    model = make_tiny_llama(VOCAB, seed=3).train()  # no dropout in the tiny Llama: train mode is deterministic
    batch = _batch(loss_name)
    base_loss, base_grads, base_path = _loss_and_grads(copy.deepcopy(model), loss_name, batch, tmp_path)
    loss, grads, path = _loss_and_grads(copy.deepcopy(model), loss_name, batch, tmp_path, **options)
    assert base_path == "full logits"
    if options.get("logprob_chunk"):
        # wpo reads the student's whole distribution: it falls back to the logits, and says so
        assert ("chunked" in path) == (loss_name != "wpo"), path
    assert ("padding-free" in path) == bool(options.get("padding_free")), path
    assert abs(float(loss - base_loss)) <= TOL, (float(loss), float(base_loss))
    assert float(base_loss) != pytest.approx(0.6931, abs=1e-3)  # not the trivial log 2 of equal policies
    for name, gr in base_grads.items():
        assert gr.abs().max() > 0, name  # every weight gets a gradient on both paths
        assert (grads[name] - gr).abs().max() <= TOL, name


def test_gradient_checkpointing_gives_equal_gradients(tmp_path):
    model = make_tiny_llama(VOCAB, seed=4).train()
    batch = _batch("dpo", seed=2)
    base_loss, base_grads, _ = _loss_and_grads(copy.deepcopy(model), "dpo", batch, tmp_path)
    ckpt = copy.deepcopy(model)
    ckpt.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    assert ckpt.is_gradient_checkpointing
    loss, grads, _ = _loss_and_grads(ckpt, "dpo", batch, tmp_path, logprob_chunk=3)
    assert abs(float(loss - base_loss)) <= TOL
    for name, gr in base_grads.items():
        assert (grads[name] - gr).abs().max() <= TOL, name


def test_a_head_that_is_not_linear_falls_back_to_full_logits(tmp_path):
    model = make_tiny_llama(VOCAB, seed=5).train()
    model.config.final_logit_softcapping = 30.0  # the logits are no longer head(h): chunking would be wrong
    batch = _batch("dpo")
    _, _, path = _loss_and_grads(model, "dpo", batch, tmp_path, logprob_chunk=4)
    assert path.startswith("full logits (the model's LM head")


def test_bf16_model_keeps_fp32_log_probs_on_every_path(tmp_path):
    model = make_tiny_llama(VOCAB, seed=6).to(torch.bfloat16).train()
    batch = _batch("dpo", seed=3)
    base_loss, base_grads, _ = _loss_and_grads(copy.deepcopy(model), "dpo", batch, tmp_path)
    for options in ({"logprob_chunk": 4}, {"logprob_chunk": 4, "padding_free": True}):
        m = copy.deepcopy(model)
        loss, grads, _ = _loss_and_grads(m, "dpo", batch, tmp_path, **options)
        assert loss.dtype == torch.float32
        # the same bf16 matmuls, fp32 softmax math: equal up to bf16 rounding of the weight gradients
        assert abs(float(loss - base_loss)) <= 1e-3
        for name, gr in base_grads.items():
            assert grads[name].dtype == torch.bfloat16
            assert (grads[name].float() - gr.float()).abs().max() <= 2e-2 * max(1.0, float(gr.float().abs().max()))
