"""Named profiles: one typed, frozen configuration per kind of run, overridable key by key."""
from __future__ import annotations

import difflib
from typing import Any

from pydantic import ValidationError, model_validator

from pd_core.config import Frozen
from pd_data.config import DataConfig, PromptConfig
from pd_data.tasks import FORWARD_TASKS, TASKS, TRAINING_TASKS
from pd_eval.config import EvalConfig
from pd_model.config import BaseModelConfig, TrainConfig, resolution_multiple


class Profile(Frozen):
    name: str
    data: DataConfig = DataConfig()
    prompts: PromptConfig = PromptConfig()
    base: BaseModelConfig = BaseModelConfig()
    train: TrainConfig = TrainConfig()
    eval: EvalConfig = EvalConfig()

    @model_validator(mode="after")
    def _fits(self) -> "Profile":
        """Shapes that cannot work are rejected here, before any stage starts."""
        m, r = resolution_multiple(self.base), self.data.resolution
        if r % m:
            kind = "latent SD 1.5 base (8x VAE, 4 levels)" if self.base.kind == "sd15" else \
                f"pixel-space base with block_out_channels={self.base.block_out_channels}"
            raise ValueError(f"data.resolution={r} is not divisible by {m}, which the {kind} needs; "
                             f"use data.resolution={max(m, r // m * m)} or {(r // m + 1) * m}")
        have = set(self.data.modalities)
        trained = [name for name in TRAINING_TASKS if set(TASKS[name].modalities) <= have]
        if not trained:
            raise ValueError(f"data.annotators={self.data.annotators} makes none of the maps the six training tasks need "
                             f"(depth, hed, seg); add at least one, e.g. data.annotators={{\"hed\": \"controlnet_aux\"}}")
        need = {TASKS[name].target for name in FORWARD_TASKS}
        if self.eval.task_inference_queries and not need <= have:
            raise ValueError(f"eval.task_inference_queries={self.eval.task_inference_queries} shows depth, hed and seg "
                             f"examples, but data.annotators lacks {sorted(need - have)}; annotate them or set "
                             f"eval.task_inference_queries=0")
        if self.name == "paper" and (new := {k: v for k, v in self.train.departures().items()
                                             if k in self.train.NOT_IN_PAPER}):
            said = ", ".join(f"train.{k}={v!r}" for k, v in new.items())
            raise ValueError(f"{said}: not in the paper's recipe, which the paper profile keeps; try it with the demo "
                             f"profile (or a profile of your own), or leave it at its default")
        t, n = self.train, len(trained)
        if t.baseline_steps_per_task and t.baseline_steps(n) == 0:
            raise ValueError(f"train.baseline_budget='equal_compute' splits train.steps={t.steps} over {n} CN(FT) models: "
                             f"0 steps each; raise train.steps to at least {n} or set train.baseline_steps_per_task=0")
        return self


# Where the paper profile reads its data and weights (override any of them with -o).
PAPER_INPUTS = "~/pd-inputs"
# The annotators of ControlNet 1.0 as the paper used them: HED (and its fake scribble), MiDaS DPT-hybrid
# depth, UperNet ADE20k segmentation, Canny, BAE normals.
PAPER_ANNOTATORS = {"depth": "transformers", "hed": "controlnet_aux", "seg": "transformers",
                    "canny": "controlnet_aux", "scribble": "controlnet_aux", "normal": "controlnet_aux"}

