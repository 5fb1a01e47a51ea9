"""Medical volumes (NIfTI, ``.nii`` / ``.nii.gz``) read as stacks of 2-D slices and written back with
their geometry.

    file array [X, Y, Z] (+ affine, spacing)  ->  slices [S, H, W] along the slice axis  ->  2-D model
    predicted slices [S, H, W]                ->  file array [X, Y, Z], the input's affine and header, uint8

The slice axis is the one of largest spacing (a CT or MRI volume's through-plane axis, so that slices are
in-plane), or the one ``data.slice_axis`` names; ties go to the last axis. Geometry never changes: the
arrays keep the file's voxel order and a predicted mask is written with the input's affine, spacing,
origin and direction (its header's sform/qform).

Read through nibabel (the ``medical`` extra: ``pip install -e ".[medical]"`` in a checkout): pure Python, the
reference NIfTI implementation of the NiPy project, and light beside SimpleITK's binary wheels; NIfTI is
what nnU-Net raw datasets hold (``file_ending: .nii.gz``).
"""
from __future__ import annotations

import gzip
import os
from typing import Any, List, Optional, Tuple

import numpy as np

from ..fileio import atomic_write

VOLUME_SUFFIXES = (".nii.gz", ".nii")


def is_volume(path: str) -> bool:
    """Whether ``path`` names a NIfTI volume."""
    return path.lower().endswith(VOLUME_SUFFIXES)


def file_stem(name: str) -> str:
    """The name without its suffix, ``.nii.gz`` counted as one (``ct_0000.nii.gz`` -> ``ct_0000``)."""
    base = os.path.basename(name)
    for suffix in VOLUME_SUFFIXES:
        if base.lower().endswith(suffix):
            return base[: -len(suffix)]
    return os.path.splitext(base)[0]


def _nibabel() -> Any:
    try:
        import nibabel
    except ImportError:
        raise ModuleNotFoundError(
            'reading NIfTI volumes (.nii, .nii.gz) needs nibabel: pip install -e ".[medical]" in the checkout '
            "(or pip install nibabel)", name="nibabel",
        ) from None
    return nibabel


def read_volume(path: str) -> Tuple[np.ndarray, Any]:
    """``(array [X, Y, Z] float32 in the file's voxel order, the nibabel image)``. A ValueError names the
    file for a damaged or truncated file, a volume that is not 3-D (a 4-D file with one time point counts
    as 3-D), or NaN/infinite voxels."""
    nib = _nibabel()
    try:
        image = nib.load(path)
        array = np.asarray(image.dataobj, dtype=np.float32)
    except Exception as err:  # nibabel, gzip and zlib each raise their own types for a damaged file
        raise ValueError(f"cannot read volume {path!r} (damaged or truncated?): {err}") from err
    if array.ndim == 4 and array.shape[3] == 1:
        array = array[..., 0]
    if array.ndim != 3:
        raise ValueError(
            f"volume {path!r} has shape {array.shape}, not 3-D: give one 3-D file per channel (nnU-Net's "
            f"<case>_0000, <case>_0001, ...)"
        )
    bad = int(array.size - np.count_nonzero(np.isfinite(array)))
    if bad:
        raise ValueError(f"volume {path!r} has {bad} non-finite voxel value(s) (NaN or infinity); replace them")
    return array, image


def spacing(image: Any) -> Tuple[float, ...]:
    """The voxel spacing of a nibabel image, one value per axis (mm)."""
    return tuple(float(z) for z in image.header.get_zooms()[:3])


def volume_spacing(path: str) -> Tuple[float, ...]:
    """The voxel spacing of the volume file ``path`` (its header; nothing else is read)."""
    return spacing(_nibabel().load(path))


def slice_axis(zooms: Tuple[float, ...], configured: Optional[int] = None) -> int:
    """The axis slices are taken along: ``configured``, else the one of largest spacing (ties: the last)."""
    if configured is not None:
        return configured
    largest = max(zooms)
    return max(i for i, z in enumerate(zooms) if np.isclose(z, largest))


def volume_axis(path: str, configured: Optional[int] = None) -> int:
    """The slice axis of the volume file ``path`` (:func:`slice_axis` of its spacing)."""
    return slice_axis(spacing(_nibabel().load(path)), configured)


def to_slices(array: np.ndarray, axis: int) -> np.ndarray:
    """``[X, Y, Z]`` -> ``[S, H, W]`` with the slice axis first (a view)."""
    return np.moveaxis(array, axis, 0)


def read_volume_slices(path: str, axis: Optional[int] = None) -> Tuple[List[np.ndarray], bool, int]:
    """``([1, H, W] float32 per slice], whether the stored values are integers, the slice axis)``."""
    array, image = read_volume(path)
    chosen = slice_axis(spacing(image), axis)
    integer = np.issubdtype(image.get_data_dtype(), np.integer)
    return [s[None] for s in to_slices(array, chosen)], integer, chosen


def read_label_volume(path: str, axis: Optional[int] = None) -> np.ndarray:
    """A label volume as ``[S, H, W]`` int64 slices; values must be whole numbers."""
    array, _ = read_volume(path)
    if not np.array_equal(array, np.round(array)):
        raise ValueError(f"label volume {path!r} holds non-integer values: a label map holds class values")
    return to_slices(array, slice_axis(spacing(_nibabel().load(path)), axis)).astype(np.int64)


def check_same_geometry(image_path: str, label_path: str) -> None:
    """A ValueError when a label volume's shape or affine differ from its image's."""
    nib = _nibabel()
    a, b = nib.load(image_path), nib.load(label_path)
    if a.shape[:3] != b.shape[:3]:
        raise ValueError(f"label volume {label_path!r} has shape {b.shape[:3]} but its image {image_path!r} has "
                         f"{a.shape[:3]}; they must cover the same voxels")
    if not np.allclose(a.affine, b.affine, atol=1e-4):
        raise ValueError(f"label volume {label_path!r} has another affine (voxel-to-world geometry) than its image "
                         f"{image_path!r}: {np.round(b.affine, 4).tolist()} vs {np.round(a.affine, 4).tolist()}; "
                         f"resample the label onto the image")


def write_label_volume(path: str, labels: np.ndarray, axis: int, reference: str) -> None:
    """Write ``labels`` ``[S, H, W]`` (slices along ``axis``) as a uint8/uint16 volume with the geometry of
    the volume file ``reference`` (affine, spacing, origin, direction), atomically."""
    nib = _nibabel()
    ref = nib.load(reference)
    array = np.moveaxis(labels, 0, axis)
    dtype = np.uint8 if labels.size == 0 or labels.max() <= 255 else np.uint16
    header = ref.header.copy()
    header.set_data_dtype(dtype)
    out = nib.Nifti1Image(array.astype(dtype), ref.affine, header)
    out.set_sform(ref.get_sform(), code=int(ref.header["sform_code"]))
    out.set_qform(ref.get_qform(), code=int(ref.header["qform_code"]))
    data = out.to_bytes()  # one .nii file's bytes; gzipped for .nii.gz (nibabel picks by the name, which the
    if path.lower().endswith(".gz"):  # temporary file of the atomic write does not have)
        data = gzip.compress(data, compresslevel=6)

    def write(tmp: str) -> None:
        with open(tmp, "wb") as f:
            f.write(data)

    atomic_write(path, write)
