"""The one-pass teacher columns equal the full-logits reference path (fp32, 1e-5) and the float64
references of the aux rewards, by the pure-torch fold and by the compiled C fold alike; the teacher
cache gives the same columns by every path; without a C compiler the pure-torch fold runs."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from tests.conftest import make_tiny_llama, make_tiny_tokenizer
from tests.test_cache import tokenized
from tvkd.api import AUX_REWARDS, AuxSpec
from tvkd.aux_rewards import TABLE5, reference_value
from tvkd.cache import fold_kernel
from tvkd.cache.onepass import onepass_columns, reference_columns, supported
from tvkd.cache.teacher import aux_specs, build_teacher_cache, pass_method

SPECS = aux_specs(TABLE5, (0.5, 1.0, 2.0, 3.0), ("logits", "logprobs"))
C_FOLD = pytest.param(True, marks=pytest.mark.skipif(not fold_kernel.available(), reason="no C compiler"), id="c")
FOLDS = [pytest.param(False, id="torch"), C_FOLD]  # the `kernel` argument of onepass_columns


def _problem(n=37, v=1000, d=24, seed=0, bias=True, scale=2.0):
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(n, d, generator=g) * scale
    weight = torch.randn(v, d, generator=g) * 0.5
    b = torch.randn(v, generator=g) if bias else None
    ids = torch.randint(0, v, (n,), generator=g)
    return hidden, weight, b, ids


def _assert_same(got, want, atol=1e-5, logits=None):
    """`logits`: ties are likely (bf16): the ids may differ among equal logits, their logits may not."""
    cols, top = got
    ref_cols, ref_top = want
    assert cols.keys() == ref_cols.keys()
    for c in cols:
        torch.testing.assert_close(cols[c], ref_cols[c], rtol=1e-5, atol=atol, msg=c)
    if ref_top is None:
        assert top is None
        return
    torch.testing.assert_close(top[0], ref_top[0], rtol=1e-5, atol=atol)
    if logits is None:
        assert torch.equal(top[1], ref_top[1])
    else:
        assert torch.equal(logits.gather(1, top[1]), logits.gather(1, ref_top[1]))
    torch.testing.assert_close(top[2], ref_top[2], rtol=1e-5, atol=atol)


# blocks: whole vocabulary; blocks with a partial last one (1000 = 3 x 300 + 100, not whole sub-blocks);
# blocks too small for the sub-block search; rows split unevenly
@pytest.mark.parametrize("rows,block", [(64, 1000), (10, 300), (7, 48), (37, 16), (5, 999)])
@pytest.mark.parametrize("topk", [None, 1, 5])
@pytest.mark.parametrize("kernel", FOLDS)
def test_onepass_equals_the_full_logits_path(rows, block, topk, kernel):
    hidden, weight, bias, ids = _problem()
    z = torch.nn.functional.linear(hidden, weight, bias)
    _assert_same(onepass_columns(hidden, weight, bias, ids, SPECS, topk, rows=rows, block=block, kernel=kernel),
                 reference_columns(z, ids, SPECS, topk))


@pytest.mark.parametrize("kernel", FOLDS)
@pytest.mark.parametrize("betas", [(2.0,), (0.5, 3.0), (1.0,)])  # with and without the exp((z - M)/2)² path
def test_top_50_over_many_blocks_and_every_value_temperature(kernel, betas):
    """A 20k vocabulary in 1k blocks: the running top-50 (its threshold rising block by block) and the rest."""
    hidden, weight, bias, ids = _problem(n=40, v=20000, d=32, seed=5)
    z = torch.nn.functional.linear(hidden, weight, bias)
    specs = aux_specs(TABLE5, betas)
    _assert_same(onepass_columns(hidden, weight, bias, ids, specs, 50, rows=16, block=1024, kernel=kernel),
                 reference_columns(z, ids, specs, 50))


@pytest.mark.parametrize("kernel", FOLDS)
@pytest.mark.parametrize("block", [64, 1000])
def test_ties_at_the_top_k_boundary(kernel, block):
    """Integer logits in [-8, 8]: hundreds of ties at the k-th value; the rest mass counts each tie left
    out of the top-k once (the ids among equal logits may differ, their logits may not)."""
    g = torch.Generator().manual_seed(7)
    hidden = torch.randint(-2, 3, (30, 4), generator=g).float()
    weight = torch.randint(-1, 2, (1000, 4), generator=g).float()
    ids = torch.randint(0, 1000, (30,), generator=g)
    z = torch.nn.functional.linear(hidden, weight)
    specs = aux_specs(TABLE5, (2.0,))
    _assert_same(onepass_columns(hidden, weight, None, ids, specs, 7, rows=8, block=block, kernel=kernel),
                 reference_columns(z, ids, specs, 7), logits=z)


@pytest.mark.parametrize("kernel", FOLDS)
def test_onepass_equals_the_float64_references(kernel):
    hidden, weight, bias, ids = _problem(n=6, v=300, seed=1)
    cols, _ = onepass_columns(hidden, weight, bias, ids, SPECS, None, rows=4, block=64, kernel=kernel)
    z = torch.nn.functional.linear(hidden, weight, bias).double()
    for spec in SPECS:
        want = [reference_value(spec, z[i].numpy(), int(ids[i])) for i in range(len(ids))]
        np.testing.assert_allclose(cols[spec.column].numpy(), want, rtol=1e-5, atol=1e-5, err_msg=spec.column)


@pytest.mark.parametrize("kernel", FOLDS)
def test_top_k_rest_is_exact_when_the_top_k_holds_almost_all_the_mass(kernel):
    """A peaked distribution: the rest mass is ~1e-9 of the total; 1 - sum(top) would be all rounding."""
    hidden, weight, _, _ = _problem(n=8, v=2000, seed=2, bias=False, scale=1.0)
    bias = torch.zeros(2000)
    bias[[5, 900, 1999]] = torch.tensor([30.0, 29.0, 28.5])
    _, (lp, ids, rest) = onepass_columns(hidden, weight, bias, None, [], 3, rows=3, block=256, kernel=kernel)
    z = torch.nn.functional.linear(hidden, weight, bias).double()
    logp = torch.log_softmax(z, -1)
    want = logp.scatter(-1, ids, float("-inf")).logsumexp(-1)
    assert (want < -15).all()
    np.testing.assert_allclose(rest.numpy(), want.numpy(), rtol=0, atol=1e-4)
    assert all(set(row) == {5, 900, 1999} for row in ids.tolist())


@pytest.mark.parametrize("kernel", FOLDS)
def test_bf16_logits_accumulate_in_fp32(kernel):
    hidden, weight, bias, ids = _problem(n=20, v=640, seed=3)
    hidden, weight, bias = hidden.bfloat16(), weight.bfloat16(), bias.bfloat16()
    z = torch.nn.functional.linear(hidden, weight, bias)
    assert z.dtype == torch.bfloat16
    specs = aux_specs(TABLE5, (2.0,))
    _assert_same(onepass_columns(hidden, weight, bias, ids, specs, 4, rows=8, block=128, kernel=kernel),
                 reference_columns(z, ids, specs, 4), atol=2e-5, logits=z)


def test_only_the_paper_aux_rewards_take_the_one_pass():
    assert supported(SPECS)
    hidden, weight, bias, ids = _problem(n=4, v=64)
    AUX_REWARDS.add("test_onepass_entropy", lambda stats, actions=None, **kw: stats.lse - stats.expected_logit,
                    kind="state", formula="H", uses_temperature=False, uses_q=False, reference=None)
    try:
        other = AuxSpec("test_onepass_entropy")
        assert not supported([AuxSpec("max"), other])
        with pytest.raises(ValueError, match="one-pass columns cover"):
            onepass_columns(hidden, weight, bias, ids, [other], None)
    finally:
        AUX_REWARDS.remove("test_onepass_entropy")
    with pytest.raises(ValueError, match="topk must be in 1..64"):
        onepass_columns(hidden, weight, bias, ids, [], 65)


def test_the_pass_method_is_checked(monkeypatch):
    monkeypatch.delenv("TVKD_CACHE_PASS", raising=False)
    assert pass_method() == "reference"  # the default path and its numbers are today's
    monkeypatch.setenv("TVKD_CACHE_PASS", "fast")
    with pytest.raises(ValueError, match="TVKD_CACHE_PASS='fast': use one of reference, onepass"):
        pass_method()


@pytest.mark.parametrize("kernel", FOLDS)
def test_teacher_cache_is_the_same_by_either_path(tmp_path, monkeypatch, kernel):
    tok = make_tiny_tokenizer()
    teacher = make_tiny_llama(len(tok) + 6, seed=11)  # a padded embedding matrix: 6 rows cut off
    td = tokenized(tmp_path, tok)
    specs = aux_specs(TABLE5, (0.5, 2.0))
    built = {}
    monkeypatch.setenv("TVKD_CACHE_KERNEL", "1" if kernel else "0")
    folds, real = [], fold_kernel.FoldState.fold
    monkeypatch.setattr(fold_kernel.FoldState, "fold", lambda self, *a: folds.append(1) or real(self, *a))
    for method in ("reference", "onepass"):
        monkeypatch.setenv("TVKD_CACHE_PASS", method)
        if method == "onepass":  # no full logits on this path
            monkeypatch.setattr("tvkd.cache.teacher.flat_state_logits", lambda *a, **k: pytest.fail("full logits"))
        built[method] = build_teacher_cache(td.dataset, td.fingerprint, teacher, "t", specs, topk=4,
                                            pad_id=tok.pad_token_id, batch_size=3, vocab_size=len(tok),
                                            cache_dir=tmp_path / method, progress=False).dataset
    assert bool(folds) == kernel  # the C fold runs where it builds, the torch fold when it is turned off
    a, b = built["reference"], built["onepass"]
    assert a.column_names == b.column_names
    for col in a.column_names:
        for x, y in zip(a[col], b[col]):
            if col.endswith("topk_ids"):
                assert x == y, col
            else:
                np.testing.assert_allclose(np.asarray(y, dtype=np.float64), np.asarray(x, dtype=np.float64),
                                           rtol=1e-5, atol=1e-5, err_msg=col)
    assert max(max(max(r) for r in rows) for rows in b["chosen/topk_ids"]) < len(tok)  # the vocabulary cut


@pytest.mark.skipif(not fold_kernel.available(), reason="no C compiler")
def test_the_c_fold_exponential_is_accurate_to_fp32():
    x = torch.cat([torch.linspace(-87.0, 0.0, 400_001), torch.tensor([-0.0, -1e-30, -87.5, -200.0, -1e30])])
    got = fold_kernel.exp(x).double()
    want = x.double().exp()
    normal = x >= -87.0
    rel = ((got - want) / want)[normal].abs().max().item()
    assert rel < 2e-7, rel  # a few fp32 ulps
    assert (got[~normal] == 0).all()  # below e^-87 (< 1.7e-38): 0, what no fp32 sum of terms >= 1 holds


@pytest.mark.parametrize("compiler", [None, "false"])  # none found; one that fails (`false` exits 1)
def test_without_a_c_compiler_the_torch_fold_runs(tmp_path, monkeypatch, compiler):
    hidden, weight, bias, ids = _problem(n=9, v=500, seed=6)
    z = torch.nn.functional.linear(hidden, weight, bias)
    want = reference_columns(z, ids, SPECS, 3)
    monkeypatch.setattr(fold_kernel, "_LIB", [])
    monkeypatch.setattr(fold_kernel, "_compiler", lambda: compiler)
    monkeypatch.setenv("TVKD_CACHE", str(tmp_path))
    assert not fold_kernel.available()
    monkeypatch.setattr(fold_kernel.FoldState, "fold", lambda *a: pytest.fail("the C fold ran"))
    _assert_same(onepass_columns(hidden, weight, bias, ids, SPECS, 3), want)  # the torch fold, same numbers
    with pytest.raises(ValueError, match="the compiled one-pass fold needs a CPU and a C compiler"):
        onepass_columns(hidden, weight, bias, ids, SPECS, 3, kernel=True)


def test_the_c_fold_is_turned_off_by_its_variable(monkeypatch):
    monkeypatch.setenv("TVKD_CACHE_KERNEL", "0")
    assert not fold_kernel.available()


@pytest.mark.slow
def test_the_compiled_fold_equals_the_eager_one():
    hidden, weight, bias, ids = _problem(n=50, v=4000, seed=4)
    specs = aux_specs(TABLE5, (2.0,))
    eager = onepass_columns(hidden, weight, bias, ids, specs, 8, rows=32, block=1024, kernel=False)
    _assert_same(onepass_columns(hidden, weight, bias, ids, specs, 8, rows=32, block=1024, compiled=True,
                                 kernel=False), eager)
