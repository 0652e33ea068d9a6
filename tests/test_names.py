"""The names a user reads: one label per model id, artifact keys from the same words, and help for
every parameter of every flow in the deployment's form."""
import pytest

from flows.full_benchmark import full_benchmark
from flows.plan import model_specs
from flows.profiles import load_profile
from flows.retrain import retrain_flow, watch_source_flow
from flows.stages import annotate_flow, evaluate_flow, ingest_flow, report_flow, train_flow
from pd_data.tasks import TRAINING_TASKS, UNSEEN_TASKS
from pd_model.names import key, label, model_id


def test_every_model_has_one_label_and_one_key():
    cfg = load_profile("demo", {"train": {"oracles": True}}).train
    specs = model_specs(cfg, TRAINING_TASKS, UNSEEN_TASKS)
    labels = [label(s.name) for s in specs]
    assert labels[:2] == ["prompt-diffusion", "cn-ft image->depth"] and "cn-ft-oracle canny->image" in labels
    assert len(set(labels)) == len(specs) and len({key("train", x) for x in labels}) == len(specs)
    assert model_id("cn-ft", "image->depth") == "cn-ft_image-to-depth"  # the folder name of trained models: unchanged
    assert key("validation", label("cn-ft_image-to-depth"), "step-120") == "validation-cn-ft-image-to-depth-step-120"


@pytest.mark.parametrize("fn", [full_benchmark, ingest_flow, annotate_flow, train_flow, evaluate_flow, report_flow,
                                retrain_flow, watch_source_flow], ids=lambda f: f.name)
def test_every_flow_parameter_has_help_in_the_deployment_form(fn):
    from prefect.utilities.callables import parameter_schema

    props = parameter_schema(fn.fn).model_dump()["properties"]
    missing = [name for name, p in props.items() if not p.get("description")]
    assert not missing, f"{fn.name}: no Args entry for {missing}"
    assert '{"train": {"steps": 50}}' in props["overrides"]["description"]
    assert fn.description and "Args:" not in fn.description.splitlines()[0]
