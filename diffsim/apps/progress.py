"""Progress bars for the command line (tqdm), and a silent stand-in without it.

:func:`progress_bar` gives a tqdm bar on stderr when it is enabled and tqdm is installed,
else an object with the same ``update``/``set_postfix_str``/``close`` methods that draws
nothing. Outside a terminal (logs, CI) the bar is redrawn at most every few seconds.
"""

from __future__ import annotations

import sys

# Seconds between redraws when stderr is not a terminal (a log file or a pipe).
LOG_INTERVAL = 5.0


class _Silent:
    """The interface of a tqdm bar that draws nothing."""

    n = 0

    def update(self, n: int = 1) -> None:
        self.n += n

    def set_postfix_str(self, text: str = "", refresh: bool = True) -> None:
        pass

    def close(self) -> None:
        pass

    def __enter__(self) -> _Silent:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def progress_bar(total: int, desc: str, unit: str, enabled: bool = True, delay: float = 0.0):
    """A progress bar ``desc: 40%|####      | unit 4/10 [00:01<00:02, postfix]`` on stderr.

    Args:
        total: the number of units.
        desc: what is counted (``"run"``, ``"render"``, ``"fit"``).
        unit: the unit's name, shown before the count (``"step"``, ``"frame"``).
        enabled: False gives the silent stand-in.
        delay: seconds before the bar first appears (none if it closes before).

    Returns:
        A tqdm bar, or the silent stand-in when disabled or tqdm is missing; both are
        context managers.
    """
    if not enabled:
        return _Silent()
    try:
        from tqdm import tqdm
    except ImportError:  # tqdm is a dependency, but an old environment may lack it
        return _Silent()
    tty = sys.stderr.isatty()
    return tqdm(
        total=total,
        desc=desc,
        unit=unit,
        file=sys.stderr,
        dynamic_ncols=tty,
        ncols=None if tty else 100,
        mininterval=0.1 if tty else LOG_INTERVAL,
        bar_format="{desc}: {percentage:3.0f}%|{bar}| " + unit + " {n_fmt}/{total_fmt} "
        "[{elapsed}<{remaining}{postfix}]",
        leave=True,
        delay=delay,
    )
