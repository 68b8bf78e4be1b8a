"""Image decoding and normalization shared by the device runner and the exporter's tests.

One implementation on both sides matters: the bundle's reference predictions (made on the
workstation) and the device's predictions must see identical pixels, so both call `preprocess`.
Numpy and pillow only: the device has no torch.
"""

from __future__ import annotations

import logging
import os
import stat
import warnings
from collections.abc import Sequence

import numpy as np
from PIL import Image, ImageOps

from vqt_edge.errors import UserError

log = logging.getLogger(__name__)

#: Images with more pixels than this are refused before decoding. A 100 MP RGB image already takes
#: 300 MB decoded, which is more than an edge device's whole training budget; anything larger is far
#: more likely a mistake or a decompression bomb than a photo worth downscaling to 224 px.
MAX_PIXELS = 100_000_000


class UnreadableImage(UserError):
    """An image file that cannot be decoded (missing, corrupt, truncated, unsupported, too big)."""

    def __init__(self, path: str | os.PathLike[str], reason: str) -> None:
        super().__init__(f"cannot read image {os.fspath(path)}: {reason}")
        self.path = os.fspath(path)
        self.reason = reason


class ImageTooLarge(UnreadableImage):
    """An image above `MAX_PIXELS`; a subclass so `drop_unreadable` skips it like any bad file."""


def load_rgb(path: str | os.PathLike[str], *, draft_size: int | None = None) -> Image.Image:
    """Decode `path` fully into an upright 8-bit RGB image.

    `draft_size` lets JPEGs decode at a reduced DCT scale (still >= draft_size px) for a quick
    validity check: the whole entropy-coded stream is still read, so truncation is still caught,
    but the pixels differ from a full decode, so never use it for images fed to the model.
    """
    try:
        mode = os.stat(path).st_mode
    except (OSError, ValueError):
        pass  # missing, NUL in the name, ...: Image.open below says what is wrong
    else:
        if not stat.S_ISREG(mode):  # a FIFO would block forever, /dev/zero never ends
            raise UnreadableImage(path, "not a regular file")
    try:
        # PIL warns at 89 MP, below our own cap; our cap is the one rule, so silence the warning.
        # PIL's hard error (at twice its limit, or lower if someone lowered it) becomes ours.
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            # Damaged EXIF only costs the orientation; do not warn about it every epoch.
            warnings.filterwarnings("ignore", "Corrupt EXIF data", UserWarning)
            with Image.open(os.fspath(path)) as img:
                width, height = img.size
                if width * height > MAX_PIXELS:
                    raise ImageTooLarge(path, f"{width}x{height} pixels is above the limit of {MAX_PIXELS:,}")
                if draft_size is not None:
                    img.draft("RGB", (draft_size, draft_size))
                img.load()
                return to_rgb(_upright(img))
    except Image.DecompressionBombError as e:
        raise ImageTooLarge(path, str(e)) from None
    except (UnreadableImage, MemoryError):
        raise
    except Exception as e:  # noqa: BLE001
        # Pillow's decoders raise many types on bad input (OSError, ValueError, SyntaxError,
        # EOFError, struct.error, ...). Inside this block every failure is about the file itself.
        raise UnreadableImage(path, f"{type(e).__name__}: {e}") from None


def _upright(img: Image.Image) -> Image.Image:
    """Apply EXIF orientation; a broken EXIF block must not cost us an otherwise good photo."""
    try:
        return ImageOps.exif_transpose(img)
    except Exception as e:  # noqa: BLE001
        log.debug("ignoring unusable EXIF orientation in %s: %s", getattr(img, "filename", "an image"), e)
        return img.copy()  # detached: the caller closes the file-backed original


def to_rgb(img: Image.Image) -> Image.Image:
    """Convert any pillow mode to 8-bit RGB.

    Transparency is composited over white (as Hugging Face image processors do), so a transparent
    pixel gets one defined colour instead of whatever the encoder left under it. High-depth
    grayscale (I;16, I, F) is rescaled to 0-255; pillow's own conversion would clip it.
    """
    if img.mode == "RGB":
        return img
    if img.mode.startswith("I") or img.mode == "F":
        return Image.fromarray(_to_uint8(img)).convert("RGB")
    if img.has_transparency_data:
        rgba = img.convert("RGBA")
        white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(white, rgba).convert("RGB")
    return img.convert("RGB")


def _to_uint8(img: Image.Image) -> np.ndarray:
    """Scale a high-depth grayscale image to uint8.

    16-bit modes use their nominal range (65535 -> 255), so a dim image stays dim. Modes I and F
    carry no nominal range: use the smallest usual one that holds the data ([0,1] for floats,
    [0,255], [0,65535]) and stretch min..max only when none does. Non-finite values become 0.
    """
    a = np.asarray(img, dtype=np.float32)
    a = np.where(np.isfinite(a), a, np.float32(0))
    lo, hi = (float(a.min()), float(a.max())) if a.size else (0.0, 0.0)
    if img.mode.startswith("I;16"):
        top = 65535.0
    else:
        ranges = ([1.0] if img.mode == "F" else []) + [255.0, 65535.0]
        top = next((r for r in ranges if lo >= 0 and hi <= r), 0.0)
        if not top:
            a, top = a - lo, (hi - lo if hi > lo else 1.0)
    return np.clip(np.rint(a * (255.0 / top)), 0, 255).astype(np.uint8)


def preprocess(img: Image.Image, image_size: int, mean: Sequence[float], std: Sequence[float]) -> np.ndarray:
    """Return float32 [3,S,S]: resize straight to SxS (bicubic), scale to [0,1], normalize.

    A plain squash without crop or aspect-ratio preservation is what the VTAB-1k pipelines of
    VPT/VQT use, so the paper's recipes transfer unchanged.
    """
    if image_size < 1:
        raise ValueError(f"image_size must be >= 1, got {image_size}")
    if len(mean) != 3 or len(std) != 3 or any(s == 0 for s in std):
        raise ValueError(f"need 3 means and 3 non-zero stds, got mean={mean}, std={std}")
    img = to_rgb(img).resize((image_size, image_size), Image.Resampling.BICUBIC)
    x = np.asarray(img, dtype=np.float32)  # [S,S,3], 0..255
    scale = 1.0 / (255.0 * np.asarray(std, dtype=np.float32))
    shift = np.asarray(mean, dtype=np.float32) / np.asarray(std, dtype=np.float32)
    return np.ascontiguousarray((x * scale - shift).transpose(2, 0, 1), dtype=np.float32)


def load_batch(
    paths: Sequence[str | os.PathLike[str]],
    image_size: int,
    mean: Sequence[float],
    std: Sequence[float],
) -> np.ndarray:
    """Decode and preprocess `paths` into one float32 [B,3,S,S] array.

    Raises `UnreadableImage` on the first bad file; run `device_runner.data.drop_unreadable`
    beforehand so training never stops half-way through an epoch.
    """
    out = np.empty((len(paths), 3, image_size, image_size), dtype=np.float32)
    for i, path in enumerate(paths):
        out[i] = preprocess(load_rgb(path), image_size, mean, std)
    return out
