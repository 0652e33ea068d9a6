"""The demo re-annotator: seeded training, a safetensors round trip, better than the mean map on depth,
and clear errors."""
import numpy as np
import pytest
import torch

from pd_data.procedural import SEG_PALETTE
from pd_eval.reader import (CONFIG, NAME, WEIGHTS, load_reader, mean_maps, reader_quality, split_pairs,
                            train_reader)

SMALL = {"width": 8, "batch_size": 16}  # a trunk of ~37k weights: seconds per training on 2 cores


@pytest.fixture(scope="module")
def splits(tmp_path_factory):
    """48 procedural images at 32 px with every map, split by group 3:1 (the demo's data, smaller)."""
    from pd_data.annotate import annotate_shard
    from pd_data.config import DataConfig
    from pd_data.dataset import load_split
    from pd_data.ingest import ingest

    root = tmp_path_factory.mktemp("reader-world")
    cfg = DataConfig(n_groups=12, split_fractions=(0.75, 0.0, 0.25))
    ingest(cfg, root / "img")
    for p in sorted((root / "img").glob("images-*.parquet")):
        annotate_shard(p, root / "ann" / p.name.replace("images", "annotations"), cfg.annotators)
    return load_split(root / "img", root / "ann", "train"), load_split(root / "img", root / "ann", "test")


@pytest.fixture(scope="module")
def pairs(splits):
    return split_pairs(splits[0])


def _weights(reader) -> dict[str, torch.Tensor]:
    return reader.net.state_dict()


def test_training_is_deterministic_for_a_seed_and_changes_with_it(pairs):
    a, b, c = (train_reader(pairs, 6, seed, SEG_PALETTE, **SMALL) for seed in (3, 3, 4))
    for k, v in _weights(a).items():
        torch.testing.assert_close(v, _weights(b)[k], rtol=1e-5, atol=1e-6, msg=k)
    diff = max(float((v - _weights(c)[k]).abs().max()) for k, v in _weights(a).items())
    assert diff > 1e-3
    assert a.version != c.version and a.id.startswith(f"{NAME}@")
    state = torch.random.get_rng_state()
    train_reader(pairs, 1, 0, SEG_PALETTE, **SMALL)
    assert torch.equal(state, torch.random.get_rng_state())  # the caller's random stream is left alone


def test_save_and_load_give_the_same_reads(pairs, splits, tmp_path):
    reader = train_reader(pairs, 4, 0, SEG_PALETTE, **SMALL)
    reader.save(tmp_path / "r")
    back = load_reader(tmp_path / "r")
    images = split_pairs(splits[1])["depth"][0]
    assert back.id == reader.id and back.modalities == reader.modalities
    for m in reader.modalities:
        np.testing.assert_array_equal(back.read(images, m), reader.read(images, m), err_msg=m)
    seg = back.read(images, "seg").reshape(-1, 3)
    assert {tuple(c) for c in seg} <= set(SEG_PALETTE.values())  # seg reads are palette colours, never blends


def test_a_trained_reader_beats_the_mean_map_on_depth(pairs, splits):
    train, test = splits
    held = split_pairs(test, ("depth", "hed"))
    reader = train_reader({m: pairs[m] for m in ("depth", "hed")}, 300, 0, **SMALL)
    q = reader_quality(reader, held["depth"][0], {m: maps for m, (_, maps) in held.items()},
                       mean_maps(train, ("depth", "hed")))
    assert q["depth"]["metric"] == "ctrl_rmse"
    assert q["depth"]["reader"] < 0.85 * q["depth"]["mean_map"], q["depth"]  # measured 0.138 against 0.186
    assert q["hed"]["metric"] == "ctrl_ssim" and q["hed"]["reader"] > q["hed"]["mean_map"]


def test_a_missing_file_names_it(pairs, tmp_path):
    reader = train_reader({"depth": pairs["depth"]}, 1, 0, **SMALL)
    reader.save(tmp_path / "r")
    (tmp_path / "r" / WEIGHTS).unlink()
    with pytest.raises(FileNotFoundError, match=rf"{WEIGHTS}.*not found.*save"):
        load_reader(tmp_path / "r")
    with pytest.raises(FileNotFoundError, match=CONFIG):
        load_reader(tmp_path / "nowhere")


def test_bad_input_is_named(pairs):
    reader = train_reader({"depth": pairs["depth"]}, 1, 0, **SMALL)
    images = pairs["depth"][0]
    with pytest.raises(ValueError, match=r"reads \['depth'\], not 'hed'"):
        reader.read(images, "hed")
    with pytest.raises(ValueError, match=r"\(N, 32, 32, 3\) uint8.*\(2, 16, 16, 3\).*resize"):
        reader.read(images[:2, ::2, ::2], "depth")
    with pytest.raises(ValueError, match="need palette="):
        train_reader({"seg": pairs["seg"]}, 1, 0, **SMALL)
    with pytest.raises(ValueError, match=r"'sketch'.*known modalities"):
        train_reader({"sketch": pairs["depth"]}, 1, 0, **SMALL)
