"""A setting that cannot apply is an error naming it, its value and the fix, never silently dropped;
the forms that do apply keep working."""
import json

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from PIL import Image
from pydantic import ValidationError

from conftest import live_controlnet
from pd_data.config import PROCEDURAL_ONLY, DataConfig
from pd_data.sources import ParquetSource
from pd_eval.config import EvalConfig
from pd_model.base import build_tiny_base
from pd_model.config import BaseModelConfig
from pd_model.controlnet import as_kind, controlnet_class, kind_of, residuals
from pd_model.pipeline import PromptDiffusionPipeline, load_trained, save_trained

pytestmark = pytest.mark.numerics  # float results: .ci/run reruns these at 1 and 2 threads and other BLAS kernels

CAPTIONS = ["a red ball on a plain grey background", "a blue box on a sky background"]
NOT_PROC = {"hed": "controlnet_aux"}


@pytest.fixture(scope="module")
def parts():
    """A tiny base and a live ControlNet of each kind (pixel space: one conditioning level)."""
    base = build_tiny_base(BaseModelConfig(), CAPTIONS, 32).freeze()
    nets = {k: live_controlnet(controlnet_class(k).from_unet(base.unet, conditioning_embedding_out_channels=(16,)))
            for k in ("prompt-diffusion", "cn-ft")}
    return base, nets


def _img(seed, size=32):
    return Image.fromarray(np.random.default_rng(seed).integers(0, 255, (size, size, 3), dtype=np.uint8))


def _call(pipe, **kw):
    args = dict(image=_img(3), num_inference_steps=2, guidance_scale=2.0, output_type="np",
                generator=torch.Generator().manual_seed(0))
    return pipe("a red ball", **{**args, **kw}).images


# ---------------------------------------------------------------- 1. the paper protocol
@pytest.mark.parametrize("key, value, paper", [("scheduler", "dpm", "ddim"), ("steps", 7, "100"),
                                               ("guidance_scale", 3.0, "9.0"), ("pair_guidance_scale", 2.0, "null"),
                                               ("map_guidance_scale", 1.0, "null")])
def test_a_sampler_setting_other_than_the_papers_is_an_error_under_the_paper_protocol(key, value, paper):
    """The fix is what `-o` takes: the paper's own value (null for None) or the other protocol."""
    with pytest.raises(ValidationError, match=rf"eval.{key}={value} cannot apply under eval.protocol=paper.*"
                                              rf"use eval.{key}={paper} or eval.protocol=fast"):
        EvalConfig(protocol="paper", **{key: value})


def test_the_paper_protocol_holds_the_papers_sampler():
    paper = EvalConfig(protocol="paper")
    assert (paper.scheduler, paper.steps, paper.guidance_scale, paper.pair_guidance_scale) == ("ddim", 100, 9.0, None)
    assert EvalConfig(protocol="paper", scheduler="ddim", steps=100, guidance_scale=9, pair_guidance_scale=None) == paper
    assert EvalConfig.model_validate(paper.model_dump()) == paper  # what is hashed rebuilds the same config
    fast = EvalConfig(steps=7, pair_guidance_scale=2.0)
    assert (fast.steps, fast.pair_guidance_scale) == (7, 2.0)


# ---------------------------------------------------------------- 2. the pipeline
@pytest.mark.parametrize("kind", ["cn-ft", None])
@pytest.mark.parametrize("setting", [{"pair_guidance_scale": 2.0}, {"empty_pair": True}])
def test_pair_settings_without_a_prompt_diffusion_controlnet_are_errors(parts, kind, setting):
    base, nets = parts
    pipe = PromptDiffusionPipeline.from_parts(base, nets[kind] if kind else None, "ddim")
    (name, value), = setting.items()
    has = "a stock ControlNet" if kind else "no ControlNet"
    with pytest.raises(ValueError, match=rf"^{name}={value} cannot apply: .*{has}.*; leave {name}="):
        _call(pipe, **setting, **({} if kind else {"image": None}))


