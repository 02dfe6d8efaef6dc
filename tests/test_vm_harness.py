"""The VM harness's host-side parts, without booting anything: the initramfs writer, the guest's
result protocol, module dependencies, QEMU trace cutting and the counters page."""

from __future__ import annotations

import io
import lzma
import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from vnvme.spec.log_pages import VNVME_COUNTERS, VNVME_COUNTERS_SIGNATURE
from vnvme.vm.cpio import CpioWriter
from vnvme.vm.guest import Guest, parse_results, scenario_archive, trace_doorbells_between_marks
from vnvme.vm.provision import (
    Image,
    ProvisionError,
    module_depends,
    module_key,
    module_load_order,
    rooted,
)
from vnvme.vm.scenarios import (
    FIO_VERIFY_MAGIC,
    DepthResult,
    DeviceColumn,
    VmOptions,
    boot_with_progress,
    fio_verify_blocks,
    format_columns,
    parse_counters,
    parse_size_text,
)


def _read_newc(data: bytes) -> dict[str, tuple[int, bytes]]:
    """An independent reader of the newc format: name -> (mode, data)."""
    entries: dict[str, tuple[int, bytes]] = {}
    at = 0
    while True:
        assert data[at : at + 6] == b"070701", f"bad magic at {at}"
        fields = [int(data[at + 6 + 8 * i : at + 14 + 8 * i], 16) for i in range(13)]
        mode, size, namesize = fields[1], fields[6], fields[11]
        name = data[at + 110 : at + 110 + namesize - 1].decode()
        at += 110 + namesize
        at += -at % 4
        body = data[at : at + size]
        at += size
        at += -at % 4
        if name == "TRAILER!!!":
            assert at == len(data)
            return entries
        entries[name] = (mode, body)


def test_cpio_newc_round_trip() -> None:
    buf = io.BytesIO()
    archive = CpioWriter(buf)
    archive.file("usr/bin/tool", b"\x7fELF" + bytes(7), mode=0o755)
    archive.file("etc/x", b"abc")
    archive.symlink("lib64", "usr/lib64")
    archive.close()
    entries = _read_newc(buf.getvalue())
    assert entries["usr/bin/tool"] == (0o100755, b"\x7fELF" + bytes(7))
    assert entries["etc/x"] == (0o100644, b"abc")
    assert entries["lib64"] == (0o120777, b"usr/lib64")
    # parents come before children, as the kernel's unpacker needs
    names = list(entries)
    assert names.index("usr") < names.index("usr/bin") < names.index("usr/bin/tool")
    with pytest.raises(ValueError):
        archive.file("late", b"")


def test_cpio_refuses_repeated_names() -> None:
    archive = CpioWriter(io.BytesIO())
    archive.file("a", b"1")
    with pytest.raises(ValueError):
        archive.file("a", b"2")


def test_scenario_archive_quotes_values() -> None:
    entries = _read_newc(scenario_archive({"PHASE": "main", "ODD": "it's $HOME"}))
    text = entries["scenario.env"][1].decode()
    assert "PHASE='main'\n" in text
    assert "ODD='it'\"'\"'s $HOME'\n" in text


def test_parse_results_blocks_notes_and_unfinished() -> None:
    text = (
        "@@note boot kernel=6.1 phase=main\r\n"
        "@@begin probe\nstate live\nmodel x\n@@end probe 0\n"
        '@@begin fio\n{"a": 1}\n@@end fio 3\n'
        "@@note boot kernel=6.1 phase=main\n"
        "@@begin probe\nstate live\n@@end probe 0\n"
        "@@begin cut\npartial"
    )
    blocks, notes = parse_results(text)
    assert [(b.name, b.rc) for b in blocks] == [("probe", 0), ("fio", 3), ("probe", 0), ("cut", None)]
    assert blocks[0].text == "state live\nmodel x"
    assert blocks[1].json() == {"a": 1} and not blocks[1].ok
    assert notes == ["boot kernel=6.1 phase=main"] * 2
    assert blocks[3].text == "partial"


def _module(depends: str) -> bytes:
    return b"\x7fELF junk\0license=GPL\0depends=" + depends.encode() + b"\0retpoline=Y\0"


