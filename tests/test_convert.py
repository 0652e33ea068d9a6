"""Original (ldm) Prompt Diffusion checkpoint <-> PromptDiffusionControlNet: tiny models, CPU only."""
import pytest
import torch
from diffusers import UNet2DConditionModel
from safetensors.torch import save_file

from pd_model.controlnet import PromptDiffusionControlNet
from pd_model.convert import (
    CheckpointKeyError,
    UnsafeCheckpointError,
    convert_checkpoint,
    diffusers_to_ldm,
    ldm_to_diffusers,
    load_original_state_dict,
)

pytestmark = pytest.mark.numerics  # float results: .ci/run reruns these at 1 and 2 threads and other BLAS kernels

# The attribute names of the original `cldm.cldm.ControlNet` (Prompt-Diffusion's cldm/cldm.py).
ORIGINAL_MODULES = {"time_embed", "input_blocks", "zero_convs", "input_hint_block", "input_cond_block",
                    "middle_block", "middle_block_out"}


def _tiny_unet(use_linear_projection=False):
    """SD-shaped in miniature: latent input, attention in all but the last level, 2 layers per level."""
    torch.manual_seed(0)
    return UNet2DConditionModel(
        sample_size=8, in_channels=4, out_channels=4, block_out_channels=(32, 64, 64), layers_per_block=2,
        down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=32, attention_head_dim=8, norm_num_groups=8, use_linear_projection=use_linear_projection)


@pytest.fixture(scope="module", params=[False, True], ids=["conv-proj", "linear-proj"])
def unet(request):
    return _tiny_unet(request.param)


@pytest.fixture(scope="module")
def net(unet):
    """A tiny Prompt Diffusion ControlNet with every weight random (zero convs included), so nothing hides."""
    net = PromptDiffusionControlNet.from_unet(unet, conditioning_embedding_out_channels=(16, 32, 96, 256))
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in net.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.05)
    return net.eval()


@pytest.fixture(scope="module")
def ldm(net):
    sd = diffusers_to_ldm(net.state_dict(), net.config)
    # the rest of a ControlLDM checkpoint, which the converter must ignore
    extra = {"model.diffusion_model.input_blocks.0.0.weight": torch.zeros(3), "first_stage_model.x": torch.zeros(1),
             "cond_stage_model.transformer.y": torch.zeros(1), "betas": torch.zeros(2)}
    return {k: v.clone().contiguous() for k, v in {**sd, **extra}.items()}


def _outputs(model):
    g = torch.Generator().manual_seed(2)
    x, pair, query = torch.randn(2, 4, 8, 8, generator=g), torch.rand(2, 6, 64, 64, generator=g) * 2 - 1, \
        torch.rand(2, 3, 64, 64, generator=g) * 2 - 1
    emb = torch.randn(2, 5, 32, generator=g)
    with torch.no_grad():
        down, mid = model(x, torch.tensor([10, 700]), emb, controlnet_cond=pair, controlnet_query_cond=query,
                          return_dict=False)
    return [*down, mid]


def _assert_same(a, b):
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    assert all(torch.equal(sa[k], sb[k]) for k in sa)
    for x, y in zip(_outputs(a), _outputs(b), strict=True):
        assert torch.equal(x, y)


