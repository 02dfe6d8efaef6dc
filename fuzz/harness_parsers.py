#!/usr/bin/env python3
"""The user's command line and config file: ``--namespace`` (parse_namespace_spec), ``--fault``
(parse_fault_rule) and ``--config`` (serve._load_config).

The first byte picks the parser (and an NSID), the rest is the text, decoded as Python decodes
argv (UTF-8, undecodable bytes as surrogates); a TOML file gets the bytes as they are. Each
input runs in a fresh temporary directory as its cwd, holding a writable ``disk.img``, a
read-only ``ro.img``, an empty ``empty.img`` and a directory ``dir``.

Oracle: a parser returns or raises ValueError (one clear line for the user), nothing else;
a refused spec leaves the directory exactly as it was; an accepted one changes nothing but
creating the file it names or growing one with ``grow`` (the old bytes stay as they were).
Texts with a ``/`` are not run: a path outside the temporary directory could be a real file.
"""

from __future__ import annotations

import hashlib
import os
import tempfile

from _engine import Input, instrumented, run

with instrumented():
    from vnvme.controller.faults import parse_fault_rule
    from vnvme.controller.namespace import Namespace, parse_namespace_spec
    from vnvme.serve import _load_config

FIXTURES = {
    "disk.img": (b"vnvme-fuzz" * 1000, 0o600),
    "ro.img": (b"read-only" * 57, 0o444),
    "empty.img": (b"", 0o600),
}
NSIDS = [1, 2, 1, 1, 0, 0xFFFF_FFFF, 0xFFFF_FFFE]
_cwd = os.getcwd()


def _snapshot(directory: str) -> dict[str, tuple[int, int, bytes]]:
    """Every entry: (mode, size, digest of its first 64 KiB: a created file may be huge and sparse)."""
    state = {}
    for entry in os.scandir(directory):
        st = entry.stat(follow_symlinks=False)
        digest = b""
        if entry.is_file(follow_symlinks=False):
            with open(entry.path, "rb") as f:
                digest = hashlib.sha256(f.read(1 << 16)).digest()
        state[entry.name] = (st.st_mode, st.st_size, digest)
    return state


def _prefix_kept(path: str, old: bytes) -> bool:
    with open(path, "rb") as f:
        return f.read(len(old)) == old


def one_input(data: bytes) -> None:
    inp = Input(data)
    choice = inp.u8()
    which = choice % 3
    raw = data[1:]
    text = raw.decode("utf-8", "surrogateescape")
    if "/" in text and which != 2:
        return
    with tempfile.TemporaryDirectory(prefix="vnvme-fuzz-") as directory:
        for name, (content, mode) in FIXTURES.items():
            path = os.path.join(directory, name)
            with open(path, "wb") as f:
                f.write(content)
            os.chmod(path, mode)
        os.mkdir(os.path.join(directory, "dir"))
        if which == 2:
            with open(os.path.join(directory, "vnvme.toml"), "wb") as f:
                f.write(raw)
        before = _snapshot(directory)
        os.chdir(directory)
        namespace: Namespace | None = None
        try:
            if which == 0:
                namespace = parse_namespace_spec(text, NSIDS[(choice // 3) % len(NSIDS)])
            elif which == 1:
                parse_fault_rule(text)
            else:
                _load_config("vnvme.toml")
        except ValueError:
            assert _snapshot(directory) == before, "a refused spec changed the directory"
            return
        finally:
            os.chdir(_cwd)
            if namespace is not None:
                namespace.backend.close()
        after = _snapshot(directory)
        for name, state in after.items():
            if before.get(name) == state:
                continue
            path = os.path.join(directory, name)
            named = os.path.join(directory, getattr(namespace.backend, "path", "")) if namespace else None
            assert named is not None and os.path.samefile(path, named), name
            if name in before:  # only grown, with its bytes kept
                assert state[0] == before[name][0] and state[1] > before[name][1], (name, before[name], state)
                assert _prefix_kept(path, FIXTURES[name][0]), name
        assert set(before) <= set(after), "a file was removed"


if __name__ == "__main__":
    run(one_input)
