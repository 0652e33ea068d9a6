"""Turning whatever a source holds into a square RGB uint8 image and a UTF-8 caption, or a reject.

Normalised: grayscale, 1-bit, palette, RGBA/LA (composited on white), CMYK, 16-bit and float
images, EXIF orientation, any size above the minimum (centre-cropped, resized). Rejected, with a
reason: empty files, non-images, truncated files, decompression bombs, images below the minimum
side, missing captions. Captions that are not UTF-8 are decoded with replacement characters and
marked in the provenance.
"""
from __future__ import annotations

import io
import warnings

import numpy as np
from PIL import Image, ImageOps


class Reject(Exception):
    """A record that cannot be used; `reason` is a short stable code counted in the summary."""

    def __init__(self, reason: str, detail: str = ""):
        super().__init__(f"{reason}: {detail}" if detail else reason)
        self.reason, self.detail = reason, detail


def open_image(data: bytes, max_pixels: int) -> Image.Image:
    """Decode fully (so truncation shows here, not later); never allocate a decompression bomb."""
    if not data:
        raise Reject("empty-file")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            img = Image.open(io.BytesIO(data))
            if img.width * img.height > max_pixels:  # checked on the header, before pixels are decoded
                raise Reject("decompression-bomb", f"{img.width}x{img.height} > {max_pixels} pixels")
            img.load()
    except Reject:
        raise
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as e:
        raise Reject("decompression-bomb", str(e)) from None
    except Image.UnidentifiedImageError:
        raise Reject("not-an-image") from None
    except (OSError, SyntaxError, ValueError) as e:
        raise Reject("truncated" if "truncated" in str(e).lower() else "corrupt-image", str(e)) from None
    return img


def to_rgb(img: Image.Image) -> Image.Image:
    img = ImageOps.exif_transpose(img)
    if img.mode in ("I;16", "I;16B", "I;16L", "I", "F"):
        a = np.asarray(img, dtype=np.float64)
        top = 65535.0 if img.mode.startswith("I;16") or a.max() > 255 else 255.0
        if img.mode == "F":
            top = max(float(a.max()), 1e-12)
        img = Image.fromarray(np.clip(a / top * 255.0, 0, 255).round().astype(np.uint8), "L")
    if img.mode == "P":
        img = img.convert("RGBA")
    if img.mode in ("RGBA", "LA", "PA"):
        rgba = img.convert("RGBA")
        white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        img = Image.alpha_composite(white, rgba)
    return img.convert("RGB")


def square_resize(img: Image.Image, resolution: int) -> np.ndarray:
    """Centre crop to a square, then resize (Lanczos) to resolution x resolution: (R, R, 3) uint8."""
    w, h = img.size
    s = min(w, h)
    img = img.crop(((w - s) // 2, (h - s) // 2, (w - s) // 2 + s, (h - s) // 2 + s))
    return np.asarray(img.resize((resolution, resolution), Image.LANCZOS))


def normalise_image(data: bytes | np.ndarray, resolution: int, min_side: int, max_pixels: int) -> np.ndarray:
    if isinstance(data, np.ndarray):
        img = Image.fromarray(data)
    else:
        img = open_image(data, max_pixels)
    if min(img.size) < min_side:
        raise Reject("too-small", f"{img.width}x{img.height} < {min_side} px")
    return square_resize(to_rgb(img), resolution)


def normalise_caption(caption: str | bytes | None) -> tuple[str, bool]:
    """(caption, repaired): bytes that are not UTF-8 are decoded with U+FFFD replacements."""
    repaired = False
    if isinstance(caption, bytes):
        try:
            caption = caption.decode("utf-8")
        except UnicodeDecodeError:
            caption, repaired = caption.decode("utf-8", errors="replace"), True
    if caption is None or not str(caption).strip():
        raise Reject("missing-caption")
    return " ".join(str(caption).split()), repaired