def test_module_load_order_from_modinfo(tmp_path: Path) -> None:
    host = tmp_path / "kernel" / "drivers" / "nvme" / "host"
    host.mkdir(parents=True)
    (host / "nvme.ko").write_bytes(_module("nvme-core"))
    (host / "nvme-core.ko.xz").write_bytes(lzma.compress(_module("t10-pi,crc64-rocksoft")))
    lib = tmp_path / "kernel" / "lib"
    lib.mkdir()
    (lib / "t10-pi.ko").write_bytes(_module("crc64-rocksoft"))
    (lib / "crc64-rocksoft.ko").write_bytes(_module(""))
    order = [module_key(p.name) for p in module_load_order(tmp_path, ["nvme"])]
    assert order == ["crc64_rocksoft", "t10_pi", "nvme_core", "nvme"]
    assert module_depends(_module("")) == []
    with pytest.raises(ProvisionError, match="not in"):
        module_load_order(tmp_path, ["virtio_blk"])


def test_module_cycle_is_reported(tmp_path: Path) -> None:
    (tmp_path / "a.ko").write_bytes(_module("b"))
    (tmp_path / "b.ko").write_bytes(_module("a"))
    with pytest.raises(ProvisionError, match="cycle"):
        module_load_order(tmp_path, ["a"])


def test_rooted_command_mounts_in_a_private_namespace() -> None:
    argv = rooted(Path("/cache/root"), ["qemu-system-x86_64", "-m", "512M"], binds=["/tmp/run"])
    assert argv[:5] == ["unshare", "--mount", "--propagation", "private", "--"]
    script = argv[7]
    for inner in ("/dev", "/proc", "/sys", "/tmp/run"):
        assert f"mount --rbind {inner} /cache/root{inner}" in script
    assert argv[-3:] == ["qemu-system-x86_64", "-m", "512M"]


@pytest.mark.skipif(os.geteuid() != 0 or shutil.which("unshare") is None, reason="mount namespaces need root")
def test_a_boot_leaves_no_mount_point_in_the_cached_root(tmp_path: Path) -> None:
    """Issue "first hour" item 9: every ``vnvme vm run`` left an empty ``vnvme-vm-*`` folder in
    the cache, the mount point of its run folder. A root without QEMU makes the boot fail at
    once, after the mounts were made."""
    root = tmp_path / "cache" / "trixie"
    (root / "opt").mkdir(parents=True)
    (root / "opt" / "initrd").write_bytes(b"0707")
    run_dir = tmp_path / "runs" / "vnvme-vm-1"
    run_dir.mkdir(parents=True)
    image = Image(root, "6.1", "6.1.0", "/opt/vmlinuz", "/opt/initrd", "none")
    result = Guest(image, run_dir, "guest1", [], {"PHASE": "main"}).boot(timeout=60)
    assert result.exit_code not in (0, None) and not result.timed_out
    assert (root / "dev").is_dir()  # the mounts were made
    assert not (root / "tmp").exists(), sorted(str(p.relative_to(root)) for p in root.rglob("*"))
    assert run_dir.is_dir() and (run_dir / "guest1.initrd").is_file()  # the run's own folder stays


@pytest.mark.skipif(os.geteuid() != 0 or shutil.which("unshare") is None, reason="mount namespaces need root")
def test_a_boot_says_when_it_starts_and_how_it_ended(tmp_path: Path) -> None:
    """Issue "first hour" item 13: a guest boot takes minutes; it says so, and when it is over."""
    root = tmp_path / "root"
    (root / "opt").mkdir(parents=True)
    (root / "opt" / "initrd").write_bytes(b"0707")
    image = Image(root, "6.1", "6.1.0", "/opt/vmlinuz", "/opt/initrd", "none")
    lines: list[str] = []
    guest = Guest(image, tmp_path, "guest1", [], {"PHASE": "main"})
    result = boot_with_progress(guest, VmOptions(boot_timeout=60, say=lines.append), "against nothing")
    assert lines == [
        "[vm] guest1: booting against nothing ...",
        f"[vm] guest1: QEMU exited ({result.exit_code}) after {result.seconds:.0f} s, 0 guest boot(s)",
    ]


def test_vm_progress_shows_through_pytest_capture(tmp_path: Path) -> None:
    """Item 13: the VM tests' progress reaches the terminal while pytest captures output (a
    print in the same fixture does not: the control)."""
    (tmp_path / "test_slow.py").write_text(
        textwrap.dedent(
            """
            import pytest
            from vm.conftest import vm_say  # the fixture under test

            @pytest.fixture(scope="module")
            def cache(vm_say):
                print("[hidden] a print, captured")
                vm_say("[vm] debootstrap: 19 s")
                return 1

            def test_one(cache):
                assert cache == 1
            """
        )
    )
    tests = str(Path(__file__).parent)
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([tests, os.environ.get("PYTHONPATH", "")]))
    done = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "test_slow.py"],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    assert "[vm] debootstrap: 19 s\n" in done.stdout
    assert "[hidden]" not in done.stdout + done.stderr


