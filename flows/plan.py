"""The stage DAG as data, frozen once per run: every stage's key, computed in dependency order.

A stage's key hashes the configuration it reads (the effective one: `EvalConfig` already holds the
protocol's values), the keys of its upstream stages, and the code of the modules it runs: its entry
module and every project module that one imports, found by walking the imports (their syntax trees,
docstrings dropped: editing a comment or a docstring reruns nothing). The source is
fingerprinted once, when the plan is built: a file touched while the run goes on cannot move a
key under it, so nothing it writes is orphaned. A finished stage is a folder with a `_DONE.json`
marker under its key.
"""
from __future__ import annotations

import ast
import dataclasses
import hashlib
import importlib.util
import threading
from dataclasses import dataclass
from datetime import datetime, timezone
from functools import lru_cache
from pathlib import Path
from types import MappingProxyType
from typing import Mapping

from flows.dag import STAGES, UPSTREAM, descendants
from flows.profiles import ConfigError, Profile
from pd_data.sources import make_source
from pd_core.state import StateDir, fingerprint
from pd_data.tasks import TASKS, TRAINING_TASKS, UNSEEN_TASKS
from pd_model.names import model_id, replicate_id
from pd_model.train import ModelSpec

# The module each stage calls; the code it runs is that module and every project module it imports,
# directly or not (imports inside functions included). annotators_ext is imported by name at run time.
STAGE_ENTRY = {"ingest": ("pd_data.ingest",), "annotate": ("pd_data.annotate", "pd_data.annotators_ext"),
               "prompts": ("pd_data.prompts", "pd_data.dataset"), "base": ("pd_model.train_base",),
               "train": ("pd_model.train_dist",), "evaluate": ("pd_eval.evaluate",)}
PROJECT = ("pd_core", "pd_data", "pd_model", "pd_eval")


def _source(module: str) -> str:
    spec = importlib.util.find_spec(module)
    if spec is None or spec.origin is None:
        raise ImportError(f"stage code module {module} not found")
    return Path(spec.origin).read_text()


@lru_cache(maxsize=512)
def _is_module(name: str) -> bool:
    try:
        return importlib.util.find_spec(name) is not None
    except ModuleNotFoundError:
        return False


# CPython 3.11's parser is not safe to enter from two threads at once ("SystemError: AST constructor
# recursion depth mismatch"), and Prefect runs stage tasks in threads that each build a plan.
_PARSE = threading.Lock()


def _parse(text: str) -> ast.AST:
    with _PARSE:
        return ast.parse(text)


@lru_cache(maxsize=256)
def _project_imports(text: str) -> frozenset[str]:
    """The project modules a module's source imports (`from pd_data import tasks` counts as pd_data.tasks)."""
    found = set()
    for node in ast.walk(_parse(text)):
        if isinstance(node, ast.Import):
            found |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0 and node.module.split(".")[0] in PROJECT:
            found.add(node.module)
            found |= {f"{node.module}.{a.name}" for a in node.names if _is_module(f"{node.module}.{a.name}")}
    return frozenset(m for m in found if m.split(".")[0] in PROJECT and "." in m)


def stage_modules(stage: str) -> tuple[str, ...]:
    """Every project module the stage runs: the closure of its entry modules' imports."""
    seen, todo = set(), list(STAGE_ENTRY[stage])
    while todo:
        m = todo.pop()
        if m not in seen:
            seen.add(m)
            todo += _project_imports(_source(m)) - seen
    return tuple(sorted(seen))


@lru_cache(maxsize=256)
def _tree_hash(text: str) -> str:
    """A hash of the module's syntax tree without docstrings: code changes count, prose does not."""
    tree = _parse(text)
    for node in ast.walk(tree):
        body = getattr(node, "body", None)
        if isinstance(body, list) and body and isinstance(body[0], ast.Expr) \
                and isinstance(body[0].value, ast.Constant) and isinstance(body[0].value.value, str):
            node.body = body[1:] or [ast.Pass()]
    return hashlib.sha256(ast.dump(tree).encode()).hexdigest()[:16]


def code_version(stage: str) -> dict[str, str]:
    """module -> hash of its code, for every module the stage runs."""
    return {m: _tree_hash(_source(m)) for m in stage_modules(stage)}


def annotated_tasks(tasks: tuple[str, ...], modalities: tuple[str, ...]) -> tuple[str, ...]:
    """The tasks whose every map is among `modalities`."""
    return tuple(t for t in tasks if set(TASKS[t].modalities) <= set(modalities))


