"""Prompt Diffusion's ControlNet: a stock diffusers ControlNet with a second hint encoder for the query.

The example pair (6 channels) goes through the usual conditioning stack (`controlnet_cond_embedding`),
the query (3 channels) through an identical, freshly initialised one
(`controlnet_query_cond_embedding`, the diffusers research port's name); the two are summed and
added to the first feature map. Everything else is the upstream `ControlNetModel`, untouched.

With `pair_context=True` (a departure from the paper's architecture, off by default) the pair also
reaches every block as one vector: a small strided encoder, mean-pooled and projected to the time
embedding (`controlnet_pair_context`, its projection zero-initialised), added to the ControlNet's
time embedding. The first-map injection sums the pair's features pixel by pixel into those of a
query of another layout, so the task the pair shows is a property of the whole pair that no pixel
holds; the pooled vector carries it to every block, as the text's cross-attention carries "depth map".
"""
from __future__ import annotations

import inspect
from typing import Literal

import torch
from diffusers import ControlNetModel, ModelMixin, UNet2DConditionModel  # noqa: F401 - ModelMixin: see below
from diffusers.configuration_utils import register_to_config
from diffusers.models.controlnets.controlnet import ControlNetConditioningEmbedding
from torch import nn

# `DiffusionPipeline.from_pretrained` loads a component declared ["pd_model.controlnet", "PromptDiffusionControlNet"]
# in model_index.json by looking its loadable base classes (ModelMixin) up in this module: keep the import.
PAIR_CHANNELS = 6
HintRange = Literal["-1,1", "0,1"]
Kind = Literal["prompt-diffusion", "cn-ft"]
# Old pipeline.json files on disk spell the kinds the first way.
_KINDS: dict[str, Kind] = {"prompt-diffusion": "prompt-diffusion", "cn-ft": "cn-ft",
                           "prompt_diffusion": "prompt-diffusion", "cnft": "cn-ft"}


class PairQueryConditioningEmbedding(ControlNetConditioningEmbedding):
    """Embeds a (B, 6 + 3, H, W) hint as pair-stack(pair) + query-stack(query).

    Its own weights are the pair stack; the query stack is owned (and saved) by the ControlNet as
    `controlnet_query_cond_embedding` and only referenced here, so the state-dict layout is the
    research port's.
    """

    def bind_query(self, query_embedding: ControlNetConditioningEmbedding) -> None:
        object.__setattr__(self, "_query_embedding", query_embedding)  # a reference, not a submodule

    def forward(self, conditioning: torch.Tensor) -> torch.Tensor:
        pair, query = conditioning[:, :PAIR_CHANNELS], conditioning[:, PAIR_CHANNELS:]  # (B,6,H,W), (B,3,H,W)
        return super().forward(pair) + self._query_embedding(query)


class PairContext(nn.Module):
    """(B, 6, H, W) example pair -> (B, D) vector: strided convolutions, a mean over positions, a linear
    projection that starts at zero (so a fresh model is the one without it)."""

    def __init__(self, out_dim: int, widths: tuple[int, ...] = (32, 64)):
        super().__init__()
        layers, c = [], PAIR_CHANNELS
        for w in widths:
            layers += [nn.Conv2d(c, w, 3, stride=2, padding=1), nn.SiLU()]
            c = w
        self.features = nn.Sequential(*layers)
        self.proj = nn.Linear(c, out_dim)
        nn.init.zeros_(self.proj.weight)
        nn.init.zeros_(self.proj.bias)

    def forward(self, pair: torch.Tensor) -> torch.Tensor:
        return self.proj(self.features(pair).mean(dim=(2, 3)))


def _add_context(net: "PromptDiffusionControlNet", module, inputs, output: torch.Tensor) -> torch.Tensor:
    """Forward hook of the time embedding: adds the pair vector of the call in progress."""
    ctx = net._pair_ctx
    return output if ctx is None else output + ctx.to(output.dtype)


def _attach_pair_context(net: "PromptDiffusionControlNet") -> None:
    """The pair-context encoder as a submodule (saved with the weights) and the hook that adds its
    vector to the time embedding."""
    net.controlnet_pair_context = PairContext(net.time_embedding.linear_2.out_features)
    net.time_embedding.register_forward_hook(lambda m, i, o: _add_context(net, m, i, o))


def _init(self, query_conditioning_channels: int = 3, hint_range: HintRange = "-1,1", pair_context: bool = False, **kwargs):
    super(PromptDiffusionControlNet, self).__init__(**kwargs)
    object.__setattr__(self, "_pair_ctx", None)
    if pair_context:
        _attach_pair_context(self)
    out_channels = self.config.conditioning_embedding_out_channels
    emb_channels = self.config.block_out_channels[0]
    self.controlnet_cond_embedding = PairQueryConditioningEmbedding(
        emb_channels, self.config.conditioning_channels, out_channels)
    self.controlnet_query_cond_embedding = ControlNetConditioningEmbedding(
        emb_channels, query_conditioning_channels, out_channels)
    self.controlnet_cond_embedding.bind_query(self.controlnet_query_cond_embedding)


