"""Reading images (PNG, TIFF 8/16-bit or float, BMP, JPEG) and label maps (lossless files only) as a
viewer shows them, and writing label maps.

Two rules hold for every reader here:

- **Orientation.** A photo's EXIF Orientation tag (phones and cameras store pixels rotated and say so;
  TIFF's own tag 274 is the same) is applied, to images and masks alike, so pixels come back in the
  orientation a viewer shows; a predicted mask is written in that orientation, without a tag.
- **Pages.** A file with several pages or frames (a multi-page TIFF z-stack or time series, an animated
  PNG) is read whole by :func:`read_image_pages` / :func:`read_label_pages` (``[N, ...]``, page order),
  and refused by the one-image readers with an error that names the page count: never cut to page 1.
  A folder of one-page files is a stack too (``images/<stack>/<section>.png``, electron-microscopy sections
  saved one per file): its pages are its files in natural order (``s2`` before ``s10``), see
  :func:`section_files`.
"""
from __future__ import annotations

import os
import re
from typing import List, Optional, Sequence, Tuple

import numpy as np
from PIL import Image

from ..fileio import atomic_write
from .volume_io import is_volume, read_label_volume, read_volume_slices

IMAGE_SUFFIXES = (".png", ".tif", ".tiff", ".bmp", ".jpg", ".jpeg")
# compression changes pixel values: a 0/255 mask saved as JPEG holds every value in between
LOSSY_SUFFIXES = (".jpg", ".jpeg")
ORIENTATION_TAG = 0x0112  # EXIF Orientation (TIFF tag 274)
# EXIF orientation values 5-8 turn the image by 90 degrees: what is stored W x H is shown H x W
_ORIENTATION_NAMES = {2: "mirrored", 3: "rotated 180°", 4: "mirrored vertically", 5: "mirrored and rotated 90°",
                      6: "rotated 90° clockwise", 7: "mirrored and rotated 270°", 8: "rotated 90° counter-clockwise"}


def _open(path: str) -> Image.Image:
    try:
        return Image.open(path)
    except Exception as err:
        raise ValueError(f"cannot read image file {path!r}: {err}") from err


def exif_orientation(path: str) -> int:
    """The EXIF/TIFF orientation of ``path`` (1: stored as shown, no tag or an invalid one)."""
    with Image.open(path) as img:
        return _orientation(img)


def describe_orientation(path: str) -> str:
    """``"orientation tag 6 (rotated 90° clockwise)"`` or ``"no orientation tag"``, for messages."""
    value = exif_orientation(path)
    return f"orientation tag {value} ({_ORIENTATION_NAMES[value]})" if value != 1 else "no orientation tag"


def _orientation(img: Image.Image) -> int:
    """The orientation tag of ``img``'s current page (TIFF's own tag of that page, else EXIF's); 1 if none
    or invalid."""
    value = img.tag_v2.get(ORIENTATION_TAG) if hasattr(img, "tag_v2") else img.getexif().get(ORIENTATION_TAG)
    return value if isinstance(value, int) and 1 <= value <= 8 else 1


# what undoes each orientation: ImageOps.exif_transpose's table, applied per page by hand because
# exif_transpose reads the first page's (cached) EXIF for every page of a TIFF
_TRANSPOSE = {2: Image.Transpose.FLIP_LEFT_RIGHT, 3: Image.Transpose.ROTATE_180, 4: Image.Transpose.FLIP_TOP_BOTTOM,
              5: Image.Transpose.TRANSPOSE, 6: Image.Transpose.ROTATE_270, 7: Image.Transpose.TRANSVERSE,
              8: Image.Transpose.ROTATE_90}


