import hashlib

import numpy as np
import pyarrow.parquet as pq
import pytest

from pd_data import procedural
from pd_data.annotate import annotate_shard, get_annotator
from pd_data.config import DataConfig
from pd_data.dataset import load_split
from pd_data.ingest import ingest, split_of
from pd_data.shards import IMAGES_SCHEMA, read_shards
from pd_data.tasks import TASKS, TRAINING_TASKS, get_task


def test_scenes_are_deterministic_and_twins_differ():
    a, b = procedural.make_group(7, 1, 3), procedural.make_group(7, 1, 3)
    assert a == b
    r0 = procedural.render(a[0][0][0], 32, 7)
    r1 = procedural.render(a[0][1][0], 32, 7)
    assert set(r0) == {"image", *procedural.MODALITIES}
    assert all(v.shape == (32, 32, 3) and v.dtype == np.uint8 for v in r0.values())
    assert not np.array_equal(r0["image"], r1["image"]) or a[0][0][1] != a[0][1][1]


@pytest.mark.parametrize("seed", range(20))
def test_layouts_of_one_group_share_a_theme_and_differ_in_every_map(seed):
    group = procedural.make_group(seed, 3, 2)
    scenes = [lay[0][0] for lay in group]
    for s in scenes:  # one theme: background, texture, lighting, and objects drawn from one set
        assert (s["background"], s["texture"], s["light"]) == (scenes[0]["background"], scenes[0]["texture"], scenes[0]["light"])
    theme = {(o["kind"], o["color"]) for s in scenes for o in s["objects"]}
    assert len(theme) <= 4
    maps = [procedural.render(s, 32) for s in scenes]
    for m in ("depth", "hed", "seg"):
        for i in range(3):
            for j in range(i + 1, 3):
                assert not np.array_equal(maps[i][m], maps[j][m]), (m, i, j)
    # More layouts keep the ones of fewer: layout l is drawn from (seed, l) alone.
    assert procedural.make_group(seed, 2, 2) == group[:2]


def test_captions_name_only_what_can_be_seen():
    near = {"kind": "box", "color": "red", "x": 0.5, "y": 0.8, "size": 0.28}
    hidden = {"kind": "ball", "color": "orange", "x": 0.5, "y": 0.75, "size": 0.12}  # behind the box
    aside = {"kind": "ball", "color": "orange", "x": 0.15, "y": 0.5, "size": 0.1}
    scene = {"background": "grey", "texture": "plain", "horizon": 0.5, "light": 0.0, "objects": [near, hidden]}
    assert procedural.visible_objects(scene) == [near]
    assert procedural.caption(scene) == "a red box on a plain grey background, lit from above"
    scene["objects"].append(aside)
    assert procedural.caption(scene) == "an orange ball and a red box on a plain grey background, lit from above"
    assert procedural.caption(scene | {"light": -1.0}).endswith("lit from the left")


def test_maps_are_exact_for_the_scene():
    scene = {"background": "grey", "texture": "plain", "horizon": 0.5, "light": 0.0,
             "objects": [{"kind": "box", "color": "red", "x": 0.5, "y": 0.7, "size": 0.2}]}
    m = procedural.render(scene, 64)
    box = np.all(m["seg"] == procedural.SEG_PALETTE["box"], axis=-1)
    assert 0.05 < box.mean() < 0.3
    # The object stands nearer than the wall behind it, and edges lie on its outline, not inside it.
    assert m["depth"][box].mean() > m["depth"][:5].mean()
    inner = box & np.roll(box, 2, 0) & np.roll(box, -2, 0) & np.roll(box, 2, 1) & np.roll(box, -2, 1)
    assert m["hed"][inner].max() == 0 and m["hed"].max() == 255
    assert "a red box" in procedural.caption(scene)


def test_split_is_by_group_and_stable():
    assert split_of("g000001", 0, (0.8, 0.1, 0.1)) == split_of("g000001", 0, (0.8, 0.1, 0.1))
    splits = [split_of(f"g{i:06d}", 0, (0.6, 0.2, 0.2)) for i in range(2000)]
    assert abs(splits.count("train") / 2000 - 0.6) < 0.05


def _digest(folder, prefix):
    t = read_shards(folder, prefix)
    return hashlib.sha256(str(t.to_pylist()).encode()).hexdigest(), t.num_rows


