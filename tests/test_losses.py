"""`dpo`, `tvkd`, `tvkd_released` and `sft` against independent loop references (docs/methods.md §A.3, §A.4, §A.7)."""

from __future__ import annotations

import itertools
import math

import numpy as np
import pytest
import torch
from datasets import Dataset

from tvkd.losses import LOSSES, ScoredBatch, build_config
from tvkd.registry import UnknownNameError

B, V = 5, 11
BETA, ALPHA = 0.1, 0.7


# --- an independent toy world: teacher logits per state, student/reference log-probs per token


def softmax64(z: np.ndarray) -> np.ndarray:
    e = np.exp(z - z.max())
    return e / e.sum()


def aux_value(name: str, z: np.ndarray, a: int | None, q_source: str, beta_v: float) -> float:
    """Table 5 at one state, in float64, straight from the definitions."""
    log_z = math.log(sum(math.exp(float(x)) for x in z))
    pi = [math.exp(float(x) - log_z) for x in z]
    q = [float(x) if q_source == "logits" else float(x) - log_z for x in z]
    return {
        "logits": lambda: q[a],
        "log_prob": lambda: float(z[a]) - log_z,
        "max": lambda: max(pi),
        "margin": lambda: sorted(pi)[-1] - sorted(pi)[-2],
        "expectation": lambda: sum(p * x for p, x in zip(pi, q)),
        "soft_value": lambda: beta_v * math.log(sum(math.exp(x / beta_v) for x in q)),
    }[name]()


class World:
    """B pairs; each response has T_i tokens and T_i + 1 teacher states (s_0 shared by the pair)."""

    def __init__(self, seed: int = 0, pairs: int = B):
        rng = np.random.default_rng(seed)
        self.pairs = pairs
        self.lengths = [int(n) for n in rng.integers(1, 7, size=2 * pairs)]  # chosen rows, then rejected
        self.tokens = [rng.integers(0, V, size=n) for n in self.lengths]
        self.teacher = [rng.normal(size=(n + 1, V)) * 2 for n in self.lengths]
        for i in range(pairs):
            self.teacher[pairs + i][0] = self.teacher[i][0]  # one prompt, one start state
        T = max(self.lengths)
        self.mask = torch.zeros(2 * pairs, T, dtype=torch.bool)
        for r, n in enumerate(self.lengths):
            self.mask[r, :n] = True
        self.logps = torch.from_numpy(-rng.gamma(2.0, 1.0, size=(2 * pairs, T))).float() * self.mask
        self.ref_logps = torch.from_numpy(-rng.gamma(2.0, 1.0, size=(2 * pairs, T))).float() * self.mask

    def aux_rows(self, name: str, kind: str, q_source: str, beta_v: float) -> list[list[float]]:
        rows = []
        for r, n in enumerate(self.lengths):
            z, a = self.teacher[r], self.tokens[r]
            if kind == "state":
                rows.append([aux_value(name, z[t], None, q_source, beta_v) for t in range(n + 1)])
            else:
                rows.append([aux_value(name, z[t], int(a[t]), q_source, beta_v) for t in range(n)])
        return rows

    def batch(self, columns=None, requires_grad=True) -> ScoredBatch:
        logps = self.logps.clone().requires_grad_(requires_grad)
        return ScoredBatch(
            logps=logps, mask=self.mask, ref_logps=self.ref_logps.clone(), columns=columns or {}
        )


def loop_psi(values: list[float], kind: str, gamma: float, shaping: str, terminal: str) -> float:
    if kind == "action":
        return sum(values)
    T = len(values) - 1
    total = 0.0
    for t in range(T):
        nxt = 0.0 if (terminal == "zero" and t == T - 1) else values[t + 1]
        total += gamma * nxt - (values[t] if shaping == "pbrs" else 0.0)
    return total


def softplus_neg(x: float) -> float:
    """−log σ(x), stably."""
    return math.log1p(math.exp(-x)) if x > -30 else -x


@pytest.fixture(scope="module")
def world():
    return World()


# --- tvkd: every flag combination ----------------------------------------------------------

AUX = {
    "logits": "action",
    "log_prob": "action",
    "max": "state",
    "margin": "state",
    "expectation": "state",
    "soft_value": "state",
}
FLAGS = list(
    itertools.product(
        AUX,
        ["pbrs", "next_only"],  # shaping
        ["teacher", "zero"],  # terminal
        [1.0, 0.9],  # gamma
        [True, False],  # include_reference
        ["none", "shuffled"],  # control
        ["logits", "logprobs"],  # q_source
        [False, True],  # tie_temperature
    )
)