def _config_parts(p: Profile, stage: str) -> object:
    """What each stage reads of the profile (settings that change only how, not what, are left out)."""
    return {
        "ingest": lambda: p.data.model_dump(exclude={"annotators", "annotator_weights", "workers", "dask_address",
                                                     "gpu_workers", "pairing"}),
        "annotate": lambda: (p.data.annotators, p.data.annotator_weights),
        "prompts": lambda: (p.prompts.model_dump(), p.data.pairing),
        "base": lambda: p.base.model_dump(exclude={"checkpoint_every", "keep_last"}),
        "train": lambda: (p.train.identity(), p.data.pairing),
        "evaluate": lambda: p.eval.identity(),
    }[stage]()


def model_specs(cfg, tasks: tuple[str, ...], unseen: tuple[str, ...]) -> tuple[ModelSpec, ...]:
    """The models the train stage trains (`train` config `cfg`): the joint model, one CN(FT) per task and,
    with train.oracles, one oracle CN(FT) per unseen task (a CN(FT) whose task is unseen is an oracle);
    then replicates 1.. of each (`train.replicates`, `train.baseline_replicates`), each from its own seeds."""
    specs = [("prompt-diffusion", "prompt-diffusion", tasks, cfg.steps)]
    if cfg.baseline_steps_per_task > 0:
        each = cfg.baseline_steps(len(tasks))
        specs += [(model_id("cn-ft", t), "cn-ft", (t,), each) for t in tasks]
        if cfg.oracles:
            specs += [(model_id("cn-ft", t, oracle=True), "cn-ft", (t,), each) for t in unseen]
    first = [ModelSpec(name, kind, ts, steps, i) for i, (name, kind, ts, steps) in enumerate(specs)]
    more = [ModelSpec(replicate_id(m.name, r), m.kind, m.tasks, m.steps, m.seed_offset + r * cfg.REPLICATE_SEED_STRIDE, r)
            for r in range(1, max(cfg.replicates, cfg.baseline_replicates))
            for m in first if r < (cfg.replicates if m.kind == "prompt-diffusion" else cfg.baseline_replicates)]
    return tuple(first + more)


def model_key(plan_keys: Mapping[str, str], profile: Profile, spec: ModelSpec) -> str:
    """One trained model's own key: the train stage's code, the settings its weights depend on, the
    stages it reads, and its spec (its seed and replicate). Two train stages that differ only in which
    other models they train (more replicates, another baseline budget) share the models they both have."""
    return fingerprint("model", code_version("train"), profile.train.model_identity(), profile.data.pairing,
                       [plan_keys[u] for u in UPSTREAM["train"]], dataclasses.asdict(spec))


@dataclass(frozen=True)
class Plan:
    """One run's profile, state directory, source fingerprint and stage keys, and the stages this run
    recomputes even if done (`force`: `pd run --force STAGE`, with their descendants). Build it with
    `Plan.build`."""

    profile: Profile
    state: StateDir
    source_fingerprint: str
    keys: Mapping[str, str]
    force: frozenset[str] = frozenset()
    started_at: datetime | None = None  # when the run that made the plan began: its `runs` row's started_at

    @classmethod
    def build(cls, profile: Profile, state: StateDir, force=(), started_at: datetime | None = None) -> "Plan":
        """`force`: stage names whose outputs this run recomputes, with every stage that reads them;
        `started_at`: when the run began (default: now)."""
        unknown = sorted(set(force) - set(STAGES))
        if unknown:
            raise ConfigError(f"cannot force {unknown}: the stages are {list(STAGES)}")
        if "base" in force and profile.base.kind != "tiny":
            raise ConfigError(f"force=['base'] cannot apply: base.kind={profile.base.kind!r} is loaded, not trained; "
                              f"force 'train' to retrain the ControlNets")
        tasks = annotated_tasks(TRAINING_TASKS, profile.data.modalities)
        unseen = annotated_tasks(UNSEEN_TASKS, profile.data.modalities)
        source = make_source(profile.data).fingerprint()
        models = [dataclasses.asdict(m) for m in model_specs(profile.train, tasks, unseen)]
        extra = {"ingest": source, "prompts": tasks + unseen, "train": models}
        keys: dict[str, str] = {}
        for stage in STAGES:  # dependency order: each upstream key exists when it is needed
            keys[stage] = fingerprint(stage, code_version(stage), _config_parts(profile, stage),
                                      [keys[u] for u in UPSTREAM[stage]], extra.get(stage))
        return cls(profile, state, source, MappingProxyType(keys), frozenset(descendants(force)),
                   started_at or datetime.now(timezone.utc))

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
        return model_specs(self.profile.train, self.tasks, self.unseen_tasks)

    def key(self, stage: str) -> str:
        return self.keys[stage]

    def model_key(self, spec: ModelSpec) -> str:
        return model_key(self.keys, self.profile, spec)

    def dir(self, stage: str) -> Path:
        return self.state.stage_dir(stage, self.keys[stage])