def section_files(folder: str) -> List[str]:
    """The image files of a stack folder in natural order (the numbers in their names compared as numbers:
    ``s2.png`` before ``s10.png``). Two names of one position (``s1.png`` and ``s01.png``), a folder inside
    it, a volume, or no image at all is a ValueError naming the folder."""
    names = sorted(os.listdir(folder))
    inner = [n for n in names if os.path.isdir(os.path.join(folder, n))]
    if inner:
        raise ValueError(f"stack folder {folder!r} holds the folder {inner[0]!r}; a stack folder holds its "
                         f"sections as image files, one page each")
    if any(is_volume(n) for n in names):
        raise ValueError(f"stack folder {folder!r} holds a NIfTI volume; a volume is a stack already: put it "
                         f"beside the other cases, not in a folder")
    images = [n for n in names if n.lower().endswith(IMAGE_SUFFIXES)]
    if not images:
        raise ValueError(f"stack folder {folder!r} holds no image files ({', '.join(IMAGE_SUFFIXES)})")

    def position(name: str) -> Tuple:
        base = os.path.splitext(name)[0]
        return tuple(int(p) if p.isdigit() else p for p in re.split(r"(\d+)", base))

    keys = [position(n) for n in images]
    clash = next((n for i, n in enumerate(images) if keys.index(keys[i]) != i), None)
    if clash:
        raise ValueError(f"stack folder {folder!r}: {images[keys.index(position(clash))]!r} and {clash!r} take one "
                         f"place in the section order; rename one (e.g. zero-pad every number)")
    return [os.path.join(folder, n) for _, n in sorted(zip(keys, images))]


def _pages(path: str) -> List[Image.Image]:
    """Every page of ``path``, each turned as a viewer shows it (its orientation tag applied); a stack
    folder's pages are its section files'."""
    if os.path.isdir(path):
        pages = []
        for section in section_files(path):
            one = _pages(section)
            if len(one) > 1:
                raise ValueError(f"section file {section!r} of stack folder {path!r} has {len(one)} pages; a stack "
                                 f"folder's files are one page each")
            pages += one
        return pages
    with _open(path) as img:
        return _turned_pages(img, path)


def _turned_pages(img: Image.Image, path: str) -> List[Image.Image]:
    pages = []
    # a camera's MPO JPEG holds the photo, then previews or a gain map: one image
    for index in range(1 if img.format == "MPO" else getattr(img, "n_frames", 1)):
        try:
            img.seek(index)
            before = _orientation(img) if hasattr(img, "tag_v2") else 1
            if before >= 5:  # Pillow 13 applies a TIFF's tag itself on load, and garbles the pixels of these
                raise ValueError(
                    f"it is a TIFF with {describe_orientation(path)}, whose pixels Pillow does not read reliably; "
                    f"save it again as shown (turned, without the tag), or as PNG"
                )
            img.load()
            # a tag still there after load was not applied by Pillow (JPEG, PNG; TIFF with older Pillow)
            orientation = _orientation(img)
            pages.append(img.transpose(_TRANSPOSE[orientation]) if orientation != 1 else img.copy())
        except Exception as err:
            where = f"page {index + 1} of " if index else ""
            raise ValueError(f"cannot read {where}image file {path!r}: {err}") from err
    return pages  # copies: the file is closed


def _one_page(path: str, pages: Sequence[object], what: str) -> None:
    if len(pages) > 1:
        raise ValueError(
            f"{what} file {path!r} has {len(pages)} pages (a multi-page TIFF such as a z-stack or time series, or "
            f"an animated image); a training {what} is one 2D page. Save each page as a file of its own (e.g. "
            f"<case>_z00.tif, <case>_z01.tif, ...) with a mask each; predict reads a multi-page file page by "
            f"page and writes a multi-page mask"
        )


def _is_gray_palette(img: Image.Image) -> bool:
    rgb = np.asarray(img.convert("RGB"))
    return bool((rgb[..., :1] == rgb).all())


def read_image(path: str) -> np.ndarray:
    """``[C, H, W]`` float32 pixel values as stored in the file (see :func:`read_image_and_kind`)."""
    return read_image_and_kind(path)[0]


def read_image_and_kind(path: str) -> Tuple[np.ndarray, bool]:
    """``([C, H, W] float32, integer)`` of a one-page image file (:func:`read_image_pages`; a file of
    several pages is a ValueError naming its page count)."""
    pages, integer = read_image_pages(path)
    _one_page(path, pages, "image")
    return pages[0], integer