# Sizes chosen for the 2-core CPU; measured durations are in docs/benchmarks.md.
PROFILES: dict[str, dict[str, Any]] = {
    "smoke": {"data": {"split_fractions": (0.6, 0.1, 0.3)}, "train": {"oracles": True}, "eval": {"bootstrap": 50, "steps": 10, "reader_steps": 40},
              "base": {"snr_gamma": 5.0, "train_text_encoder": True, "map_fraction": 0.25}},
    "demo": {
        # 80 themes x 3 layouts x (a picture and its edited twin): 480 images.
        "data": {"n_groups": 80, "layouts_per_group": 3, "resolution": 32},
        # Enough prompts per task for comparisons to separate; sensitivity re-samples the first 16 twice.
        "prompts": {"per_task": 64},
        # Each base setting is the one that drew held-out captions best at equal cost (EMA, min-SNR with a
        # trained text encoder, v-prediction, a quarter of maps for the prior SD has of them): docs/results.md.
        "base": {"train_steps": 900, "batch_size": 16, "block_out_channels": (32, 64, 64), "ema_decay": 0.999,
                 "snr_gamma": 5.0, "train_text_encoder": True, "map_fraction": 0.25, "prediction_type": "v_prediction",
                 "checkpoint_every": 150,  # a killed run resumes (checkpoints stay out of the stage keys)
                 "mixed_precision": "bf16"},  # the faster step on these CPUs (docs/benchmarks.md); "no" is fp32
        # Equal steps per task: Prompt Diffusion's 960 over six tasks, each CN(FT) 160 on its one. min-SNR and
        # the trained decoder (as the original's shipped command) lower image->map RMSE (scripts/bench_maps.py).
        "train": {"steps": 960, "batch_size": 16, "learning_rate": 5e-4, "baseline_steps_per_task": 160,
                  "validate_every": 120, "snr_gamma": 5.0, "train_unet_decoder": True, "checkpoint_every": 120,
                  "mixed_precision": "bf16"},
        # Text guidance helps map->image and hurts image->map, so each direction has its own (docs/results.md);
        # one process at two threads generates faster here than two at one (scripts/bench_eval.py).
        "eval": {"guidance_scale": 3.0, "map_guidance_scale": 1.0, "threads": 2, "unseen_per_task": 32,
                 "sensitivity_per_task": 16},
    },
    # The paper's run: InstructPix2Pix, the ControlNet annotators, Stable Diffusion 1.5, Inception FID.
    # Every input is read from PAPER_INPUTS (`pd check --profile paper` lists what is missing there).
    "paper": {
        "data": {"source": "instructpix2pix", "source_path": f"{PAPER_INPUTS}/instructpix2pix", "resolution": 256,
                 "shard_size": 256, "annotators": PAPER_ANNOTATORS, "annotator_weights": f"{PAPER_INPUTS}/annotators"},
        "prompts": {"per_task": 1000},
        "base": {"kind": "sd15", "pretrained_path": f"{PAPER_INPUTS}/stable-diffusion-v1-5", "train_steps": 0},
        "train": {"steps": 5000, "batch_size": 32, "learning_rate": 1e-4, "baseline_steps_per_task": 5000,
                  "loader_workers": 4, "checkpoint_every": 500},
        "eval": {"protocol": "paper", "batch_size": 8},
    },
}


def merge_settings(base: dict[str, Any], over: dict[str, Any]) -> dict[str, Any]:
    """`over` on `base`, both `{section: {setting: value}}` (a profile, overrides): sections combine, a
    setting's value replaces it whole, a mapping too, and a dotted key `setting.entry` (as
    `parse_override("data.annotators.hed=x")` makes) sets one entry; a whole value given later drops
    the entries given before it. One rule whoever set the value before: model default, profile or `-o`."""
    out = {k: dict(v) if isinstance(v, dict) else v for k, v in base.items()}
    for section, settings in over.items():
        if not (isinstance(settings, dict) and isinstance(out.get(section), dict)):
            out[section] = settings
            continue
        cur = out[section]
        for key, v in settings.items():
            if "." not in key:
                for stale in [k for k in cur if k.startswith(f"{key}.")]:
                    del cur[stale]
            cur[key] = v
    return out


# The demo with three training replicates of Prompt Diffusion: claims that hold across retrainings.
# After a demo run it trains the two new replicates only (the rest are copied by model key) and
# evaluates all three; its deployment's weekly schedule is registered paused.
PROFILES["replicated"] = merge_settings(PROFILES["demo"], {"train": {"replicates": 3}})


def _set_entries(resolved: dict[str, Any]) -> dict[str, Any]:
    """The dotted keys of `merge_settings`'s result written into their settings: into the value the profile
    gives, else into the model's default (so `-o data.annotators.hed=x` adds to the default annotators
    as it adds to the paper profile's)."""
    out = dict(resolved)
    for section, settings in resolved.items():
        if not isinstance(settings, dict) or not any("." in k for k in settings):
            continue
        fields = getattr(Profile.model_fields.get(section), "annotation", None)
        fields = getattr(fields, "model_fields", {})
        cur = {k: v for k, v in settings.items() if "." not in k}
        for key, v in sorted((k, v) for k, v in settings.items() if "." in k):
            name, *path = key.split(".")
            if name not in fields:
                cur[key] = v  # left for validation to name as an unknown setting, with its near miss
                continue
            value = cur[name] if name in cur else fields[name].get_default(call_default_factory=True)
            if not isinstance(value, dict):
                raise ConfigError(f"{section}.{key}={v!r}: {section}.{name} is not a mapping, so it has no entry "
                                  f"{'.'.join(path)!r}; set it whole, e.g. -o {section}.{name}=VALUE")
            node = value = {**value}
            for part in path[:-1]:
                node[part] = node = dict(node.get(part) or {})
            node[path[-1]] = v
            cur[name] = value
        out[section] = cur
    return out


class ConfigError(ValueError):
    """A configuration that cannot run: one line per problem, each naming the key, the value and a fix."""