def test_check_script_says_up_front_what_the_vm_tests_need(tmp_path: Path) -> None:
    """Item 13: ``bash scripts/check`` says before anything else that it provisions and boots
    guests, and how to leave them out; the quick form passes its arguments on to pytest."""
    stubs = tmp_path / "bin"
    stubs.mkdir()
    calls = tmp_path / "calls"
    for tool in ("ruff", "mypy", "python"):
        (stubs / tool).write_text(f'#!/bin/sh\necho "{tool} $*" >> {calls}\n')
        (stubs / tool).chmod(0o755)
    script = Path(__file__).parents[1] / "scripts" / "check"
    env = dict(os.environ, PATH=f"{stubs}{os.pathsep}/usr/bin{os.pathsep}/bin")

    def check(*args: str) -> str:
        done = subprocess.run(
            ["bash", str(script), *args], env=env, capture_output=True, text=True, timeout=60
        )
        assert done.returncode == 0, done.stderr
        return done.stdout

    first = check().splitlines()[0]
    for words in ("provision a Debian guest cache", "root", "1.2 GB", "boot", "-m 'not vm'"):
        assert words in first, first
    assert calls.read_text().splitlines()[-1] == "python -m pytest -q"
    assert check("-m", "not vm") == ""
    assert calls.read_text().splitlines()[-1] == "python -m pytest -q -m not vm"


def test_trace_cut_at_get_features_marks() -> None:
    trace = "\n".join(
        [
            "pci_nvme_mmio_doorbell_sq sqid 0 new_tail 3",  # before any mark: ignored
            "123@1.0:pci_nvme_getfeat cid 1 nsid 0x0 fid 0x7 sel 0x0 cdw11 0x0",
            "pci_nvme_mmio_doorbell_sq sqid 1 new_tail 1",
            "pci_nvme_mmio_doorbell_sq sqid 1 new_tail 2",
            "pci_nvme_mmio_doorbell_cq cqid 1 new_head 2",
            "pci_nvme_mmio_doorbell_sq sqid 0 new_tail 4",
            "pci_nvme_getfeat cid 2 nsid 0x0 fid 0x7 sel 0x0 cdw11 0x0",
            "pci_nvme_getfeat cid 3 nsid 0x0 fid 0x6 sel 0x0 cdw11 0x0",  # not a mark
            "pci_nvme_mmio_doorbell_cq cqid 0 new_head 5",
            "pci_nvme_getfeat cid 4 nsid 0x0 fid 0x7 sel 0x0 cdw11 0x0",
        ]
    )
    assert trace_doorbells_between_marks(trace) == [
        {"sq_io": 2, "cq_io": 1, "sq_admin": 1, "cq_admin": 0},
        {"sq_io": 0, "cq_io": 0, "sq_admin": 0, "cq_admin": 1},
    ]


def test_counters_page_from_od_output() -> None:
    page = VNVME_COUNTERS.pack(
        {"signature": VNVME_COUNTERS_SIGNATURE, "doorbell_sq_io": 300, "io_commands": 7}
    )
    od = "\n".join(" " + " ".join(f"{b:02x}" for b in page[i : i + 16]) for i in range(0, len(page), 16))
    counters = parse_counters(od)
    assert counters is not None
    assert counters["doorbell_sq_io"] == 300 and counters["io_commands"] == 7
    assert parse_counters("00 11") is None
    assert parse_counters(od.replace("76 6e", "00 6e", 1)) is None  # not vnvme's page


def test_format_columns() -> None:
    columns = [
        DeviceColumn(
            "a", "", [DepthResult(1, 3200.0, 100, 0.5, 0.25), DepthResult(8, 5500.0, 100, None, None)]
        ),
    ]
    table = format_columns(columns, [1, 8])
    assert "| a: IOPS | 3.20k | 5.50k |" in table
    assert "| a: doorbells/IO (SQ + CQ) | 0.750 (0.500 + 0.250) | n/a |" in table


def test_fio_verify_blocks_counts_headers_on_disk(tmp_path: Path) -> None:
    disk = tmp_path / "disk.img"
    data = bytearray(8 * 4096)
    for block in (0, 3, 7):
        data[block * 4096 : block * 4096 + 2] = FIO_VERIFY_MAGIC
    data[5 * 4096 + 1 : 5 * 4096 + 3] = FIO_VERIFY_MAGIC  # not at a block start
    disk.write_bytes(bytes(data))
    assert fio_verify_blocks(disk, 8 * 4096) == 3
    assert fio_verify_blocks(disk, 4 * 4096) == 2
    assert parse_size_text("16M") == 16 << 20 and parse_size_text("4096") == 4096
