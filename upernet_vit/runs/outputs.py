"""What a command may write: its own output, never a file the user gave it or one it did not create.

One rule for ``train``, ``predict``, ``evaluate`` and ``export`` (DESIGN.md, "The user's data is read, never
changed"), checked before anything is written:

- an output that is, contains or lies inside one of the command's inputs is refused
  (:func:`refuse_overlap`);
- an existing file is replaced only when it is the command's own earlier output, recognised by what the
  command writes into it (:func:`refuse_foreign_file`); a folder is written into only when it is new, empty
  or the command's own (a run folder's marker, a prediction folder's record);
- one process at a time writes an output folder (:class:`FolderLock`, an ``flock`` that ends with the
  process, so a lock file left by a killed process is free again).
"""
from __future__ import annotations

import os
from typing import Callable, Mapping, Optional


def _inside(path: str, folder: str) -> bool:
    return path.startswith(folder.rstrip(os.sep) + os.sep)


def refuse_overlap(output: str, inputs: Mapping[str, Optional[str]], output_name: str = "output",
                   why: str = "") -> None:
    """A ValueError when ``output`` (a file or folder) is, contains or lies inside one of ``inputs``
    (``{name: path}``, None entries skipped). ``output_name`` and the input names are what the message
    calls them; ``why`` says what would be lost."""
    out = os.path.realpath(output)
    for name, path in inputs.items():
        if path is None:
            continue
        inp = os.path.realpath(path)
        if out == inp:
            where = "is"
        elif _inside(inp, out):
            where = "contains"
        elif os.path.isdir(inp) and _inside(out, inp):
            where = "lies inside"
        else:
            continue
        raise ValueError(
            f"{output_name} {output!r} {where} the {name} {path!r}{why}; choose an output apart from the inputs"
        )


def refuse_foreign_file(path: str, is_ours: Callable[[str], bool], output_name: str, made_by: str) -> None:
    """A FileExistsError when ``path`` exists and ``is_ours(path)`` is false: the command never replaces a
    file it did not create (``made_by`` names what it writes, for the message)."""
    if os.path.lexists(path) and not (os.path.isfile(path) and is_ours(path)):
        kind = "a folder" if os.path.isdir(path) else "a file"
        raise FileExistsError(
            f"{output_name} {path!r} is {kind} that {made_by} did not write; it never replaces what it did not "
            f"create: choose a new name, or move that {kind[2:]} away first"
        )


class FolderLock:
    """An exclusive lock on an output folder (``folder/name``, ``flock``) for the life of the process that
    writes it, so that a second command into the same folder fails at once instead of racing for its files.
    The kernel releases it when the process ends, however it ends: a lock file left by a killed process is
    stale and taken over. A no-op where ``fcntl`` does not exist (Windows)."""

    def __init__(self, folder: str, name: str = ".lock", holder: str = "process", output_name: str = "output") -> None:
        self.path = os.path.join(folder, name)
        self._file = open(self.path, "a+", encoding="utf-8")
        try:
            import fcntl
        except ImportError:
            return
        try:
            fcntl.flock(self._file, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            self._file.seek(0)
            owner = self._file.read().strip() or "another process"
            self._file.close()
            raise FileExistsError(
                f"{folder} is in use by another {holder} ({owner}); wait for it to end, or choose another "
                f"{output_name}"
            ) from None
        self._file.seek(0)
        self._file.truncate()
        self._file.write(f"pid {os.getpid()}\n")
        self._file.flush()

    def release(self) -> None:
        self._file.close()

    def __enter__(self) -> "FolderLock":
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()
