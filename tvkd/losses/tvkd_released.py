"""TVKD as released by its authors (docs/methods.md §A.4, §B.1.3, with the §A.7 correction).

The released recipe (`qadapter_loss_type="dpo"`, `softvalue="entropy"`) trains a different
objective from the paper's Eq. 3. On the 51-bin projection q_θ(s) of the student at each state
(the teacher's top-50 ids at s, plus one "rest" bin holding the student's remaining mass),
each bin clamped to [1e-8, 1 − 1e-8] and *not* renormalised:

    r_t = log q_θ(s_t)[bin(a_t)] − γ·H(q_θ(s_{t+1})),   H(q) = −Σ_k q_k log q_k
    R_i = Σ_{t < T_i − 1} r_t                                (content tokens; EOS excluded)
    L   = −log σ(R_w − R_l)                                  (no π_ref, no β; mean over pairs)

bin(a) is the index of a among the teacher's top-k ids at s_t, or k (the rest bin) if absent.
The entropy at the EOS position (the state s_{T−1} that predicts EOS) is exactly 0 (A.7: the
released code zeroes the probabilities there before the entropy), so the last content token
gets r = Q only. The rest bin is the released code's 1 − Σ top-k of the student's fp32 softmax,
by the same operations in the same order (`official_bins`), floored at 1e-8 (`rest_bin="complement"`,
the default, so this row reproduces the release: on a peaked student that bin is mostly rounding,
and any other fp32 route to it moves the loss by up to 0.1 nats at logit scale 12); `rest_bin="logsumexp"`
takes logsumexp over the non-top-k student logits minus logsumexp over all of them (stable;
docs/methods.md §B.8), which differs when the student's mass outside the top-k is below ~6e-8.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from tvkd.api import LOSSES, LossOutput, Needs, PreferenceLoss, ScoredBatch

CLAMP_MIN = 1e-8
CLAMP_MAX = 1.0 - 1e-8


REST_BINS = ("complement", "logsumexp")


def official_bins(logits: torch.Tensor, topk_ids: torch.Tensor) -> torch.Tensor:
    """[..., k+1] q_θ as the released code builds it (``load_input_and_target_probs_fast``), unclamped.

    The student's fp32 ``softmax`` gathered at the teacher's top-k ids, written into a k+1 buffer
    whose last bin is ``1 − buffer[..., :k].sum(-1)``, the same operations in the same order.
    When the student's mass outside the top-k is near fp32 resolution (a peaked student), that
    difference is dominated by rounding, so only this exact sequence gives the released numbers:
    computing 1 − Σ from ``exp(z − logsumexp z)`` instead moves the loss by 0.1 nats at logit
    scale 12 (docs/methods.md §A.4).
    """
    probs = torch.softmax(logits.float(), dim=-1)
    k = topk_ids.shape[-1]
    out = probs.new_zeros(*topk_ids.shape[:-1], k + 1)
    out[..., :k] = probs.gather(-1, topk_ids.long())
    out[..., k] = 1 - out[..., :k].sum(-1)
    return out


def binned_log_probs(logits: torch.Tensor, topk_ids: torch.Tensor, rest_bin: str = "logsumexp") -> torch.Tensor:
    """[..., k+1] log q_θ: the student's log-probs of the teacher's top-k ids, then the rest bin.

    fp32 throughout; the top-k bins are log-softmax values either way. `rest_bin="logsumexp"`: the
    rest bin is logsumexp(z with the top-k ids set to −inf) − logsumexp(z), exact however little
    mass is left. `rest_bin="complement"`: the released code's 1 − Σ top-k of the fp32 softmax
    (`official_bins`, bit for bit), floored at 1e-8 before the log; it rounds a rest mass below
    ~6e-8 to 0 and then to 1e-8 (up to 1.6 nats off per token on a peaked student).
    """
    z = logits.float()
    ids = topk_ids.long()
    lse = torch.logsumexp(z, dim=-1, keepdim=True)
    top = z.gather(-1, ids) - lse
    if rest_bin == "complement":
        rest = official_bins(z, ids)[..., -1:].clamp(min=CLAMP_MIN).log()
    elif rest_bin == "logsumexp":
        rest = torch.logsumexp(z.scatter(-1, ids, float("-inf")), dim=-1, keepdim=True) - lse
    else:
        raise ValueError(f"unknown rest_bin {rest_bin!r}; valid: {', '.join(REST_BINS)}")
    return torch.cat([top, rest], dim=-1)


def clamped_bins(log_q: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(q, log q) with every bin clamped to [1e-8, 1 − 1e-8], not renormalised (as released)."""
    q = log_q.exp().clamp(CLAMP_MIN, CLAMP_MAX)
    return q, q.log()


