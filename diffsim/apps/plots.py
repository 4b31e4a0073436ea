"""Line plots as PNG files, through matplotlib (the optional ``plots`` extra).

One function serves the loss curve of ``diffsim fit`` and the energy plot of ``diffsim run``.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path

INSTALL_HINT = "pip install 'diffsim[plots]' (matplotlib)"


def plotting_available() -> bool:
    """True where matplotlib can be imported."""
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        return False
    return True


def line_plot(
    path: str | Path,
    x: Sequence[float],
    series: Mapping[str, Sequence[float]],
    *,
    xlabel: str,
    ylabel: str,
    log_y: bool = False,
    emphasise: str | None = None,
) -> None:
    """Writes a line plot with labelled axes (units in the labels) to a PNG.

    Args:
        path: the ``.png`` to write.
        x: the shared x values ``[N]``.
        series: label -> y values ``[N]``; a legend is drawn when there are several.
        xlabel, ylabel: axis labels with units, e.g. ``"time (s)"``.
        log_y: a logarithmic y axis (loss curves).
        emphasise: the label of a series drawn thicker (e.g. the total).

    Raises:
        ImportError: matplotlib is not installed (the message says how to install it).
    """
    try:
        import matplotlib
    except ImportError as exc:
        raise ImportError(f"plots need matplotlib: {INSTALL_HINT}") from exc
    matplotlib.use("Agg")  # no display needed
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4), dpi=100)
    try:
        for label, y in series.items():
            ax.plot(x, y, label=label, lw=2.2 if label == emphasise else 1.4)
        if log_y:
            ax.set_yscale("log")
        ax.set_xlabel(xlabel)
        ax.set_ylabel(ylabel)
        ax.grid(alpha=0.3, which="both" if log_y else "major")
        if len(series) > 1:
            ax.legend(loc="best", fontsize=8)
        fig.tight_layout()
        fig.savefig(path)
    finally:
        plt.close(fig)
