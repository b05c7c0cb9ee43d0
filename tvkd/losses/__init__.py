"""Every loss, registered into `LOSSES` on import (one module per loss).

``import tvkd.losses`` registers them all; ``LOSSES.get(name)`` returns the class and
``LOSSES.meta(name)`` its `needs`, `citation` and `reference_free` metadata.
"""

from tvkd.losses import dpo, sft, tvkd, tvkd_released  # noqa: F401  (registration)
from tvkd.losses.base import LOSSES, AuxSpec, LossOutput, Needs, PreferenceLoss, ScoredBatch, build_config

__all__ = ["LOSSES", "AuxSpec", "LossOutput", "Needs", "PreferenceLoss", "ScoredBatch", "build_config"]
