"""Reading images and label maps (PNG, TIFF 8/16-bit, BMP, JPEG) and writing label PNGs."""
from __future__ import annotations

import numpy as np
from PIL import Image

from ..fileio import atomic_write

IMAGE_SUFFIXES = (".png", ".tif", ".tiff", ".bmp", ".jpg", ".jpeg")


def _open(path: str) -> Image.Image:
    try:
        img = Image.open(path)
        img.load()
        return img
    except Exception as err:
        raise ValueError(f"cannot read image file {path!r}: {err}") from err


def _is_gray_palette(img: Image.Image) -> bool:
    rgb = np.asarray(img.convert("RGB"))
    return bool((rgb[..., :1] == rgb).all())


def read_image(path: str) -> np.ndarray:
    """``[C, H, W]`` float32. Integer images are scaled to [0, 1]: 8-bit /255, 16-bit /65535, 32-bit
    integer (Pillow mode ``I``) /65535 when its values fit 16 bits, else /(2^31 - 1). Float images
    (mode ``F``) are kept as stored (use ``normalization: zscore`` for them) and must be finite: a NaN or
    infinite pixel is a ValueError naming the file. RGB stays in one file
    (C = 3); an alpha channel is dropped; palette images give their colours (1 channel if all gray)."""
    img = _open(path)
    if img.mode == "P":
        img = img.convert("L" if _is_gray_palette(img) else "RGB")
    elif img.mode in ("RGBA", "CMYK", "YCbCr"):
        img = img.convert("RGB")
    elif img.mode == "LA":
        img = img.convert("L")
    arr = np.asarray(img)
    if arr.dtype == np.uint8:
        arr = arr.astype(np.float32) / 255.0
    elif arr.dtype.kind == "u" and arr.dtype.itemsize == 2 or img.mode.startswith("I;16"):
        arr = arr.astype(np.float32) / 65535.0
    elif arr.dtype.kind in "iu":
        scale = 65535.0 if arr.size == 0 or (arr.min() >= 0 and arr.max() <= 65535) else float(2**31 - 1)
        arr = arr.astype(np.float32) / scale
    else:
        arr = arr.astype(np.float32)
        bad = int(arr.size - np.count_nonzero(np.isfinite(arr)))
        if bad:  # one NaN pixel makes every logit of the image NaN: refuse it here, naming the file
            raise ValueError(
                f"image file {path!r} has {bad} non-finite pixel value(s) (NaN or infinity) of {arr.size}; "
                f"replace them with finite values (e.g. 0 or the image minimum) and try again"
            )
    if arr.ndim == 2:
        arr = arr[None]
    else:
        arr = np.ascontiguousarray(arr.transpose(2, 0, 1))
    return arr


def read_label(path: str) -> np.ndarray:
    """``[H, W]`` int64 label values as stored (palette PNGs give their indices)."""
    img = _open(path)
    arr = np.asarray(img)
    if arr.ndim == 3 and img.mode in ("RGBA", "LA"):
        arr = arr[..., :-1]  # alpha is not a label
    if arr.ndim == 3:
        if not (arr[..., :1] == arr).all():
            raise ValueError(
                f"label file {path!r} has {arr.shape[2]} different channels; a label map must be one "
                f"channel of integer values (save it as 8- or 16-bit grayscale or palette PNG)"
            )
        arr = arr[..., 0]
    if np.issubdtype(arr.dtype, np.floating):
        if not np.all(np.equal(np.mod(arr, 1), 0)):
            raise ValueError(f"label file {path!r} holds non-integer values")
    return arr.astype(np.int64)


def write_label_png(path: str, label: np.ndarray) -> None:
    """Write ``[H, W]`` integer labels as 8-bit (values < 256) or 16-bit PNG, atomically."""
    label = np.asarray(label)
    if label.min() < 0 or label.max() > 65535:
        raise ValueError(f"label values must be in 0..65535 to write a PNG, got {label.min()}..{label.max()}")
    img = Image.fromarray(label.astype(np.uint8 if label.max() < 256 else np.uint16))
    atomic_write(path, lambda tmp: img.save(tmp, format="PNG"))
