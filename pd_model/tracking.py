"""Experiment tracking of a training run, through accelerate's trackers: per-step scalars, validation
grids and the configuration.

`report_to` is the training Accelerator's `log_with`: TensorBoard (the default: event files,
offline), Weights & Biases (offline unless `WANDB_MODE` says otherwise) or MLflow (an SQLite file
unless `MLFLOW_TRACKING_URI` names a server), each writing in the run's own `logs/` folder beside
its checkpoints; or none. Scalars go through `Accelerator.log`. What accelerate's trackers lack is
here: a grid PNG in each tracker's own way (TensorBoard image, W&B image, MLflow artifact),
TensorBoard's HParams tab with the run's last loss (accelerate's writes a second run beside it), and
`logs/tracker.json`, which names the tracker and its run, so that a resumed training continues that
run and `log_metrics` adds the evaluation's scores to it later. Only the main process logs, and
nothing here draws a random number or touches a weight: a tracked run's weights are bitwise an
untracked one's. The tracker is in no key (`TrainConfig.NOT_IN_KEY`).
"""
from __future__ import annotations

import importlib.util
import json
import os
import re
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Iterable, Literal

from pd_core.state import atomic_write_json

if TYPE_CHECKING:  # accelerate imports torch: the configuration, which imports this module, must load without it
    from accelerate import Accelerator

ReportTo = Literal["tensorboard", "wandb", "mlflow", "none"]
PACKAGE = {"tensorboard": "tensorboard", "wandb": "wandb", "mlflow": "mlflow"}  # report_to -> what pip installs
LOGS = "logs"  # the tracker's folder inside a model's folder
RUN_FILE = "tracker.json"
PROJECT = "prompt-diffusion"  # W&B project and MLflow experiment, unless WANDB_PROJECT / MLFLOW_EXPERIMENT_NAME


def installed(package: str) -> bool:
    return importlib.util.find_spec(package) is not None


def check_installed(report_to: str) -> None:
    """Raise before any training when the tracker's package is missing, naming the pip command."""
    package = PACKAGE.get(report_to)
    if package is not None and not installed(package):
        instead = "none" if report_to == "tensorboard" else "tensorboard (the default) or none"
        raise ValueError(f"train.report_to={report_to!r} needs the {package} package, which is not installed: "
                         f"run `pip install {package}`, or set train.report_to to {instead}")


@dataclass(frozen=True)
class Tracking:
    """Where and to what a run logs: `report_to`, its `logs/` folder, its name and its configuration
    (nested dicts of JSON values, logged flattened as `section.key` hyperparameters)."""

    report_to: ReportTo
    root: Path
    name: str
    config: dict


def _flat(config: dict, prefix: str = "") -> dict[str, bool | int | float | str]:
    """{"train": {"steps": 30}} -> {"train.steps": 30}; lists and None as JSON text."""
    out = {}
    for k, v in config.items():
        if isinstance(v, dict):
            out |= _flat(v, f"{prefix}{k}.")
        else:
            out[f"{prefix}{k}"] = v if isinstance(v, (bool, int, float, str)) else json.dumps(v)
    return out


def _tag(name: str) -> str:
    """A name every tracker accepts (MLflow: letters, digits, _ - . / : and spaces): image->depth -> image-to-depth."""
    return re.sub(r"[^A-Za-z0-9_\-./: ]", "_", name.replace("->", "-to-"))


def accelerator_args(t: Tracking) -> dict:
    """`Accelerator(**accelerator_args(t))`: the tracker of `t` and the folder its `logs/` is in."""
    return {} if t.report_to == "none" else {"log_with": t.report_to, "project_dir": str(t.root.parent)}


def _init_args(t: Tracking, run: dict, start: int | None) -> tuple[str, dict, dict | None]:
    """`init_trackers(project_name, config, init_kwargs)` of `t`'s tracker: its project, arguments and
    the configuration to store (None: stored another way, or already stored in the resumed run)."""
    if t.report_to == "tensorboard":  # event files in project_dir / project_name: the model's logs/
        # A run resuming after step `start` logs step start + 1 first: TensorBoard hides what an
        # interrupted run logged from there on.
        return t.root.name, {"purge_step": None if start is None else start + 1}, None
    if t.report_to == "wandb":
        run.setdefault("run_id", uuid.uuid4().hex[:16])  # os.urandom: no RNG of the training is drawn from
        return os.environ.get("WANDB_PROJECT", PROJECT), {
            "name": run["name"], "id": run["run_id"], "resume": "allow", "dir": str(t.root),
            "mode": os.environ.get("WANDB_MODE", "offline")}, t.config or None
    import mlflow  # accelerate's MLflow tracker logs to the process's tracking URI

    server = os.environ.get("MLFLOW_TRACKING_URI")
    mlflow.set_tracking_uri(server or f"sqlite:///{(t.root / 'mlflow.db').resolve()}")  # MLflow 3 refuses a folder store
    artifacts = None if server else (t.root / "artifacts").resolve().as_uri()
    # Parameters are logged once: MLflow refuses a changed value on a resumed run.
    config = _flat(t.config) if t.config and "run_id" not in run else None
    return PROJECT, {"logging_dir": artifacts, "run_id": run.get("run_id"), "run_name": run["name"]}, config


