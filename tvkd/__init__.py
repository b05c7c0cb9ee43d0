"""tvkd: a harness for preference distillation (TVKD and its baselines)."""

__version__ = "0.1.0"
