"""Experiment tracking of a training run: its per-step scalars, validation grids and configuration.

`report_to` picks the tracker: TensorBoard (the default: event files, offline), Weights & Biases
(offline unless `WANDB_MODE` says otherwise) or MLflow (an SQLite file unless `MLFLOW_TRACKING_URI`
names a server), each writing in the run's own `logs/` folder beside its checkpoints; or none.
`logs/tracker.json` names the tracker and its run, so that `log_metrics` adds the evaluation's
scores to the same run later. Only the main process logs, and nothing here draws a random number
or touches a weight: a tracked run's weights are bitwise an untracked one's.
"""
from __future__ import annotations

import importlib.util
import json
import os
import re
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Literal

from pd_core.state import atomic_write_json

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


class TensorBoard:
    """Event files in `root`. A run resuming after step `start` logs step start + 1 first (a step is
    logged at the number of steps done): TensorBoard hides what an interrupted run logged from there on."""

    def __init__(self, root: Path, run: dict, config: dict | None, start: int | None):
        from torch.utils.tensorboard import SummaryWriter
        from torch.utils.tensorboard.summary import hparams

        self.w = SummaryWriter(str(root), purge_step=None if start is None else start + 1)
        if config is not None:
            exp, ssi, self._end = hparams(_flat(config), {"train/loss": None})  # the HParams tab shows the last loss
            self.w.file_writer.add_summary(exp)
            self.w.file_writer.add_summary(ssi)
            self.w.add_text("config", "```json\n" + json.dumps(config, indent=2) + "\n```", start or 0)

    def scalars(self, values: dict[str, float], step: int) -> None:
        for k, v in values.items():
            self.w.add_scalar(k, v, step)

    def image(self, tag: str, path: Path, step: int) -> None:
        import numpy as np
        from PIL import Image

        self.w.add_image(tag, np.asarray(Image.open(path).convert("RGB")), step, dataformats="HWC")

    def close(self) -> None:
        if hasattr(self, "_end"):
            self.w.file_writer.add_summary(self._end)
        self.w.close()


class WandB:
    """A Weights & Biases run under `root`, offline unless WANDB_MODE says otherwise (`wandb sync` uploads it)."""

    def __init__(self, root: Path, run: dict, config: dict | None, start: int | None):
        import wandb

        run.setdefault("run_id", uuid.uuid4().hex[:16])  # os.urandom: no RNG of the training is drawn from
        self.run = wandb.init(project=os.environ.get("WANDB_PROJECT", PROJECT), name=run["name"], id=run["run_id"],
                              resume="allow", dir=str(root), mode=os.environ.get("WANDB_MODE", "offline"),
                              config=config)
        self.wandb = wandb

    def scalars(self, values: dict[str, float], step: int) -> None:
        self.run.log(values, step=step)

    def image(self, tag: str, path: Path, step: int) -> None:
        self.run.log({tag: self.wandb.Image(str(path))}, step=step)

    def close(self) -> None:
        self.run.finish()


class MLflow:
    """An MLflow run in `root/mlflow.db` (SQLite; MLflow 3 refuses a folder store), grids as artifacts
    in `root/artifacts`; or on MLFLOW_TRACKING_URI's server."""

    def __init__(self, root: Path, run: dict, config: dict | None, start: int | None):
        from mlflow.tracking import MlflowClient

        server = os.environ.get("MLFLOW_TRACKING_URI")
        self.client = MlflowClient(server or f"sqlite:///{(root / 'mlflow.db').resolve()}")
        if "run_id" not in run:  # parameters are logged once: MLflow refuses a changed value on a resumed run
            name = os.environ.get("MLFLOW_EXPERIMENT_NAME", PROJECT)
            exp = self.client.get_experiment_by_name(name)
            exp_id = exp.experiment_id if exp is not None else self.client.create_experiment(
                name, artifact_location=None if server else (root / "artifacts").resolve().as_uri())
            run["run_id"] = self.client.create_run(exp_id, run_name=run["name"]).info.run_id
            for k, v in _flat(config or {}).items():
                self.client.log_param(run["run_id"], k, v)
        self.id = run["run_id"]

    def scalars(self, values: dict[str, float], step: int) -> None:
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        self.client.log_batch(self.id, metrics=[Metric(k, float(v), now, step) for k, v in values.items()])

    def image(self, tag: str, path: Path, step: int) -> None:
        self.client.log_artifact(self.id, str(path), artifact_path=tag)

    def close(self) -> None:
        self.client.set_terminated(self.id)


BACKENDS = {"tensorboard": TensorBoard, "wandb": WandB, "mlflow": MLflow}


class Tracker:
    """One open run: `scalars(values, step)`, `image(tag, png_path, step)`, `close(step)`."""

    def __init__(self, report_to: str, root: Path, run: dict, config: dict | None, start: int | None):
        check_installed(report_to)
        root.mkdir(parents=True, exist_ok=True)
        self.root, self.run = root, {**run, "report_to": report_to}
        self.backend = BACKENDS[report_to](root, self.run, config, start)
        self._record()

    def _record(self) -> None:
        atomic_write_json(self.root / RUN_FILE, self.run)

    def scalars(self, values: dict[str, float], step: int) -> None:
        self.backend.scalars({_tag(k): v for k, v in values.items()}, step)

    def image(self, tag: str, path: Path, step: int) -> None:
        self.backend.image(_tag(tag), path, step)

    def close(self, step: int | None = None) -> None:
        """Flush and close; `step`: the last step trained, where `log_metrics` puts the evaluation."""
        self.backend.close()
        if step is not None:
            self.run["step"] = step
            self._record()


def open_tracker(t: Tracking, start: int) -> Tracker | None:
    """The run of `t` (the same run again when it resumes at step `start`), or None for report_to='none'."""
    if t.report_to == "none":
        return None
    saved = t.root / RUN_FILE
    run = json.loads(saved.read_text()) if saved.exists() else {}
    run = run if run.get("report_to") == t.report_to else {}  # a resumed run that changed tracker starts a new one
    return Tracker(t.report_to, t.root, run | {"name": t.name}, t.config, start)


def log_metrics(model_folder: Path, metrics: Iterable[tuple[str, str, float]], step: int | None = None,
                prefix: str = "eval") -> bool:
    """Log evaluation metrics, (name, task, value) each, as `<prefix>/<task>/<name>` to the tracker run
    that trained the model in `model_folder`, at `step` (default: its last training step). False, and
    nothing logged, when that training was not tracked (report_to='none', or no `logs/tracker.json`)."""
    saved = Path(model_folder) / LOGS / RUN_FILE
    if not saved.exists():
        return False
    run = json.loads(saved.read_text())
    tracker = Tracker(run["report_to"], saved.parent, run, None, None)
    at = run.get("step", 0) if step is None else step
    tracker.scalars({f"{prefix}/{task}/{name}": float(value) for name, task, value in metrics}, at)
    tracker.close()
    return True
