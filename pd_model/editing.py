"""Editing as in the paper: one step (a map of an image + new text -> image, an inverse task) or two
steps (image -> map with a forward task, then map + new text -> image with an inverse task)."""
from __future__ import annotations

from PIL import Image

from pd_data.tasks import get_task
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
