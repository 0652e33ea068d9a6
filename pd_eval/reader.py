"""A re-annotator for the demo: a small conv net that reads each procedural map back from an image, so
that a generated image can be scored against its query map (`pd_eval.control`).

The demo's maps are rendered from the scene description, not computed from pixels, so no annotator can
read a generated image; this one learns to, from the train split's (image, map) pairs.

One network, one head per modality: a shared U-Net trunk (32 -> 16 -> 8 px and back, with skips and
two coordinate channels, since depth on these scenes depends on height in the frame) and a 3x3 conv
head per modality. Why shared: every map is a function of the same scene (edges are depth and label
steps, normals are depth's gradient), so one trunk learns the geometry once and a training step
backpropagates all six losses through one forward pass, about a sixth of six separate nets' cost on a
2-core CPU. Heads: gray maps (all channels equal in training) regress one channel, colour maps three,
both as tanh in [-1, 1] with an absolute error (sharper edges and
normals than a squared one: on the demo at 1000 steps, normal angle 7.8 against 9.9 degrees, hed SSIM
0.91 against 0.87); seg classifies each pixel over the palette (cross
entropy), so a read is always a palette colour and never a blend of two labels.

A reader is named `demo-reader-v1@<version>`, the version a short hash of its config and weights:
metric rows carry it, as numbers from different re-annotators are not comparable.
"""
from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from torch import nn

from pd_data.dataset import SplitData
from pd_eval.baselines import mean_map as _mean_map
from pd_eval.control import METRICS, Palette, as_palette, control_spec, palette_index, summarise

NAME = "demo-reader-v1"
WEIGHTS, CONFIG = "reader.safetensors", "reader.json"
# A reader is informative on a modality when its headline's distance to the ceiling (the error itself
# for RMSE and angle; 1 - score for SSIM, mIoU, F1) is at most this fraction of the mean map's.
INFORMATIVE_FRACTION = 0.5


@dataclass(frozen=True)
class ReaderConfig:
    """Everything that makes a reader: its maps, size, width, palette and how it was trained."""

    modalities: tuple[str, ...]
    channels: tuple[int, ...]  # per modality: output channels (1 gray, 3 colour, K palette classes for seg)
    resolution: int
    width: int = 16
    palette: tuple[tuple[int, int, int], ...] = ()  # seg's label colours
    steps: int = 1000
    batch_size: int = 32
    lr: float = 3e-3
    seed: int = 0
    name: str = NAME

    def to_json(self) -> str:
        return json.dumps(asdict(self), sort_keys=True)

    @classmethod
    def from_json(cls, text: str, where: str) -> "ReaderConfig":
        raw = json.loads(text)
        unknown = sorted(set(raw) - {f.name for f in fields(cls)})
        if unknown or raw.get("name") != NAME:
            raise ValueError(f"{where} is not a {NAME} config (unknown keys {unknown}, name {raw.get('name')!r}); "
                             f"retrain it with pd_eval.reader.train_reader")
        tuples = {"modalities": tuple(raw["modalities"]), "channels": tuple(raw["channels"]),
                  "palette": tuple(tuple(c) for c in raw["palette"])}
        return cls(**{**raw, **tuples})


