"""What a run shows in the Prefect UI besides its states: progress reports as log lines and progress
artifacts, validation grids and the report as Markdown artifacts (their images inlined), table rows as
JSON."""
from __future__ import annotations

import base64
import math
import re
from pathlib import Path
from typing import Any

from prefect.artifacts import create_markdown_artifact
from prefect.context import FlowRunContext, TaskRunContext

from flows.follow import progress_logger
from pd_core.progress import Report
from pd_model import names
from pd_model.names import label

_PROGRESS_ARTIFACTS: dict[tuple[str, str], Any] = {}


def to_run_log(report: Report) -> None:
    """A progress report as a line of the run's log and the run's progress artifact `report.key`
    (outside a run: printed)."""
    from prefect.artifacts import create_progress_artifact, update_progress_artifact

    ctx = TaskRunContext.get() or FlowRunContext.get()
    if ctx is None:
        print(report.line, flush=True)
        return
    progress_logger().info(report.line)  # tagged by its logger's name, so that `pd follow` shows exactly these
    run = str(ctx.task_run.id if isinstance(ctx, TaskRunContext) else ctx.flow_run.id)
    key = (run, report.key)
    if key not in _PROGRESS_ARTIFACTS:
        _PROGRESS_ARTIFACTS[key] = create_progress_artifact(100 * report.fraction, key=report.key, description=report.line)
    else:
        update_progress_artifact(_PROGRESS_ARTIFACTS[key], 100 * report.fraction, description=report.line)


def publish_grid(path: Path, step: int, model: str) -> None:
    """A validation grid as a Markdown artifact `validation-<model>-step-<step>` (one card per model and
    step), inside a flow or task run only (elsewhere: nothing).

    The PNG is inlined as a data URL in Markdown, which the UI renders as the picture: the UI is served
    over http and will not load a file:// URL, and an image artifact's page prints its URL as text."""
    if FlowRunContext.get() is None and TaskRunContext.get() is None:
        return
    name = label(model)
    create_markdown_artifact(
        key=names.key("validation", name, f"step-{step}"),
        markdown=f"### {name}, step {step}\n\nexample pair | query | output | target\n\n"
                 f"![{name}, step {step}](data:image/png;base64,{base64.b64encode(path.read_bytes()).decode()})\n\n`{path}`\n",
        description=f"Validation grid of {name} at step {step}")


def inline_images(markdown: str, folder: Path) -> str:
    """`markdown` with each relative `![alt](file.png)` that exists under `folder` as a data URL."""
    def inline(m: re.Match) -> str:
        f = folder / m.group(2)
        if "://" in m.group(2) or not f.is_file():
            return m.group(0)
        return f"![{m.group(1)}](data:image/png;base64,{base64.b64encode(f.read_bytes()).decode()})"

    return re.sub(r"!\[([^\]]*)\]\(([^)\s]+\.png)\)", inline, markdown)


def jsonable(v):
    """Table artifacts are JSON: NaN and infinities (an interval of one sample) become None."""
    return None if isinstance(v, float) and not math.isfinite(v) else v
