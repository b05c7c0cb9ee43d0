"""SeqKD (Kim & Rush, 2016, "Sequence-Level Knowledge Distillation", EMNLP): SFT on the teacher's answers.

    y_T = greedy decoding of π_T for each training prompt x
    L   = −(1 / Σ_i |y_T,i|) · Σ_i Σ_t log π_θ(y_T,i,t | x_i, y_T,i,<t)      (token mean over the batch)

docs/methods.md §B.5: no teacher logits are needed, only its greedy rollouts, generated once per
(data, teacher, length budget) and cached (`tvkd.rollouts`); the chosen side of every pair is
replaced by the teacher's rollout and the rejected side is ignored. The released TVKD code's
`sequence_kd_weight` branch computes something else ((q_θ − margin).mean()) and is not copied;
TRL's `GKDTrainer(seq_kd=True)` is a different method (teacher samples plus a JSD).
"""

from __future__ import annotations

from dataclasses import dataclass, field

from tvkd.api import LOSSES, LossOutput, Needs, PreferenceLoss, ScoredBatch


@LOSSES.register(
    "seqkd",
    needs="teacher greedy rollouts of the training prompts (cached); no reference",
    citation="Kim & Rush, 2016, Sequence-Level Knowledge Distillation, EMNLP",
    reference_free=True,
)
class SeqKD(PreferenceLoss):
    """L = token-mean −log π_θ(y_T) on the teacher's greedy answers."""

    name = "seqkd"

    @dataclass
    class Config:
        max_new_tokens: int = field(
            default=512, metadata={"help": "Length budget of the teacher's greedy rollouts (tokens)."})

        def __post_init__(self):
            if self.max_new_tokens < 1:
                raise ValueError(f"seqkd: max_new_tokens must be >= 1, got {self.max_new_tokens}")

    def needs(self, cfg: Config) -> Needs:
        return Needs(chosen_from="teacher", rollout_max_new_tokens=cfg.max_new_tokens)

    def __call__(self, batch: ScoredBatch, cfg: Config) -> LossOutput:
        logps, _ = batch.split(batch.logps)
        mask, _ = batch.split(batch.mask)
        loss = -(logps * mask).sum() / mask.sum().clamp(min=1)
        return LossOutput(loss=loss, metrics={"loss": loss.detach(), "nll": loss.detach(),
                                              "tokens": mask.sum().float()})