def test_ldm_keys_follow_the_original_naming(net, ldm):
    control = [k for k in ldm if k.startswith("control_model.")]
    assert {k.split(".")[1] for k in control} == ORIGINAL_MODULES
    for key in ["control_model.input_hint_block.0.weight", "control_model.input_hint_block.14.bias",
                "control_model.input_cond_block.0.weight", "control_model.input_cond_block.14.weight",
                "control_model.zero_convs.0.0.weight", "control_model.zero_convs.8.0.bias",
                "control_model.middle_block_out.0.weight", "control_model.time_embed.2.weight",
                "control_model.input_blocks.0.0.weight", "control_model.input_blocks.1.0.in_layers.2.weight",
                "control_model.input_blocks.1.1.transformer_blocks.0.attn2.to_k.weight",
                "control_model.input_blocks.3.0.op.weight", "control_model.input_blocks.4.0.skip_connection.weight",
                "control_model.middle_block.1.proj_in.weight", "control_model.middle_block.2.out_layers.3.weight"]:
        assert key in ldm, key
    # the hint blocks are nn.Sequentials with SiLU at odd indices: convs at 0, 2, ..., 14
    for block, in_ch in (("input_hint_block", 6), ("input_cond_block", 3)):
        idx = sorted({int(k.split(".")[2]) for k in control if k.split(".")[1] == block})
        assert idx == list(range(0, 16, 2))
        assert ldm[f"control_model.{block}.0.weight"].shape == (16, in_ch, 3, 3)
        assert ldm[f"control_model.{block}.14.weight"].shape == (32, 256, 3, 3)
    assert "control_model.zero_convs.9.0.weight" not in ldm  # one zero conv per input block (9 here, 12 in SD)


@pytest.mark.parametrize("fmt", ["safetensors", "ckpt"])
def test_round_trip_is_exact(unet, net, ldm, fmt, tmp_path):
    path = tmp_path / f"network-step=04999.{fmt}"
    if fmt == "safetensors":
        save_file(ldm, path)
    else:
        torch.save({"state_dict": ldm, "epoch": 0, "global_step": 5000, "pytorch-lightning_version": "1.5.0"}, path)
    assert load_original_state_dict(path).keys() == ldm.keys()
    back = convert_checkpoint(path, unet, out_dir=tmp_path / "out")
    assert isinstance(back, PromptDiffusionControlNet)
    assert back.config.hint_range == "-1,1" and back.config.conditioning_channels == 6
    assert tuple(back.config.conditioning_embedding_out_channels) == (16, 32, 96, 256)
    _assert_same(net, back)
    _assert_same(net, PromptDiffusionControlNet.from_pretrained(tmp_path / "out"))


def test_a_config_dict_or_json_is_enough(unet, net, ldm, tmp_path):
    path = tmp_path / "pd.safetensors"
    save_file(ldm, path)
    _assert_same(net, convert_checkpoint(path, dict(unet.config)))
    unet.save_config(tmp_path / "sd" / "unet")  # a diffusers SD folder: sd/unet/config.json
    back = convert_checkpoint(path, tmp_path / "sd", hint_range="0,1")
    assert back.config.hint_range == "0,1"
    _assert_same(net, back)


def test_ldm_to_diffusers_inverts_diffusers_to_ldm(net, ldm):
    sd = ldm_to_diffusers(ldm, net.config)
    assert sd.keys() == net.state_dict().keys()
    assert all(torch.equal(sd[k], v) for k, v in net.state_dict().items())


@pytest.mark.parametrize("key", ["control_model.input_cond_block.4.weight", "control_model.input_hint_block.6.bias",
                                 "control_model.middle_block_out.0.bias", "control_model.zero_convs.3.0.weight",
                                 "control_model.time_embed.0.weight", "control_model.input_blocks.0.0.bias",
                                 "control_model.input_hint_block.14.weight"])
def test_a_missing_key_is_named(net, ldm, key):
    broken = {k: v for k, v in ldm.items() if k != key}
    with pytest.raises(CheckpointKeyError, match="missing") as err:
        ldm_to_diffusers(broken, net.config)
    assert key in str(err.value)


def test_a_missing_attention_weight_is_named_at_load(unet, ldm, tmp_path):
    key = "control_model.input_blocks.1.1.transformer_blocks.0.attn1.to_q.weight"
    path = tmp_path / "broken.safetensors"
    save_file({k: v for k, v in ldm.items() if k != key}, path)
    with pytest.raises(CheckpointKeyError, match="missing") as err:
        convert_checkpoint(path, unet)
    assert key in str(err.value)


