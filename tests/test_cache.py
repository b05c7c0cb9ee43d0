"""Teacher and reference caches equal a direct, one-row-at-a-time full-logits computation."""

from __future__ import annotations

import logging
from pathlib import Path
from types import SimpleNamespace

import datasets
import numpy as np
import pytest
import torch

from tests.conftest import make_tiny_llama, make_tiny_tokenizer
from tvkd.api import AUX_REWARDS, AuxSpec
from tvkd.aux_rewards import TABLE5
from tvkd.cache.teacher import aux_specs, build_reference_cache, build_teacher_cache
from tvkd.modeling import VocabularyMismatchError, shared_vocab_size
from tvkd.tokenize import TokenizeConfig, tokenize_preferences

ROWS = [("sort c a b", "a b c", "c b a"), ("reverse a b", "b a", "a b a b"), ("hello", "world", "the cat the dog"),
        ("the cat the dog sort", "yes", "no")]


def tokenized(tmp_path, tok):
    exs = [SimpleNamespace(id=str(i), prompt=[{"role": "user", "content": p}],
                           chosen=[{"role": "assistant", "content": c}], rejected=[{"role": "assistant", "content": r}],
                           meta={}) for i, (p, c, r) in enumerate(ROWS)]
    return tokenize_preferences(exs, tok, TokenizeConfig(64, 32), cache_dir=tmp_path / "tok", progress=False)


def direct(model, prompt, response):
    """Full logits of one unpadded sequence; states s_0..s_T (A.1: logits at p+t-1 predict a_t)."""
    ids = torch.tensor([list(prompt) + list(response)])
    with torch.no_grad():
        z = model(input_ids=ids).logits[0].double()
    p = len(prompt)
    return z[p - 1: p + len(response)]  # T+1 states


def reference_values(z, response, beta_v):
    """Table 5 by hand from full logits (float64)."""
    pi = torch.softmax(z, -1)
    top = torch.sort(pi, -1, descending=True).values
    a = torch.tensor(list(response))
    T = len(response)
    return {
        "logits": z[torch.arange(T), a],
        "log_prob": torch.log_softmax(z, -1)[torch.arange(T), a],
        "max": top[:, 0],
        "margin": top[:, 0] - top[:, 1],
        "expectation": (pi * z).sum(-1),
        f"soft_value@{beta_v:g}": beta_v * torch.logsumexp(z / beta_v, -1),
    }


@pytest.mark.parametrize("batch_size", [1, 3])
def test_teacher_cache_equals_direct_computation(tmp_path, batch_size):
    tok = make_tiny_tokenizer()
    teacher = make_tiny_llama(len(tok), seed=3)
    td = tokenized(tmp_path, tok)
    specs = aux_specs(TABLE5, (0.5, 2.0))
    tc = build_teacher_cache(td.dataset, td.fingerprint, teacher, "t", specs, topk=4, pad_id=tok.pad_token_id,
                             batch_size=batch_size, cache_dir=tmp_path / "tc", progress=False)
    ds = datasets.concatenate_datasets([td.dataset, tc.dataset], axis=1)
    for i in range(len(ds)):
        row = ds[i]
        for side in ("chosen", "rejected"):
            resp = row[f"{side}_ids"]
            z = direct(teacher, row["prompt_ids"], resp)
            for bv in (0.5, 2.0):
                want = reference_values(z, resp, bv)
                for col, ref in want.items():
                    got = np.asarray(row[f"{side}/{col}"], dtype=np.float64)
                    n = len(resp) if col in ("logits", "log_prob") else len(resp) + 1
                    assert got.shape == (n,), (col, got.shape)
                    np.testing.assert_allclose(got, ref[:n].numpy(), rtol=1e-5, atol=1e-5, err_msg=f"{side} {col}")
            lp = torch.log_softmax(z[:-1], -1)
            top_lp, top_ids = lp.topk(4, -1)
            np.testing.assert_array_equal(np.asarray(row[f"{side}/topk_ids"]), top_ids.numpy())
            np.testing.assert_allclose(np.asarray(row[f"{side}/topk_logprobs"]), top_lp.numpy(), rtol=1e-5, atol=1e-6)
            rest = torch.log1p(-top_lp.exp().sum(-1))
            np.testing.assert_allclose(np.asarray(row[f"{side}/topk_rest"]), rest.numpy(), rtol=1e-4, atol=1e-5)
    # s_0 is shared by the pair: chosen and rejected potentials start with the same value
    assert ds[0]["chosen/max"][0] == ds[0]["rejected/max"][0]


