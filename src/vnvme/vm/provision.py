"""Provision the guest tool chain, cached and resumable.

Everything lives in one cache folder (``$VNVME_VM_CACHE``, default ``~/.cache/vnvme/vm``):

- ``trixie/``: a ``debootstrap --variant=minbase trixie`` root with ``qemu-system-x86`` from
  trixie-backports (11.x: the first Debian QEMU with ``vfio-user-pci``), fio, nvme-cli and
  busybox-static. Debian 12's own QEMU (7.2) has no vfio-user client.
- ``trixie/opt/vnvme/kernel-<name>/``: a Debian kernel package unpacked with ``dpkg -x`` (never
  installed), downloaded by apt inside the root with a list of its own (``6.1`` from bookworm,
  ``6.12`` from trixie).
- ``trixie/opt/vnvme/initrd-<name>.cpio.gz``: busybox, fio and nvme-cli with the shared
  libraries they link, the nvme modules and their dependencies, and ``/init``.

Each step leaves a stamp file when it has finished; a step without its stamp is redone from its
start, so an interrupted provisioning resumes where it stopped. Commands inside the root run in
a private mount namespace (``unshare --mount``): the bind mounts of /dev, /proc and /sys vanish
with the process, whatever happens to it.
"""

from __future__ import annotations

import contextlib
import gzip
import hashlib
import lzma
import os
import re
import shlex
import shutil
import subprocess
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

from vnvme.vm.cpio import CpioWriter

MIRROR = "http://deb.debian.org/debian"
SECURITY_MIRROR = "http://deb.debian.org/debian-security"
#: Packages inside the root. QEMU comes from trixie-backports (``-t``); the others from trixie.
QEMU_PACKAGES = ("qemu-system-x86", "qemu-system-data", "seabios")
GUEST_TOOLS = ("fio", "nvme-cli", "busybox-static")
#: Guest kernels: name -> (suite its package comes from, apt sources for that suite).
KERNELS = {
    "6.1": "bookworm",
    "6.12": "trixie",
}
DEFAULT_KERNEL = "6.1"
#: Modules the guest loads, with whatever modules.dep says they need.
GUEST_MODULES = ("nvme",)
#: Programs copied into the initramfs, with the libraries ``ldd`` names.
GUEST_PROGRAMS = ("/usr/bin/fio", "/usr/sbin/nvme")
_PATH = "PATH=/usr/sbin:/usr/bin:/sbin:/bin"
#: What the cache takes on disk with both kernels (measured), for the progress line.
CACHE_SIZE = "1.2 GB"


#: Written at the cache's top before the first build: what lies beside it is vnvme's to replace.
CACHE_MARK = ".vnvme-cache"


class ProvisionError(RuntimeError):
    """Provisioning could not finish; the message says which step and why."""


def cache_dir() -> Path:
    return Path(os.environ.get("VNVME_VM_CACHE", Path.home() / ".cache" / "vnvme" / "vm"))


@dataclass(frozen=True)
class Image:
    """What a guest boot needs, as paths on the host and inside the root."""

    root: Path
    kernel_name: str
    kernel_version: str
    #: Inside the root (QEMU runs there).
    vmlinuz: str
    initrd: str
    qemu_version: str

    def host_path(self, inner: str) -> Path:
        return self.root / inner.lstrip("/")


def rooted(root: Path, argv: Sequence[str], binds: Iterable[Path | str] = ()) -> list[str]:
    """A command line that runs ``argv`` in ``root`` with /dev, /proc, /sys and ``binds`` mounted.

    The mounts live in a private mount namespace, so they disappear with the process. ``unshare``,
    ``sh`` and ``chroot`` all exec, so the process started is, in the end, ``argv[0]`` itself.
    """
    lines = ["set -e"]
    for inner in ("/dev", "/proc", "/sys", *map(str, binds)):
        target = shlex.quote(f"{root}{inner}")
        lines.append(f"mkdir -p {target} && mount --rbind {shlex.quote(inner)} {target}")
    lines.append(f'exec chroot {shlex.quote(str(root))} /usr/bin/env -i {_PATH} HOME=/root LANG=C.UTF-8 "$@"')
    script = "\n".join(lines)
    return ["unshare", "--mount", "--propagation", "private", "--", "sh", "-c", script, "vnvme-vm", *argv]