def expected_column(aux: str, q_source: str, beta_v: float) -> str:
    col = aux
    if q_source == "logprobs" and aux in ("logits", "expectation", "soft_value"):
        col += "[logprobs]"
    if aux == "soft_value":
        col += f"@{beta_v:g}"
    return col


@pytest.mark.parametrize("aux,shaping,terminal,gamma,include_reference,control,q_source,tie", FLAGS)
def test_tvkd_every_flag_matches_reference(
    world, aux, shaping, terminal, gamma, include_reference, control, q_source, tie
):
    options = dict(
        aux=aux,
        shaping=shaping,
        terminal=terminal,
        gamma=gamma,
        include_reference=include_reference,
        control=control,
        q_source=q_source,
        tie_temperature=tie,
    )
    loss_cls = LOSSES.get("tvkd")
    kind = AUX[aux]
    if kind == "action" and (shaping, terminal, gamma) != ("pbrs", "teacher", 1.0):
        with pytest.raises(ValueError, match="action aux reward"):
            build_config(loss_cls, options)
        return
    cfg = build_config(loss_cls, options)
    loss_fn = loss_cls()
    beta_v = BETA if tie else 2.0
    column = expected_column(aux, q_source, beta_v)
    (spec,) = loss_fn.needs(cfg).aux
    assert spec.column == column
    assert loss_fn.needs(cfg).reference is include_reference

    rows = world.aux_rows(aux, kind, q_source, beta_v)
    ds = Dataset.from_dict(
        {f"chosen/{column}": rows[:B], f"rejected/{column}": rows[B:], "id": list(range(B))}
    )
    prepared = loss_fn.prepare(ds, cfg, seed=123)
    offsets = prepared["tvkd_offset"]

    want_offsets = [
        loop_psi(rows[i], kind, gamma, shaping, terminal)
        - loop_psi(rows[B + i], kind, gamma, shaping, terminal)
        for i in range(B)
    ]
    if control == "none":
        np.testing.assert_allclose(offsets, want_offsets, rtol=1e-10, atol=1e-10)
    else:
        np.testing.assert_allclose(sorted(offsets), sorted(want_offsets), rtol=1e-10, atol=1e-10)

    batch = world.batch({"tvkd_offset": torch.tensor(offsets)})
    out = loss_fn(batch, cfg)
    lp, ref = world.logps.double().numpy(), world.ref_logps.double().numpy()
    losses = []
    for i in range(B):
        d = [lp[r].sum() - (ref[r].sum() if include_reference else 0.0) for r in (i, B + i)]
        margin = BETA * (d[0] - d[1]) - ALPHA * offsets[i]
        losses.append(softplus_neg(margin))
    assert out.loss.shape == ()
    assert out.loss.item() == pytest.approx(np.mean(losses), rel=1e-5, abs=1e-6)
    assert out.metrics["psi/offset_mean"].item() == pytest.approx(np.mean(offsets), rel=1e-5, abs=1e-6)


def _prepared_batch(world: World, options: dict, seed: int = 0) -> tuple[object, ScoredBatch]:
    loss_cls = LOSSES.get("tvkd")
    cfg = build_config(loss_cls, options)
    (spec,) = loss_cls().needs(cfg).aux
    kind = AUX[spec.name]
    rows = world.aux_rows(spec.name, kind, spec.q_source, spec.temperature or 1.0)
    ds = Dataset.from_dict(
        {f"chosen/{spec.column}": rows[: world.pairs], f"rejected/{spec.column}": rows[world.pairs :]}
    )
    offsets = loss_cls().prepare(ds, cfg, seed=seed)["tvkd_offset"]
    return cfg, world.batch({"tvkd_offset": torch.tensor(offsets)})


@pytest.mark.parametrize("aux", ["soft_value", "max", "margin", "expectation"])
@pytest.mark.parametrize("include_reference", [True, False])
def test_tvkd_equals_dpo_bit_for_bit(world, aux, include_reference):
    options = dict(aux=aux, shaping="pbrs", terminal="zero", gamma=1.0, include_reference=include_reference)
    cfg, batch = _prepared_batch(world, options)
    assert torch.all(batch.columns["tvkd_offset"] == 0.0)
    out = LOSSES.get("tvkd")()(batch, cfg)
    out.loss.backward()

    dpo_batch = world.batch()
    dpo_cfg = build_config(LOSSES.get("dpo"), {"beta": BETA, "reference_free": not include_reference})
    dpo_out = LOSSES.get("dpo")()(dpo_batch, dpo_cfg)
    dpo_out.loss.backward()
    assert torch.equal(out.loss, dpo_out.loss)
    assert torch.equal(batch.logps.grad, dpo_batch.logps.grad)
    assert torch.equal(out.margins, dpo_out.margins)


