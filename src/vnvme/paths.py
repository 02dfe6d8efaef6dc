"""The command line's output paths, checked before any work: each refusal is one line.

Every ``vnvme`` command that names a file or folder to write calls these, so that a path in a
missing folder or a directory named as a file is said the same way everywhere, and said before a
run that would otherwise lose its results (or, for a VM, before the guest boots).
"""

from __future__ import annotations

import os
from pathlib import Path


def output_directory(option: str, path: str | os.PathLike[str]) -> str:
    """The existing directory that ``path`` (a file to write) goes in; else ValueError."""
    directory = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(directory):
        raise ValueError(f"{option} {os.fspath(path)}: directory {directory} does not exist")
    return directory


def check_output_file(option: str, path: str | os.PathLike[str]) -> None:
    """Refuse a file to write (named by ``option``) that could not be: a directory there, a
    missing directory, no write permission. An existing file is fine: the user asked for it."""
    if os.path.isdir(path):
        raise ValueError(f"{option} {os.fspath(path)}: is a directory")
    directory = output_directory(option, path)
    if not os.access(path if os.path.exists(path) else directory, os.W_OK):
        raise ValueError(f"{option} {os.fspath(path)}: not writable")


def make_folder(option: str, path: str | os.PathLike[str]) -> None:
    """Create the folder ``option`` names, with its parents (``mkdir -p``); one line if it cannot
    be or cannot be written in. An existing folder is used as it is."""
    try:
        Path(path).mkdir(parents=True, exist_ok=True)
    except FileExistsError:  # exist_ok covers folders only
        raise ValueError(f"{option} {os.fspath(path)}: exists and is not a directory") from None
    except OSError as exc:
        raise ValueError(f"{option} {os.fspath(path)}: cannot create it: {exc.strerror or exc}") from None
    if not os.access(path, os.W_OK | os.X_OK):
        raise ValueError(f"{option} {os.fspath(path)}: not writable")


def write_output(option: str, path: str | os.PathLike[str], text: str) -> None:
    """Write ``text`` to the file ``option`` names (checked before the run, but its folder may
    have gone since); ValueError with one line if it cannot be written."""
    try:
        Path(path).write_text(text)
    except OSError as exc:
        raise ValueError(f"{option} {os.fspath(path)}: cannot write it: {exc.strerror or exc}") from None
