"""The report reads at a glance: verdict first, where it ran, Table 1 in two narrow tables, the claims
as a table, intervals that miss their estimate marked and explained, negative KID explained. Built
from a real DuckDB store written through the store's own functions."""
import re
from datetime import datetime, timedelta, timezone

import pytest

from pd_eval.schema import MetricRow, RunRow
from pd_core.state import StateDir
from pd_eval.report import build_report
from pd_eval.store import replace_evaluation, write_run
from pd_eval.tables import DAGGER

FE = "random-conv-v1"
RMSE = {"image->depth": (0.112, 0.167, 0.233, 0.286, 0.180),  # PD, CN(FT), copy-example, copy-query, mean-map
        "image->hed": (0.265, 0.434, 0.420, 0.432, 0.290),
        "image->seg": (0.266, 0.281, 0.282, 0.286, 0.218)}
FID = {"depth->image": (0.379, 0.315, 0.159), "hed->image": (0.475, 0.437, 0.1684), "seg->image": (0.343, 0.288, 0.173)}


def _m(model, task, metric, value, lo=None, hi=None):
    lo, hi = (value - 0.01 if lo is None else lo), (value + 0.02 if hi is None else hi)
    return MetricRow("e1", model, task, metric, value, lo, hi, 16, FE if metric in ("fid", "kid") else "", "fast",
                     datetime.now(timezone.utc))


def _rows(copy_example_hed_interval=(0.173, 0.3858), pd_kid=-0.002):
    rows = []
    for t, (pd, cn, ce, cq, mm) in RMSE.items():
        rows += [_m("prompt-diffusion", t, "rmse", pd), _m("cn-ft", t, "rmse", cn), _m("baseline/copy-example", t, "rmse", ce),
                 _m("baseline/copy-query", t, "rmse", cq), _m("baseline/mean-map", t, "rmse", mm)]
    for t, (pd, cn, ce) in FID.items():
        ce_lo, ce_hi = copy_example_hed_interval if t == "hed->image" else (ce - 0.01, ce + 0.2)
        kid_lo = pd_kid - 0.008 if pd_kid < 0 else 0.5 * pd_kid
        rows += [_m("prompt-diffusion", t, "fid", pd, pd - 0.1, pd + 0.2), _m("cn-ft", t, "fid", cn, cn - 0.1, cn + 0.2),
                 _m("baseline/copy-example", t, "fid", ce, ce_lo, ce_hi),
                 _m("prompt-diffusion", t, "kid", pd_kid, kid_lo, 0.01), _m("cn-ft", t, "kid", 0.01, 0.001, 0.02)]
    return rows


def _report(root, rows, machine=None, precision=None) -> str:
    state = StateDir(root)
    replace_evaluation(state.db, "e1", rows)
    now = datetime.now(timezone.utc)
    write_run(state.db, RunRow("r1", "demo", "e1", now - timedelta(minutes=19), now, "completed", None, "{}", precision, machine))
    md = build_report(state.db, "r1", "e1", "demo", root / "evaluate", None, root / "report", ["profile: demo"])
    return md.read_text()


def _facts(cpu, amx):
    return {"cpu": cpu, "arch": "x86_64", "amx_bf16": amx, "avx512_bf16": True, "torch_threads": 8,
            "blas": [{"library": "openblas", "version": "0.3.31", "threads": 2, "architecture": "SkylakeX"}],
            "openblas_coretype": None, "versions": {"python": "3.11.7", "torch": "2.14.1"}}


@pytest.fixture(scope="module")
def md(tmp_path_factory) -> str:
    machine = {"train": _facts("Intel(R) Xeon(R) Platinum 8480+", True), "evaluate": _facts("AMD EPYC 9654", False)}
    return _report(tmp_path_factory.mktemp("state"), _rows(), machine,
                   "train bfloat16 (train.mixed_precision=bf16 on cpu)")


def _table(md: str, header: str) -> list[list[str]]:
    """The rows (cells) of the Markdown table whose header line is `header`."""
    lines = md.splitlines()
    start = lines.index(header)
    body = []
    for line in lines[start + 2:]:
        if not line.startswith("|"):
            break
        body.append([c.strip() for c in line.strip("|").split("|")])
    return body


def test_the_verdict_comes_first_in_at_most_three_lines_from_the_claims(md):
    top = md.split("\n## ")[0].splitlines()[1:]  # below the title, above the first section
    lines = [line for line in top if line]
    assert lines[0].startswith("Verdict: ") and 1 <= len(lines) <= 3
    # Prompt Diffusion is below CN(FT) on the three image->map tasks, above it on the three map->image ones.
    assert lines[0].startswith("Verdict: Prompt Diffusion beats CN(FT) on 3 of 6 trained tasks")
    # Below every baseline: PD on image->depth and image->hed (intervals clear), CN(FT) on image->depth
    # (0.167 against mean-map 0.180, its interval reaching it); no model beats copy-example on map->image.
    assert lines[1] == ("Beats every trivial baseline: Prompt Diffusion on 2 of 3 image->map and 0 of 3 map->image "
                        "tasks (interval clear on 2); CN(FT) on 1 of 3 image->map and 0 of 3 map->image tasks "
                        "(interval clear on 0).")