@contextlib.contextmanager
def mount_points(root: Path, binds: Iterable[Path | str]) -> Iterator[None]:
    """The folders in ``root`` that :func:`rooted` mounts ``binds`` on, for as long as the block runs.

    The mounts vanish with their namespace but a folder made for one would stay in the cache, one
    per run: those made here are removed afterwards (only while empty: rmdir, never a tree).
    """
    made: list[Path] = []
    try:
        for inner in binds:
            missing: list[Path] = []
            target = root / str(inner).lstrip("/")
            while not target.exists():
                missing.append(target)
                target = target.parent
            for folder in reversed(missing):
                folder.mkdir()
                made.append(folder)
        yield
    finally:
        for folder in reversed(made):
            with contextlib.suppress(OSError):
                folder.rmdir()


def _run(
    argv: Sequence[str],
    *,
    timeout: float,
    what: str,
    env: dict[str, str] | None = None,
    capture: bool = False,
) -> str:
    try:
        done = subprocess.run(
            argv,
            timeout=timeout,
            env=env,
            stdout=subprocess.PIPE if capture else subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            text=True,
        )
    except subprocess.TimeoutExpired:
        raise ProvisionError(f"{what}: no result after {timeout:.0f} s") from None
    except FileNotFoundError as exc:
        raise ProvisionError(f"{what}: {exc}") from None
    if done.returncode != 0:
        tail = "\n".join(done.stderr.strip().splitlines()[-15:])
        raise ProvisionError(f"{what} failed (exit {done.returncode}):\n{tail}")
    return done.stdout if capture else ""


