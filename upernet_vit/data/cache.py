"""The data cache: a dataset converted once into memory-mappable arrays, so that training memory does not
grow with the dataset.

    <cache root>/<dataset>-<fingerprint>/
        index.json             what the cache holds: the sources' fingerprint, the dataset's classes and
                               channels, and per case its id, source file, shape, full scale, pixel range and
                               pixels per class (what training needs without reading an image)
        000000.image.npy       [C, H, W] pixel values in their stored dtype (uint8 stays uint8, 1 byte a value)
        000000.label.npy       [H, W] int16 class indices (IGNORE_INDEX where ignored)
        (a volume: [S, C, H, W] and [S, H, W], and 000000.foreground.npy, a sample of its foreground voxels)

The first run reads every case through the dataset's loader (every data check runs then, once, naming the
file) and writes it here; later runs open the arrays as read-only memory maps (``np.load(mmap_mode="r")``)
and read a case's pixels only when a sample needs them. The pages are the kernel's page cache, shared by
DDP processes and DataLoader workers instead of copied into each (a copied float32 array per process was
8 bytes of memory per stored 8-bit value and more once workers touched it).

The fingerprint covers each source file's path, size and modification time, the config keys that change
what is read (format, labels) and this layout's version: an edited, added or removed file gives a new
cache, and the stale ones of the same dataset are removed. A cache is written into a temporary folder and
renamed into place whole, so a crash leaves no half cache, and two runs that build one at once keep one.
Where it lives: ``data.cache_dir``, or ``.upernet-vit-cache`` beside the run folder; never inside the
dataset (the trainer refuses that).
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
from typing import Any, Dict, List, Optional, Tuple

import numpy as np

from ..config import DataConfig
from ..fileio import read_json, write_text
from .datasets import IGNORE_INDEX, Case, DatasetInfo, load_folders, load_nnunet_raw
from .volumes import volume_stats

logger = logging.getLogger(__name__)

CACHE_VERSION = 2  # 2: volumes, with their statistics
INDEX_NAME = "index.json"
WRITTEN_BY = "upernet-vit data cache"
DEFAULT_CACHE_NAME = ".upernet-vit-cache"  # beside the run folder when data.cache_dir is not set


def source_files(cfg: DataConfig) -> List[str]:
    """Every file the dataset of ``cfg`` is read from (nnU-Net raw: dataset.json, imagesTr, labelsTr;
    folders: images, masks, and the section files of stack folders), sorted."""
    root = os.fspath(cfg.root)  # type: ignore[arg-type]
    folders = ("imagesTr", "labelsTr") if cfg.format == "nnunet" else ("images", "masks")
    files = [os.path.join(root, "dataset.json")] if cfg.format == "nnunet" else []
    for folder in folders:
        path = os.path.join(root, folder)
        if os.path.isdir(path):
            for n in sorted(os.listdir(path)):
                inner = os.path.join(path, n)
                files += ([os.path.join(inner, m) for m in sorted(os.listdir(inner))] if os.path.isdir(inner)
                          else [inner])
    return [f for f in files if os.path.isfile(f)]


def fingerprint(cfg: DataConfig) -> str:
    """A hash of what the cache of ``cfg``'s dataset depends on (module docstring)."""
    root = os.path.abspath(os.fspath(cfg.root))  # type: ignore[arg-type]
    stats = []
    for path in source_files(cfg):
        st = os.stat(path)
        stats.append([os.path.relpath(path, root), st.st_size, st.st_mtime_ns])
    what = {"version": CACHE_VERSION, "root": root, "format": cfg.format, "labels": cfg.labels,
            "slice_axis": cfg.slice_axis, "stacks": cfg.stacks, "files": stats}
    return hashlib.sha256(json.dumps(what, sort_keys=True).encode("utf-8")).hexdigest()[:16]


def _stored_dtype(image: np.ndarray) -> np.dtype:
    """The smallest dtype that holds ``image``'s values exactly: uint8, uint16 or int16 (a CT volume's
    Hounsfield units) for whole numbers in its range, else float32 (what the reader returned)."""
    if image.size and np.array_equal(image, np.round(image)):
        low, high = float(image.min()), float(image.max())
        for dtype in (np.uint8, np.uint16, np.int16):
            if np.iinfo(dtype).min <= low and high <= np.iinfo(dtype).max:
                return np.dtype(dtype)
    return np.dtype(np.float32)


class _Writer:
    """Writes each case the loader hands it into ``folder`` and returns the case reading from the map."""

    def __init__(self, folder: str, total: int) -> None:
        from tqdm.auto import tqdm

        self.folder, self.entries = folder, []  # type: ignore[var-annotated]
        self.bar = tqdm(total=total, desc="data cache", unit="case", leave=False)

    def __call__(self, case: Case) -> Case:
        stem = f"{len(self.entries):06d}"
        dtype = _stored_dtype(case.image)
        image_file, label_file = f"{stem}.image.npy", f"{stem}.label.npy"
        np.save(os.path.join(self.folder, image_file), case.image.astype(dtype))
        label = case.label if case.label is not None else np.full(case.image.shape[1:], IGNORE_INDEX)
        np.save(os.path.join(self.folder, label_file), label.astype(np.int16))
        counts = np.bincount(label[label >= 0].ravel(), minlength=1)
        entry = {"case_id": case.case_id, "source": case.source, "image": image_file, "label": label_file,
                 "full_scale": case.full_scale, "value_range": list(case.pixel_range()),
                 "class_pixels": [int(n) for n in counts]}
        if case.image.ndim == 4:  # a volume: what cutting it into slices needs, so no run reads it for that
            stats = dict(case.volume_stats or volume_stats(case.image, label, len(counts)))
            sample_file = f"{stem}.foreground.npy"
            np.save(os.path.join(self.folder, sample_file), np.asarray(stats.pop("foreground_sample")))
            entry["volume_stats"] = {**stats, "foreground_sample": sample_file}
        self.entries.append(entry)
        self.bar.update(1)
        return _open_case(self.folder, entry)

    def close(self) -> None:
        self.bar.close()