@LOSSES.register(
    "tvkd_released",
    needs="student logits + teacher top-k ids (k=50); no reference",
    citation="TVKD official code (kaist-siit-lab/StarLab_Preference-Distillation-via-Value-based-Reinforcement-"
    "Learning, scripts/run_distill_dpo.py, qadapter_loss_type=dpo, softvalue=entropy); docs/methods.md §A.4",
    reference_free=True,
)
class TVKDReleased(PreferenceLoss):
    """R_i = Σ_t [log q_θ(bin(a_t)) − γ·H(q_θ(s_{t+1}))], L = −log σ(R_w − R_l) (docs/methods.md §B.1.3)."""

    name = "tvkd_released"

    @dataclass
    class Config:
        gamma: float = field(
            default=1.0,
            metadata={"help": "γ (qadapter_gamma), the weight of the next-state student entropy."},
        )
        topk: int = field(
            default=50,
            metadata={"help": "Teacher top-k ids per state that define the bins (k + 1 with the rest)."},
        )
        rest_bin: str = field(
            default="complement",
            metadata={"help": "The 51st bin: complement (released code: 1 − Σ top-k of the fp32 softmax, by its own "
                              "operations, floored at 1e-8) | "
                              "logsumexp (exact: logsumexp over the logits outside the top-k)."},
        )

        def __post_init__(self):
            if self.rest_bin not in REST_BINS:
                raise ValueError(f"tvkd_released: rest_bin must be one of {', '.join(REST_BINS)}, got {self.rest_bin!r}")
            if not (isinstance(self.topk, int) and self.topk >= 1):
                raise ValueError(f"tvkd_released: topk must be a positive int, got {self.topk!r}")
            if not math.isfinite(self.gamma):
                raise ValueError(f"tvkd_released: gamma must be finite, got {self.gamma}")

    def needs(self, cfg: Config) -> Needs:
        return Needs(topk=cfg.topk, student_logits=True)

    def batch_columns(self, cfg: Config) -> dict[str, str]:
        return {"topk_ids": "topk"}

    def sequence_rewards(self, batch: ScoredBatch, cfg: Config) -> tuple[torch.Tensor, torch.Tensor]:
        """([2B] R_i, [2B] Σ of the entropies that entered R_i)."""
        if batch.logits is None:
            raise ValueError("tvkd_released needs the student logits (Needs.student_logits)")
        if "topk_ids" not in batch.columns:
            raise ValueError("tvkd_released needs the teacher's top-k ids (batch column 'topk_ids')")
        ids = batch.columns["topk_ids"]
        if ids.shape[-1] >= batch.logits.shape[-1]:
            # the rest bin would be empty (log-mass −inf, undefined gradient)
            raise ValueError(
                f"top-k ({ids.shape[-1]}) must be smaller than the vocabulary ({batch.logits.shape[-1]})"
            )
        log_q = binned_log_probs(batch.logits, ids, cfg.rest_bin)  # [2B, T, k+1]
        q, log_q = clamped_bins(log_q)
        k = ids.shape[-1]

        # bin of the taken token: its rank among the teacher's top-k ids, else the rest bin k
        actions = batch.token_ids
        if actions is None:
            raise ValueError("tvkd_released needs the response token ids (ScoredBatch.token_ids)")
        hit = ids.long() == actions.long().unsqueeze(-1)  # [2B, T, k]
        bins = torch.where(hit.any(-1), hit.long().argmax(-1), torch.full_like(actions.long(), k))
        taken = log_q.gather(-1, bins.unsqueeze(-1)).squeeze(-1)  # [2B, T]

        lengths = batch.lengths().long()
        pos = torch.arange(batch.mask.shape[1], device=lengths.device).unsqueeze(0)
        content = batch.mask & (pos < (lengths - 1).unsqueeze(1))  # response tokens except EOS
        entropy = -(q * log_q).sum(-1)  # [2B, T], H(q_θ(s_t))
        # H(s_{t+1}) for content position t; s_{T-1} (the EOS position) is not content, so its
        # entropy is 0 exactly (A.7), as is everything past it
        next_entropy = torch.where(content, entropy, torch.zeros_like(entropy))[:, 1:]
        next_entropy = F.pad(next_entropy, (0, 1))
        zero = torch.zeros_like(taken)
        rewards = torch.where(content, taken - cfg.gamma * next_entropy, zero)
        return rewards.sum(-1), torch.where(content, next_entropy, zero).sum(-1)

    def __call__(self, batch: ScoredBatch, cfg: Config) -> LossOutput:
        rewards, entropies = self.sequence_rewards(batch, cfg)
        chosen, rejected = batch.split(rewards)
        diff = chosen - rejected
        losses = -F.logsigmoid(diff)
        d = diff.detach()
        metrics = {
            "loss": losses.detach().mean(),
            "margin": d.mean(),
            "reward_accuracy": (d > 0).float().mean(),
            "rewards/chosen": chosen.detach().mean(),
            "rewards/rejected": rejected.detach().mean(),
            "value/entropy_sum_mean": entropies.detach().mean(),
        }
        return LossOutput(loss=losses.mean(), metrics=metrics, margins=d)
