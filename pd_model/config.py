"""Typed configuration of the networks, of training and of sampling."""
from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar, Literal

from pydantic import Field, model_validator

from pd_core.config import Frozen
from pd_model.tracking import ReportTo, check_installed

# How training steps compute (pd_model.precision): fp32, bf16 or fp16 autocast, or by device.
MixedPrecision = Literal["no", "bf16", "fp16", "auto"]


class BaseModelConfig(Frozen):
    """The text-to-image base. `kind='tiny'` is trained by the pipeline; `'sd15'` is loaded."""

    kind: Literal["tiny", "sd15"] = "tiny"
    pretrained_path: str | None = Field(None, description="diffusers folder or HF-cache repo id for kind='sd15'")
    block_out_channels: tuple[int, ...] = (32, 64)
    layers_per_block: int = 1
    attention_head_dim: int = 8
    text_hidden_size: int = 32
    text_layers: int = 2
    max_text_length: int = 24
    train_steps: int = Field(60, ge=0)
    batch_size: int = Field(8, ge=1)
    learning_rate: float = Field(1e-3, gt=0)
    ema_decay: float = Field(0.0, ge=0, lt=1, description="EMA of the weights (diffusers EMAModel); 0 is off")
    snr_gamma: float = Field(0.0, ge=0, description="min-SNR-gamma loss weighting (5 is the usual value); 0 is off")
    train_text_encoder: bool = Field(False, description="train the small text encoder with the UNet (it starts random)")
    # Stable Diffusion draws depth maps, edge maps and segmentations when asked ("a depth map of ..."):
    # it saw such pictures in LAION. A base trained on photos alone lacks that prior, so a fraction
    # of the tiny base's samples are the annotated maps of the trained tasks, captioned "depth map", ...
    map_fraction: float = Field(0.0, ge=0, le=1, description="share of base-training samples that are maps of the trained modalities")
    mixed_precision: MixedPrecision = Field("auto", description="tiny base training, as train.mixed_precision: no "
                                            "(fp32), bf16 or fp16 autocast, auto (fp32 on the CPU)")
    prediction_type: Literal["epsilon", "v_prediction"] = Field(
        "epsilon", description="what the tiny UNet predicts (SD 1.5: epsilon); v is better conditioned at high noise")
    checkpoint_every: int = Field(0, ge=0, description="tiny base: save a resumable checkpoint every N steps; 0 is off")
    keep_last: int = Field(2, ge=1, description="checkpoints kept")
    seed: int = 0

    @model_validator(mode="after")
    def _check(self) -> "BaseModelConfig":
        if self.kind == "sd15" and not self.pretrained_path:
            raise ValueError("base.kind='sd15' needs base.pretrained_path (a diffusers folder of Stable Diffusion 1.5)")
        return self


def resolution_multiple(base: BaseModelConfig) -> int:
    """What image sides must divide by: each UNet level but the last halves the map, and a latent
    base (SD 1.5: four levels) works on images 8x smaller still."""
    if base.kind == "sd15":
        return 8 * 2 ** (4 - 1)
    return 2 ** (len(base.block_out_channels) - 1)


