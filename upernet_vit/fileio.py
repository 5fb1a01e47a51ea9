"""Crash-safe file writes: a reader (or a run resumed after a crash or power loss) sees the old file or the
new one, never half of one. Used by ``save_pretrained``, the trainer's run files and the ONNX export."""
from __future__ import annotations

import errno
import json
import os
import re
import uuid
from typing import Any, BinaryIO, Callable, Optional


def current_umask() -> int:
    """The process umask, read without changing it where the OS allows (Linux)."""
    try:
        with open("/proc/self/status", encoding="ascii") as f:
            for line in f:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except OSError:
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def fsync_path(path: str) -> None:
    """Flush a file's or a folder's contents (a folder: its entries, e.g. a rename) to disk."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def as_os_error(err: BaseException, path: str, scratch: str) -> Optional[OSError]:
    """``err`` as an OSError that names ``path``, when it is a disk error while writing ``scratch`` (the
    temporary file or folder that becomes ``path``): an OSError without a file name (a write through a file
    object) or naming something inside ``scratch`` (as its file or, for a copy, its destination
    ``filename2``), or a safetensors error carrying ``os error N``. None
    for anything else, which keeps its own message."""
    if isinstance(err, OSError):
        if err.errno is None:
            return None

        def within(name: object) -> bool:
            return os.fspath(name) == scratch or os.fspath(name).startswith(scratch + os.sep)  # type: ignore[arg-type]

        # shutil.copyfile names the source first and the destination second (filename2)
        inside = err.filename is None or within(err.filename) or (err.filename2 is not None and within(err.filename2))
        return OSError(err.errno, err.strerror, path) if inside else None
    match = re.search(r"os error (\d+)", str(err)) if "Safetensor" in type(err).__name__ else None
    if match:
        code = int(match.group(1))
        return OSError(code, os.strerror(code), path)
    return None


def atomic_write(path: str, write: Callable[[str], None]) -> None:
    """Call ``write(tmp_path)``, flush it to disk, then rename it over ``path``. On failure the temporary
    file is removed and a disk error (no space, read-only, ...) is an OSError naming ``path``."""
    folder = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(folder):
        raise OSError(errno.ENOENT, "the folder does not exist", folder)
    tmp = os.path.join(folder, f".{os.path.basename(path)}.tmp-{uuid.uuid4().hex[:8]}")
    try:
        write(tmp)
        os.chmod(tmp, 0o666 & ~current_umask())  # some writers (safetensors) create files 0600
        fsync_path(tmp)
        os.replace(tmp, path)
    except Exception as err:
        disk_error = as_os_error(err, path, tmp)
        if disk_error is not None:
            raise disk_error from err
        raise
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)
    fsync_path(folder)


class _WriteErrorRecorder:
    """A binary file's ``write`` and ``flush`` that keep the first OSError they raise (see ``save_torch``)."""

    def __init__(self, file: BinaryIO) -> None:
        self.file, self.error = file, None

    def write(self, data: bytes) -> int:
        try:
            return self.file.write(data)
        except OSError as err:
            self.error = self.error or err
            raise

    def flush(self) -> None:
        self.file.flush()


def save_torch(obj: object, path: str) -> None:
    """``torch.save(obj, path)``, where a disk error while writing (no space left, file too large for the
    file system) is raised as that OSError: torch's zip writer swallows it and reports only
    ``unexpected pos N vs M``."""
    import torch

    with open(path, "wb") as f:
        sink = _WriteErrorRecorder(f)
        try:
            torch.save(obj, sink)  # type: ignore[arg-type]
        except RuntimeError:
            if sink.error is not None:
                raise sink.error from None
            raise


def write_text(path: str, text: str) -> None:
    with open(path, "w", encoding="utf-8") as f:
        f.write(text)


def read_json(path: str) -> Any:
    """A JSON file's content; malformed JSON (or text that is not UTF-8) is a ValueError naming the file,
    the line and the column."""
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except json.JSONDecodeError as err:
        raise ValueError(f"{path} is not valid JSON: {err.msg} at line {err.lineno}, column {err.colno}") from None
    except UnicodeDecodeError as err:
        raise ValueError(f"{path} is not UTF-8 text (byte {err.start}): is it a JSON file?") from None
