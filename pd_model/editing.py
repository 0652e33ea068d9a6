"""Generating and editing as in the paper, from images in memory or files (`pd generate`, `pd edit`).

Editing takes one step (a map of an image + new text -> image, an inverse task) or two (image -> map
with a forward task, then map + new text -> image with an inverse task)."""
from __future__ import annotations

from pathlib import Path

import torch
from PIL import Image

from pd_data.tasks import get_task
from pd_model.config import Sampler
from pd_model.pipeline import ImageLike, PromptDiffusionPipeline


def edit_one_step(pipe: PromptDiffusionPipeline, map_image: ImageLike, text: str,
                  inverse_pair: tuple[ImageLike, ImageLike], **kwargs) -> Image.Image:
    """`inverse_pair` = (a map, its image) showing the inverse task; the map of the image to edit is the query."""
    return pipe(text, image_pair=inverse_pair, image=map_image, output_type="pil", **kwargs).images[0]


def edit_two_steps(pipe: PromptDiffusionPipeline, image: ImageLike, text: str, modality: str,
                   forward_pair: tuple[ImageLike, ImageLike], inverse_pair: tuple[ImageLike, ImageLike],
                   **kwargs) -> tuple[Image.Image, Image.Image]:
    """(the predicted map, the edited image): image -> `modality` map -> image under the new text."""
    forward = get_task(f"image->{modality}")
    map_image = pipe(forward.fixed_text, image_pair=forward_pair, image=image, output_type="pil", **kwargs).images[0]
    return map_image, edit_one_step(pipe, map_image, text, inverse_pair, **kwargs)


def open_image(path: str | Path) -> Image.Image:
    """An image file as RGB; a missing file is an error naming it."""
    if not Path(path).is_file():
        raise FileNotFoundError(f"image {path} not found")
    return Image.open(path).convert("RGB")


def _loaded(model_dir: str | Path, sampler: Sampler) -> PromptDiffusionPipeline:
    pipe = PromptDiffusionPipeline.from_trained(model_dir, sampler.scheduler)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def _call(sampler: Sampler, seed: int) -> dict:
    return sampler.pipeline_kwargs() | {"generator": torch.Generator().manual_seed(seed)}


def generate_file(model_dir: str | Path, prompt: str, pair: tuple[str, str], query: str, out: str | Path,
                  sampler: Sampler = Sampler(), seed: int = 0) -> Path:
    """One prompt from image files (the example pair's source and target, the query) to the PNG `out`."""
    pipe = _loaded(model_dir, sampler)
    image = pipe(prompt, image_pair=(open_image(pair[0]), open_image(pair[1])), image=open_image(query),
                 **_call(sampler, seed)).images[0]
    Path(out).parent.mkdir(parents=True, exist_ok=True)
    image.save(out)
    return Path(out)


def edit_file(model_dir: str | Path, text: str, inverse_pair: tuple[str, str], out: str | Path, *,
              map_path: str | None = None, image: str | None = None, forward_pair: tuple[str, str] | None = None,
              modality: str = "depth", sampler: Sampler = Sampler(), seed: int = 0) -> list[Path]:
    """An edit from image files to the PNG `out`: one step from `map_path`, else two from `image` through
    a `modality` map (shown by `forward_pair`), saved beside `out` as `<out>-<modality>.png`. The paths written."""
    if map_path is None and not (image and forward_pair):
        raise ValueError("two-step editing needs --image and --forward-pair IMAGE MAP (or give --map for one step)")
    pipe = _loaded(model_dir, sampler)
    inverse = (open_image(inverse_pair[0]), open_image(inverse_pair[1]))
    Path(out).parent.mkdir(parents=True, exist_ok=True)
    written = []
    if map_path is not None:
        edited = edit_one_step(pipe, open_image(map_path), text, inverse, **_call(sampler, seed))
    else:
        predicted, edited = edit_two_steps(pipe, open_image(image), text, modality,
                                           (open_image(forward_pair[0]), open_image(forward_pair[1])), inverse,
                                           **_call(sampler, seed))
        written.append(Path(out).with_name(Path(out).stem + f"-{modality}.png"))
        predicted.save(written[-1])
    edited.save(out)
    return [*written, Path(out)]
