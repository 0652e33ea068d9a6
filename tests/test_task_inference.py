"""In-context task inference: prompts, classification by nearest true map, confusion and accuracy."""
import numpy as np

from pd_data.dataset import SplitData
from pd_data.tasks import get_task
from pd_eval.config import EvalConfig
from pd_eval.task_inference import COPIED, FORWARD, PREDICTED, accuracy, classify, confusion, inference_request, scored


def _split() -> SplitData:
    rng = np.random.default_rng(0)
    data = SplitData()
    for i in range(4):
        data.arrays[f"i{i}"] = {m: rng.integers(0, 256, (8, 8, 3), dtype=np.uint8) for m in ("image", "depth", "hed", "seg")}
        data.captions[f"i{i}"] = f"caption {i}"
    data.groups = {"g": sorted(data.arrays)}
    return data


def test_each_query_gets_the_three_forward_pairs_with_no_text():
    data = _split()
    rows = [{"prompt_id": f"{t}/{k}", "task": t, "example_id": "i0", "query_id": f"i{k + 1}", "seed": k}
            for t in ("image->depth", "depth->image") for k in range(3)]
    req = inference_request(rows, 2, "pd", EvalConfig())
    assert [it.prompt_id for it in req.items] == [f"image->depth/{k}@{t}" for k in range(2) for t in FORWARD]
    assert req.no_text and req.checkpoint == "pd" and req.guidance == EvalConfig().guidance_scale
    for it in req.items:
        p = data.prompt(get_task(it.task), it.example_id, it.query_id)  # what generation composes (then drops the text)
        assert np.array_equal(p.query, data.arrays[it.query_id]["image"])
        assert np.array_equal(p.example_target, data.arrays["i0"][it.task.split("->")[1]])


def test_an_output_is_classified_as_the_task_whose_true_map_it_is_nearest():
    data = _split()
    truths = {t: data.arrays["i1"][t.split("->")[1]] for t in FORWARD}
    for t in FORWARD:
        noisy = np.clip(truths[t].astype(int) + 10, 0, 255).astype(np.uint8)
        assert classify(noisy, truths) == t
        assert classify(noisy, truths, data.arrays["i0"][t.split("->")[1]]) == t  # the example's target is farther


def test_copying_the_example_gets_no_credit():
    data = _split()
    rows = [{"prompt_id": f"image->depth/{k}", "task": "image->depth", "example_id": "i0", "query_id": f"i{k + 1}",
             "seed": k} for k in range(3)]
    req = inference_request(rows, 3, "pd", EvalConfig())
    copies = np.stack([data.arrays[it.example_id][it.task.split("->")[1]] for it in req.items])
    row, cells = scored("baseline/copy-example", copies, req, data, EvalConfig(bootstrap=20))
    assert row.value == 0.0 and row.n == 9
    assert {(c["shown_task"], c["predicted_task"]): c["count"] for c in cells if c["count"]} == {
        (t, COPIED): 3 for t in FORWARD}
    # The true maps of the query, the task done on the query, are credited.
    answers = np.stack([data.arrays[it.query_id][it.task.split("->")[1]] for it in req.items])
    assert scored("m", answers, req, data, EvalConfig(bootstrap=20))[0].value == 1.0


def test_confusion_matrix_and_accuracy_count_what_was_shown_against_what_was_followed():
    shown = ["image->depth", "image->depth", "image->hed", "image->seg"]
    predicted = ["image->depth", "image->seg", "image->hed", "image->depth"]
    m = confusion(shown + ["image->hed"], predicted + [COPIED])
    assert m.tolist() == [[1, 0, 1, 0], [0, 1, 0, 1], [1, 0, 0, 0]] and m.sum() == 5 and len(PREDICTED) == 4
    acc = accuracy(shown, predicted, resamples=100, seed=0)
    assert acc.value == 0.5 and acc.n == 4 and 0 <= acc.ci_low <= 0.5 <= acc.ci_high <= 1
