"""Initialising Warp once, quietly (no start-up banner or module-load lines)."""

from __future__ import annotations

_initialised = False


def quiet_warp() -> None:
    """Silences Warp's informational output without initialising it."""
    import warp as wp

    wp.config.quiet = True  # Warp < 1.10
    if hasattr(wp, "LOG_ERROR"):
        wp.config.log_level = wp.LOG_ERROR


def init_warp() -> None:
    """Silences Warp's informational output and initialises it (idempotent)."""
    global _initialised
    if _initialised:
        return
    import warp as wp

    quiet_warp()
    wp.init()
    _initialised = True
