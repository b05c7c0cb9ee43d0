"""Baseline losses, one module each, registered into `tvkd.api.LOSSES` like TVKD's own.

A file dropped here is found by discovery (every module of this package is imported on the
registry's first use); modules whose name starts with ``_`` are helpers and are not imported by
discovery.
"""