@pytest.mark.parametrize("kind", ["prompt-diffusion", "cn-ft"])
@pytest.mark.parametrize("setting", [{"height": 64}, {"width": 16}])
def test_an_output_size_other_than_the_querys_is_an_error(parts, kind, setting):
    base, nets = parts
    pipe = PromptDiffusionPipeline.from_parts(base, nets[kind], "ddim")
    pair = {"image_pair": (_img(1), _img(2))} if kind == "prompt-diffusion" else {}
    (name, value), = setting.items()
    with pytest.raises(ValueError, match=rf"^{name}={value} cannot apply: the output has the query image's size "
                                         rf"\(32x32.*leave {name}=None"):
        _call(pipe, **pair, **setting)


def test_the_settings_that_apply_still_work(parts):
    base, nets = parts
    cnft = PromptDiffusionPipeline.from_parts(base, nets["cn-ft"], "ddim")
    out = _call(cnft, height=32, width=32)  # the query's own size may be given
    assert out.shape == (1, 32, 32, 3) and np.array_equal(out, _call(cnft))
    pd = PromptDiffusionPipeline.from_parts(base, nets["prompt-diffusion"], "ddim")
    pair = (_img(1), _img(2))
    assert not np.array_equal(_call(pd, image_pair=pair), _call(pd, image_pair=pair, pair_guidance_scale=2.0))
    assert not np.array_equal(_call(pd, image_pair=pair), _call(pd, image_pair=pair, empty_pair=True))
    text_only = PromptDiffusionPipeline.from_parts(base, None, "ddim")
    assert _call(text_only, image=None, height=16, width=32).shape == (1, 16, 32, 3)  # no query: the size is asked for


def test_the_benchmark_gives_pair_guidance_to_prompt_diffusion_only(train_world, tmp_path):
    """`eval.pair_guidance_scale` is documented as Prompt Diffusion only: a CN(FT) under it samples as without it."""
    from pd_data.config import PromptConfig
    from pd_data.dataset import load_split
    from pd_data.prompts import materialise_prompts
    from pd_data.tasks import get_task
    from pd_eval.benchmark import evaluation_prompts
    from pd_eval.evaluate import Split, evaluate_folders
    from pd_eval.generation import cpu_threads
    from pd_model.base import load_base
    from pd_model.pipeline import save_trained
    from pd_model.config import Sampler
    from pd_model.sampling import generate

    data = load_split(train_world / "img", train_world / "ann", "train")
    base = load_base(train_world / "base").freeze()
    net = live_controlnet(controlnet_class("cn-ft").from_unet(base.unet, conditioning_embedding_out_channels=(16,)))
    task = "image->depth"
    save_trained(tmp_path / "cn-ft", net, base, str(train_world / "base"), "cn-ft", (task,), False)
    prompts_path = tmp_path / "prompts.parquet"
    materialise_prompts(data, (task,), PromptConfig(per_task=2, split="train"), prompts_path)
    cfg = EvalConfig(steps=2, bootstrap=0, pair_guidance_scale=3.0)
    where = Split(train_world / "img", train_world / "ann", "train", prompts_path, baselines=False)
    result = evaluate_folders(train_world / "base", {"cn-ft_depth": tmp_path / "cn-ft"}, (), where, cfg, tmp_path / "out")
    rows = evaluation_prompts(prompts_path, cfg)
    built = [data.prompt(get_task(task), r["example_id"], r["query_id"]) for r in rows]
    with cpu_threads(cfg.threads):  # as generation runs: on a CPU the thread count moves float sums
        direct = generate(base, net, built, [r["seed"] for r in rows], Sampler(steps=2, guidance_scale=cfg.guidance_scale))
    assert np.array_equal(np.stack([np.asarray(Image.open(s["path"])) for s in result.samples]), direct)
    with pytest.raises(ValueError, match="pair_guidance_scale=3.0 cannot apply"):  # asked for directly, it is an error
        generate(base, net, built, [r["seed"] for r in rows], Sampler(steps=2, pair_guidance_scale=3.0))