def _open_case(folder: str, entry: Dict[str, Any]) -> Case:
    """The case of an index ``entry``: image and label as read-only memory maps."""
    image = np.load(os.path.join(folder, entry["image"]), mmap_mode="r")
    label = np.load(os.path.join(folder, entry["label"]), mmap_mode="r")
    low, high = entry["value_range"]
    stats = entry.get("volume_stats")
    if stats is not None:  # the foreground sample's file (small: up to 10,000 values per channel)
        stats = {**stats, "foreground_sample": np.load(os.path.join(folder, stats["foreground_sample"]))}
    return Case(entry["case_id"], image, label, entry["full_scale"], entry["source"], (float(low), float(high)),
                list(entry["class_pixels"]), stats)


def _read_index(folder: str, key: str) -> Optional[Dict[str, Any]]:
    """The index of a complete cache for ``key`` in ``folder``; None when there is none (or another's)."""
    path = os.path.join(folder, INDEX_NAME)
    if not os.path.isfile(path):
        return None
    try:
        index = read_json(path)
    except ValueError:
        return None
    if not (isinstance(index, dict) and index.get("written_by") == WRITTEN_BY and index.get("fingerprint") == key):
        return None
    return index


def _remove_stale(cache_root: str, name: str, keep: str) -> None:
    """Remove the caches of the same dataset with another fingerprint (only folders this module wrote)."""
    for entry in os.listdir(cache_root):
        path = os.path.join(cache_root, entry)
        if entry != keep and entry.startswith(name + "-") and os.path.isdir(path):
            index = os.path.join(path, INDEX_NAME)
            try:
                ours = os.path.isfile(index) and read_json(index).get("written_by") == WRITTEN_BY
            except (ValueError, AttributeError):
                ours = False
            if ours:
                shutil.rmtree(path, ignore_errors=True)
                logger.info("data cache: removed %s (its sources changed)", path)


def cached_dataset(cfg: DataConfig, cache_root: str) -> Tuple[DatasetInfo, List[Case]]:
    """The dataset of ``cfg`` (``nnunet`` or ``folders``) as cases that read from the cache under
    ``cache_root``, which is built on first use and rebuilt when the sources change (module docstring)."""
    key = fingerprint(cfg)
    name = "".join(c if c.isalnum() or c in "-_." else "_" for c in os.path.basename(os.path.normpath(cfg.root)))
    folder = os.path.join(cache_root, f"{name}-{key}")
    index = _read_index(folder, key)
    if index is None:
        os.makedirs(cache_root, exist_ok=True)
        index = _build(cfg, folder, key)
        _remove_stale(cache_root, name, os.path.basename(folder))
    else:
        logger.info("data cache: %d cases from %s", len(index["cases"]), folder)
    info = DatasetInfo(**index["info"])
    return info, [_open_case(folder, entry) for entry in index["cases"]]


def _build(cfg: DataConfig, folder: str, key: str) -> Dict[str, Any]:
    """Convert the dataset into ``folder`` (via a temporary folder renamed into place) and return its index."""
    tmp = f"{folder}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    os.makedirs(tmp)
    total = len([f for f in source_files(cfg) if os.sep + ("labelsTr" if cfg.format == "nnunet" else "images")
                 + os.sep in f])
    writer = _Writer(tmp, total)
    try:
        if cfg.format == "nnunet":
            info, _ = load_nnunet_raw(cfg.root, store=writer, slice_axis=cfg.slice_axis,  # type: ignore[arg-type]
                                      stacks=cfg.stacks)
        else:
            info, _ = load_folders(cfg.root, cfg.labels, store=writer, slice_axis=cfg.slice_axis,  # type: ignore[arg-type]
                                   stacks=cfg.stacks)
        writer.close()
        index = {"written_by": WRITTEN_BY, "version": CACHE_VERSION, "fingerprint": key,
                 "info": {"name": info.name, "label_names": info.label_names, "label_values": info.label_values,
                          "num_channels": info.num_channels, "file_ending": info.file_ending,
                          "ignore_value": info.ignore_value, "channel_names": info.channel_names},
                 "cases": writer.entries}
        write_text(os.path.join(tmp, INDEX_NAME), json.dumps(index, indent=1))  # last: a cache without it is none
        try:
            os.rename(tmp, folder)
        except OSError:  # another run built the same cache meanwhile: keep that one
            if _read_index(folder, key) is None:
                raise
            shutil.rmtree(tmp, ignore_errors=True)
    except BaseException:
        writer.close()
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    logger.info("data cache: %d cases written to %s", len(index["cases"]), folder)
    return index
