"""The stage DAG as data, frozen once per run: every stage's key, computed in dependency order.

A stage's key hashes the configuration it reads (the effective one: `EvalConfig` already holds the
protocol's values), the keys of its upstream stages, and the code of the modules it runs (their
syntax trees, docstrings dropped: editing a comment or a docstring reruns nothing). The source is
fingerprinted once, when the plan is built: a file touched while the run goes on cannot move a
key under it, so nothing it writes is orphaned. A finished stage is a folder with a `_DONE.json`
marker under its key.
"""
from __future__ import annotations

import ast
import hashlib
import importlib.util
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from types import MappingProxyType
from typing import Mapping

from flows.profiles import Profile
from pd_data.sources import make_source
from pd_data.state import StateDir, fingerprint
from pd_data.tasks import TASKS, TRAINING_TASKS, UNSEEN_TASKS
from pd_model.train import ModelSpec

STAGES = ("ingest", "annotate", "prompts", "base", "train", "evaluate")

# The modules whose code decides what each stage writes.
STAGE_CODE = {
    "ingest": ("pd_data.ingest", "pd_data.sources", "pd_data.normalize", "pd_data.shards", "pd_data.procedural"),
    "annotate": ("pd_data.annotate", "pd_data.annotators_ext", "pd_data.shards"),
    "prompts": ("pd_data.prompts", "pd_data.dataset", "pd_data.tasks"),
    "base": ("pd_model.base", "pd_model.train_base", "pd_model.loop", "pd_model.objective", "pd_model.checkpoint"),
    "train": ("pd_model.train", "pd_model.train_dist", "pd_model.loop", "pd_model.objective", "pd_model.checkpoint",
              "pd_model.controlnet", "pd_model.hints", "pd_model.validation", "pd_data.dataset"),
    "evaluate": ("pd_eval.benchmark", "pd_eval.metrics", "pd_eval.features", "pd_eval.baselines", "pd_eval.task_inference",
                 "pd_model.pipeline", "pd_model.sampling", "pd_model.controlnet"),
}


def _source(module: str) -> str:
    spec = importlib.util.find_spec(module)
    if spec is None or spec.origin is None:
        raise ImportError(f"stage code module {module} not found")
    return Path(spec.origin).read_text()


@lru_cache(maxsize=64)
def _tree_hash(text: str) -> str:
    """A hash of the module's syntax tree without docstrings: code changes count, prose does not."""
    tree = ast.parse(text)
    for node in ast.walk(tree):
        body = getattr(node, "body", None)
        if isinstance(body, list) and body and isinstance(body[0], ast.Expr) \
                and isinstance(body[0].value, ast.Constant) and isinstance(body[0].value.value, str):
            node.body = body[1:] or [ast.Pass()]
    return hashlib.sha256(ast.dump(tree).encode()).hexdigest()[:16]


def code_version(stage: str) -> dict[str, str]:
    """module -> hash of its code, for every module the stage runs."""
    return {m: _tree_hash(_source(m)) for m in STAGE_CODE[stage]}


def annotated_tasks(tasks: tuple[str, ...], modalities: tuple[str, ...]) -> tuple[str, ...]:
    """The tasks whose every map is among `modalities`."""
    return tuple(t for t in tasks if set(TASKS[t].modalities) <= set(modalities))


def _config_parts(p: Profile, stage: str) -> object:
    """What each stage reads of the profile (settings that change only how, not what, are left out)."""
    return {
        "ingest": lambda: p.data.model_dump(exclude={"annotators", "annotator_weights", "workers", "pairing"}),
        "annotate": lambda: (p.data.annotators, p.data.annotator_weights),
        "prompts": lambda: (p.prompts.model_dump(), p.data.pairing),
        "base": lambda: p.base.model_dump(exclude={"checkpoint_every", "keep_last"}),
        "train": lambda: (p.train.model_dump(exclude={"checkpoint_every", "keep_last", "validate_every",
                                                      "gradient_checkpointing", "loader_workers"}), p.data.pairing),
        "evaluate": lambda: p.eval.model_dump(),
    }[stage]()


@dataclass(frozen=True)
class Plan:
    """One run's profile, state directory, source fingerprint and stage keys. Build it with `Plan.build`."""

    profile: Profile
    state: StateDir
    source_fingerprint: str
    keys: Mapping[str, str]

    @classmethod
    def build(cls, profile: Profile, state: StateDir) -> "Plan":
        tasks = annotated_tasks(TRAINING_TASKS, profile.data.modalities)
        unseen = annotated_tasks(UNSEEN_TASKS, profile.data.modalities)
        source = make_source(profile.data).fingerprint()
        upstream = {"ingest": (), "annotate": ("ingest",), "prompts": ("annotate",),
                    # A base that learns maps (base.map_fraction) reads the annotations too.
                    "base": ("annotate",) if profile.base.map_fraction else ("ingest",),
                    "train": ("annotate", "base"), "evaluate": ("train", "prompts")}
        extra = {"ingest": source, "prompts": tasks + unseen, "train": tasks}
        keys: dict[str, str] = {}
        for stage in STAGES:  # dependency order: each upstream key exists when it is needed
            keys[stage] = fingerprint(stage, code_version(stage), _config_parts(profile, stage),
                                      [keys[u] for u in upstream[stage]], extra.get(stage))
        return cls(profile, state, source, MappingProxyType(keys))

    @property
    def tasks(self) -> tuple[str, ...]:
        """The tasks Prompt Diffusion and CN(FT) are trained on: the paper's six, less those whose maps
        the configured annotators do not make (`data.annotators`)."""
        return annotated_tasks(TRAINING_TASKS, self.profile.data.modalities)

    @property
    def unseen_tasks(self) -> tuple[str, ...]:
        """Never-trained tasks whose maps the configured annotators make: evaluated zero-shot."""
        return annotated_tasks(UNSEEN_TASKS, self.profile.data.modalities)

    @property
    def eval_tasks(self) -> tuple[str, ...]:
        return self.tasks + self.unseen_tasks

    @property
    def models(self) -> tuple[ModelSpec, ...]:
        """The models the train stage trains: the joint model, one CN(FT) per task and, with train.oracles,
        one oracle CN(FT) per unseen task (a CN(FT) whose task is unseen is an oracle)."""
        cfg = self.profile.train
        specs = [("prompt-diffusion", "prompt-diffusion", self.tasks, cfg.steps)]
        if cfg.baseline_steps_per_task > 0:
            each = cfg.baseline_steps(len(self.tasks))
            specs += [(f"cn-ft_{t.replace('->', '-to-')}", "cn-ft", (t,), each) for t in self.tasks]
            if cfg.oracles:
                specs += [(f"cn-ft-oracle_{t.replace('->', '-to-')}", "cn-ft", (t,), each) for t in self.unseen_tasks]
        return tuple(ModelSpec(name, kind, tasks, steps, i) for i, (name, kind, tasks, steps) in enumerate(specs))

    def key(self, stage: str) -> str:
        return self.keys[stage]

    def dir(self, stage: str) -> Path:
        return self.state.stage_dir(stage, self.keys[stage])
