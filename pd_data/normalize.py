"""Turning whatever a source holds into a square RGB uint8 image and a UTF-8 caption, or a reject.

Normalised: grayscale, 1-bit, palette, RGBA/LA (composited on white), CMYK, 16-bit and float
images, EXIF orientation, any size above the minimum (centre-cropped, resized). Rejected, with a
reason: empty files, non-images, truncated files, decompression bombs, images below the minimum
side, missing captions, text that UTF-8 cannot encode (a lone surrogate). Captions that are not
UTF-8 are decoded with replacement characters and marked in the provenance. `data.max_pixels` is
the one size limit: Pillow's own guard is raised to it while an image is opened.
"""
from __future__ import annotations

import io
import threading
import warnings
from contextlib import contextmanager

import numpy as np
from PIL import Image, ImageOps


class Reject(Exception):
    """A record that cannot be used; `reason` is a short stable code counted in the summary."""

    def __init__(self, reason: str, detail: str = ""):
        super().__init__(f"{reason}: {detail}" if detail else reason)
        self.reason, self.detail = reason, detail


_PILLOW_GUARD = threading.Lock()


@contextmanager
def pillow_limit(max_pixels: int):
    """Pillow's decompression-bomb guard (the global `Image.MAX_IMAGE_PIXELS`) raised to `max_pixels` while
    held, so that our header check is the one limit. A raise holds a lock until it is undone, so threads never
    restore each other's value (their opens wait); an open that needs no raise takes the lock only to read."""
    _PILLOW_GUARD.acquire()
    limit = Image.MAX_IMAGE_PIXELS  # read under the lock: never a value another open has raised
    if limit is None or max_pixels <= limit:
        _PILLOW_GUARD.release()
        yield
        return
    Image.MAX_IMAGE_PIXELS = max_pixels
    try:
        yield
    finally:
        Image.MAX_IMAGE_PIXELS = limit
        _PILLOW_GUARD.release()


def open_image(data: bytes, max_pixels: int) -> Image.Image:
    """Decode fully (so truncation shows here, not later); never allocate more than `max_pixels`."""
    if not data:
        raise Reject("empty-file")
    try:
        with pillow_limit(max_pixels), warnings.catch_warnings():
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


def decode_utf8(data: bytes) -> tuple[str, bool]:
    """(text, repaired): bytes that are not UTF-8 are decoded with U+FFFD replacements."""
    try:
        return data.decode("utf-8"), False
    except UnicodeDecodeError:
        return data.decode("utf-8", errors="replace"), True


def require_utf8(fields: dict[str, str]) -> None:
    """Reject `unencodable-text` naming the first field UTF-8 cannot encode (a lone surrogate, from a JSON
    `\\udcff` escape or a filename's undecodable bytes): one such value would fail its whole shard's write."""
    for name, value in fields.items():
        try:
            value.encode("utf-8")
        except UnicodeEncodeError as e:
            raise Reject("unencodable-text", f"{name} {value!r:.200}: {e.reason} at position {e.start}") from None


def normalise_caption(caption: str | bytes | None) -> tuple[str, bool]:
    """(caption, repaired): bytes that are not UTF-8 are decoded with U+FFFD replacements."""
    repaired = False
    if isinstance(caption, bytes):
        caption, repaired = decode_utf8(caption)
    if caption is None or not str(caption).strip():
        raise Reject("missing-caption")
    return " ".join(str(caption).split()), repaired