def _describe(err: dict) -> str:
    """One pydantic error as `section.key=value: what is wrong; what works`."""
    loc = [str(x) for x in err["loc"]]
    key, value = ".".join(loc), err.get("input")
    if err["type"] == "extra_forbidden":
        fields: Any = Profile.model_fields
        for part in loc[:-1]:  # the section's own fields, to suggest the key that was meant
            ann = fields[part].annotation if part in fields else None
            fields = getattr(ann, "model_fields", {})
        near = difflib.get_close_matches(loc[-1], list(fields), n=1)
        hint = f"did you mean {'.'.join(loc[:-1] + near[:1])}?" if near else f"known keys: {', '.join(sorted(fields))}"
        return f"{key}={value!r}: there is no such setting; {hint}"
    msg = err["msg"].removeprefix("Value error, ")
    if not loc or (err["type"] == "value_error" and len(loc) == 1):  # a rule over settings: its message names them
        return msg
    return f"{key}={value!r}: {msg}"


def _for_source(profile: dict[str, Any], overrides: dict[str, Any]) -> dict[str, Any]:
    """The profile without the source settings it sets for its own source, when the overrides choose
    another (the demo's data.n_groups under -o data.source=folder): a setting the overrides give that
    cannot apply to their source stays an error."""
    from pd_data.config import PROCEDURAL_ONLY, SOURCE_ONLY

    data = profile.get("data", {})
    source = overrides.get("data", {}).get("source", data.get("source", "procedural"))
    if source == data.get("source", "procedural"):
        return profile
    drop = {k for k in PROCEDURAL_ONLY if source != "procedural"} | {k for k, ok in SOURCE_ONLY.items() if source not in ok}
    drop |= {"annotators"} if "procedural" in data.get("annotators", {}).values() and source != "procedural" else set()
    return profile | {"data": {k: v for k, v in data.items() if k not in drop}}


def _for_protocol(profile: dict[str, Any], overrides: dict[str, Any]) -> dict[str, Any]:
    """The profile without its own sampler settings when the overrides choose the paper's protocol (the
    demo's guidance 3 under -o eval.protocol=paper): the protocol sets them, and only a value the
    overrides give that contradicts it is an error."""
    from pd_eval.config import PROTOCOL_KEYS

    ev = profile.get("eval", {})
    if overrides.get("eval", {}).get("protocol") != "paper" or ev.get("protocol") == "paper":
        return profile
    return profile | {"eval": {k: v for k, v in ev.items() if k not in PROTOCOL_KEYS}}


def load_profile(name: str, overrides: dict[str, Any] | None = None) -> Profile:
    """`load_profile("demo", {"train": {"steps": 10}})`; an unknown profile, key or bad value raises
    `ConfigError` listing every problem."""
    if name not in PROFILES:
        raise ConfigError(f"unknown profile {name!r}; choose one of {sorted(PROFILES)}")
    try:
        own = _for_protocol(_for_source(PROFILES[name], overrides or {}), overrides or {})
        return Profile.model_validate(_set_entries(merge_settings(own | {"name": name}, overrides or {})))
    except ValidationError as e:
        raise ConfigError("\n".join(_describe(err) for err in e.errors(include_url=False))) from None


def split_overrides(text: str) -> list[str]:
    """`train.steps=10,base.block_out_channels=[32,64]` -> its two overrides (commas inside [...] stay)."""
    import re

    return [item for item in re.split(r",(?![^\[]*\])", text) if item]


OVERRIDE_RULE = ("A value replaces the setting whole, a mapping too: -o data.annotators='{\"hed\": \"controlnet_aux\"}' "
                 "is exactly that one annotator; a dotted key sets one entry: -o data.annotators.hed=controlnet_aux "
                 "adds or changes hed and keeps the others. The same whether the profile or the default set the value.")


def parse_override(text: str) -> dict[str, Any]:
    """`train.steps=10` -> {"train": {"steps": 10}} (values parsed as JSON when they can be).

    A value replaces the setting whole, a mapping too: `data.annotators={"hed": "controlnet_aux"}` is
    exactly that annotator. A dotted key sets one entry of a mapping setting, and stays one key of its
    section: `data.annotators.hed=controlnet_aux` -> {"data": {"annotators.hed": "controlnet_aux"}},
    which `load_profile` writes into the profile's value of the setting, or its default."""
    import json

    if "=" not in text:
        raise ValueError(f"override {text!r} must look like section.key=value, e.g. train.steps=10")
    path, raw = text.split("=", 1)
    try:
        value: Any = json.loads(raw)
    except json.JSONDecodeError:
        value = raw
    section, _, key = path.partition(".")
    if not key:
        raise ValueError(f"override {text!r} names no setting of section {section!r}; write section.key=value, "
                         f"e.g. train.steps=10")
    return {section: {key: value}}
