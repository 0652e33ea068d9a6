"""`pd follow`: start a deployment run and follow it in the terminal through the Prefect API.

It prints the stages' progress lines (the records of `progress_logger`, written by
`flows.artifacts.to_run_log`) and each task run's state as it changes (Running, Completed, Cached,
Failed, ...), for the run and its subflow runs, and never Prefect's event stream (hundreds of
artifact updates). On a failed run it prints the failing tasks' errors and where the full log is.
Logs reach the API in batches, so it polls (every `POLL_S`), reads a window that overlaps the last
one, and keeps each log once by its id.
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from pathlib import Path
from typing import Callable
from uuid import UUID

PROGRESS = "progress"  # the run logger's child whose records are progress lines: prefect.task_runs.progress
POLL_S = 2.0
LATE_S = 60.0  # how far before the newest log seen a late batch is looked for
PAGE = 200     # logs per request (the server's limit)
WAITING_S = 30.0  # a run not started after this long: say that a worker must pick it up
QUIET_STATES = {"Pending", "Scheduled", "Late"}  # not worth a line: every task run starts there


def progress_logger():
    """The current run's logger for progress lines, tagged by its name (`<run logger>.progress`):
    shown in the UI like any run log, and the only INFO lines `pd follow` prints."""
    from prefect import get_run_logger
    from prefect.logging.loggers import PrefectLogAdapter

    log = get_run_logger()
    return PrefectLogAdapter(log.logger.getChild(PROGRESS), log.extra)


def is_progress(log) -> bool:
    return log.name.endswith("." + PROGRESS)


def _clock(t: datetime) -> str:
    return t.astimezone().strftime("%H:%M:%S")


@dataclass
class Follower:
    """What has been printed of one flow run (and its subflow runs): log ids, task run states."""

    client: object  # a sync PrefectClient
    flow_run_id: UUID
    say: Callable[[str], None] = print
    runs: set[UUID] = field(default_factory=set)
    seen_logs: set[UUID] = field(default_factory=set)
    states: dict[UUID, str] = field(default_factory=dict)
    since: datetime | None = None
    errors: list = field(default_factory=list)  # ERROR log records, for the failure summary
    held: list[tuple[datetime, str]] = field(default_factory=list)  # lines newer than the logs that have arrived

    def flow_runs(self) -> list[UUID]:
        """The run and every subflow run under it (an annotate or ingest stage may run its shards in one)."""
        from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterParentFlowRunId

        self.runs.add(self.flow_run_id)
        todo = [self.flow_run_id]
        while todo:
            children = self.client.read_flow_runs(
                flow_run_filter=FlowRunFilter(parent_flow_run_id=FlowRunFilterParentFlowRunId(any_=todo)))
            todo = [r.id for r in children if r.id not in self.runs]
            self.runs |= set(todo)
        return sorted(self.runs)

    def poll(self, final: bool = False) -> int:
        """Print what is new, in time order: task run state changes and progress lines. A state change
        newer than every log that has arrived waits for the next poll (its logs' batch is on the way),
        unless `final`. Returns how many logs were new."""
        from prefect.client.schemas.filters import (FlowRunFilter, FlowRunFilterId, LogFilter, LogFilterFlowRunId,
                                                    LogFilterTimestamp)
        from prefect.client.schemas.sorting import LogSort

        ids = self.flow_runs()
        lines, self.held = self.held, []
        for tr in self.client.read_task_runs(flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=ids))):
            if tr.state is None or self.states.get(tr.id) == tr.state.name:
                continue
            self.states[tr.id] = tr.state.name
            if tr.state.name not in QUIET_STATES:
                lines.append((tr.state.timestamp, f"{tr.name}: {tr.state.name}"))
        window = LogFilter(flow_run_id=LogFilterFlowRunId(any_=ids),
                           timestamp=LogFilterTimestamp(after_=self.since - timedelta(seconds=LATE_S)) if self.since else None)
        new, offset = 0, 0
        while True:
            page = self.client.read_logs(log_filter=window, limit=PAGE, offset=offset, sort=LogSort.TIMESTAMP_ASC)
            for log in page:
                if log.id in self.seen_logs:
                    continue
                self.seen_logs.add(log.id)
                new += 1
                self.since = max(self.since or log.timestamp, log.timestamp)
                if is_progress(log):
                    lines.append((log.timestamp, log.message))
                elif log.level >= 40:
                    self.errors.append(log)
            if len(page) < PAGE:
                break
            offset += PAGE
        for t, text in sorted(lines, key=lambda x: x[0]):
            if final or self.since is None or t <= self.since or new == 0:
                self.say(f"{_clock(t)}  {text}")
            else:
                self.held.append((t, text))
        return new

    def failures(self) -> list[str]:
        """`task run: its state's message` for each failed or crashed task run, then the last ERROR log's text."""
        from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId

        by_message: dict[str, list[str]] = {}  # a stage fails with the task inside it: one line for both
        runs = self.client.read_task_runs(flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=sorted(self.runs))))
        for tr in sorted(runs, key=lambda r: r.state.timestamp if r.state else datetime.max):
            if tr.state is not None and tr.state.type.value in ("FAILED", "CRASHED"):
                by_message.setdefault(tr.state.message or tr.state.name, []).append(tr.name)
        out = [f"{', '.join(names)}: {message}" for message, names in by_message.items()]
        if self.errors:
            text = self.errors[-1].message.rstrip().splitlines()
            out.append("last error in the log:\n    " + "\n    ".join(text[-15:]))
        return out


def ui_url(flow_run_id: UUID) -> str | None:
    from prefect.settings import get_current_settings

    ui = get_current_settings().ui_url
    return f"{ui.rstrip('/')}/runs/flow-run/{flow_run_id}" if ui else None


def follow(deployment: str, parameters: dict, worker_log: Path, say: Callable[[str], None] = print) -> int:
    """Start a run of `deployment` ("full-benchmark/demo") with `parameters` and follow it to its end:
    0 when it completed, 1 when it failed, crashed or was cancelled."""
    from prefect.client.orchestration import get_client
    from prefect.deployments import run_deployment

    run = run_deployment(deployment, parameters=parameters, timeout=0)
    url = ui_url(run.id)
    say(f"{deployment}: flow run {run.name!r} ({run.id}) started" + (f"; UI: {url}" if url else ""))
    t0 = time.monotonic()
    with get_client(sync_client=True) as client:
        f = Follower(client, run.id, say)
        warned = False
        try:
            while True:
                f.poll()
                state = client.read_flow_run(run.id).state
                if state is not None and state.is_final():
                    for _ in range(5):  # the last batches of logs arrive after the final state
                        time.sleep(POLL_S)
                        if not f.poll():
                            break
                    f.poll(final=True)
                    break
                if not warned and state is not None and state.name in QUIET_STATES and time.monotonic() - t0 > WAITING_S:
                    say(f"still {state.name} after {WAITING_S:.0f} s: a worker of its pool must pick it up (`pd up` starts one)")
                    warned = True
                time.sleep(POLL_S)
        except KeyboardInterrupt:
            say(f"stopped following; flow run {run.id} goes on" + (f" ({url})" if url else ""))
            return 130
        minutes = (time.monotonic() - t0) / 60
        if state.is_completed():
            say(f"{deployment}: Completed in {minutes:.1f} min")
            return 0
        say(f"{deployment}: {state.name} after {minutes:.1f} min: {state.message or ''}".rstrip(": "))
        for line in f.failures():
            say("  " + line)
    say(f"full log: {worker_log} (flow run {run.id})" + (f"; UI: {url}" if url else ""))
    return 1