def test_tvkd_gradient_is_eq4(world):
    cfg, batch = _prepared_batch(world, dict(aux="soft_value", alpha=0.7, gamma=0.9))
    offsets = batch.columns["tvkd_offset"].double()
    assert offsets.abs().min() > 0
    LOSSES.get("tvkd")()(batch, cfg).loss.backward()
    lp, ref = world.logps.double(), world.ref_logps.double()
    seq = (lp - ref).sum(1)
    margin = BETA * (seq[:B] - seq[B:]) - 0.7 * offsets
    # ∇L = −σ(−margin)·β·(∇Δ_w − ∇Δ_l), averaged over pairs; ∂Δ_i/∂logps[i, t] = mask
    coef = torch.sigmoid(-margin) * BETA / B
    want = torch.zeros_like(lp)
    want[:B] = -coef.unsqueeze(1) * world.mask[:B]
    want[B:] = coef.unsqueeze(1) * world.mask[B:]
    torch.testing.assert_close(batch.logps.grad.double(), want, rtol=1e-5, atol=1e-8)


def test_shuffled_control_is_a_fixed_derangement():
    world = World(seed=4, pairs=24)
    _, plain = _prepared_batch(world, dict(aux="soft_value"))
    _, shuf = _prepared_batch(world, dict(aux="soft_value", control="shuffled"))
    _, again = _prepared_batch(world, dict(aux="soft_value", control="shuffled"), seed=999)  # run seed unused
    _, other = _prepared_batch(world, dict(aux="soft_value", control="shuffled", control_seed=1))
    a, s = plain.columns["tvkd_offset"], shuf.columns["tvkd_offset"]
    assert torch.equal(a.sort().values, s.sort().values)  # the distribution is kept
    assert torch.all(a != s)  # no pair keeps its own offset
    assert torch.equal(s, again.columns["tvkd_offset"])  # deterministic in control_seed
    assert not torch.equal(s, other.columns["tvkd_offset"])
    assert torch.equal(a.sort().values, other.columns["tvkd_offset"].sort().values)


def test_tvkd_metrics_and_errors(world):
    cfg, batch = _prepared_batch(world, dict(aux="soft_value"))
    out = LOSSES.get("tvkd")()(batch, cfg)
    off = batch.columns["tvkd_offset"].double()
    assert out.metrics["psi/offset_abs_mean"].item() == pytest.approx(off.abs().mean().item(), rel=1e-6)
    assert out.metrics["psi/offset_std"].item() == pytest.approx(off.std(correction=0).item(), rel=1e-5)
    seq = (world.logps - world.ref_logps).double().sum(1)
    implicit = BETA * (seq[:B] - seq[B:])
    assert out.metrics["reward_accuracy"].item() == pytest.approx((implicit > 0).double().mean().item())
    assert out.metrics["margin"].item() == pytest.approx((implicit - 0.7 * off).mean().item(), rel=1e-5)
    with pytest.raises(UnknownNameError, match="Did you mean 'soft_value'"):
        build_config(LOSSES.get("tvkd"), {"aux": "softvalue"})
    with pytest.raises(ValueError, match="tvkd_offset"):
        LOSSES.get("tvkd")()(world.batch(), cfg)
    with pytest.raises(ValueError, match="teacher cache columns"):
        LOSSES.get("tvkd")().prepare(Dataset.from_dict({"x": [1, 2]}), cfg, seed=0)
    with pytest.raises(ValueError, match="control"):
        build_config(LOSSES.get("tvkd"), {"control": "shuffle"})


# --- dpo -----------------------------------------------------------------------------------


@pytest.mark.parametrize("eps", [0.0, 0.1, 0.3])
@pytest.mark.parametrize("reference_free", [False, True])
def test_dpo_matches_reference(world, eps, reference_free):
    cfg = build_config(
        LOSSES.get("dpo"), {"beta": 0.5, "label_smoothing": eps, "reference_free": reference_free}
    )
    out = LOSSES.get("dpo")()(world.batch(), cfg)
    lp, ref = world.logps.double().numpy(), world.ref_logps.double().numpy()
    losses = []
    for i in range(B):
        h = (lp[i].sum() - lp[B + i].sum()) - (0.0 if reference_free else ref[i].sum() - ref[B + i].sum())
        losses.append((1 - eps) * softplus_neg(0.5 * h) + eps * softplus_neg(-0.5 * h))
    assert out.loss.item() == pytest.approx(np.mean(losses), rel=1e-6)


def test_dpo_rejects_bad_smoothing():
    with pytest.raises(ValueError, match="label_smoothing"):
        build_config(LOSSES.get("dpo"), {"label_smoothing": 0.5})


# --- sft -----------------------------------------------------------------------------------


