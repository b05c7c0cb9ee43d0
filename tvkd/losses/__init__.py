"""TVKD's losses: `tvkd` (the paper's Eq. 3) and `tvkd_released` (the authors' released recipe).

Every loss registers itself into `tvkd.api.LOSSES` when its module is imported; the registry
imports every module of this package and of `baselines` (and the ``tvkd.losses`` entry-point
group) on first use, so a loss is one file and nothing else lists it.
"""

from tvkd.api import LOSSES, AuxSpec, LossOutput, Needs, PreferenceLoss, ScoredBatch, build_config

__all__ = ["LOSSES", "AuxSpec", "LossOutput", "Needs", "PreferenceLoss", "ScoredBatch", "build_config"]