def test_reference_cache_and_reuse(tmp_path):
    tok = make_tiny_tokenizer()
    ref = make_tiny_llama(len(tok), seed=4)
    td = tokenized(tmp_path, tok)
    rc = build_reference_cache(td.dataset, td.fingerprint, ref, "r", pad_id=tok.pad_token_id, batch_size=2,
                               cache_dir=tmp_path / "rc", progress=False)
    for i in range(len(td.dataset)):
        row = td.dataset[i]
        for side in ("chosen", "rejected"):
            resp = row[f"{side}_ids"]
            z = direct(ref, row["prompt_ids"], resp)[:-1]
            want = torch.log_softmax(z, -1)[torch.arange(len(resp)), torch.tensor(resp)]
            np.testing.assert_allclose(rc.dataset[i][f"{side}/ref_logps"], want.numpy(), rtol=1e-5, atol=1e-5)
    loads = {"n": 0}

    def loader():
        loads["n"] += 1
        return ref

    again = build_reference_cache(td.dataset, td.fingerprint, loader, "r", cache_dir=tmp_path / "rc", progress=False)
    assert again.cached and loads["n"] == 0  # a cached call loads no model


def test_cache_bytes_per_token_is_compact(tmp_path):
    tok = make_tiny_tokenizer()
    td = tokenized(tmp_path, tok)
    tc = build_teacher_cache(td.dataset, td.fingerprint, make_tiny_llama(len(tok)), "t", aux_specs(TABLE5, (2.0,)),
                             pad_id=tok.pad_token_id, cache_dir=tmp_path / "tc", progress=False)
    # six aux rewards at one temperature: 6 floats per token, one list offset per response and column,
    # one extra potential (s_T... s_0) per response for each of the 4 state kinds
    ntok, n = tc.stats["response_tokens"], 2 * len(ROWS)
    assert 24 < tc.stats["aux_bytes_per_token"] <= 24 + (6 * 4 * (n + 1) + 4 * 4 * n) / ntok


def test_top_k_only_cache(tmp_path):
    tok = make_tiny_tokenizer()
    td = tokenized(tmp_path, tok)
    tc = build_teacher_cache(td.dataset, td.fingerprint, make_tiny_llama(len(tok)), "t", [], topk=5,
                             pad_id=tok.pad_token_id, cache_dir=tmp_path / "tc", progress=False)
    assert sorted(tc.dataset.column_names) == sorted(f"{s}/{c}" for s in ("chosen", "rejected")
                                                      for c in ("topk_ids", "topk_logprobs", "topk_rest"))
    assert tc.built == ["topk-5"]
    with pytest.raises(ValueError, match="nothing to compute"):
        build_teacher_cache(td.dataset, td.fingerprint, make_tiny_llama(len(tok)), "t", [], cache_dir=tmp_path / "x")


def _entropy(stats, actions=None, *, temperature=None, q_source="logits"):
    """H(π_T(·|s)), an aux reward that exists only in this test."""
    return stats.lse - stats.expected_logit


