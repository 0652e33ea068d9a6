"""The check's record: one JSON object filled section by section, the time each section may take, and
a watchdog that prints what there is before the hard deadline whatever a section is doing."""
from __future__ import annotations

import json
import os
import sys
import threading
import time
import traceback
from contextlib import contextmanager
from pathlib import Path

SCHEMA = "pd-gpu-check/1"
SECTIONS = ("machine", "training", "evaluation", "annotators", "e2e", "multi_gpu")  # the JSON's; the budget's
# are these with training's compiled rows apart ("training_compiled")


def log(msg: str) -> None:
    """Progress on stderr: stdout carries the JSON alone."""
    print(f"[gpu_check] {msg}", file=sys.stderr, flush=True)


class Budget:
    """Seconds since the start, of the whole run and of the section in progress."""

    def __init__(self, total_s: float):
        self.t0, self.total_s = time.monotonic(), total_s
        self.section_end = self.t0 + total_s

    def used(self) -> float:
        return time.monotonic() - self.t0

    def left(self) -> float:
        """Seconds left to the section in progress (never past the whole run's budget)."""
        return max(0.0, min(self.section_end, self.t0 + self.total_s) - time.monotonic())

    def total_left(self) -> float:
        return max(0.0, self.total_s - self.used())


class Record:
    """The JSON being built; `write` saves it (atomically) after every section, `emit` prints it once."""

    def __init__(self, mode: str, budget: Budget, json_out: Path | None):
        self.budget, self.json_out = budget, json_out
        self.data: dict = {"schema": SCHEMA, "mode": mode, "complete": False, **{s: None for s in SECTIONS},
                           "budget": {"allotted_s": budget.total_s, "used_s": 0.0, "sections": {}},
                           "not_measured": [], "errors": {}}
        self.current: str | None = None
        self.stdout = sys.stdout  # the JSON's, whatever the sections redirect
        self._lock, self._emitted = threading.Lock(), False

    def skip(self, what: str, why: str, budget: bool = True) -> None:
        """Something the check did not measure, and why: every skip is in the JSON, none is silent.
        `budget`: skipped for lack of time (the run is then not complete), else it cannot apply here."""
        self.data["not_measured"].append({"what": what, "why": why, "for_lack_of_time": budget})
        log(f"not measured: {what} ({why})")

    @contextmanager
    def section(self, name: str, allotted_s: float):
        """A guarded section: its time is capped at `allotted_s` (and the run's budget); an exception is
        recorded under `errors` and the next section goes on."""
        b = self.budget
        allotted = min(allotted_s, b.total_left())
        b.section_end, self.current = time.monotonic() + allotted, name
        start, status = b.used(), "ok"
        log(f"{name}: up to {allotted:.0f} s ({b.total_left():.0f} s of the budget left)")
        try:
            yield
        except Exception as e:  # noqa: BLE001 - one section's failure must not cost the others
            status = "error"
            self.data["errors"][name] = f"{type(e).__name__}: {e}"[:2000]
            traceback.print_exc(file=sys.stderr)
        finally:
            self._account(name, allotted, start, status)

    def _account(self, name: str, allotted: float, start: float, status: str) -> None:
        sections = self.data["budget"]["sections"]
        prev = sections.get(name, {"allotted_s": 0.0, "used_s": 0.0})
        used = self.budget.used() - start
        sections[name] = {"allotted_s": round(prev["allotted_s"] + allotted, 1),
                          "used_s": round(prev["used_s"] + used, 1),
                          "status": "error" if "error" in (status, prev.get("status")) else status}
        self.current = None
        self.budget.section_end = self.budget.t0 + self.budget.total_s
        self.write()

    def write(self) -> None:
        self.data["budget"]["used_s"] = round(self.budget.used(), 1)
        if self.json_out is None:
            return
        self.json_out.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.json_out.with_suffix(".tmp")
        tmp.write_text(json.dumps(self.data, indent=1, default=str))
        os.replace(tmp, self.json_out)

    def emit(self, complete: bool, note: str | None = None) -> bool:
        """Print (and save) the JSON; only the first call prints, whether the main thread's or the watchdog's."""
        with self._lock:
            if self._emitted:
                return False
            self._emitted = True
            self.data["complete"] = complete
            if note:
                self.data["budget"]["watchdog"] = note
            self.write()
            # Compact: a reply's tail of 12,000 characters holds it whole (the saved file is indented).
            print(json.dumps(self.data, separators=(",", ":"), default=str), file=self.stdout, flush=True)
            return True


def start_watchdog(record: Record, deadline_s: float) -> threading.Timer:
    """At `deadline_s` after the start: the JSON as it stands (complete=false), then exit 3."""

    def fire() -> None:
        where = record.current or "between sections"
        record.data["errors"].setdefault(where, f"cut off by the watchdog at {deadline_s:.0f} s")
        record.skip(f"the rest of {where}", f"the watchdog's deadline ({deadline_s:.0f} s) passed")
        if record.emit(False, f"fired at {record.budget.used():.0f} s during {where}"):
            os._exit(3)

    timer = threading.Timer(max(0.0, deadline_s - record.budget.used()), fire)
    timer.daemon = True
    timer.start()
    return timer
