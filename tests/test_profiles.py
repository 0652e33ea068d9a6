import pytest
from pydantic import ValidationError

from flows.profiles import PROFILES, ConfigError, merge_settings, load_profile, parse_override, split_overrides


@pytest.mark.parametrize("name", sorted(PROFILES))
def test_every_profile_validates(name):
    p = load_profile(name)
    assert p.name == name and p.data.resolution % 8 == 0


def test_override_changes_one_value_and_keeps_the_rest():
    p = load_profile("demo", {"train": {"steps": 7}})
    assert p.train.steps == 7
    assert p.train.batch_size == load_profile("demo").train.batch_size


def test_unknown_key_is_an_error_naming_it():
    with pytest.raises(ConfigError, match=r"^train.stepz=3: there is no such setting; did you mean train.steps\?$"):
        load_profile("smoke", {"train": {"stepz": 3}})


def test_unknown_profile_names_the_choices():
    with pytest.raises(ValueError, match="choose one of"):
        load_profile("fast")


def test_bad_values_are_rejected_before_work_starts():
    with pytest.raises(ConfigError, match="multiple of 8"):
        load_profile("smoke", {"data": {"resolution": 30}})
    with pytest.raises(ConfigError, match="sum to 1"):
        load_profile("smoke", {"data": {"split_fractions": [0.5, 0.5, 0.5]}})
    with pytest.raises(ConfigError, match="pretrained_path"):
        load_profile("smoke", {"base": {"kind": "sd15", "pretrained_path": None}})


def test_profiles_are_frozen():
    p = load_profile("smoke")
    with pytest.raises(ValidationError):
        p.train.steps = 3


def test_parse_override():
    assert parse_override("train.steps=10") == {"train": {"steps": 10}}
    assert parse_override("eval.scheduler=unipc") == {"eval": {"scheduler": "unipc"}}
    assert split_overrides("train.steps=10,base.block_out_channels=[32,64],,eval.steps=5") == [
        "train.steps=10", "base.block_out_channels=[32,64]", "eval.steps=5"]
    assert parse_override("base.block_out_channels=[32,64]") == {"base": {"block_out_channels": [32, 64]}}
    with pytest.raises(ValueError, match="section.key=value"):
        parse_override("train.steps")


def test_paper_protocol_holds_its_sampler_and_rejects_another():
    e = load_profile("paper").eval
    assert (e.scheduler, e.steps, e.guidance_scale, e.pair_guidance_scale) == ("ddim", 100, 9.0, None)
    assert load_profile("paper", {"eval": {"steps": 100, "guidance_scale": 9}}).eval == e  # the paper's own values
    with pytest.raises(ConfigError, match=r"^eval.steps=7 cannot apply under eval.protocol=paper.*use eval.steps=100 or "
                                          r"eval.protocol=fast\neval.pair_guidance_scale=3.0 .*use eval.pair_guidance_scale=null"):
        load_profile("paper", {"eval": {"pair_guidance_scale": 3.0, "steps": 7}})  # both at once, each with its fix
    assert load_profile("smoke", {"eval": {"pair_guidance_scale": 3.0}}).eval.pair_guidance_scale == 3.0
    assert load_profile("paper").eval.positive_suffix == ", best quality, extremely detailed"


@pytest.mark.parametrize("over, fix", [
    ({"data": {"resolution": 40}, "base": {"block_out_channels": [8, 8, 8, 8, 8]}}, "data.resolution=40 is not divisible by 16.*use data.resolution=32 or 48"),
    ({"data": {"resolution": 96}, "base": {"kind": "sd15", "pretrained_path": "x"}}, "96 is not divisible by 64.*latent SD 1.5.*64 or 128"),
])
def test_a_resolution_the_unet_cannot_halve_is_rejected_with_the_fix(over, fix):
    with pytest.raises(ConfigError, match=fix):
        load_profile("smoke", over)


def test_more_processes_than_gpus_is_rejected_before_training():
    import torch

    from pd_model.config import TrainConfig
    from pd_model.train_dist import check_devices

    if torch.cuda.is_available():
        with pytest.raises(ValueError, match="GPU"):
            check_devices(TrainConfig(processes=torch.cuda.device_count() + 1, batch_size=64))
    else:
        with pytest.raises(ValueError, match="train.device=cpu"):
            check_devices(TrainConfig(device="cuda"))
    check_devices(TrainConfig(processes=2, device="cpu"))  # CPU processes: always placeable


def test_baseline_budget_rule_sets_cnft_steps_and_says_so():
    steps = load_profile("demo", {"train": {"steps": 300, "baseline_steps_per_task": 40}}).train
    assert steps.baseline_steps(6) == 40 and "each of the 6 CN(FT) models 40 steps" in steps.budget_rule(6)
    compute = load_profile("demo", {"train": {"steps": 300, "baseline_budget": "equal_compute"}}).train
    assert compute.baseline_steps(6) == 300 // 6 and "together 300 steps (50 each)" in compute.budget_rule(6)
    with pytest.raises(ConfigError, match="train.steps=4 over 6 CN.FT. models: 0 steps each; raise train.steps"):
        load_profile("smoke", {"train": {"steps": 4, "baseline_budget": "equal_compute"}})


