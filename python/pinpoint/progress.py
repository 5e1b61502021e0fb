"""The one progress bar of pinpoint (tqdm).

``progress(total, desc, enabled)`` is a tqdm bar that is off when ``enabled`` is false or the
environment sets ``PINPOINT_NO_PROGRESS=1`` (tests and batch jobs). It does not stay on screen
after it closes unless ``leave=True``. Extra keyword arguments go to tqdm (``initial``,
``dynamic_ncols``, ...).
"""
from __future__ import annotations

import os

__all__ = ["progress", "progress_disabled"]


def progress_disabled(enabled: bool = True) -> bool:
    """Whether a bar asked for with ``enabled`` stays hidden (``PINPOINT_NO_PROGRESS=1`` hides all)."""
    return not enabled or os.environ.get("PINPOINT_NO_PROGRESS") == "1"


def progress(total: int, desc: str, enabled: bool = True, *, unit: str = "it", leave: bool = False, **kwargs):
    """A tqdm bar over ``total`` units; ``.update(n)`` / ``.close()`` as usual."""
    from tqdm.auto import tqdm

    return tqdm(total=total, desc=desc, unit=unit, leave=leave, disable=progress_disabled(enabled), **kwargs)