class TrainConfig(Frozen):
    """Joint six-task Prompt Diffusion fine-tuning, and the CN(FT) baselines by the same loop."""

    steps: int = Field(30, ge=1)
    batch_size: int = Field(8, ge=1)
    learning_rate: float = Field(1e-4, gt=0)
    weight_decay: float = 1e-2
    grad_clip: float = 1.0
    # Classifier-free guidance dropout, one uniform draw u per sample (paper section "Training").
    drop_text: float = 0.05
    drop_text_and_pair: float = 0.05
    drop_pair: float = 0.05
    pair_context: bool = Field(False, description="Prompt Diffusion also adds a pooled vector of the example pair to "
                               "the ControlNet's time embedding, so that every block sees the task the pair shows "
                               "(not in the paper: pd_model.controlnet)")
    timesteps: Literal["uniform", "cubic", "mixed"] = Field(
        "uniform", description="training timesteps: uniform (the paper's); cubic, t = (1 - u^3) T, most at high noise "
        "where the task is decided (T2I-Adapter's sampling; not in the paper); or mixed, each sample cubic or "
        "uniform with even odds")
    train_unet_decoder: bool = Field(False, description="also train the UNet decoder (what the original's inverted --sd_locked did)")
    baseline_steps_per_task: int = Field(10, ge=0, description="CN(FT) steps each under equal_steps; 0 skips baselines")
    baseline_budget: Literal["equal_steps", "equal_compute"] = Field(
        "equal_steps", description="equal_steps: baseline_steps_per_task each; equal_compute: all CN(FT) together get `steps`")
    oracles: bool = Field(False, description="also train a CN(FT) on each unseen task, at the CN(FT) budget: "
                                             "the oracle of the generalisation comparison (needs baselines on)")
    warmup_steps: int = Field(0, ge=0, description="linear learning-rate warm-up, then constant (the paper's lr)")
    checkpoint_every: int = Field(0, ge=0, description="save a resumable checkpoint of everything trained every N steps "
                                  "(ControlNet, decoder copy, optimizer, EMA); 0 is off")
    keep_last: int = Field(2, ge=1, description="checkpoints kept")
    ema_decay: float = Field(0.0, ge=0, lt=1, description="EMA of the trained weights (diffusers EMAModel); 0 is off")
    snr_gamma: float = Field(0.0, ge=0, description="min-SNR-gamma loss weighting (5 is the usual value); 0 is the paper's plain loss")
    validate_every: int = Field(0, ge=0, description="save a grid of outputs on fixed prompts every N steps and at the "
                                "last (model folder's validation/); 0 is off")
    # A step's global batch (batch_size samples, their noise and timesteps) is drawn from (seed, step, sample)
    # alone; it is split over `processes`, then into `grad_accum_steps` micro-batches, gradients averaged.
    grad_accum_steps: int = Field(1, ge=1, description="micro-batches per step in each process (same global batch)")
    processes: int = Field(1, ge=1, description="data-parallel processes the train stage and retrain launch (torch.distributed)")
    launcher: Literal["torchrun", "accelerate"] = Field(
        "torchrun", description="what starts the processes when processes > 1: torchrun, or accelerate launch (which "
        "also reads `accelerate config`'s file); the same job and the same weights either way")
    mixed_precision: MixedPrecision = Field("auto", description="no: fp32; bf16 / fp16 autocast (fp16 with a gradient "
                                            "scaler); auto: bf16 on CUDA, fp16 on CUDA without bf16, fp32 on the CPU")
    gradient_checkpointing: bool = Field(False, description="recompute activations in backward (ControlNet and UNet): less memory")
    device: Literal["auto", "cpu", "cuda"] = Field("auto", description="auto: CUDA (one GPU per process) when present")
    loader_workers: int = Field(0, ge=0, description="DataLoader processes composing each process's samples ahead of "
                                "the loop (0: in the loop); the weights do not depend on it")
    report_to: ReportTo = Field("tensorboard", description="experiment tracker of every training (loss, lr, grad norm, "
                                "samples/s, validation grids, config): tensorboard (event files in the model folder's "
                                "logs/), wandb (offline), mlflow, or none")
    replicates: int = Field(1, ge=1, description="independent trainings of Prompt Diffusion on the same data and "
                            "prompts, each from its own seed; every metric is stored per replicate and Table 1 gives "
                            "their mean with an interval over replicates and prompts")
    baseline_replicates: int = Field(1, ge=1, description="the same for every CN(FT) (and oracle)")
    seed: int = 0

    # Seeds of replicate r: the model's own seed offset plus r times this (far from the offsets of the models).
    REPLICATE_SEED_STRIDE: ClassVar[int] = 1000
    # How many replicates there are: not what one model's weights depend on (`model_identity`).
    REPLICATE_COUNTS: ClassVar[frozenset[str]] = frozenset({"replicates", "baseline_replicates"})

    # Settings that change how a training goes, never its weights: left out of the train stage's key.
    NOT_IN_KEY: ClassVar[frozenset[str]] = frozenset({"checkpoint_every", "keep_last", "validate_every",
                                                      "gradient_checkpointing", "loader_workers", "report_to",
                                                      "launcher"})

    def identity(self) -> dict:
        """The settings the trained weights depend on (the train stage's key): all but `NOT_IN_KEY`."""
        return self.model_dump(exclude=set(self.NOT_IN_KEY))

    def model_identity(self) -> dict:
        """What one model's weights depend on: `identity` less the replicate counts (a model is the same
        whether 3 or 5 replicates are asked for; its own replicate index and seed are in its spec)."""
        return {k: v for k, v in self.identity().items() if k not in self.REPLICATE_COUNTS}

    # The training recipe's settings whose paper values are the defaults; `NOT_IN_PAPER` were added here.
    RECIPE: ClassVar[tuple[str, ...]] = ("drop_text", "drop_text_and_pair", "drop_pair", "pair_context", "timesteps",
                                         "snr_gamma", "ema_decay", "train_unet_decoder", "warmup_steps")
    NOT_IN_PAPER: ClassVar[tuple[str, ...]] = ("pair_context", "timesteps")

    def departures(self) -> dict[str, object]:
        """The recipe settings that differ from the paper's (setting -> value), in `RECIPE` order."""
        paper = type(self)()
        return {k: getattr(self, k) for k in self.RECIPE if getattr(self, k) != getattr(paper, k)}

    def baseline_steps(self, n_tasks: int) -> int:
        """Steps of each CN(FT) model under the budget rule (batch size is the joint model's)."""
        return self.baseline_steps_per_task if self.baseline_budget == "equal_steps" else self.steps // n_tasks

    def budget_rule(self, n_tasks: int) -> str:
        """The rule in words, for the train summary and the report."""
        each = self.baseline_steps(n_tasks)
        if self.baseline_budget == "equal_steps":
            return (f"equal steps: each of the {n_tasks} CN(FT) models {each} steps, Prompt Diffusion {self.steps} "
                    f"steps over all {n_tasks} tasks (batch {self.batch_size})")
        return (f"equal compute: the {n_tasks} CN(FT) models together {each * n_tasks} steps ({each} each), as many as "
                f"Prompt Diffusion's {self.steps} over all tasks (batch {self.batch_size})")

    @model_validator(mode="after")
    def _check(self) -> "TrainConfig":
        if self.drop_text + self.drop_text_and_pair + self.drop_pair > 1:
            raise ValueError("the three dropout rates must sum to at most 1")
        split = self.processes * self.grad_accum_steps
        if self.batch_size < self.processes:
            raise ValueError(f"train.batch_size={self.batch_size} is smaller than train.processes={self.processes}: "
                             f"every process needs at least one sample; raise batch_size or lower processes")
        if self.batch_size % split:
            raise ValueError(f"train.batch_size={self.batch_size} does not split into train.processes={self.processes} x "
                             f"train.grad_accum_steps={self.grad_accum_steps} equal micro-batches; use a batch_size that "
                             f"is a multiple of {split} (e.g. {-(-self.batch_size // split) * split})")
        if self.baseline_replicates > 1 and self.baseline_steps_per_task == 0:
            raise ValueError(f"train.baseline_replicates={self.baseline_replicates} replicates CN(FT) models, but "
                             f"train.baseline_steps_per_task=0 trains none; set baseline_replicates=1 or train baselines")
        if self.oracles and self.baseline_steps_per_task == 0:
            raise ValueError("train.oracles trains CN(FT) oracles at train.baseline_steps_per_task steps, which is 0; "
                             "set baseline_steps_per_task > 0 or oracles=false")
        check_installed(self.report_to)  # now, at plan time, not when the first model starts training
        return self


@dataclass(frozen=True)
class Sampler:
    """How images are sampled. The defaults are the evaluation's (`eval.scheduler`, `eval.steps`,
    `eval.guidance_scale`), so that `pd generate` draws what the benchmark scores. `pair_guidance_scale`
    guides over the example pair apart from the text (Prompt Diffusion only); `positive_suffix` is
    appended to every text."""

    scheduler: str = "ddim"
    steps: int = 20
    guidance_scale: float = 3.0
    pair_guidance_scale: float | None = None
    negative_prompt: str = ""
    positive_suffix: str = ""

    def pipeline_kwargs(self) -> dict:
        """The pipeline call's arguments for these settings (the scheduler is the pipeline's own)."""
        return {"num_inference_steps": self.steps, "guidance_scale": self.guidance_scale,
                "pair_guidance_scale": self.pair_guidance_scale, "negative_prompt": self.negative_prompt}
