"""DPKD, Direct Preference Knowledge Distillation (Li et al., 2024): the official token-level form and the
paper's sequence-level form (docs/methods.md §A.5, §B.5.4), chosen by ``form``.

``form=token`` (default, the official code). On the chosen response with teacher forcing, per valid
token t (state s_t), with the teacher as the reference:

    y^T_t = argmax π_T(·|s_t),   y^S_t = argmax π_θ(·|s_t)          (the argmax carries no gradient)
    h_t   = [log π_θ(y^T_t) − log π_θ(y^S_t)] − [log π_T(y^T_t) − log π_T(y^S_t)]
    L_d   = (1 / N_w) Σ_t −log σ(β·h_t)                              (β = dpo_beta = 0.1)
    L     = (1 − kd_ratio) · CE(y_w) + kd_ratio · L_d               (kd_ratio = 0.5)

CE is `baselines.sft`'s token mean over the N_w valid chosen tokens (EOS included), the same
tokens L_d averages over. The official options are flags: ``label_smoothing`` ε gives
−(1−ε)·log σ(βh) − ε·log σ(−βh); ``loss_type=ipo`` gives (h − 1/(2β))²; ``loss_type=dpop`` gives
−log σ(βh) + λ·max(0, log π_T(y^T) − log π_θ(y^T)) (λ = ``dpop_lambda`` = 50). Where y^T = y^S,
h ≡ 0: the token costs log 2 and gives no gradient.

The teacher's log-prob of the student's argmax is needed, which a top-k cache may not hold, so the
teacher runs online (full logits). Both argmaxes run over the rows the two vocabularies share
(the teacher's logits may have fewer rows than the student's padded embedding); each log-prob is
a log-softmax over its model's own rows.

``form=sequence`` (the paper's formulation, the flag of docs/methods.md §A.5): the teacher's output is preferred
over the student's, with the teacher as the reference of the implicit reward. The chosen side of
each pair becomes the teacher's greedy answer y^T and the rejected side the student
initialisation's greedy answer y^S (`Needs.chosen_from="teacher"`, `rejected_from="student"`: cached
rollouts, each ending in EOS, `max_new_tokens` their budget); with sums over each response's tokens
(EOS included)

    r(y)  = β · Σ_t [log π_θ(y_t|s_t) − log π_T(y_t|s_t)]
    h     = Σ_t [log π_θ − log π_T](y^T) − Σ_t [log π_θ − log π_T](y^S)
    L_d   = mean over pairs −log σ(β·h)             (= −log σ(r(y^T) − r(y^S)))
    L     = (1 − kd_ratio) · CE(y^T) + kd_ratio · L_d

so CE is SFT on the teacher's answers (SeqKD) and ``kd_ratio=1`` is the pure preference objective.
The same options apply to the sequence h: ``label_smoothing``, ``loss_type=ipo`` ((h − 1/(2β))²,
sums, not TRL's length average) and ``loss_type=dpop`` (λ·max(0, Σ log π_T(y^T) − Σ log π_θ(y^T))).
Left out of this form: the paper samples y^S from the current student, here they are the
initialisation's greedy answers, fixed for the run (as ADPA's); and the paper's first stage, which
trains on the implicit reward plus a reverse KL before the preference stage, is not run (start
from a student trained by `gkd` or `seqkd` for it).

Differences from the official code (microsoft/LMOps ``dpkd/main.py::
get_distil_loss`` with ``--seqKD-DPO``): log-softmax in fp32 (the official runs it in bf16, which
can change an argmax on near ties); the official runner's ``lm_coef`` LM-pretraining loss on
separate data, and its ``--reference-free`` and ``--simpo`` switches (not in §B.5.4), are left out.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from baselines import _binned
from tvkd.api import LOSSES, LossOutput, Needs, PreferenceLoss, ScoredBatch

LOSS_TYPES = ("sigmoid", "ipo", "dpop")
FORMS = ("token", "sequence")


@LOSSES.register(
    "dpkd",
    needs="form=token: student logits + online teacher logits on the chosen responses; form=sequence: teacher "
          "and student greedy rollouts (chosen, rejected) + online teacher logits; no reference",
    citation="Li et al., 2024, Direct Preference Knowledge Distillation for Large Language Models "
             "(arXiv 2406.19774); official code microsoft/LMOps dpkd/main.py::get_distil_loss (--seqKD-DPO)",
    reference_free=True,
)
class DPKD(PreferenceLoss):
    """L = (1 − kd_ratio)·CE + kd_ratio·L_d: per token, teacher argmax vs student argmax (form=token), or per
    pair, the teacher's answer vs the student's with the teacher as reference (form=sequence)."""

    name = "dpkd"

    @dataclass
    class Config:
        form: str = field(default="token", metadata={
            "help": "token: the official per-token form on the chosen response (teacher argmax vs student argmax) | "
                    "sequence: the paper's form, the teacher's greedy answer preferred over the student's, "
                    "implicit reward β·log π_θ/π_T summed over each answer."})
        beta: float = field(default=0.1, metadata={
            "help": "β (dpo_beta) of the implicit reward (per token or per pair)."})
        kd_ratio: float = field(default=0.5, metadata={
            "help": "Mix in [0, 1]: L = (1 − kd_ratio)·CE + kd_ratio·L_d (official 0.5)."})
        loss_type: str = field(default="sigmoid", metadata={
            "help": "sigmoid: −log σ(βh) (official default) | ipo: (h − 1/(2β))² | "
                    "dpop: −log σ(βh) + λ·max(0, log π_T(y^T) − log π_θ(y^T))."})
        label_smoothing: float = field(default=0.0, metadata={
            "help": "ε in [0, 0.5) for loss_type=sigmoid: −(1−ε)·log σ(βh) − ε·log σ(−βh); 0 is plain."})
        dpop_lambda: float = field(default=50.0, metadata={"help": "λ of loss_type=dpop (official DPOP_lambda 50)."})
        max_new_tokens: int = field(default=512, metadata={
            "help": "Length budget of the teacher's and the student's greedy answers (form=sequence only)."})

        def __post_init__(self):
            if not self.beta > 0:
                raise ValueError(f"dpkd: beta must be > 0, got {self.beta}")
            if not 0.0 <= self.kd_ratio <= 1.0:
                raise ValueError(f"dpkd: kd_ratio must lie in [0, 1], got {self.kd_ratio}")
            if self.loss_type not in LOSS_TYPES:
                raise ValueError(f"dpkd: loss_type must be one of {', '.join(LOSS_TYPES)}, got {self.loss_type!r}")
            if not 0.0 <= self.label_smoothing < 0.5:
                raise ValueError(f"dpkd: label_smoothing must lie in [0, 0.5), got {self.label_smoothing}")
            if self.label_smoothing and self.loss_type != "sigmoid":
                raise ValueError(f"dpkd: label_smoothing applies to loss_type=sigmoid only, got {self.loss_type!r}")
            if self.form not in FORMS:
                raise ValueError(f"dpkd: form must be one of {', '.join(FORMS)}, got {self.form!r}")
            if not (isinstance(self.max_new_tokens, int) and self.max_new_tokens >= 1):
                raise ValueError(f"dpkd: max_new_tokens must be a positive int, got {self.max_new_tokens!r}")
            if self.dpop_lambda < 0:
                raise ValueError(f"dpkd: dpop_lambda must be >= 0, got {self.dpop_lambda}")

    def needs(self, cfg: Config) -> Needs:
        if cfg.form == "sequence":
            return Needs(teacher_logits=True, chosen_from="teacher", rejected_from="student",
                         rollout_max_new_tokens=cfg.max_new_tokens)
        return Needs(student_logits=True, teacher_logits=True)

    @staticmethod
    def preference_loss(h: torch.Tensor, dpop_gap: torch.Tensor, cfg: Config) -> torch.Tensor:
        """The official loss of a margin h (per token or per pair); `dpop_gap` = log π_T(y) − log π_θ(y)."""
        if cfg.loss_type == "ipo":
            return (h - 1.0 / (2.0 * cfg.beta)) ** 2
        if cfg.loss_type == "dpop":
            return -F.logsigmoid(cfg.beta * h) + cfg.dpop_lambda * dpop_gap.clamp(min=0)
        eps = cfg.label_smoothing
        return -(1.0 - eps) * F.logsigmoid(cfg.beta * h) - eps * F.logsigmoid(-cfg.beta * h)

    def sequence_margins(self, batch: ScoredBatch) -> tuple[torch.Tensor, torch.Tensor]:
        """([B] h = Σ(log π_θ − log π_T)(y_w) − Σ(log π_θ − log π_T)(y_l), [B] Σ(log π_T − log π_θ)(y_w))."""
        if batch.teacher_logits is None:
            raise ValueError("dpkd needs the online teacher logits (Needs.teacher_logits)")
        if batch.token_ids is None:
            raise ValueError("dpkd form=sequence needs the response token ids (ScoredBatch.token_ids)")
        teacher = torch.log_softmax(batch.teacher_logits.float(), -1)
        ids = batch.token_ids.long()
        if bool((ids[batch.mask] >= teacher.shape[-1]).any()):
            raise ValueError(f"dpkd: a response token id is outside the teacher's {teacher.shape[-1]} logit rows")
        t_logps = teacher.gather(-1, ids.clamp(max=teacher.shape[-1] - 1).unsqueeze(-1)).squeeze(-1)
        zero = torch.zeros_like(batch.logps)
        ratio = torch.where(batch.mask, batch.logps - t_logps, zero).sum(-1)
        chosen, rejected = batch.split(ratio)
        return chosen - rejected, -chosen

    def token_losses(self, batch: ScoredBatch, cfg: Config) -> tuple[torch.Tensor, torch.Tensor]:
        """([B, T] per-token L_d on the chosen rows, 0 at padding; [B, T] bool y^T == y^S)."""
        if batch.logits is None:
            raise ValueError("dpkd needs the student logits (Needs.student_logits)")
        if batch.teacher_logits is None:
            raise ValueError("dpkd needs the online teacher logits (Needs.teacher_logits)")
        b = batch.num_pairs
        student = torch.log_softmax(batch.logits[:b].float(), -1)
        teacher = torch.log_softmax(batch.teacher_logits[:b].float(), -1)
        shared = min(student.shape[-1], teacher.shape[-1])
        y_t = teacher[..., :shared].argmax(-1, keepdim=True)
        y_s = student.detach()[..., :shared].argmax(-1, keepdim=True)
        s_t, s_s = student.gather(-1, y_t).squeeze(-1), student.gather(-1, y_s).squeeze(-1)
        t_t, t_s = teacher.gather(-1, y_t).squeeze(-1), teacher.gather(-1, y_s).squeeze(-1)
        h = (s_t - s_s) - (t_t - t_s)
        losses = self.preference_loss(h, t_t - s_t, cfg)
        mask = batch.mask[:b]
        return torch.where(mask, losses, torch.zeros_like(losses)), (y_t == y_s).squeeze(-1) & mask

    def __call__(self, batch: ScoredBatch, cfg: Config) -> LossOutput:
        b = batch.num_pairs
        mask = batch.mask[:b]
        ce = -_binned.token_mean(batch.logps[:b], mask)
        if cfg.form == "sequence":
            h, gap = self.sequence_margins(batch)
            distil = self.preference_loss(h, gap, cfg).mean()
            loss = (1.0 - cfg.kd_ratio) * ce + cfg.kd_ratio * distil
            margins = (cfg.beta * h).detach()
            metrics = {"loss": loss.detach(), "nll": ce.detach(), "distil": distil.detach(),
                       "margin": margins.mean(), "reward_accuracy": (margins > 0).float().mean()}
            return LossOutput(loss=loss, metrics=metrics, margins=margins)
        losses, agree = self.token_losses(batch, cfg)
        distil = _binned.token_mean(losses, mask)
        loss = (1.0 - cfg.kd_ratio) * ce + cfg.kd_ratio * distil
        count = mask.sum().clamp(min=1)
        metrics = {"loss": loss.detach(), "nll": ce.detach(), "distil": distil.detach(),
                   "argmax_agreement": (agree.sum() / count).float()}
        return LossOutput(loss=loss, metrics=metrics)