def test_where_this_ran_says_the_training_and_evaluation_machines_near_the_top(md):
    sections = re.findall(r"^## (.+)$", md, re.M)
    assert sections[0] == "Where this ran"
    assert "- trained on: Intel(R) Xeon(R) Platinum 8480+ (x86_64; AVX-512 bf16, AMX), torch 8 threads, openblas 0.3.31 at 2 threads" in md
    assert "- evaluated on: AMD EPYC 9654 (x86_64; AVX-512 bf16, no AMX)" in md
    assert "- training precision: train bfloat16 (train.mixed_precision=bf16 on cpu)" in md
    assert "round differently, so the same settings give other weights on another CPU" in md


def test_a_run_without_machine_facts_says_they_were_not_recorded(tmp_path):
    md = _report(tmp_path / "state", _rows(copy_example_hed_interval=(0.16, 0.38), pd_kid=0.001))
    assert "- trained on: not recorded" in md and "- training precision: not recorded" in md
    # Every interval holds its estimate and no KID is negative: neither mark nor notes.
    assert DAGGER not in md and "unbiased estimator" not in md


def test_table1_is_two_narrow_tables_one_per_direction(md):
    rmse = _table(md, "| model | image->depth | image->hed | image->seg |")
    fid = _table(md, "| model | features | depth->image | hed->image | seg->image |")
    assert {r[0] for r in rmse} == {"prompt-diffusion", "cn-ft", "baseline/copy-example", "baseline/copy-query",
                                    "baseline/mean-map", "CN(FT) [paper]", "Prompt Diffusion [paper]"}
    assert {r[0] for r in fid} == {"prompt-diffusion", "cn-ft", "baseline/copy-example", "CN(FT) [paper]",
                                   "Prompt Diffusion [paper]"}  # copy-query and mean-map score no FID
    by_model = {r[0]: r for r in rmse}
    assert by_model["prompt-diffusion"][1:] == ["0.112", "0.265", "0.266"]
    assert {r[0]: r[1] for r in fid} == {"prompt-diffusion": FE, "cn-ft": FE, "baseline/copy-example": FE,
                                         "CN(FT) [paper]": "inception-v3", "Prompt Diffusion [paper]": "inception-v3"}
    assert "rmse_image->depth" not in md  # the old one wide table is gone


def test_the_claims_are_one_table_row_per_task(md):
    claims = _table(md, "| task | Prompt Diffusion [95% interval] | best baseline | verdict |")
    assert [r[0] for r in claims] == ["image->depth (RMSE)", "image->hed (RMSE)", "image->seg (RMSE)",
                                      "depth->image (FID)", "hed->image (FID)", "seg->image (FID)"]
    depth, hed, seg = claims[:3]
    assert depth[1:] == ["0.112 [0.102, 0.132]", "mean-map 0.180",
                         "PD beats all (interval clear); CN(FT) 0.167 beats all (interval reaches mean-map)"]
    assert hed[3] == "PD beats all (interval clear); CN(FT) 0.434 loses to copy-query, mean-map, copy-example"
    assert seg[3] == "PD loses to mean-map; CN(FT) 0.281 loses to mean-map"
    assert "does NOT beat" not in md


def test_an_estimate_outside_its_interval_is_marked_and_the_footnote_says_why(md):
    metrics = _table(md, "| model | task | metric | value | ci_low | ci_high | n | feature_extractor |")
    marked = [r for r in metrics if DAGGER in r[3]]
    assert [(r[0], r[1], r[2], r[3]) for r in marked] == [("baseline/copy-example", "hed->image", "fid", f"0.1684{DAGGER}")]
    note = next(line for line in md.splitlines() if line.startswith(DAGGER))
    assert "resamples images with repetition" in note and "interval can lie above the estimate" in note


def test_a_model_cell_of_the_claims_is_marked_when_its_interval_misses_it(tmp_path):
    rows = [r if (r.model_id, r.task, r.metric) != ("prompt-diffusion", "depth->image", "fid")
            else _m("prompt-diffusion", "depth->image", "fid", 0.379, 0.4, 0.6) for r in _rows()]
    md = _report(tmp_path / "state", rows)
    [depth] = [r for r in _table(md, "| task | Prompt Diffusion [95% interval] | best baseline | verdict |")
               if r[0] == "depth->image (FID)"]
    assert depth[1] == f"0.379 [0.400, 0.600]{DAGGER}"


