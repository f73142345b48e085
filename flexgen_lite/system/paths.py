"""The one folder where flexgen-lite keeps what it makes once and reuses: hardware profiles, GGUF tokenizers,
compiled kernels, the server's default state."""

from __future__ import annotations

import os
from pathlib import Path


def cache_dir() -> Path:
    """$FLEXGEN_LITE_CACHE, else $XDG_CACHE_HOME/flexgen-lite, else ~/.cache/flexgen-lite."""
    override = os.environ.get("FLEXGEN_LITE_CACHE")
    if override:
        return Path(override)
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "flexgen-lite"