def _block(c_in: int, c_out: int, stride: int = 1) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(c_in, c_out, 3, stride, 1), nn.GroupNorm(min(8, c_out // 4), c_out), nn.SiLU())


class ReaderNet(nn.Module):
    """(B, 3, H, W) in [-1, 1] -> {modality: (B, C_m, H, W)} (tanh for maps, logits for seg)."""

    def __init__(self, cfg: ReaderConfig):
        super().__init__()
        c = cfg.width
        self.enc1 = _block(3 + 2, c)  # + (y, x) coordinates
        self.enc2 = nn.Sequential(_block(c, 2 * c, 2), _block(2 * c, 2 * c))
        self.enc3 = nn.Sequential(_block(2 * c, 4 * c, 2), _block(4 * c, 4 * c), _block(4 * c, 4 * c))
        self.dec2 = _block(4 * c + 2 * c, 2 * c)
        self.dec1 = _block(2 * c + c, c)
        self.heads = nn.ModuleDict({m: nn.Conv2d(c, k, 3, 1, 1) for m, k in zip(cfg.modalities, cfg.channels)})
        self.classify = {m: m == "seg" for m in cfg.modalities}

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        b, _, h, w = x.shape
        yy, xx = torch.meshgrid(torch.linspace(-1, 1, h), torch.linspace(-1, 1, w), indexing="ij")
        x = torch.cat([x, torch.stack([yy, xx]).expand(b, 2, h, w)], 1)  # (B, 5, H, W)
        e1 = self.enc1(x)  # (B, c, H, W)
        e2 = self.enc2(e1)  # (B, 2c, H/2, W/2)
        e3 = self.enc3(e2)  # (B, 4c, H/4, W/4)
        d2 = self.dec2(torch.cat([F.interpolate(e3, scale_factor=2.0), e2], 1))  # (B, 2c, H/2, W/2)
        d1 = self.dec1(torch.cat([F.interpolate(d2, scale_factor=2.0), e1], 1))  # (B, c, H, W)
        return {m: y if self.classify[m] else torch.tanh(y) for m, y in ((m, head(d1)) for m, head in self.heads.items())}


def _signed(images: np.ndarray) -> torch.Tensor:
    """(N, H, W, 3) uint8 -> (N, 3, H, W) float32 in [-1, 1]."""
    return torch.from_numpy(np.ascontiguousarray(images)).permute(0, 3, 1, 2).float() / 127.5 - 1.0


class Reader:
    """A trained `ReaderNet` with its config: `read(images, modality)` -> maps."""

    def __init__(self, cfg: ReaderConfig, net: ReaderNet):
        self.cfg, self.net = cfg, net.eval()
        self.name = NAME

    @property
    def modalities(self) -> tuple[str, ...]:
        return self.cfg.modalities

    @property
    def palette(self) -> np.ndarray | None:
        return np.array(self.cfg.palette, np.uint8) if self.cfg.palette else None

    @property
    def version(self) -> str:
        """Short hash of the config and the weights: changes with either, survives save/load."""
        h = hashlib.sha256(self.cfg.to_json().encode())
        for k, v in sorted(self.net.state_dict().items()):
            h.update(k.encode())
            h.update(v.detach().contiguous().numpy().tobytes())
        return h.hexdigest()[:10]

    @property
    def id(self) -> str:
        return f"{self.name}@{self.version}"

    @torch.no_grad()
    def read(self, images: np.ndarray, modality: str, batch_size: int = 64) -> np.ndarray:
        """(N, H, W, 3) uint8 images -> (N, H, W, 3) uint8 `modality` maps."""
        if modality not in self.modalities:
            raise ValueError(f"{self.id} reads {list(self.modalities)}, not {modality!r}; train it with that modality's pairs")
        images = np.asarray(images)
        r = self.cfg.resolution
        if images.dtype != np.uint8 or images.ndim != 4 or images.shape[1:] != (r, r, 3):
            raise ValueError(f"{self.id} reads (N, {r}, {r}, 3) uint8 images, got {images.shape} {images.dtype}; resize "
                             f"them to {r} px (it was trained at that size) or train a reader at theirs")
        self.net.eval()
        out = []
        for i in range(0, len(images), batch_size):
            y = self.net(_signed(images[i:i + batch_size]))[modality]  # (B, C, H, W)
            if modality == "seg":
                out.append(self.palette[y.argmax(1).numpy()])  # (B, H, W, 3)
            else:
                u8 = ((y + 1) * 127.5).round().clamp(0, 255).to(torch.uint8).permute(0, 2, 3, 1).numpy()
                out.append(np.repeat(u8, 3, axis=-1) if u8.shape[-1] == 1 else u8)
        return np.concatenate(out) if out else np.zeros((0, r, r, 3), np.uint8)

    def save(self, folder: str | Path) -> Path:
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        state = {k: v.detach().contiguous() for k, v in self.net.state_dict().items()}
        save_file(state, str(folder / WEIGHTS), metadata={"name": NAME, "version": self.version})
        (folder / CONFIG).write_text(self.cfg.to_json() + "\n")
        return folder


def load_reader(folder: str | Path) -> Reader:
    folder = Path(folder)
    for f in (CONFIG, WEIGHTS):
        if not (folder / f).is_file():
            raise FileNotFoundError(f"reader file {folder / f} not found; save a reader there with "
                                    f"train_reader(...).save({str(folder)!r}) or scripts/bench_reader.py --save {folder}")
    cfg = ReaderConfig.from_json((folder / CONFIG).read_text(), str(folder / CONFIG))
    net = ReaderNet(cfg)
    net.load_state_dict(load_file(str(folder / WEIGHTS)))  # strict: a missing or extra tensor is an error
    return Reader(cfg, net)


Pairs = dict[str, tuple[np.ndarray, np.ndarray]]


def split_pairs(split: SplitData, modalities: tuple[str, ...] | None = None) -> Pairs:
    """modality -> (images, maps), each (N, H, W, 3) uint8, of every image of a split in id order."""
    ids = sorted(split.arrays)
    images = np.stack([split.arrays[i]["image"] for i in ids])
    return {m: (images, np.stack([split.arrays[i][m] for i in ids])) for m in (modalities or split.modalities)}


def mean_maps(train: SplitData, modalities: tuple[str, ...]) -> dict[str, np.ndarray]:
    """modality -> the mean-map baseline (`pd_eval.baselines.mean_map`, (H, W, 3) float64)."""
    return {m: _mean_map(train, m) for m in modalities}


@dataclass
class _Pool:
    """The training images (one copy when every modality has the same ones) and per-modality targets on
    the rows that have them."""

    images: torch.Tensor  # (P, 3, H, W) in [-1, 1]
    targets: dict[str, torch.Tensor] = field(default_factory=dict)  # (n_m, C, H, W) float or (n_m, H, W) class index
    rows: dict[str, tuple[int, int]] = field(default_factory=dict)  # modality -> [start, stop) in the pool


def _pool(pairs: Pairs, palette: np.ndarray | None) -> _Pool:
    mods = list(pairs)
    first = pairs[mods[0]][0]
    shared = all(pairs[m][0].shape == first.shape and np.array_equal(pairs[m][0], first) for m in mods)
    blocks = [first] if shared else [pairs[m][0] for m in mods]
    pool = _Pool(_signed(np.concatenate(blocks)))
    start = 0
    for m in mods:
        images, maps = pairs[m]
        pool.rows[m] = (0, len(first)) if shared else (start, start + len(images))
        start += len(images)
        if m == "seg":
            pool.targets[m] = torch.from_numpy(palette_index(maps, palette))  # (n, H, W)
        else:
            t = _signed(maps)  # (n, 3, H, W)
            pool.targets[m] = t[:, :1] if _is_gray(maps) else t
    return pool


def _is_gray(maps: np.ndarray) -> bool:
    return bool((maps[..., 0] == maps[..., 1]).all() and (maps[..., 0] == maps[..., 2]).all())


def _check_pairs(pairs: Pairs, palette: Palette | None) -> int:
    if not pairs:
        raise ValueError("train_reader needs pairs: {modality: (images, maps)}, e.g. split_pairs(train_split)")
    if "seg" in pairs and palette is None:
        raise ValueError("seg pairs need palette=, the label colours (pd_data.procedural.SEG_PALETTE for the demo)")
    sizes = set()
    for m, (images, maps) in pairs.items():
        control_spec(m)  # a modality nothing can score is an error here, not after training
        if images.shape != maps.shape or images.ndim != 4 or images.shape[-1] != 3 or images.dtype != np.uint8 \
                or maps.dtype != np.uint8 or len(images) == 0 or images.shape[1] != images.shape[2]:
            raise ValueError(f"{m!r}: images {images.shape} {images.dtype} and maps {maps.shape} {maps.dtype} must be "
                             f"one (N, S, S, 3) uint8 shape with N >= 1")
        sizes.add(images.shape[1])
    if len(sizes) != 1 or next(iter(sizes)) % 4:
        raise ValueError(f"every pair must share one size divisible by 4 (the trunk halves it twice); got {sorted(sizes)}")
    return sizes.pop()


def train_reader(pairs: Pairs, steps: int = 1000, seed: int = 0, palette: Palette | None = None, width: int = 16,
                 batch_size: int = 32, lr: float = 3e-3) -> Reader:
    """Train a reader on `pairs` (modality -> (images, maps), (N, S, S, 3) uint8), deterministic from `seed`:
    initial weights from torch's seeded global generator inside `fork_rng` (the caller's stream is left
    as it was), batches from a `torch.Generator` of the same seed. AdamW with a cosine decay to zero."""
    res = _check_pairs(pairs, palette)
    pal = as_palette(palette).astype(np.uint8) if "seg" in pairs else None
    pool = _pool(pairs, pal)
    channels = tuple(len(pal) if m == "seg" else pool.targets[m].shape[1] for m in pairs)
    cfg = ReaderConfig(tuple(pairs), channels, res, width, tuple(map(tuple, pal.tolist())) if pal is not None else (),
                       steps, batch_size, lr, seed)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        net = ReaderNet(cfg)
    gen = torch.Generator().manual_seed(seed)
    opt = torch.optim.AdamW(net.parameters(), lr=lr, weight_decay=1e-4)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, max(steps, 1))
    net.train()
    for _ in range(steps):
        idx = torch.randint(len(pool.images), (batch_size,), generator=gen)
        loss = training_loss(net, pool, idx)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
    return Reader(cfg, net.eval())


def training_loss(net: ReaderNet, pool: _Pool, idx: torch.Tensor) -> torch.Tensor:
    """Sum over modalities of the mean loss on the batch rows that have that modality's map."""
    out = net(pool.images[idx])
    loss = torch.zeros(())
    for m, (start, stop) in pool.rows.items():
        have = (idx >= start) & (idx < stop)
        if not have.any():
            continue
        target = pool.targets[m][idx[have] - start]
        y = out[m][have]
        loss = loss + (F.cross_entropy(y, target) if m == "seg" else F.l1_loss(y, target))
    return loss


def reader_quality(reader: Reader, images: np.ndarray, maps: dict[str, np.ndarray],
                   mean_map: dict[str, np.ndarray]) -> dict[str, dict]:
    """Per modality: the reader's headline score on held-out (images, maps) beside the mean map's (the
    per-pixel mean train map, rounded to 8 bits, answering every image), and whether the reader is
    informative (its gap to the ceiling at most `INFORMATIVE_FRACTION` of the mean map's)."""
    out = {}
    for m, truth in maps.items():
        if m not in mean_map:
            raise ValueError(f"no mean map for {m!r}; pass mean_maps(train_split, {tuple(maps)})")
        pal = reader.palette if m == "seg" else None
        const = np.broadcast_to(np.clip(mean_map[m], 0, 255).round().astype(np.uint8), truth.shape)
        name = control_spec(m).headline(*truth.shape[1:3])
        ceiling = METRICS[name].ceiling
        ours = summarise(m, reader.read(images, m), truth, pal, resamples=0)[name].value
        base = summarise(m, np.ascontiguousarray(const), truth, pal, resamples=0)[name].value
        out[m] = {"metric": name, "higher_is_better": METRICS[name].higher_is_better, "ceiling": ceiling,
                  "reader": ours, "mean_map": base,
                  "informative": abs(ceiling - ours) <= INFORMATIVE_FRACTION * abs(ceiling - base),
                  "reader_id": reader.id, "n": len(truth)}
    return out