def test_the_pairing_changes_the_prompts_and_the_models_not_the_data(tmp_path):
    from flows.plan import Plan
    from pd_core.state import StateDir

    def keys(over):
        plan = Plan.build(load_profile("smoke", over), StateDir(tmp_path))
        return {s: plan.key(s) for s in ("ingest", "annotate", "prompts", "base", "train", "evaluate")}

    default, anyp = keys({}), keys({"data": {"pairing": "any"}})
    assert {s for s in default if default[s] != anyp[s]} == {"prompts", "train", "evaluate"}
    with pytest.raises(ValueError, match="pairing"):
        load_profile("smoke", {"data": {"pairing": "twins"}})


def test_a_profile_for_one_source_takes_another_from_the_overrides():
    """The demo sizes its procedural source (data.n_groups=80); -o data.source=folder drops that, while
    the same setting given with the override is an error naming it."""
    folder = {"source": "folder", "source_path": "/photos",
              "annotators": {"depth": "transformers", "hed": "controlnet_aux", "seg": "transformers"}}
    assert load_profile("demo", {"data": folder}).data.source == "folder"
    with pytest.raises(ConfigError, match=r"data.n_groups=3 cannot apply to data.source='folder'"):
        load_profile("demo", {"data": folder | {"n_groups": 3}})


@pytest.mark.parametrize("name", ["demo", "smoke"])
def test_choosing_the_paper_protocol_replaces_the_profiles_own_sampler_values(name):
    """The demo sets guidance 3 and map guidance 1, the smoke 10 steps: under -o eval.protocol=paper they
    give way to the protocol's sampler; only a contradicting value given with -o is an error, and its
    fix can be typed as one -o."""
    from pd_eval.config import NEGATIVE_PROMPT

    e = load_profile(name, {"eval": {"protocol": "paper"}}).eval
    assert (e.scheduler, e.steps, e.guidance_scale, e.map_guidance_scale, e.pair_guidance_scale) == ("ddim", 100, 9.0, None, None)
    assert e.negative_prompt == NEGATIVE_PROMPT and e.positive_suffix == ", best quality, extremely detailed"
    assert e.threads == load_profile(name).eval.threads  # not a sampler setting: the profile's stays
    with pytest.raises(ConfigError, match=r"^eval.guidance_scale=3.0 cannot apply under eval.protocol=paper.*"
                                          r"use eval.guidance_scale=9.0 or eval.protocol=fast$") as err:
        load_profile(name, {"eval": {"protocol": "paper", "guidance_scale": 3.0}})
    fixed = parse_override(str(err.value).rsplit("use ", 1)[1].split(" or ")[0])  # the fix, as the user types it
    assert load_profile(name, merge_settings({"eval": {"protocol": "paper", "guidance_scale": 3.0}}, fixed)).eval == e


@pytest.mark.parametrize("name, backend", [("smoke", "procedural"), ("demo", "procedural"), ("paper", "controlnet_aux")])
def test_a_mapping_override_replaces_the_setting_and_a_dotted_one_sets_an_entry_for_every_profile(name, backend):
    """One rule whether the annotators are the model's default (smoke, demo) or the profile's own dict
    (paper): a value replaces the mapping whole, so an annotator can be dropped; a dotted key sets one."""
    from flows.cli import _overrides

    before = load_profile(name).data.annotators
    assert len(before) == 6
    only = _overrides([f'data.annotators={{"hed": "{backend}"}}', "eval.task_inference_queries=0"])
    assert load_profile(name, only).data.annotators == {"hed": backend}
    other = "controlnet_aux" if backend == "procedural" else "transformers"
    one = _overrides([f"data.annotators.canny={other}"])
    assert one == {"data": {"annotators.canny": other}}
    assert load_profile(name, one).data.annotators == {**before, "canny": other}
    # Given together: the whole value, then the entry on it; an entry given before a whole value is dropped.
    both = _overrides([f'data.annotators={{"hed": "{backend}"}}', f"data.annotators.seg={backend}",
                       "eval.task_inference_queries=0"])
    assert load_profile(name, both).data.annotators == {"hed": backend, "seg": backend}
    late = _overrides([f"data.annotators.seg={backend}", f'data.annotators={{"hed": "{backend}"}}',
                       "eval.task_inference_queries=0"])
    assert load_profile(name, late).data.annotators == {"hed": backend}


def test_overrides_of_one_section_combine_and_a_dotted_key_needs_a_mapping():
    from flows.cli import _overrides

    over = _overrides(["train.steps=5", "train.batch_size=2"])
    assert over == {"train": {"steps": 5, "batch_size": 2}}
    t = load_profile("demo", over).train
    assert (t.steps, t.batch_size, t.learning_rate) == (5, 2, load_profile("demo").train.learning_rate)
    assert parse_override("data.annotators.hed=controlnet_aux") == {"data": {"annotators.hed": "controlnet_aux"}}
    with pytest.raises(ConfigError, match=r"^data.resolution.x=1: data.resolution is not a mapping.*-o data.resolution="):
        load_profile("demo", _overrides(["data.resolution.x=1"]))
    with pytest.raises(ValueError, match="names no setting of section 'train'"):
        parse_override("train=3")