def test_negative_kid_is_explained_under_the_figure_and_the_table(md):
    after_bars = md.split("![bars.png](bars.png)")[1].lstrip().splitlines()[0]
    assert after_bars.startswith("KID is the unbiased estimator") and "draws such values and interval ends at 0" in after_bars
    after_metrics = md.split("## Every metric")[1]
    assert "KID is the unbiased estimator" in after_metrics
    metrics = _table(md, "| model | task | metric | value | ci_low | ci_high | n | feature_extractor |")
    assert ["prompt-diffusion", "depth->image", "kid", "-0.002"] in [r[:4] for r in metrics]  # the table keeps it


def test_the_figure_draws_a_negative_kid_at_zero():
    from pd_eval.report import _clipped

    row = {"metric": "kid", "value": -0.002, "ci_low": -0.01, "ci_high": 0.01}
    assert _clipped(row) == {"metric": "kid", "value": 0.0, "ci_low": 0.0, "ci_high": 0.01}
    fid = {"metric": "fid", "value": -1.0, "ci_low": -2.0, "ci_high": 1.0}  # only KID is clipped
    assert _clipped(fid) == fid


def test_sensitivity_and_paired_fidelity_tables_say_whether_the_pair_is_read(tmp_path):
    rows = _rows()
    rows += [_m("prompt-diffusion/other-pair", "image->depth", "paired_diff_mse", 0.02, 0.01, 0.03),   # worse: read
             _m("prompt-diffusion/other-pair", "image->depth", "output_change", 0.15, 0.12, 0.18),
             _m("prompt-diffusion/empty-pair", "image->depth", "paired_diff_mse", 0.001, -0.002, 0.004),  # no clear help
             _m("prompt-diffusion/empty-pair", "image->depth", "output_change", 0.01, 0.008, 0.012),
             _m("prompt-diffusion/other-pair", "image->hed", "paired_diff_mse", 0.0, -0.001, 0.001),     # ignored
             _m("prompt-diffusion/other-pair", "image->hed", "output_change", 0.0, 0.0, 0.0),
             _m("prompt-diffusion", "depth->image", "rmse", 0.162), _m("prompt-diffusion", "depth->image", "ssim", 0.41),
             _m("baseline/mean-map", "depth->image", "rmse", 0.168), _m("baseline/mean-map", "depth->image", "ssim", 0.12)]
    md = _report(tmp_path, rows)
    sens = md.split("Example sensitivity")[1].split("\n## ")[0]
    depth = next(line for line in sens.splitlines() if line.startswith("| image->depth"))
    hed = next(line for line in sens.splitlines() if line.startswith("| image->hed"))
    assert depth.rstrip(" |").split("|")[-3:-1] == [" no ", " yes "]  # own pair vs zeroed: no; reads its pair: yes
    assert hed.split("|")[-3].strip() == "no"
    fidelity = md.split("paired fidelity")[1].split("\n## ")[0]
    assert "| prompt-diffusion | depth->image | 0.162 [" in fidelity and "| baseline/mean-map | depth->image | 0.168 [" in fidelity


def test_map_to_image_claims_use_controllability_and_a_weak_re_annotator_is_said(tmp_path):
    rid = "demo-reader-v1@abc"
    ctrl = lambda model, v, lo, hi: MetricRow("e1", model, "hed->image", "ctrl_ssim", v, lo, hi, 16, rid, "fast",  # noqa: E731
                                              datetime.now(timezone.utc))
    rows = _rows() + [ctrl("prompt-diffusion", 0.60, 0.55, 0.65), ctrl("cn-ft", 0.50, 0.45, 0.55),
                      ctrl("baseline/copy-example", 0.20, 0.15, 0.25), ctrl("baseline/mean-map", 0.30, 0.28, 0.32),
                      ctrl("baseline/true-image", 0.90, 0.88, 0.92)]
    rows += [MetricRow("e1", "re-annotator", "read:hed", "ctrl_ssim", 0.5, float("nan"), float("nan"), 48, rid, "fast", None),
             MetricRow("e1", "re-annotator/mean-map", "read:hed", "ctrl_ssim", 0.2, float("nan"), float("nan"), 48, rid, "fast", None),
             MetricRow("e1", "re-annotator", "read:hed", "informative", 0.0, float("nan"), float("nan"), 48, rid, "fast", None)]
    md = _report(tmp_path, rows)
    claim = next(line for line in md.splitlines() if line.startswith("| hed->image (control ssim, higher is better)"))
    assert "0.600 [0.550, 0.650]" in claim and "beats all (interval clear)" in claim  # PD, by controllability, not FID
    assert "true-image" not in claim  # the ceiling is not a bar to beat, nor a model
    section = md.split("Controllability:")[1].split("\n## ")[0]
    assert "| hed->image | baseline/true-image | ssim | 0.900 [0.880, 0.920] | 16 | demo-reader-v1@abc |" in section
    assert "NOT INFORMATIVE for hed" in section
    assert md.splitlines()[2].startswith("Verdict: Prompt Diffusion beats CN(FT) on")