# `register_to_config` records the arguments named in the signature, so the signature must list the
# parent's arguments as well as ours (a bare **kwargs would drop them from config.json).
_parent = inspect.signature(ControlNetModel.__init__).parameters
_init.__signature__ = inspect.Signature([
    *(p for p in _parent.values()),
    inspect.Parameter("query_conditioning_channels", inspect.Parameter.POSITIONAL_OR_KEYWORD, default=3),
    inspect.Parameter("hint_range", inspect.Parameter.POSITIONAL_OR_KEYWORD, default="-1,1"),
    inspect.Parameter("pair_context", inspect.Parameter.POSITIONAL_OR_KEYWORD, default=False),
])


class PromptDiffusionControlNet(ControlNetModel):
    """`forward(sample, t, text_emb, controlnet_cond=pair (B,6,H,W), controlnet_query_cond=query (B,3,H,W))`.

    `config.hint_range` is the range the hints were trained in ("-1,1" for the original and this
    pipeline, "0,1" for weights trained through the diffusers research port); pipelines honour it.
    """

    __init__ = register_to_config(_init)

    @classmethod
    def from_unet(cls, unet: UNet2DConditionModel, conditioning_embedding_out_channels: tuple[int, ...] = (16, 32, 96, 256),
                  hint_range: HintRange = "-1,1", pair_context: bool = False, **kwargs) -> "PromptDiffusionControlNet":
        """Copy the UNet's encoder, as ControlNet does; the pair stack takes 6 channels. `pair_context`:
        add the pooled pair vector to the time embedding (see the module's docstring)."""
        net = super().from_unet(unet, conditioning_embedding_out_channels=conditioning_embedding_out_channels,
                                conditioning_channels=PAIR_CHANNELS, **kwargs)
        net.register_to_config(hint_range=hint_range, pair_context=pair_context)
        if pair_context:
            _attach_pair_context(net)
        return net

    @classmethod
    def from_research_port(cls, path, hint_range: HintRange) -> "PromptDiffusionControlNet":
        """Weights saved by the diffusers research port (`PromptDiffusionControlNetModel`, same key layout).

        Say which range they were trained with: "-1,1" for weights converted from the original
        release, "0,1" for weights trained through the port's own pipeline.
        """
        net = cls.from_pretrained(path)
        net.register_to_config(hint_range=hint_range)
        return net

    def forward(self, sample, timestep, encoder_hidden_states, controlnet_cond, controlnet_query_cond=None, **kwargs):
        if controlnet_query_cond is None:
            raise ValueError("PromptDiffusionControlNet needs controlnet_query_cond (the query image, B x 3 x H x W)")
        hint = torch.cat([controlnet_cond, controlnet_query_cond], dim=1)  # (B, 6 + 3, H, W)
        if not getattr(self.config, "pair_context", False):
            return super().forward(sample, timestep, encoder_hidden_states, hint, **kwargs)
        object.__setattr__(self, "_pair_ctx", self.controlnet_pair_context(controlnet_cond))
        try:
            return super().forward(sample, timestep, encoder_hidden_states, hint, **kwargs)
        finally:
            object.__setattr__(self, "_pair_ctx", None)


def as_kind(kind: str) -> Kind:
    """`kind` in this vocabulary, the legacy spellings of old model folders included."""
    if kind not in _KINDS:
        raise ValueError(f"unknown ControlNet kind {kind!r}; choose 'prompt-diffusion' or 'cn-ft'")
    return _KINDS[kind]


def spellings(kind: Kind) -> list[str]:
    """Every spelling of `kind` that `as_kind` reads (old model folders' and results' included)."""
    return [k for k, v in _KINDS.items() if v == kind]


def controlnet_class(kind: str) -> type[ControlNetModel]:
    return PromptDiffusionControlNet if as_kind(kind) == "prompt-diffusion" else ControlNetModel


def kind_of(net: ControlNetModel) -> Kind:
    """The kind of a loaded ControlNet: the one place that tells the two apart by type."""
    if isinstance(net, PromptDiffusionControlNet):
        return "prompt-diffusion"
    if isinstance(net, ControlNetModel):
        return "cn-ft"
    raise TypeError(f"{type(net).__name__} is not a ControlNet; pass a PromptDiffusionControlNet or a ControlNetModel")


def residuals(controlnet: ControlNetModel | None, sample: torch.Tensor, timestep, emb: torch.Tensor,
              pair: torch.Tensor | None, query: torch.Tensor | None, scale: float = 1.0) -> dict:
    """The UNet's `down_block_additional_residuals` / `mid_block_additional_residual` kwargs, one call for
    both kinds: Prompt Diffusion reads pair (B, 6, H, W) and query (B, 3, H, W), a stock ControlNet the
    query alone (it has no input for a pair); no ControlNet adds nothing. `scale` multiplies the residuals
    (diffusers' `controlnet_conditioning_scale`)."""
    if controlnet is None:
        return {}
    if query is None:
        raise ValueError("a ControlNet needs the query hint (B x 3 x H x W)")
    if kind_of(controlnet) == "prompt-diffusion":
        if pair is None:
            raise ValueError("a Prompt Diffusion ControlNet needs the example pair hint (B x 6 x H x W)")
        down, mid = controlnet(sample, timestep, emb, controlnet_cond=pair, controlnet_query_cond=query, return_dict=False)
    else:
        down, mid = controlnet(sample, timestep, emb, controlnet_cond=query, return_dict=False)
    if scale != 1.0:
        down, mid = [d * scale for d in down], mid * scale
    return {"down_block_additional_residuals": down, "mid_block_additional_residual": mid}
