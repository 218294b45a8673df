"""Polygraphy's logger as tdqrt uses it: no colours where the optional ``colored`` module is missing.

The first time Polygraphy's logger colours a message it imports ``colored``; when that fails it prints "[W]
'colored' module is not installed, will not use colors when logging ..." - on every tdqrt run that validates or
builds. Turning colours off through the logger's own setting (``G_LOGGER.colors``) when the module is absent
skips that check and its line; with ``colored`` installed nothing changes.
"""
from __future__ import annotations

import importlib.util


def quiet_polygraphy_colors() -> None:
    """Call before Polygraphy logs anything in this process (cheap; repeated calls are harmless)."""
    from polygraphy.logger import G_LOGGER

    if importlib.util.find_spec("colored") is None:
        G_LOGGER.colors = False