def read_image_pages(path: str, slice_axis: Optional[int] = None) -> Tuple[List[np.ndarray], bool]:
    """``([[C, H, W] float32 per page], integer)``: the pixel values as stored, whatever the file type
    (8-bit 200, 16-bit 200 and float 200.0 all give 200.0; the intensity rule in :mod:`.intensity` maps
    them to the backbone's range), each page as a viewer shows it, and whether the file holds integers.
    Float images must be finite: a NaN or infinite pixel is a ValueError naming the file. RGB stays in one
    file (C = 3); an alpha channel is dropped; palette images give their colours (1 channel if all gray);
    1-bit images are 0/255. The pages of one file must agree in size and channels. A NIfTI volume's pages
    are its slices along ``slice_axis`` (default: the axis of largest spacing; :mod:`.volume_io`)."""
    if is_volume(path):
        slices, integer, _ = read_volume_slices(path, slice_axis)
        return slices, integer
    arrays, kinds = [], set()
    for img in _pages(path):
        if img.mode == "P":
            img = img.convert("L" if _is_gray_palette(img) else "RGB")
        elif img.mode in ("RGBA", "CMYK", "YCbCr"):
            img = img.convert("RGB")
        elif img.mode in ("LA", "1"):
            img = img.convert("L")
        arr = np.asarray(img)
        kinds.add(arr.dtype.kind in "iub")
        arr = arr.astype(np.float32)
        arrays.append(arr[None] if arr.ndim == 2 else np.ascontiguousarray(arr.transpose(2, 0, 1)))
    integer = kinds == {True}
    if not integer:
        bad = sum(int(a.size - np.count_nonzero(np.isfinite(a))) for a in arrays)
        if bad:  # one NaN pixel makes every logit of the image NaN: refuse it here, naming the file
            raise ValueError(
                f"image file {path!r} has {bad} non-finite pixel value(s) (NaN or infinity) of "
                f"{sum(a.size for a in arrays)}; replace them with finite values (e.g. 0 or the image minimum) "
                f"and try again"
            )
    if len({a.shape for a in arrays}) > 1:
        raise ValueError(
            f"image file {path!r} has pages of different sizes or channels {sorted({a.shape for a in arrays})}; "
            f"a stack's pages must match"
        )
    return arrays, integer


def read_label(path: str) -> np.ndarray:
    """``[H, W]`` int64 label values of a one-page label file (:func:`read_label_pages`; a file of
    several pages is a ValueError naming its page count)."""
    pages = read_label_pages(path)
    _one_page(path, pages, "label")
    return pages[0]


def read_label_pages(path: str) -> np.ndarray:
    """``[N, H, W]`` int64 label values as stored (palette PNGs give their indices), page by page, each as
    a viewer shows it. A lossy file (JPEG) is a ValueError naming it: its values are not the labels that
    were saved. A NIfTI label volume gives its slices along the axis of largest spacing."""
    if is_volume(path):
        return read_label_volume(path)
    lossy = [f for f in (section_files(path) if os.path.isdir(path) else [path]) if f.lower().endswith(LOSSY_SUFFIXES)]
    if lossy:
        path = lossy[0]
        raise ValueError(
            f"label file {path!r} is a JPEG, a lossy format: compression changes its values (a 0/255 mask "
            f"comes back with every value from 0 to 255), so its labels cannot be trusted; save the masks as "
            f"PNG or TIFF from the original label maps"
        )
    pages = []
    for img in _pages(path):
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
        pages.append(arr.astype(np.int64))
    if len({a.shape for a in pages}) > 1:
        raise ValueError(f"label file {path!r} has pages of different sizes {sorted({a.shape for a in pages})}")
    return np.stack(pages)


def _label_dtype(label: np.ndarray) -> type:
    """uint8 for values < 256, uint16 up to 65535; a ValueError outside 0..65535."""
    if label.min() < 0 or label.max() > 65535:
        raise ValueError(f"label values must be in 0..65535 to write a PNG or TIFF, got {label.min()}..{label.max()}")
    return np.uint8 if label.max() < 256 else np.uint16


def write_label_png(path: str, label: np.ndarray) -> None:
    """Write ``[H, W]`` integer labels as 8-bit (values < 256) or 16-bit PNG, atomically."""
    label = np.asarray(label)
    img = Image.fromarray(label.astype(_label_dtype(label)))
    atomic_write(path, lambda tmp: img.save(tmp, format="PNG"))


def write_label_stack(path: str, labels: np.ndarray) -> None:
    """Write ``[N, H, W]`` integer labels as an N-page TIFF (8-bit, or 16-bit for values >= 256; one dtype
    for all pages), pages in order, deflate-compressed (lossless), atomically."""
    labels = np.asarray(labels)
    dtype = _label_dtype(labels)
    pages = [Image.fromarray(page.astype(dtype)) for page in labels]
    atomic_write(path, lambda tmp: pages[0].save(tmp, format="TIFF", save_all=True, append_images=pages[1:],
                                                 compression="tiff_deflate"))