class Provisioner:
    """Builds the cache step by step; :meth:`image` runs whatever step is missing."""

    def __init__(
        self,
        cache: Path | None = None,
        *,
        mirror: str = MIRROR,
        say: Callable[[str], None] = print,
    ) -> None:
        self.cache = cache or cache_dir()
        self.root = self.cache / "trixie"
        self.mirror = mirror
        self.say = say

    # -- helpers

    def _in_root(self, argv: Sequence[str], *, timeout: float, what: str, capture: bool = False) -> str:
        # rooted() starts from an empty environment; apt must not ask questions
        command = rooted(self.root, ["env", "DEBIAN_FRONTEND=noninteractive", *argv])
        return _run(command, timeout=timeout, what=what, capture=capture)

    def _made_here(self, path: Path) -> bool:
        """Whether ``path`` (the root or its partial build) is this cache's own: the cache holds
        the mark written before a build, or the root carries the stamps' folder (caches made
        before the mark existed)."""
        return (self.cache / CACHE_MARK).exists() or (path / "opt" / "vnvme").is_dir()

    def _stamp(self, name: str) -> Path:
        return self.root / "opt" / "vnvme" / f".done-{name}"

    def _step(self, name: str, key: str, body: Callable[[], None]) -> None:
        """Run ``body`` unless its stamp holds ``key`` (what the step was built from)."""
        stamp = self._stamp(name)
        if stamp.exists() and stamp.read_text() == key:
            return
        started = time.monotonic()
        self.say(f"[vm] {name} ...")
        body()
        stamp.parent.mkdir(parents=True, exist_ok=True)
        stamp.write_text(key)
        self.say(f"[vm] {name}: {time.monotonic() - started:.0f} s")

    # -- steps

    def _host_tools(self) -> None:
        missing = [tool for tool in ("debootstrap", "unshare", "chroot") if shutil.which(tool) is None]
        if not missing:
            return
        if missing != ["debootstrap"]:
            raise ProvisionError(f"missing host commands: {', '.join(missing)} (util-linux, coreutils)")
        self.say("[vm] installing debootstrap on the host ...")
        env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
        install = ["apt-get", "install", "-y", "-q", "--no-install-recommends", "debootstrap"]
        try:
            _run(install, timeout=600, what="apt-get install debootstrap", env=env)
        except ProvisionError:
            _run(["apt-get", "update", "-q"], timeout=600, what="apt-get update (host)", env=env)
            _run(install, timeout=600, what="apt-get install debootstrap", env=env)

    def _bootstrap(self) -> None:
        ready = (self.root / "usr" / "bin" / "apt-get").exists() and self._stamp("debootstrap").exists()
        if ready:
            return
        partial = self.cache / "trixie.partial"
        for leftover in (partial, self.root):
            # --cache may name a folder of the user's: remove only what this class made.
            if leftover.exists() and not self._made_here(leftover):
                raise ProvisionError(f"{leftover} was not made by vnvme; leaving it (choose another --cache)")
        self._host_tools()
        shutil.rmtree(partial, ignore_errors=True)
        shutil.rmtree(self.root, ignore_errors=True)
        partial.parent.mkdir(parents=True, exist_ok=True)
        (self.cache / CACHE_MARK).write_text("vnvme guest cache\n")
        started = time.monotonic()
        self.say(f"[vm] debootstrap trixie into {self.root} ...")
        _run(
            ["debootstrap", "--variant=minbase", "trixie", str(partial), self.mirror],
            timeout=1200,
            what=f"debootstrap trixie from {self.mirror}",
        )
        partial.rename(self.root)
        self._stamp("debootstrap").parent.mkdir(parents=True, exist_ok=True)
        self._stamp("debootstrap").write_text("trixie")
        self.say(f"[vm] debootstrap: {time.monotonic() - started:.0f} s")

    def _sources(self) -> None:
        apt = self.root / "etc" / "apt"
        (apt / "sources.list").write_text(
            f"deb {self.mirror} trixie main\n"
            f"deb {self.mirror} trixie-updates main\n"
            f"deb {self.mirror} trixie-backports main\n"
            f"deb {SECURITY_MIRROR} trixie-security main\n"
        )
        # debootstrap may also write a deb822 file for the same suite
        (apt / "sources.list.d" / "debian.sources").unlink(missing_ok=True)
        (apt / "sources.list.bookworm").write_text(
            f"deb {self.mirror} bookworm main\ndeb {SECURITY_MIRROR} bookworm-security main\n"
        )

    def _packages(self) -> None:
        self._sources()
        self._in_root(["apt-get", "update", "-q"], timeout=600, what="apt-get update (trixie root)")
        self._in_root(
            [
                "apt-get",
                "install",
                "-y",
                "-q",
                "--no-install-recommends",
                "-t",
                "trixie-backports",
                *QEMU_PACKAGES,
            ],
            timeout=1200,
            what="apt-get install QEMU from trixie-backports",
        )
        self._in_root(
            ["apt-get", "install", "-y", "-q", "--no-install-recommends", *GUEST_TOOLS],
            timeout=1200,
            what="apt-get install " + " ".join(GUEST_TOOLS),
        )
        self._in_root(["apt-get", "clean"], timeout=120, what="apt-get clean")

    def _apt_for(self, suite: str) -> list[str]:
        if suite == "trixie":
            return ["apt-get"]
        return [
            "apt-get",
            "-o",
            f"Dir::Etc::SourceList=/etc/apt/sources.list.{suite}",
            "-o",
            "Dir::Etc::SourceParts=-",
            "-o",
            f"Dir::State::Lists=/var/lib/apt/lists-{suite}",
        ]

    def _kernel(self, name: str) -> None:
        suite = KERNELS[name]
        apt = self._apt_for(suite)
        if suite != "trixie":
            (self.root / "var" / "lib" / "apt" / f"lists-{suite}" / "partial").mkdir(
                parents=True, exist_ok=True
            )
            self._in_root(
                [*apt, "update", "-q"], timeout=600, what=f"apt-get update ({suite}, for the kernel)"
            )
        depends = self._in_root(
            ["apt-cache", *apt[1:], "depends", "linux-image-amd64"],
            timeout=120,
            what="apt-cache depends",
            capture=True,
        )
        match = re.search(r"Depends: (linux-image-[0-9][^\s]*-amd64)\b", depends)
        if match is None:
            raise ProvisionError(
                f"no versioned kernel package behind linux-image-amd64 in {suite}:\n{depends}"
            )
        package = match.group(1)
        download = "/var/cache/vnvme-kernel"
        target = f"/opt/vnvme/kernel-{name}"
        shutil.rmtree(self.root / download.lstrip("/"), ignore_errors=True)
        shutil.rmtree(self.root / target.lstrip("/"), ignore_errors=True)
        (self.root / download.lstrip("/")).mkdir(parents=True)
        self._in_root(
            ["sh", "-c", f"cd {download} && {shlex.join(apt)} download -q {package}"],
            timeout=900,
            what=f"apt-get download {package}",
        )
        debs = sorted((self.root / download.lstrip("/")).glob("*.deb"))
        if len(debs) != 1:
            raise ProvisionError(f"apt-get download {package} left {len(debs)} packages")
        self._in_root(
            ["dpkg", "-x", f"{download}/{debs[0].name}", target], timeout=300, what=f"dpkg -x {package}"
        )
        shutil.rmtree(self.root / download.lstrip("/"), ignore_errors=True)

    def _module_trees(self, name: str) -> Path:
        """The folder that holds ``<version>/kernel/...``: lib/modules, or usr/lib/modules
        (trixie's packages, merged /usr)."""
        kernel_root = self.root / "opt" / "vnvme" / f"kernel-{name}"
        for inner in ("lib/modules", "usr/lib/modules"):
            if (kernel_root / inner).is_dir():
                return kernel_root / inner
        raise ProvisionError(f"kernel {name}: no lib/modules or usr/lib/modules under {kernel_root}")

    def _kernel_version(self, name: str) -> str:
        modules = self._module_trees(name)
        versions = sorted(p.name for p in modules.iterdir())
        if len(versions) != 1:
            raise ProvisionError(f"kernel {name}: expected one module tree under {modules}, found {versions}")
        return versions[0]

    def _libraries(self, program: str) -> list[str]:
        """Files ``program`` needs to run, as ``ldd`` in the root resolves them."""
        out = self._in_root(["ldd", program], timeout=60, what=f"ldd {program}", capture=True)
        paths = []
        for line in out.splitlines():
            match = re.search(r"(/\S+) \(0x", line)
            if match:
                paths.append(match.group(1))
            elif "not found" in line:
                raise ProvisionError(f"ldd {program}: {line.strip()}")
        return paths

    def _initrd(self, name: str) -> None:
        version = self._kernel_version(name)
        order = module_load_order(self._module_trees(name) / version, GUEST_MODULES)
        out = self.root / "opt" / "vnvme" / f"initrd-{name}.cpio.gz"
        partial = out.with_suffix(".partial")
        with (
            open(partial, "wb") as raw,
            gzip.GzipFile(fileobj=raw, mode="wb", mtime=0, compresslevel=6) as gz,
        ):
            archive = CpioWriter(gz)
            for directory in ("dev", "proc", "sys", "tmp", "run", "mnt", "bin", "sbin", "etc", "lib/modules"):
                archive.directory(directory)
            archive.file("init", guest_init_script().encode(), mode=0o755)
            archive.file("bin/busybox", (self.root / "usr/bin/busybox").read_bytes(), mode=0o755)
            archive.file("etc/passwd", b"root:x:0:0:root:/:/bin/sh\n")
            archive.file("etc/group", b"root:x:0:\n")
            copied: set[str] = set()
            for program in GUEST_PROGRAMS:
                for path in [program, *self._libraries(program)]:
                    if path in copied:
                        continue
                    copied.add(path)
                    source = self.root / path.lstrip("/")
                    archive.file(path.lstrip("/"), source.read_bytes(), mode=0o755)
            names = []
            for module in order:
                base = module_key(module.name) + ".ko"
                archive.file(f"lib/modules/{base}", read_module(module))
                names.append(base)
            archive.file("lib/modules/load-order", ("\n".join(names) + "\n").encode())
            archive.file("etc/vnvme-kernel", f"{version}\n".encode())
            archive.close()
        partial.rename(out)

    def image(self, kernel: str = DEFAULT_KERNEL) -> Image:
        """Provision what is missing (cached) and describe the result."""
        if kernel not in KERNELS:
            raise ProvisionError(f"unknown kernel {kernel!r}: choose from {', '.join(KERNELS)}")
        if os.geteuid() != 0:
            raise ProvisionError("provisioning and booting need root (debootstrap, chroot, mount namespaces)")
        started = time.monotonic()
        self.say(
            f"[vm] guest cache {self.cache}, kernel {kernel}: provisioning what is missing "
            f"(root, Debian's archive; about {CACHE_SIZE} and minutes the first time) ..."
        )
        self._bootstrap()
        self._step("packages", " ".join(QEMU_PACKAGES + GUEST_TOOLS), self._packages)
        self._step(f"kernel-{kernel}", KERNELS[kernel], lambda: self._kernel(kernel))
        init_key = hashlib.sha256(guest_init_script().encode()).hexdigest()
        self._step(
            f"initrd-{kernel}", f"{self._kernel_version(kernel)} {init_key}", lambda: self._initrd(kernel)
        )
        version = self._kernel_version(kernel)
        qemu = self._in_root(
            ["qemu-system-x86_64", "--version"], timeout=60, what="qemu-system-x86_64 --version", capture=True
        )
        qemu_version = qemu.splitlines()[0].strip() if qemu else "?"
        self.say(
            f"[vm] guest cache ready in {time.monotonic() - started:.0f} s: {qemu_version}, kernel {version}"
        )
        return Image(
            root=self.root,
            kernel_name=kernel,
            kernel_version=version,
            vmlinuz=f"/opt/vnvme/kernel-{kernel}/boot/vmlinuz-{version}",
            initrd=f"/opt/vnvme/initrd-{kernel}.cpio.gz",
            qemu_version=qemu_version,
        )


