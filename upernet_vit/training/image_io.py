"""Reading images (PNG, TIFF 8/16-bit or float, BMP, JPEG) and label maps (lossless files only), and
writing label PNGs."""
from __future__ import annotations

from typing import Tuple

import numpy as np
from PIL import Image

from ..fileio import atomic_write

IMAGE_SUFFIXES = (".png", ".tif", ".tiff", ".bmp", ".jpg", ".jpeg")
# compression changes pixel values: a 0/255 mask saved as JPEG holds every value in between
LOSSY_SUFFIXES = (".jpg", ".jpeg")


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
    """``[C, H, W]`` float32 pixel values as stored in the file (see :func:`read_image_and_kind`)."""
    return read_image_and_kind(path)[0]


def read_image_and_kind(path: str) -> Tuple[np.ndarray, bool]:
    """``([C, H, W] float32, integer)``: the pixel values as stored, whatever the file type (8-bit 200,
    16-bit 200 and float 200.0 all give 200.0; the intensity rule in :mod:`.intensity` maps them to the
    backbone's range), and whether the file holds integers. Float images must be finite: a NaN or
    infinite pixel is a ValueError naming the file. RGB stays in one file (C = 3); an alpha channel is
    dropped; palette images give their colours (1 channel if all gray); 1-bit images are 0/255."""
    img = _open(path)
    if img.mode == "P":
        img = img.convert("L" if _is_gray_palette(img) else "RGB")
    elif img.mode in ("RGBA", "CMYK", "YCbCr"):
        img = img.convert("RGB")
    elif img.mode in ("LA", "1"):
        img = img.convert("L")
    arr = np.asarray(img)
    integer = arr.dtype.kind in "iub"
    arr = arr.astype(np.float32)
    if not integer:
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
    return arr, integer


def read_label(path: str) -> np.ndarray:
    """``[H, W]`` int64 label values as stored (palette PNGs give their indices). A lossy file (JPEG) is
    a ValueError naming it: its values are not the labels that were saved."""
    if path.lower().endswith(LOSSY_SUFFIXES):
        raise ValueError(
            f"label file {path!r} is a JPEG, a lossy format: compression changes its values (a 0/255 mask "
            f"comes back with every value from 0 to 255), so its labels cannot be trusted; save the masks as "
            f"PNG or TIFF from the original label maps"
        )
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