@pytest.mark.parametrize("key", ["control_model.input_cond_block.16.weight", "control_model.zero_convs.42.0.weight",
                                 "control_model.input_hint_block.1.weight", "control_model.some_new_block.weight"])
def test_an_unexpected_key_is_named(net, ldm, key):
    with pytest.raises(CheckpointKeyError, match="unexpected") as err:
        ldm_to_diffusers({**ldm, key: torch.zeros(1)}, net.config)
    assert key in str(err.value)


def test_a_shape_mismatch_is_named(ldm, tmp_path):
    """A checkpoint for another UNet (here: wider) is refused, naming the offending original key."""
    path = tmp_path / "pd.safetensors"
    save_file(ldm, path)
    other = UNet2DConditionModel(
        sample_size=8, in_channels=4, out_channels=4, block_out_channels=(64, 64, 64), layers_per_block=2,
        down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=32, attention_head_dim=8, norm_num_groups=8)
    with pytest.raises(CheckpointKeyError, match="shape mismatch") as err:
        convert_checkpoint(path, other)
    assert "control_model.input_blocks.0.0.weight" in str(err.value)


def test_no_controlnet_in_the_checkpoint_is_an_error(net):
    with pytest.raises(CheckpointKeyError, match="control_model"):
        ldm_to_diffusers({"model.diffusion_model.out.0.weight": torch.zeros(1)}, net.config)


_RAN = []


def _side_effect():
    _RAN.append(True)
    return "pwned"


class _Payload:
    """Unpickling this would run `_side_effect`; weights_only loading must refuse it."""

    def __reduce__(self):
        return (_side_effect, ())


def test_a_pickled_object_is_refused_not_unpickled(tmp_path):
    path = tmp_path / "evil.ckpt"
    torch.save({"state_dict": {"control_model.time_embed.0.weight": torch.zeros(1)}, "extra": _Payload()}, path)
    with pytest.raises(UnsafeCheckpointError, match="safetensors"):
        load_original_state_dict(path)
    assert not _RAN


def test_bad_inputs(tmp_path):
    (tmp_path / "w.npz").write_bytes(b"")
    with pytest.raises(ValueError, match="unsupported checkpoint format"):
        load_original_state_dict(tmp_path / "w.npz")
    with pytest.raises(FileNotFoundError):
        load_original_state_dict(tmp_path / "nothing.ckpt")
    torch.save({"state_dict": {"a": torch.zeros(1), "b": 3}}, tmp_path / "mixed.pth")
    with pytest.raises(ValueError, match="not tensors: b"):
        load_original_state_dict(tmp_path / "mixed.pth")


def test_pd_convert_command(tmp_path):
    """`pd convert` reads an original-layout checkpoint and writes a loadable diffusers folder."""
    import torch
    from diffusers import UNet2DConditionModel
    from safetensors.torch import save_file

    from flows.cli import main as pd_main
    from pd_model.controlnet import PromptDiffusionControlNet
    from pd_model.convert import diffusers_to_ldm

    unet = UNet2DConditionModel(sample_size=8, in_channels=4, out_channels=4, block_out_channels=(32, 64), layers_per_block=1,
                                down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
                                cross_attention_dim=32, attention_head_dim=8, norm_num_groups=8)
    (tmp_path / "sd" / "unet").mkdir(parents=True)
    unet.save_pretrained(tmp_path / "sd" / "unet")
    net = PromptDiffusionControlNet.from_unet(unet)
    save_file({k: v.contiguous() for k, v in diffusers_to_ldm(net.state_dict(), net.config).items()}, tmp_path / "orig.safetensors")
    assert pd_main(["convert", str(tmp_path / "orig.safetensors"), "--base", str(tmp_path / "sd"), "--out", str(tmp_path / "out")]) == 0
    back = PromptDiffusionControlNet.from_pretrained(tmp_path / "out")
    assert back.config.hint_range == "-1,1"
    assert all(torch.equal(a, b) for a, b in zip(net.state_dict().values(), back.state_dict().values()))