class TrackedRun:
    """The run of `t` on `acc`'s tracker (the same run again when it resumes at step `start`):
    `scalars(values, step)`, `image(tag, png_path, step)`, `close(step)`."""

    def __init__(self, acc: Accelerator, t: Tracking, start: int | None):
        check_installed(t.report_to)
        t.root.mkdir(parents=True, exist_ok=True)
        saved = t.root / RUN_FILE
        run = json.loads(saved.read_text()) if saved.exists() else {}
        run = run if run.get("report_to") == t.report_to else {}  # a resumed run that changed tracker starts a new one
        self.acc, self.t, self.run = acc, t, run | {"name": t.name, "report_to": t.report_to}
        project, kwargs, config = _init_args(t, self.run, start)
        acc.init_trackers(project, config, {t.report_to: kwargs})
        self.tracker = acc.get_tracker(t.report_to)
        if t.report_to == "mlflow":
            self.run["run_id"] = self.tracker.tracker.info.run_id
        if t.report_to == "tensorboard" and t.config:
            from torch.utils.tensorboard.summary import hparams

            exp, ssi, self._end = hparams(_flat(t.config), {"train/loss": None})  # the HParams tab shows the last loss
            writer = self.tracker.tracker
            writer.file_writer.add_summary(exp)
            writer.file_writer.add_summary(ssi)
            writer.add_text("config", "```json\n" + json.dumps(t.config, indent=2) + "\n```", start or 0)
        atomic_write_json(saved, self.run)

    def scalars(self, values: dict[str, float], step: int) -> None:
        self.acc.log({_tag(k): v for k, v in values.items()}, step=step)

    def image(self, tag: str, path: Path, step: int) -> None:
        if self.t.report_to == "tensorboard":
            import numpy as np
            from PIL import Image

            self.tracker.tracker.add_image(_tag(tag), np.asarray(Image.open(path).convert("RGB")), step, dataformats="HWC")
        elif self.t.report_to == "wandb":
            self.tracker.log_images({_tag(tag): [str(path)]}, step=step)
        else:
            self.tracker.log_artifact(str(path), artifact_path=_tag(tag))

    def close(self, step: int | None = None) -> None:
        """Flush and close; `step`: the last step trained, where `log_metrics` puts the evaluation."""
        if hasattr(self, "_end"):
            self.tracker.tracker.file_writer.add_summary(self._end)
        self.tracker.finish()
        if step is not None:
            self.run["step"] = step
            atomic_write_json(self.t.root / RUN_FILE, self.run)


def open_run(acc: Accelerator, t: Tracking, start: int) -> TrackedRun | None:
    """The run of `t` on the tracker `acc` was made with (`accelerator_args(t)`), or None for report_to='none'."""
    return None if t.report_to == "none" else TrackedRun(acc, t, start)


def log_metrics(model_folder: Path, metrics: Iterable[tuple[str, str, float]], step: int | None = None,
                prefix: str = "eval") -> bool:
    """Log evaluation metrics, (name, task, value) each, as `<prefix>/<task>/<name>` to the tracker run
    that trained the model in `model_folder`, at `step` (default: its last training step). False, and
    nothing logged, when that training was not tracked (report_to='none', or no `logs/tracker.json`)."""
    saved = Path(model_folder) / LOGS / RUN_FILE
    if not saved.exists():
        return False
    run = json.loads(saved.read_text())
    from accelerate import Accelerator

    t = Tracking(run["report_to"], saved.parent, run["name"], {})
    tracked = TrackedRun(Accelerator(**accelerator_args(t)), t, None)
    at = run.get("step", 0) if step is None else step
    tracked.scalars({f"{prefix}/{task}/{name}": float(value) for name, task, value in metrics}, at)
    tracked.close()
    return True