def test_sft_is_chosen_token_mean_nll(world):
    out = LOSSES.get("sft")()(world.batch(), build_config(LOSSES.get("sft"), {}))
    nll, count = 0.0, 0
    for r in range(B):  # chosen rows only, every token including EOS
        for t in range(world.lengths[r]):
            nll -= float(world.logps[r, t])
            count += 1
    assert out.loss.item() == pytest.approx(nll / count, rel=1e-6)


# --- tvkd_released -------------------------------------------------------------------------


def released_loop(logits: np.ndarray, ids: np.ndarray, tokens, lengths, gamma: float) -> float:
    """docs/methods.md §B.1.3 + §A.7, one position at a time in float64."""

    def bins(z, top):
        p = softmax64(z)
        q = [p[k] for k in top]
        q.append(1.0 - sum(q))
        return [min(max(x, 1e-8), 1 - 1e-8) for x in q]

    rewards = []
    for r, n in enumerate(lengths):
        total = 0.0
        for t in range(n - 1):  # content tokens: EOS (t = n − 1) excluded
            q = bins(logits[r, t], ids[r, t])
            top = list(ids[r, t])
            b = top.index(tokens[r][t]) if tokens[r][t] in top else len(top)
            h = 0.0
            if t + 1 < n - 1:  # the entropy at the EOS position is 0
                qn = bins(logits[r, t + 1], ids[r, t + 1])
                h = -sum(x * math.log(x) for x in qn)
            total += math.log(q[b]) - gamma * h
        rewards.append(total)
    half = len(lengths) // 2
    return float(np.mean([softplus_neg(rewards[i] - rewards[half + i]) for i in range(half)]))


@pytest.mark.parametrize("gamma", [1.0, 0.5, 0.0])
def test_tvkd_released_matches_loop(world, gamma):
    rng = np.random.default_rng(7)
    k = 4
    T = world.mask.shape[1]
    logits = rng.normal(size=(2 * B, T, V)) * 2
    logits[0, 0, 3] += 45.0  # a peaked state: the top bin clamps at 1 − 1e-8, the rest at 1e-8
    ids = np.stack([np.argsort(-rng.normal(size=(2 * B, T, V)), -1)[..., :k]])[0]
    tokens = [np.asarray(t) for t in world.tokens]
    tokens[0][0] = ids[0, 0, 0]  # one taken token surely inside the top-k
    token_ids = torch.zeros(2 * B, T, dtype=torch.long)
    for r, t in enumerate(tokens):
        token_ids[r, : len(t)] = torch.from_numpy(t)
    z = torch.tensor(logits, dtype=torch.float32, requires_grad=True)
    batch = ScoredBatch(
        logps=world.logps.clone(),
        mask=world.mask,
        logits=z,
        token_ids=token_ids,
        columns={"topk_ids": torch.from_numpy(ids).long()},
    )
    cfg = build_config(LOSSES.get("tvkd_released"), {"gamma": gamma, "topk": k})
    out = LOSSES.get("tvkd_released")()(batch, cfg)
    want = released_loop(np.float32(logits).astype(np.float64), ids, tokens, world.lengths, gamma)
    assert out.loss.item() == pytest.approx(want, rel=1e-5, abs=1e-6)
    out.loss.backward()
    assert torch.isfinite(z.grad).all() and z.grad.abs().sum() > 0
    # EOS positions and padding get no gradient: nothing at t ≥ T_i − 1 enters R_i
    for r, n in enumerate(world.lengths):
        assert torch.all(z.grad[r, n - 1 :] == 0)


def test_tvkd_released_rest_bins_differ_only_on_a_peaked_student():
    """complement (released) and logsumexp agree unless the student's rest mass underflows fp32's 1 − Σ."""
    from tvkd.losses.tvkd_released import binned_log_probs

    g = torch.Generator().manual_seed(3)
    z = torch.randn(4, 30, generator=g)
    ids = z.topk(5, -1).indices
    soft = [binned_log_probs(z, ids, r)[..., -1] for r in ("complement", "logsumexp")]
    torch.testing.assert_close(soft[0], soft[1], rtol=1e-5, atol=1e-5)
    peaked = z.clone()
    peaked[:, 0] += 40.0  # top-k holds all but ~e^-40 of the mass
    ids = peaked.topk(5, -1).indices
    comp, exact = (binned_log_probs(peaked, ids, r)[..., -1] for r in ("complement", "logsumexp"))
    assert torch.all(comp == math.log(1e-8)) and torch.all(exact < -35)


def test_tvkd_released_ignores_eos_and_needs():
    cls = LOSSES.get("tvkd_released")
    needs = cls().needs(build_config(cls, {}))
    assert needs.topk == 50 and needs.student_logits and not needs.reference
    assert build_config(cls, {}).rest_bin == "complement"
    assert LOSSES.meta("tvkd_released")["reference_free"] is True