# ---------------------------------------------------------------- 3. one vocabulary, one call
@pytest.mark.parametrize("bad, match", [
    (lambda nets: controlnet_class("controlnet"), r"unknown ControlNet kind 'controlnet'; choose 'prompt-diffusion' or 'cn-ft'"),
    (lambda nets: kind_of(object()), r"object is not a ControlNet"),
    (lambda nets: residuals(nets["prompt-diffusion"], *_unet_inputs()[:3], None, _unet_inputs()[4]),
     r"Prompt Diffusion ControlNet needs the example pair"),
    (lambda nets: residuals(nets["cn-ft"], *_unet_inputs()[:4], None), r"a ControlNet needs the query"),
])
def test_a_kind_or_an_input_a_controlnet_cannot_take_is_an_error(parts, bad, match):
    with pytest.raises((ValueError, TypeError), match=match):
        bad(parts[1])


def _unet_inputs(b=2):
    g = torch.Generator().manual_seed(0)
    x, pair, query = (torch.randn(b, c, 32, 32, generator=g) for c in (3, 6, 3))
    return x, torch.tensor([10, 500]), torch.randn(b, 8, 32, generator=g), pair, query


def test_both_kinds_go_through_residuals_with_one_call(parts):
    base, nets = parts
    x, t, _, pair, query = _unet_inputs()
    emb = base.encode_text(CAPTIONS)
    plain = base.unet(x, t, emb).sample
    for kind, net in nets.items():
        assert kind_of(net) == kind and isinstance(net, controlnet_class(kind))
        extra = residuals(net, x, t, emb, pair, query)
        assert set(extra) == {"down_block_additional_residuals", "mid_block_additional_residual"}
        assert not torch.allclose(base.unet(x, t, emb, **extra).sample, plain)
    cnft = nets["cn-ft"]  # the pair is Prompt Diffusion's input only
    assert torch.equal(residuals(cnft, x, t, emb, pair, query)["mid_block_additional_residual"],
                       residuals(cnft, x, t, emb, None, query)["mid_block_additional_residual"])
    assert residuals(None, x, t, emb, pair, query) == {}
    assert [as_kind(k) for k in ("prompt_diffusion", "cnft", "prompt-diffusion", "cn-ft")] == \
        ["prompt-diffusion", "cn-ft", "prompt-diffusion", "cn-ft"]


def test_model_folders_are_written_in_the_new_vocabulary_and_old_ones_still_load(parts, tmp_path):
    base, nets = parts
    for legacy, kind in (("prompt_diffusion", "prompt-diffusion"), ("cnft", "cn-ft")):
        save_trained(tmp_path / kind, nets[kind], base, "base-ref", legacy, ("image->depth",), with_unet=False)
        meta, net, _ = load_trained(tmp_path / kind)
        assert meta["kind"] == kind and kind_of(net) == kind
        (tmp_path / kind / "pipeline.json").write_text(json.dumps({**meta, "kind": legacy}))  # a folder of old
        assert kind_of(load_trained(tmp_path / kind)[1]) == kind
    with pytest.raises(ValueError, match="kind='cn-ft' but the ControlNet is a 'prompt-diffusion' one"):
        save_trained(tmp_path / "wrong", nets["prompt-diffusion"], base, "base-ref", "cn-ft", ("image->depth",), False)


# ---------------------------------------------------------------- 4. Parquet column mappings
def _png(color) -> bytes:
    import io

    buf = io.BytesIO()
    Image.new("RGB", (32, 32), color).save(buf, format="PNG")
    return buf.getvalue()


@pytest.mark.parametrize("columns, match", [
    ([{"image": "img", "caption": "text", "grp": "album"}], r"unknown key\(s\) \['grp'\]; the keys are 'image' and 'caption' and, optionally, 'group'"),
    ([{"image": "img"}], r"has no 'caption' key; the keys are 'image' and 'caption'"),
    ([{"image": "img", "caption": "text", "group": "album"}, {"image": "img", "caption": "text"}],
     r"views name the group columns \['album', None\].*same group column in every view or in none"),
])
def test_a_parquet_mapping_the_source_would_not_read_is_an_error(tmp_path, columns, match):
    pq.write_table(pa.table({"img": [_png((1, 2, 3))], "text": ["x"], "album": ["a"]}), tmp_path / "t.parquet")
    with pytest.raises(ValueError, match=rf"data.parquet_columns .*{match}"):
        ParquetSource(tmp_path / "t.parquet", columns=columns)
    with pytest.raises(ValidationError, match=match):
        DataConfig(source="parquet", source_path=str(tmp_path), annotators=NOT_PROC, parquet_columns=columns)