def test_ingest_resumes_to_identical_rows(tmp_path):
    cfg = DataConfig(n_groups=5, shard_size=6)
    full = ingest(cfg, tmp_path / "a")
    assert full["rows_out"] == 20 and full["shards"] == 4
    # An interrupted run: two shards written, one leftover temporary file of a shard being written.
    ingest(cfg, tmp_path / "b")
    for p in sorted((tmp_path / "b").glob("images-*.parquet"))[2:]:
        p.unlink()
    (tmp_path / "b" / ".images-00002.parquet.x.tmp").write_bytes(b"half a file")
    resumed = ingest(cfg, tmp_path / "b")
    assert resumed["shards_resumed"] == 2
    assert _digest(tmp_path / "a", "images") == _digest(tmp_path / "b", "images")
    assert pq.read_schema(next((tmp_path / "a").glob("images-*.parquet"))).equals(IMAGES_SCHEMA, check_metadata=False)


def test_annotation_covers_every_image_with_provenance(tmp_path):
    cfg = DataConfig(n_groups=3, split_fractions=(0.5, 0.0, 0.5))
    ingest(cfg, tmp_path / "img")
    for p in sorted((tmp_path / "img").glob("images-*.parquet")):
        annotate_shard(p, tmp_path / "ann" / p.name.replace("images", "annotations"), cfg.annotators)
    ann = read_shards(tmp_path / "ann", "annotations").to_pylist()
    assert len(ann) == 12 * 6
    assert {(r["annotator"], r["annotator_version"]) for r in ann} == {("procedural", "1")}
    data = load_split(tmp_path / "img", tmp_path / "ann", "test")
    # Every procedural image records its layout: 2 layouts x 2 twins per group.
    assert all(len({data.layout_of(i) for i in ids}) == 2 and len(ids) == 4 for ids in data.groups.values())
    for arrays in data.arrays.values():
        assert set(arrays) == {"image", "depth", "hed", "seg", "canny", "scribble", "normal"}


def test_unknown_annotator_names_what_exists():
    with pytest.raises(ValueError, match="known"):
        get_annotator("procedural", "lineart")


@pytest.mark.parametrize("name", sorted(TASKS))
def test_task_prompts_follow_the_paper(tmp_path, name):
    cfg = DataConfig(n_groups=2, split_fractions=(1.0, 0.0, 0.0))
    ingest(cfg, tmp_path / "img")
    for p in sorted((tmp_path / "img").glob("images-*.parquet")):
        annotate_shard(p, tmp_path / "ann" / p.name.replace("images", "annotations"), cfg.annotators)
    data = load_split(tmp_path / "img", tmp_path / "ann", "train")
    spec = get_task(name)
    p = data.sample_prompt(spec, np.random.default_rng(0))
    if spec.target == "image":  # inverse task: text is the caption of the target image
        assert p.text in data.captions.values()
    else:  # forward task: a fixed string
        assert p.text == {"depth": "depth map", "hed": "hed map", "seg": "segmentation map",
                          "canny": "canny map"}[spec.target]
    # Example and query come from two different layouts of one group (data.pairing's default).
    assert not (np.array_equal(p.example_source, p.query) and np.array_equal(p.example_target, p.target))
    example, query = data.draw_pair(np.random.default_rng(0))
    assert data.layout_of(example) != data.layout_of(query)


def test_task_registry_has_six_trained_and_unseen_tasks():
    assert len(TRAINING_TASKS) == 6
    assert {t.metric for t in TASKS.values() if t.trained} == {"fid", "rmse"}
    assert any(not t.trained for t in TASKS.values())


def test_unseen_task_maps_are_exact_edges_scribbles_and_normals():
    from pd_data.procedural import render

    scene = {"background": "grey", "texture": "plain", "horizon": 0.5, "light": 0.0,
             "objects": [{"kind": "box", "color": "red", "x": 0.5, "y": 0.8, "size": 0.2}]}
    m = render(scene, 64)
    canny, scribble, normal = m["canny"][..., 0] > 127, m["scribble"][..., 0] > 127, m["normal"].astype(int)
    assert set(np.unique(m["canny"])) == {0, 255} and set(np.unique(m["scribble"])) == {0, 255}
    assert (canny <= scribble).all() and scribble.sum() > 2 * canny.sum()  # same strokes, thicker
    assert 0 < canny[45].sum() <= 4  # thin: a row through the box crosses its two sides, no fill
    assert canny[:, 5].any()  # the horizon: a region boundary, drawn
    assert tuple(normal[5, 5]) == (128, 128, 255)  # the wall faces the camera
    assert normal[60, 5, 1] > 140 and abs(normal[60, 5, 0] - 128) <= 1  # the floor tilts up, not sideways
