"""Where a prompt's example pair comes from (`data.pairing`), in training draws and evaluation prompts."""
import numpy as np
import pyarrow.parquet as pq
import pytest

from pd_data.config import PromptConfig
from pd_data.dataset import SplitData
from pd_data.prompts import materialise_prompts


def _split(layout: dict[str, str], groups: dict[str, list[str]], pairing: str) -> SplitData:
    data = SplitData(pairing=pairing)
    for i in layout:
        data.arrays[i] = {"image": np.zeros((4, 4, 3), np.uint8)}
        data.captions[i] = f"caption of {i}"
    data.layouts, data.groups = dict(layout), groups
    return data


# Group A: two layouts of two twins each; group B: one layout (a before/after pair); group C: one image.
LAYOUT = {"a0": "A0", "a1": "A0", "a2": "A1", "a3": "A1", "b0": "B0", "b1": "B0", "c0": "c0"}
GROUPS = {"A": ["a0", "a1", "a2", "a3"], "B": ["b0", "b1"], "C": ["c0"]}
GROUP_OF = {i: g for g, ids in GROUPS.items() for i in ids}


def _draws(data: SplitData, n: int = 2000) -> list[tuple[str, str]]:
    rng = np.random.default_rng(0)
    return [data.draw_pair(rng) for _ in range(n)]


def test_other_layout_never_pairs_an_image_with_its_own_layout():
    data = _split(LAYOUT, GROUPS, "other-layout")
    pairs = _draws(data)
    assert all(LAYOUT[e] != LAYOUT[q] for e, q in pairs)
    # Group A pairs within itself; B (one layout) and C (one image) take their example from another group.
    assert all(GROUP_OF[e] == "A" for e, q in pairs if GROUP_OF[q] == "A")
    assert all(GROUP_OF[e] != GROUP_OF[q] for e, q in pairs if GROUP_OF[q] in "BC")
    assert len(set(pairs)) == data.pair_count() == len(data.all_pairs()) == 4 * 2 + 2 * 5 + 1 * 6


def test_any_pairs_twins_and_other_group_never_stays_in_the_group():
    anyp = _draws(_split(LAYOUT, GROUPS, "any"))
    assert any(LAYOUT[e] == LAYOUT[q] for e, q in anyp) and all(e != q for e, q in anyp)
    assert all(GROUP_OF[e] == GROUP_OF[q] for e, q in anyp if GROUP_OF[q] != "C")
    other = _split(LAYOUT, GROUPS, "other-group")
    assert all(GROUP_OF[e] != GROUP_OF[q] for e, q in _draws(other))
    assert other.pair_count() == 4 * 3 + 2 * 5 + 1 * 6


def test_a_lone_group_without_partners_is_a_clear_error():
    data = _split({"x": "x"}, {"G": ["x"]}, "other-layout")
    with pytest.raises(ValueError, match="only one"):
        data.draw_pair(np.random.default_rng(0))


@pytest.mark.parametrize("per_task", [3, 18, 24])  # redrawn repeats; a shuffle of all 24 pairs; all of them
def test_evaluation_prompts_are_distinct_and_follow_the_pairing(tmp_path, per_task):
    data = _split(LAYOUT, GROUPS, "other-layout")
    out = tmp_path / "prompts.parquet"
    materialise_prompts(data, ("image->depth", "depth->image"), PromptConfig(per_task=per_task), out)
    rows = pq.read_table(out).to_pylist()
    for task in ("image->depth", "depth->image"):
        pairs = [(r["example_id"], r["query_id"]) for r in rows if r["task"] == task]
        assert len(pairs) == len(set(pairs)) == per_task
        assert all(LAYOUT[e] != LAYOUT[q] for e, q in pairs)
    assert {r["text"] for r in rows if r["task"] == "depth->image"} <= {f"caption of {i}" for i in LAYOUT}
    again = tmp_path / "again.parquet"
    materialise_prompts(data, ("image->depth", "depth->image"), PromptConfig(per_task=per_task), again)
    assert pq.read_table(again).to_pylist() == rows  # seeded


def test_too_few_distinct_pairs_is_an_error_naming_both_numbers(tmp_path):
    data = _split(LAYOUT, GROUPS, "other-layout")
    with pytest.raises(ValueError, match=r"allows 24 distinct .* prompts.per_task=25"):
        materialise_prompts(data, ("image->depth",), PromptConfig(per_task=25), tmp_path / "p.parquet")


def _png(path, color) -> None:
    from PIL import Image

    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (40, 40), color).save(path)


@pytest.mark.parametrize("source, fix, foreign", [
    ("procedural", "raise data.n_groups or data.layouts_per_group", "data.source_path"),
    ("folder", "add images to the folder source at data.source_path", "data.n_groups"),
])
def test_too_little_data_suggests_only_settings_of_the_source_in_use(source, fix, foreign, tmp_path, mirror_annotator):
    """A small folder cannot grow by data.n_groups (the procedural source's size): each error's fix is
    a setting the source in use reads."""
    from pd_data.annotate import annotate_shard
    from pd_data.config import DataConfig
    from pd_data.dataset import load_split
    from pd_data.ingest import ingest

    if source == "folder":
        for g, name, color in (("g1", "a", (200, 0, 0)), ("g1", "b", (0, 200, 0)), ("g2", "c", (0, 0, 200))):
            _png(tmp_path / "photos" / g / f"{name}.png", color)
            (tmp_path / "photos" / g / f"{name}.txt").write_text(f"a {name} square")
        cfg = DataConfig(source="folder", source_path=str(tmp_path / "photos"), split_fractions=(1.0, 0.0, 0.0),
                         annotators={"mirror": "test"})
    else:
        cfg = DataConfig(n_groups=2, split_fractions=(1.0, 0.0, 0.0), annotators={"mirror": "test"})
    ingest(cfg, tmp_path / "img")
    for p in sorted((tmp_path / "img").glob("images-*.parquet")):
        annotate_shard(p, tmp_path / "ann" / p.name.replace("images", "annotations"), cfg.annotators)
    data = load_split(tmp_path / "img", tmp_path / "ann", "train")
    with pytest.raises(ValueError, match=rf"prompts.per_task=500; lower prompts.per_task, {fix} or change data.pairing") as e:
        materialise_prompts(data, ("image->depth",), PromptConfig(per_task=500), tmp_path / "p.parquet")
    assert foreign not in str(e.value)
    with pytest.raises(ValueError, match=rf"split 'test' has no images .*; adjust data.split_fractions or {fix}$") as e:
        load_split(tmp_path / "img", tmp_path / "ann", "test")
    assert foreign not in str(e.value)