def test_a_group_column_missing_from_a_file_or_a_mapping_beside_a_preset_is_an_error(tmp_path):
    pq.write_table(pa.table({"img": [_png((1, 2, 3))], "text": ["x"]}), tmp_path / "t.parquet")
    src = ParquetSource(tmp_path / "t.parquet", columns=[{"image": "img", "caption": "text", "group": "album"}])
    with pytest.raises(ValueError, match=r"group column 'album' \(data.parquet_columns\) is not in .*t.parquet"):
        src.items()
    columns = [{"image": "img", "caption": "text"}]
    with pytest.raises(ValueError, match="data.parquet_columns=.* cannot apply with data.parquet_preset='instructpix2pix-hf'"):
        ParquetSource(tmp_path / "t.parquet", columns=columns, preset="instructpix2pix-hf")
    with pytest.raises(ValidationError, match="data.parquet_columns=.* cannot apply with data.parquet_preset"):
        DataConfig(source="parquet", source_path=str(tmp_path), annotators=NOT_PROC, parquet_columns=columns,
                   parquet_preset="instructpix2pix-hf")


def test_the_group_column_groups_rows_across_files(tmp_path):
    from pd_data.ingest import ingest
    from pd_data.shards import read_shards

    for name, albums in (("a", ["trip", "home", None]), ("b", ["trip"])):
        pq.write_table(pa.table({"before": [_png((10 * i, 0, 0)) for i in range(len(albums))],
                                 "after": [_png((0, 10 * i, 0)) for i in range(len(albums))],
                                 "text": [f"{name}{i}" for i in range(len(albums))], "album": albums}),
                       tmp_path / f"{name}.parquet")
    views = [{"image": "before", "caption": "text", "group": "album"}, {"image": "after", "caption": "text", "group": "album"}]
    src = ParquetSource(tmp_path, columns=views)
    groups = {it.image_id: (it.group_id, it.layout) for it in src.items()}
    assert groups == {"a/0/0": ("trip", "a/0"), "a/0/1": ("trip", "a/0"), "a/1/0": ("home", "a/1"),
                      "a/1/1": ("home", "a/1"), "a/2/0": ("a/2", "a/2"), "a/2/1": ("a/2", "a/2"),
                      "b/0/0": ("trip", "b/0"), "b/0/1": ("trip", "b/0")}  # a null value: the row alone
    cfg = DataConfig(source="parquet", source_path=str(tmp_path), annotators=NOT_PROC, parquet_columns=views)
    ingest(cfg, tmp_path / "out", src)
    rows = {r["image_id"]: r["group_id"] for r in read_shards(tmp_path / "out", "images").to_pylist()}
    assert rows == {k: g for k, (g, _) in groups.items()}
    plain = ParquetSource(tmp_path, columns=[{k: v for k, v in view.items() if k != "group"} for view in views])
    assert {it.group_id for it in plain.items()} == {"a/0", "a/1", "a/2", "b/0"}  # no group column: each row alone


# ---------------------------------------------------------------- 5. procedural-only sizes
@pytest.mark.parametrize("source", ["folder", "instructpix2pix", "parquet"])
@pytest.mark.parametrize("key", PROCEDURAL_ONLY)
def test_a_procedural_size_is_an_error_for_another_source(source, key):
    with pytest.raises(ValidationError, match=rf"data.{key}=3 cannot apply to data.source='{source}'.*leave data.{key} unset"):
        DataConfig(source=source, source_path="x", annotators=NOT_PROC, **{key: 3})


def test_procedural_sizes_apply_to_the_procedural_source():
    assert DataConfig(n_groups=3, layouts_per_group=3, images_per_layout=3).n_groups == 3
    folder = DataConfig(source="folder", source_path="x", annotators=NOT_PROC)  # left unset: fine
    assert folder.n_groups == DataConfig().n_groups
