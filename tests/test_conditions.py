"""Which model answers which task under which generalisation condition."""
from pd_data.tasks import TASKS, TRAINING_TASKS, UNSEEN_TASKS
from pd_eval.benchmark import models_under_test


def test_every_unseen_task_gets_all_four_conditions_and_trained_tasks_keep_table1_rows():
    nets = {"prompt-diffusion": ("prompt-diffusion", TRAINING_TASKS)}
    nets |= {f"net-{t}": ("cn-ft", (t,)) for t in TRAINING_TASKS}
    nets |= {f"oracle-{t}": ("cn-ft", (t,)) for t in UNSEEN_TASKS}
    models = models_under_test(nets, UNSEEN_TASKS)
    by_task: dict[str, dict[str, object]] = {}
    for m in models:
        for t in m.tasks:
            assert m.model_id not in by_task.setdefault(t, {}), f"{m.model_id} answers {t} twice"
            by_task[t][m.model_id] = m
    for t in TRAINING_TASKS:
        assert set(by_task[t]) == {"prompt-diffusion", "cn-ft"}
    for t in UNSEEN_TASKS:
        c = by_task[t]
        assert set(c) == {"prompt-diffusion", "prompt-diffusion/empty-pair", "cn-ft/nearest", "cn-ft/oracle"}
        assert c["prompt-diffusion/empty-pair"].empty_pair and not c["prompt-diffusion"].empty_pair
        assert c["cn-ft/nearest"].checkpoint == f"net-{TASKS[t].nearest}" and TASKS[t].nearest in TRAINING_TASKS
        assert c["cn-ft/oracle"].checkpoint == f"oracle-{t}"
    # Without oracles, or without unseen tasks, the other conditions are simply absent.
    assert {m.model_id for m in models_under_test({k: v for k, v in nets.items() if "oracle" not in k}, UNSEEN_TASKS)} == {
        "prompt-diffusion", "prompt-diffusion/empty-pair", "cn-ft", "cn-ft/nearest"}
    assert {m.model_id for m in models_under_test(nets, ())} >= {"prompt-diffusion", "cn-ft"}


def test_an_empty_pair_changes_prompt_diffusion_outputs():
    """The empty-pair condition really feeds zeros: same prompt and seed, different output."""
    import numpy as np
    import torch

    from pd_data.tasks import Prompt
    from pd_model.base import build_tiny_base
    from pd_model.config import BaseModelConfig
    from pd_model.config import Sampler
    from pd_model.sampling import generate
    from pd_model.train import build_controlnet

    base = build_tiny_base(BaseModelConfig(), ["a red ball"], 32)
    net = build_controlnet(base, "prompt-diffusion")
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():  # zero-initialised outputs would hide the pair: give them weight
        for p in net.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=g))
    rng = np.random.default_rng(1)
    img = lambda: rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)  # noqa: E731
    prompt = Prompt("hed->image", img(), img(), img(), img(), "a red ball")
    with_pair = generate(base, net, [prompt], [7], Sampler(steps=2, guidance_scale=1.0))
    again = generate(base, net, [prompt], [7], Sampler(steps=2, guidance_scale=1.0))
    empty = generate(base, net, [prompt], [7], Sampler(steps=2, guidance_scale=1.0), empty_pair=True)
    assert np.array_equal(with_pair, again) and not np.array_equal(with_pair, empty)