def module_key(filename: str) -> str:
    """A module's name as the kernel spells it: ``nvme-core.ko.xz`` -> ``nvme_core``."""
    return os.path.basename(filename).split(".ko")[0].replace("-", "_")


def module_depends(data: bytes) -> list[str]:
    """The ``depends=`` entry of a module's .modinfo section (NUL-separated key=value strings)."""
    at = data.find(b"\0depends=")
    if at < 0:
        return []
    end = data.find(b"\0", at + 1)
    value = data[at + len(b"\0depends=") : end].decode()
    return [module_key(name) for name in value.split(",") if name]


def read_module(path: Path) -> bytes:
    data = path.read_bytes()
    if path.name.endswith(".ko.xz"):
        return lzma.decompress(data)
    if not path.name.endswith(".ko"):
        raise ProvisionError(f"module {path.name}: only .ko and .ko.xz are supported")
    return data


def module_load_order(tree: Path, wanted: Iterable[str]) -> list[Path]:
    """The modules ``wanted`` needs, dependencies first, as ``insmod`` must load them.

    The kernel package ships no modules.dep (depmod writes it at install time, and the package
    is only unpacked here), so dependencies come from each module's own .modinfo.
    """
    index = {module_key(path.name): path for path in tree.rglob("*.ko*")}
    order: list[Path] = []

    def visit(key: str, stack: tuple[str, ...]) -> None:
        path = index.get(key)
        if path is None:
            raise ProvisionError(f"module {key} is not in {tree} (built into the kernel?)")
        if path in order:
            return
        if key in stack:
            raise ProvisionError(f"module dependency cycle: {' -> '.join(stack + (key,))}")
        for dep in module_depends(read_module(path)):
            visit(dep, stack + (key,))
        order.append(path)

    for name in wanted:
        visit(module_key(name), ())
    return order


def guest_init_script() -> str:
    return resources.files("vnvme.vm").joinpath("guest_init.sh").read_text()
