"""What every harness shares: the input reader, the import paths, and the atheris entry point.

A harness is ``one_input(data: bytes) -> None``: it decodes ``data`` with :class:`Input`, drives
the code under test and asserts the oracle; any exception escaping it is a finding. Run as a
script (``python fuzz/harness_NAME.py [libFuzzer options] [corpus dirs]``) it is an atheris
fuzzer with the ``vnvme`` package instrumented for coverage; imported (pytest, the regression
tests), it is a plain function and atheris is not needed.
"""

from __future__ import annotations

import contextlib
import os
import sys
from collections.abc import Callable, Iterator, Sequence
from typing import TypeVar

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
for _path in (os.path.join(ROOT, "tests"), os.path.join(ROOT, "src")):
    if _path not in sys.path:
        sys.path.insert(0, _path)

T = TypeVar("T")


def _fuzzing() -> bool:
    """Whether a harness runs as the fuzzer's script (then vnvme is imported instrumented)."""
    main = sys.modules.get("__main__")
    name = os.path.basename(getattr(main, "__file__", None) or "")
    return name.startswith("harness_")


@contextlib.contextmanager
def instrumented() -> Iterator[None]:
    """Around a harness's imports: atheris instruments the ``vnvme`` modules imported inside."""
    if not _fuzzing():
        yield
        return
    import atheris

    # The host driver (tests drive the device through it) is not under test: uninstrumented.
    with atheris.instrument_imports(include=["vnvme"], exclude=["vnvme.driver"]):
        yield


def run(one_input: Callable[[bytes], None]) -> None:
    """The fuzzer's entry point: libFuzzer options and corpus directories from sys.argv."""
    import atheris

    atheris.Setup(sys.argv, one_input)
    atheris.Fuzz()


class Input:
    """Reads fuzzer bytes as numbers and choices; past the end every read is zero."""

    def __init__(self, data: bytes) -> None:
        self.data = data
        self.pos = 0

    def more(self) -> bool:
        return self.pos < len(self.data)

    def uint(self, nbytes: int) -> int:
        chunk = self.data[self.pos : self.pos + nbytes]
        self.pos += nbytes
        return int.from_bytes(chunk, "little")

    def u8(self) -> int:
        return self.uint(1)

    def u16(self) -> int:
        return self.uint(2)

    def u32(self) -> int:
        return self.uint(4)

    def u64(self) -> int:
        return self.uint(8)

    def below(self, n: int) -> int:
        return (self.u8() if n <= 256 else self.u16()) % n

    def flag(self) -> bool:
        return bool(self.u8() & 1)

    def pick(self, values: Sequence[T]) -> T:
        return values[self.below(len(values))]

    def bytes(self, n: int) -> bytes:
        chunk = self.data[self.pos : self.pos + n]
        self.pos += n
        return chunk
