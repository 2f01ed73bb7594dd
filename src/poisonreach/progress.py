"""Progress of long loops: a tqdm bar on a terminal, a log line at most every 30 s elsewhere.

Every long loop of the library (the attacks' iterations, training epochs, L-BFGS rounds, a sweep's
cells) reports through :class:`Progress`. On a terminal it draws tqdm's bar on stderr. When stderr
is a file, a pipe or a CI log, a bar is noise (tqdm turns itself off there), so it logs a line
instead, through :mod:`logging` at INFO: at the first update ``interval`` seconds or more after the
previous line (or the start), and a last one when the loop ends if it logged any, so a short loop
says nothing. A loop whose single step outlasts the interval logs once per step. A library user who
configures no logging sees none of these lines; ``poisonreach`` shows them on stderr.
"""

from __future__ import annotations

import logging
import sys
from time import monotonic
from typing import Callable, Iterable

from tqdm.auto import tqdm

INTERVAL = 30.0  # seconds: the longest a loop off a terminal stays silent between two steps

_logger = logging.getLogger(__name__)


def stderr_is_terminal() -> bool:
    """Whether stderr is a terminal (where tqdm draws its bar)."""
    try:
        return sys.stderr is not None and sys.stderr.isatty()
    except (AttributeError, ValueError):  # replaced by an object without isatty, or closed
        return False


def duration(seconds: float) -> str:
    """``seconds`` for a person: "42 s", "3 min 20 s", "2 h 05 min"."""
    s = round(seconds)
    if s < 60:
        return f"{s} s"
    if s < 3600:
        return f"{s // 60} min {s % 60:02d} s"
    return f"{s // 3600} h {s % 3600 // 60:02d} min"


class Progress:
    """A loop's progress, used like a tqdm bar: iterate over it, or call :meth:`update`;
    :meth:`set_postfix` adds the loop's numbers (a residual, a loss) to the bar and the lines.

    ``show`` is the ``progress`` flag of the estimators and training functions: True draws the bar
    wherever stderr goes, False shows nothing, None (the default) draws it on a terminal and logs
    lines elsewhere. ``logger`` receives the lines (default: this module's); ``clock`` gives the
    time in seconds (default: this module's ``monotonic``, which tests replace). Other keywords go
    to tqdm.
    """

    def __init__(self, iterable: Iterable | None = None, *, desc: str, total: int | None = None, unit: str = "it",
                 show: bool | None = None, logger: logging.Logger | None = None, interval: float = INTERVAL,
                 clock: Callable[[], float] | None = None, **bar):
        terminal = stderr_is_terminal()
        self.bar = tqdm(iterable, desc=desc, total=total, unit=unit, disable=not (show or (show is None and terminal)), **bar)
        self.lines = show is None and not terminal
        self.desc, self.unit, self.interval, self.clock = desc, unit, interval, clock or monotonic
        self.total = total if total is not None or not hasattr(iterable, "__len__") else len(iterable)
        self.logger = logger or _logger
        self.n, self.postfix, self.logged, self.closed = 0, {}, False, False
        self.start = self.last = self.clock()

    def __iter__(self):
        for item in self.bar:
            yield item
            self._advance(1)

    def update(self, n: int = 1) -> None:
        """``n`` more steps done."""
        self.bar.update(n)
        self._advance(n)

    def set_postfix(self, **values) -> None:
        """The loop's current numbers, shown after the count (``ratio="0.31"``)."""
        self.bar.set_postfix(**values)
        self.postfix = values

    def close(self) -> None:
        """Remove the bar; a loop that logged lines logs where it ended."""
        if self.closed:
            return
        self.closed = True
        self.bar.close()
        if self.logged:
            self._line(self.clock(), "done, ")

    def __enter__(self) -> "Progress":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def _advance(self, n: int) -> None:
        self.n += n
        if self.lines and (now := self.clock()) - self.last >= self.interval:
            self._line(now)

    def _line(self, now: float, prefix: str = "") -> None:
        count = f"{self.n}/{self.total}" if self.total is not None else str(self.n)
        numbers = "".join(f", {k} {v}" for k, v in self.postfix.items())
        self.logger.info("%s: %s%s %s%s, %s", self.desc, prefix, count, self.unit, numbers, duration(now - self.start))
        self.last, self.logged = now, True