def test_new_aux_reward_reuses_the_existing_cache(tmp_path):
    """A new aux reward adds its column; the cached ones are neither recomputed nor changed."""
    tok = make_tiny_tokenizer()
    td = tokenized(tmp_path, tok)
    teacher = make_tiny_llama(len(tok), seed=5)
    old = [AuxSpec("soft_value", temperature=2.0), AuxSpec("max")]
    first = build_teacher_cache(td.dataset, td.fingerprint, teacher, "t", old, pad_id=tok.pad_token_id,
                                cache_dir=tmp_path / "tc", progress=False)
    assert sorted(first.built) == ["aux-max", "aux-soft_value@2"]
    stamp = {p.name: (p / "done.json").stat().st_mtime_ns for p in first.path.iterdir() if (p / "done.json").exists()}
    assert len(stamp) == 2
    AUX_REWARDS.add("test_entropy", _entropy, kind="state", formula="H", uses_temperature=False, uses_q=False,
                    reference=None)
    try:
        new = AuxSpec("test_entropy")
        second = build_teacher_cache(td.dataset, td.fingerprint, teacher, "t", [*old, new], pad_id=tok.pad_token_id,
                                     cache_dir=tmp_path / "tc", progress=False)
        assert second.path == first.path and second.built == ["aux-test_entropy"]
        assert {p: (first.path / p / "done.json").stat().st_mtime_ns for p in stamp} == stamp
        for col in ("chosen/soft_value@2", "rejected/max"):
            assert second.dataset[col] == first.dataset[col]
        z = direct(teacher, td.dataset[0]["prompt_ids"], td.dataset[0]["chosen_ids"])
        want = -(torch.softmax(z, -1) * torch.log_softmax(z, -1)).sum(-1)
        np.testing.assert_allclose(second.dataset[0]["chosen/test_entropy"], want.numpy(), rtol=1e-5, atol=1e-5)
        third = build_teacher_cache(td.dataset, td.fingerprint, lambda: pytest.fail("loaded the teacher"), "t",
                                    [new], cache_dir=tmp_path / "tc", progress=False)
        assert third.cached and third.built == []
    finally:
        AUX_REWARDS.remove("test_entropy")


def test_vocabulary_checks(caplog):
    tok = make_tiny_tokenizer()
    other = make_tiny_tokenizer()
    other.add_tokens(["zebra"])
    with pytest.raises(VocabularyMismatchError, match="only in student.*zebra"):
        shared_vocab_size(tok, other, len(tok), len(other))
    with caplog.at_level(logging.WARNING):
        assert shared_vocab_size(tok, tok, len(tok) + 8, len(tok)) == len(tok)
    assert "padding rows dropped" in caplog.text
    with pytest.raises(VocabularyMismatchError, match="smaller than the tokenizer"):
        shared_vocab_size(tok, tok, len(tok) - 1, len(tok))


def _build_in_process(tmp: str, out) -> None:
    import torch as _torch

    _torch.set_num_threads(1)
    tok = make_tiny_tokenizer()
    td = tokenized(Path(tmp), tok)
    teacher = make_tiny_llama(len(tok), seed=7)
    tc = build_teacher_cache(td.dataset, td.fingerprint, teacher, "t", aux_specs(TABLE5, (2.0,)), topk=3,
                             pad_id=tok.pad_token_id, cache_dir=Path(tmp) / "tc", progress=False)
    out.put((tc.built, tc.dataset.to_dict()))


def test_two_processes_building_the_same_teacher_cache_get_one_identical_result(tmp_path):
    import multiprocessing as mp

    ctx = mp.get_context("spawn")
    out = ctx.Queue()
    procs = [ctx.Process(target=_build_in_process, args=(str(tmp_path), out)) for _ in range(2)]
    for p in procs:
        p.start()
    results = [out.get(timeout=300) for _ in procs]
    for p in procs:
        p.join(timeout=60)
        assert p.exitcode == 0
    built = sorted(len(r[0]) for r in results)
    assert built == [0, 7]  # one process computed the 6 aux columns and the top-k, the other found them
    assert results[0][1] == results[1][1]
    assert not [p for p in (tmp_path / "tc").rglob("*") if ".tmp-" in p.name]
