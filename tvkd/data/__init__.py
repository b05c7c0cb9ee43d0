"""Data: any source (hub id, local folder or file) -> preference pairs or SFT conversations.

    from tvkd.data import load_preferences
    result = load_preferences("nvidia/HelpSteer2", split="train")
    print(result.summary())        # rows read, examples kept, skipped rows by reason
    result.examples[0].prompt      # [{"role": "user", "content": ...}]

Per-data-set schemas live in :mod:`tvkd.data.adapters` (registry ``ADAPTERS``); malformed rows
raise :class:`DataError` naming the source, row and field.
"""

from tvkd.data.adapters import ADAPTERS, AdapterContext, Skip
from tvkd.data.errors import DataError
from tvkd.data.examples import Message, PreferenceExample, SFTExample
from tvkd.data.loaders import LoadResult, load_preferences, load_sft, load_source
from tvkd.data.render import inspect_source, render_example

__all__ = [
    "ADAPTERS",
    "AdapterContext",
    "DataError",
    "LoadResult",
    "Message",
    "PreferenceExample",
    "SFTExample",
    "Skip",
    "inspect_source",
    "load_preferences",
    "load_sft",
    "load_source",
    "render_example",
]
