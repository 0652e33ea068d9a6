"""The stage DAG as data: each stage's cache key is a hash of its config and its upstream keys.

A changed parameter changes the keys of the stages that read it and of everything downstream,
and nothing else; a finished stage is a folder with a `_DONE.json` marker under its key.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from flows.profiles import Profile
from pd_data.sources import make_source
from pd_data.state import StateDir, fingerprint
from pd_data.tasks import TASKS, TRAINING_TASKS, UNSEEN_TASKS

# Bump a stage's version when its code changes what it writes, so that old outputs are not reused.
CODE_VERSIONS = {"ingest": 2, "annotate": 2, "prompts": 3, "base": 3, "train": 5, "evaluate": 6}


def annotated_tasks(tasks: tuple[str, ...], modalities: tuple[str, ...]) -> tuple[str, ...]:
    """The tasks whose every map is among `modalities`."""
    return tuple(t for t in tasks if set(TASKS[t].modalities) <= set(modalities))


@dataclass(frozen=True)
class Plan:
    profile: Profile
    state: StateDir

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

    def key(self, stage: str) -> str:
        p = self.profile
        parts = {  # lambdas: only the asked stage's upstream keys are computed
            "ingest": lambda: (p.data.model_dump(exclude={"annotators", "annotator_weights", "workers", "pairing"}),
                               make_source(p.data).fingerprint()),
            "annotate": lambda: (self.key("ingest"), p.data.annotators, p.data.annotator_weights),
            "prompts": lambda: (self.key("annotate"), p.prompts.model_dump(), self.eval_tasks, p.data.pairing),
            # A base that learns maps (base.map_fraction) reads the annotations too.
            "base": lambda: (self.key("annotate") if p.base.map_fraction else self.key("ingest"), p.base.model_dump()),
            "train": lambda: (self.key("annotate"), self.key("base"),
                              p.train.model_dump(exclude={"checkpoint_every", "keep_last", "validation_samples", "validate_every",
                                                          "gradient_checkpointing", "loader_workers"}), self.tasks, p.data.pairing),
            "evaluate": lambda: (self.key("train"), self.key("prompts"), p.eval.model_dump()),
        }[stage]()
        return fingerprint(stage, CODE_VERSIONS[stage], parts)

    def dir(self, stage: str) -> Path:
        return self.state.stage_dir(stage, self.key(stage))
