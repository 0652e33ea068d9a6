"""Progress of long work (annotation shards, training steps, generated samples) as lines a user reads:
done / total, rate and ETA, every few percent.

The work reports to `Progress`; where the line goes is the sink's business. Without a sink it is
printed (a torchrun worker's output reaches its launcher's log); the orchestration layer installs one
(`set_sink`) that writes the run's log and a progress artifact.
"""
from __future__ import annotations

import threading
import time
from dataclasses import dataclass
from typing import Callable


@dataclass(frozen=True)
class Report:
    key: str        # dash-case id of the work ("train-prompt-diffusion"): one progress artifact per key
    label: str      # what the user reads ("train prompt-diffusion")
    done: int
    total: int
    unit: str
    seconds: float  # since the work (re)started
    started_at: int  # `done` when it (re)started: a resumed run's rate counts only what it computed
    note: str = ""   # the work's own figures ("loss 0.1234")

    @property
    def fraction(self) -> float:
        return self.done / self.total if self.total else 1.0

    @property
    def rate(self) -> float:
        """Units per second of this run."""
        return (self.done - self.started_at) / self.seconds if self.seconds > 0 else 0.0

    @property
    def eta(self) -> float | None:
        return (self.total - self.done) / self.rate if self.rate > 0 else None

    @property
    def line(self) -> str:
        eta = "" if self.done >= self.total else f", ETA {duration(self.eta)}" if self.eta is not None else ", ETA unknown"
        resumed = f" ({self.started_at} done before)" if self.started_at else ""
        note = f"; {self.note}" if self.note else ""
        return (f"{self.label}: {self.done}/{self.total} {self.unit}s ({100 * self.fraction:.0f}%){resumed}, "
                f"{self.rate:.2f} {self.unit}s/s{eta}{note}")


def duration(seconds: float) -> str:
    s = int(round(seconds))
    return f"{s // 3600} h {s % 3600 // 60:02d} min" if s >= 3600 else f"{s // 60} min {s % 60:02d} s" if s >= 60 else f"{s} s"


Sink = Callable[[Report], None]
_SINK: list[Sink] = []
_LOCK = threading.Lock()


def set_sink(sink: Sink | None) -> None:
    """Where every report goes from now on in this process (None: printed)."""
    with _LOCK:
        _SINK[:] = [sink] if sink is not None else []


def _emit(report: Report) -> None:
    sink = _SINK[0] if _SINK else None
    if sink is None:
        print(report.line, flush=True)
    else:
        sink(report)


class Progress:
    """`advance(n)` as work is done; a report at the start, each `every` of the total, and at the end."""

    def __init__(self, key: str, label: str, total: int, unit: str = "step", done: int = 0, every: float = 0.05,
                 clock: Callable[[], float] = time.monotonic):
        self.key, self.label, self.total, self.unit, self.every, self.clock = key, label, total, unit, every, clock
        self.done, self.start, self.t0 = done, done, clock()
        self.next_at = self._next(done)
        self.finished = False
        self.report()

    def _next(self, done: int) -> int:
        """The first count past `done` at a multiple of `every` of the total (at least one more unit)."""
        step = max(1, int(self.total * self.every))
        return min(self.total, (done // step + 1) * step)

    def advance(self, n: int = 1, note: str | Callable[[], str] = "") -> None:
        """`note`: text, or a function giving it, called only when a line is due."""
        self.done = min(self.total, self.done + n)
        if self.done >= self.next_at and not self.finished:
            self.next_at = self._next(self.done)
            self.report(note() if callable(note) else note)

    def report(self, note: str = "") -> Report:
        r = Report(self.key, self.label, self.done, self.total, self.unit, self.clock() - self.t0, self.start, note)
        self.finished = self.done >= self.total
        _emit(r)
        return r
