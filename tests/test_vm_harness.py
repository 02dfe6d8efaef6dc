"""The VM harness's host-side parts, without booting anything: the initramfs writer, the guest's
result protocol, module dependencies, QEMU trace cutting and the counters page."""

from __future__ import annotations

import argparse
import importlib.util
import io
import json
import lzma
import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Any

import pytest

from vnvme.controller import variants
from vnvme.spec.log_pages import VNVME_COUNTERS, VNVME_COUNTERS_SIGNATURE
from vnvme.vm import command as vm_command
from vnvme.vm.command import add_arguments
from vnvme.vm.compare import DeviceColumn, Spread, format_columns
from vnvme.vm.cpio import CpioWriter
from vnvme.vm.guest import (
    Block,
    BootResult,
    Guest,
    parse_results,
    scenario_archive,
    trace_doorbells_between_marks,
)
from vnvme.vm.measure import (
    GUEST_QEMU,
    MACHINE_BUSY,
    MACHINE_ELAPSED,
    SERVER,
    CpuWindows,
    DepthResult,
    MachineCpu,
    depth_results,
    parse_block_reads,
    parse_counters,
    parse_interrupts,
    parse_proc_stat,
)
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
    VmOptions,
    boot_with_progress,
    fio_verify_blocks,
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


PROC_INTERRUPTS = """\
           CPU0       CPU1
  0:         40          0   IO-APIC   2-edge      timer
 24:         10          2   PCI-MSIX-0000:00:02.0   0-edge      nvme0q0
 25:        500          7   PCI-MSIX-0000:00:02.0   1-edge      nvme0q1
 26:          3        300   PCI-MSIX-0000:00:02.0   2-edge      nvme0q2
 27:          9          9   PCI-MSIX-0000:00:03.0   0-edge      nvme10q0
LOC:       1234       5678   Local timer interrupts
"""


def test_interrupts_of_the_nvme_io_queue_vectors() -> None:
    """I/O queues' vectors summed over every CPU; the admin queue (q0) and other devices not."""
    assert parse_interrupts(PROC_INTERRUPTS) == 500 + 7 + 3 + 300
    shared = "    CPU0\n 24:   4   PCI-MSIX-0000:00:02.0   0-edge   nvme0q0, nvme0q1\n"
    assert parse_interrupts(shared) == 4  # one vector for both: the I/O queue's interrupts are there
    assert parse_interrupts("no header here") is None


def test_block_reads_from_sysfs_stat() -> None:
    assert parse_block_reads("   12345        0   98760     4321        0 ...") == 12345
    assert parse_block_reads("") is None


def _fio_json(iops: float, ios: int, p50_ns: int, p99_ns: int) -> str:
    read = {
        "iops": iops,
        "total_ios": ios,
        "clat_ns": {"percentile": {"50.000000": p50_ns, "99.000000": p99_ns}},
    }
    return "note: both jobs reported as one\n" + json.dumps({"jobs": [{"error": 0, "read": read}]})


def _counters_od(**values: int) -> str:
    page = VNVME_COUNTERS.pack({"signature": VNVME_COUNTERS_SIGNATURE, **values})
    return " ".join(f"{b:02x}" for b in page)


def _boot(blocks: dict[str, str]) -> BootResult:
    return BootResult("g", 0, False, 1.0, [Block(name, 0, text) for name, text in blocks.items()])


def test_depth_results_per_io_from_the_guests_blocks() -> None:
    irq_after = PROC_INTERRUPTS.replace(" 500 ", " 900 ").replace(" 300 ", " 500 ")
    boot = _boot(
        {
            "counters-before-d4": _counters_od(io_commands=100, doorbell_sq_io=90, doorbell_cq_io=80),
            "irq-before-d4": PROC_INTERRUPTS,
            "iostat-before-d4": "1000 0 8000 5",
            "fio-randread-d4": _fio_json(5000.0, 790, 180_000, 950_000),
            "irq-after-d4": irq_after,
            "iostat-after-d4": "1800 0 14400 9",
            "counters-after-d4": _counters_od(
                io_commands=900, doorbell_sq_io=490, doorbell_cq_io=280, mapped_doorbell_updates=8
            ),
        }
    )
    # CPU seconds at the fio block's begin and end: server 0.2, guest QEMU 0.5, machine 1.6 of 2
    samples = {
        SERVER: [1.0, 1.2],
        GUEST_QEMU: [3.0, 3.5],
        MACHINE_BUSY: [10.0, 11.6],
        MACHINE_ELAPSED: [7.0, 8.0],
    }
    cpu = CpuWindows({name: iter(values).__next__ for name, values in samples.items()}, machine_cpus=2)
    cpu.on_line("@@begin fio-randread-d4")
    cpu.on_line("@@end fio-randread-d4 0")
    (r,) = depth_results(boot, [4], cpu=cpu)
    assert (r.depth, r.iops, r.ios) == (4, 5000.0, 800)
    assert (r.sq_doorbells, r.cq_doorbells, r.doorbells, r.mapped_doorbells) == (0.5, 0.25, 0.75, 0.01)
    assert r.interrupts == (400 + 200) / 800
    assert r.server_cpu_us == pytest.approx(0.2e6 / 800)
    assert r.guest_qemu_cpu_us == pytest.approx(0.5e6 / 800)
    assert r.machine_busy_cpus == pytest.approx(1.6) and r.machine_cpus == 2
    assert (r.lat_p50_us, r.lat_p99_us) == (180.0, 950.0)
    # a device without vnvme's counters page: nothing counted, fio's I/Os; nothing sampled
    del boot.blocks[0]
    (q,) = depth_results(boot, [4])
    assert (q.ios, q.doorbells, q.server_cpu_us, q.guest_qemu_cpu_us) == (790, None, None, None)
    assert (q.machine_busy_cpus, q.machine_cpus) == (None, None)
    assert q.interrupts == (400 + 200) / 800
    # no reads counted (no iostat blocks): no CPU per I/O, but the machine's CPUs still
    boot.blocks = [b for b in boot.blocks if not b.name.startswith("iostat")]
    (n,) = depth_results(boot, [4], cpu=cpu)
    assert (n.server_cpu_us, n.guest_qemu_cpu_us) == (None, None)
    assert n.machine_busy_cpus == pytest.approx(1.6)


def test_cpu_sampled_at_the_fio_blocks_source_by_source() -> None:
    server = iter([10.0, 10.5, 20.0, 23.0, 24.0])
    # the guest's QEMU: gone at the end of the second job (None), so no window there
    guest = iter([1.0, 1.25, 2.0, None, None])
    # the guest sampled first: its None must not cost the server its sample
    windows = CpuWindows({GUEST_QEMU: guest.__next__, SERVER: server.__next__})
    for line in (
        "@@begin counters-before-d1",  # not a fio block: no sample
        "@@begin fio-randread-d1",
        "@@end fio-randread-d1 0",
        "@@note something",
        "@@begin fio-randread-d16",
        "@@end fio-randread-d16 0",
        "@@end fio-randread-d2 0",  # an end without its begin: nothing to subtract from
    ):
        windows.on_line(line)
    assert windows.seconds == {SERVER: {1: 0.5, 16: 3.0}, GUEST_QEMU: {1: 0.25}}
    assert windows.per_io_us(SERVER, 16, 1000) == pytest.approx(3000.0)
    assert windows.per_io_us(GUEST_QEMU, 16, 1000) is None
    assert windows.per_io_us("absent", 1, 1000) is None
    gone = CpuWindows({SERVER: lambda: None})
    gone.on_line("@@begin fio-randread-d1")
    gone.on_line("@@end fio-randread-d1 0")
    assert gone.seconds == {SERVER: {}}


PROC_STAT = """cpu  {user} 20 {system} {idle} 50 5 15 {steal} 600 7
cpu0 1 2 3 4 5 6 7 8 9 10
cpu1 1 2 3 4 5 6 7 8 9 10
intr 123456 0 0
ctxt 99
"""


def test_proc_stat_busy_and_all_jiffies() -> None:
    """Busy: user, nice, system, irq, softirq; guest (inside user) not twice; idle, iowait and
    steal not busy but time that passed."""
    text = PROC_STAT.format(user=1000, system=300, idle=4000, steal=40)
    busy = 1000 + 20 + 300 + 5 + 15
    assert parse_proc_stat(text) == (busy, busy + 4000 + 50 + 40, 2)
    assert parse_proc_stat("cpu  1 2 3 4\ncpu0 1 2 3 4\n") == (6, 10, 1)  # an old kernel's 4 fields
    assert parse_proc_stat("cpu  1 2 x 4\ncpu0 1 2 3 4\n") is None
    assert parse_proc_stat("intr 1 2 3\n") is None
    assert parse_proc_stat("cpu  1 2 3 4\n") is None  # no CPU lines


def test_machine_busy_cpus_over_a_window() -> None:
    # 2 CPUs, 200 ticks each pass; 320 of the 400 are busy: 1.6 CPUs busy
    texts = iter(
        [
            PROC_STAT.format(user=1000, system=300, idle=4000, steal=0),  # MachineCpu counts the CPUs
            PROC_STAT.format(user=1000, system=300, idle=4000, steal=0),  # begin: busy
            PROC_STAT.format(user=1000, system=300, idle=4000, steal=0),  # begin: elapsed
            PROC_STAT.format(user=1300, system=320, idle=4060, steal=20),  # end: busy
            PROC_STAT.format(user=1300, system=320, idle=4060, steal=20),  # end: elapsed
        ]
    )
    machine = MachineCpu(texts.__next__)
    assert machine.cpus == 2
    windows = CpuWindows(machine.sources(), machine.cpus)
    windows.on_line("@@begin fio-randread-d1")
    windows.on_line("@@end fio-randread-d1 0")
    assert windows.busy_cpus(1) == pytest.approx(1.6)
    assert windows.busy_cpus(2) is None

    def unreadable() -> str:
        raise OSError("no /proc")

    assert MachineCpu(unreadable).cpus is None
    assert all(sample() is None for sample in MachineCpu(unreadable).sources().values())


def test_guest_cpu_seconds_only_while_its_qemu_runs(tmp_path: Path) -> None:
    image = Image(tmp_path, "6.1", "6.1.0", "/vmlinuz", "/initrd", "none")
    guest = Guest(image, tmp_path, "g", [], {})
    assert guest.cpu_seconds() is None  # not started
    guest.proc = subprocess.Popen(["sleep", "30"], text=True)
    try:
        seconds = guest.cpu_seconds()
        assert seconds is not None and seconds >= 0.0
    finally:
        guest.stop()
    assert guest.cpu_seconds() is None  # exited (and reaped: its PID is no longer its own)


def test_guest_reports_begin_lines_as_they_arrive(tmp_path: Path) -> None:
    image = Image(tmp_path, "6.1", "6.1.0", "/vmlinuz", "/initrd", "none")
    guest = Guest(image, tmp_path, "g", [], {})
    seen: list[str] = []
    guest.results_path.write_bytes(b"@@note boot\r\n@@begin fio-randread-d1\r\n{}\n@@end fio-ran")
    at = guest._follow(0, seen.append)
    assert seen == ["@@note boot", "@@begin fio-randread-d1"]
    with open(guest.results_path, "ab") as f:
        f.write(b"dread-d1 0\n")
    guest._follow(at, seen.append)
    assert seen[2:] == ["@@end fio-randread-d1 0"]


def test_guest_vcpus_on_the_qemu_command_line(tmp_path: Path) -> None:
    image = Image(tmp_path, "6.1", "6.1.0", "/vmlinuz", "/initrd", "none")
    argv = Guest(image, tmp_path, "g", [], {}, smp=2).command()
    assert argv[argv.index("-smp") + 1] == "2"


def test_guest_runs_one_pinned_fio_job_per_vcpu(tmp_path: Path) -> None:
    """The guest's fio_read, run with a stand-in fio that prints its arguments."""
    script = (Path(__file__).parents[1] / "src" / "vnvme" / "vm" / "guest_init.sh").read_text()
    start = script.index("fio_read() {")
    function = script[start : script.index("\n}\n", start) + 3]
    (tmp_path / "fio").write_text('#!/bin/sh\necho "$@"\n')
    (tmp_path / "fio").chmod(0o755)

    def fio_args(numjobs: str) -> list[str]:
        env = dict(os.environ, PATH=f"{tmp_path}:/usr/bin:/bin", NUMJOBS=numjobs, READ_DEV="/dev/nvme0n1")
        done = subprocess.run(
            ["sh", "-c", function + "fio_read job 8 2"], env=env, capture_output=True, text=True, timeout=30
        )
        assert done.returncode == 0, done.stderr
        return done.stdout.split()

    two = fio_args("2")
    assert {"--numjobs=2", "--cpus_allowed=0-1", "--cpus_allowed_policy=split"} <= set(two)
    assert {"--iodepth=8", "--group_reporting"} <= set(two)
    one = fio_args("1")
    assert "--numjobs=1" in one and not any(arg.startswith("--cpus_allowed") for arg in one)


def _result(
    depth: int, iops: float, sq: float | None, cpu: float | None = None, guest_cpu: float | None = None
) -> DepthResult:
    r = DepthResult(depth, iops, 100, sq, 0.25 if sq is not None else None, 150.0, 900.0)
    r.interrupts, r.server_cpu_us, r.guest_qemu_cpu_us = 0.5, cpu, guest_cpu
    if guest_cpu is not None:
        r.machine_busy_cpus, r.machine_cpus = 1.6, 2
    return r


def test_repeats_give_the_median_and_the_range() -> None:
    column = DeviceColumn("vnvme dbbuf", "", "dbbuf")
    for iops, sq in ((3000.0, 0.5), (5000.0, 0.75), (3600.0, 0.5)):
        column.repeats.append([_result(1, iops, sq, 40.0, iops / 20)])
    assert column.spread(1, "iops") == Spread(3600.0, 3000.0, 5000.0)
    assert column.spread(1, "doorbells") == Spread(0.75, 0.75, 1.0)
    (row,) = column.summary([1])
    assert row["iops"] == {"median": 3600.0, "min": 3000.0, "max": 5000.0}
    assert row["server_cpu_us"] == {"median": 40.0, "min": 40.0, "max": 40.0}
    assert row["guest_qemu_cpu_us"] == {"median": 180.0, "min": 150.0, "max": 250.0}
    assert row["machine_busy_cpus"] == {"median": 1.6, "min": 1.6, "max": 1.6}
    document = column.to_json([1])
    assert document["variant"] == "dbbuf" and len(document["repeats"]) == 3
    assert document["repeats"][1][0]["doorbells"] == 1.0
    assert (document["repeats"][1][0]["guest_qemu_cpu_us"], document["repeats"][1][0]["machine_cpus"]) == (
        250.0,
        2,
    )
    assert Spread.of([None, None]) is None


def test_format_columns_one_table_per_depth() -> None:
    measured = DeviceColumn("a", "")
    measured.repeats = [[_result(1, 3200.0, 0.5, 41.0, 120.0), _result(8, 5500.0, None)]]
    ranged = DeviceColumn("b", "")
    ranged.repeats = [[_result(1, 3000.0, 0.5), _result(8, 1000.0, 0.1)] for _ in range(2)]
    ranged.repeats[1][1] = _result(8, 2000.0, 0.1)
    table = format_columns([measured, ranged], [1, 8], smp=2)
    depth1, depth8 = table.split("\n\nfio randread")
    assert depth1.startswith("fio randread 4k, 2 jobs x iodepth 1:")
    assert "| guest QEMU CPU/IO (us) | host CPUs busy |" in depth1
    assert "| a | 3.20k | 0.750 = 0.500 + 0.250 | 0.500 | 41 | 120 | 1.60 / 2 | 150 / 900 |" in depth1
    assert "| a | 5.50k | n/a | 0.500 | n/a | n/a | n/a | 150 / 900 |" in depth8
    assert "| b | 1.50k (1.00k-2.00k) | 0.350 = 0.100 + 0.250 |" in depth8


def _compare_args(*argv: str) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="vnvme vm")
    add_arguments(parser)
    return parser.parse_args(["compare", *argv])


def test_compare_options(capsys: pytest.CaptureFixture[str]) -> None:
    args = _compare_args("--smp", "2", "--repeat", "3", "--variants", "dbbuf,no-dbbuf")
    assert (args.smp, args.repeat, args.variants) == (2, 3, ["dbbuf", "no-dbbuf"])
    defaults = _compare_args()
    assert (defaults.smp, defaults.repeat) == (1, 1)
    assert tuple(defaults.variants) == variants.VM_COMPARE
    bad: list[tuple[list[str], str]] = [
        (["--variants", "dbbuf,nope"], "unknown variant 'nope'"),
        (["--variants", "posted-dbbuf"], "QEMU's vfio-user-pci posts them"),
        (["--variants", "dbbuf,dbbuf"], "named twice"),
        (["--repeat", "0"], "1..20"),
        (["--smp", "3"], "invalid choice"),
    ]
    for argv, message in bad:
        with pytest.raises(SystemExit) as exit_info:
            _compare_args(*argv)
        assert exit_info.value.code == 2
        assert message in capsys.readouterr().err


def test_compare_failure_is_one_message_and_an_exit_code(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """A guest that does not finish (QEMU refused the device, say) ends the command with the
    reason and exit 1, not a traceback."""

    def refuse(*_: object, **__: object) -> list[DeviceColumn]:
        raise RuntimeError("vnvme-mappable-r1: the guest did not finish: failed to get region 0 info")

    monkeypatch.setattr(vm_command, "compare", refuse)
    image = Image(Path("/nowhere"), "6.1", "6.1.0", "/vmlinuz", "/initrd", "none")
    assert vm_command._compare(image, VmOptions(), _compare_args()) == 1
    err = capsys.readouterr().err
    assert (
        err == "vnvme vm compare: vnvme-mappable-r1: the guest did not finish: failed to get region 0 info\n"
    )


def _vm_summary() -> Any:
    path = Path(__file__).parents[1] / "benchmarks" / "vm_summary.py"
    spec = importlib.util.spec_from_file_location("vm_summary", path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_vm_summary_reads_runs_with_and_without_the_guest_qemu_cpu() -> None:
    """benchmarks/vm_summary.py on a run as `vnvme vm compare --json` writes it now, and on one
    written before the guest's QEMU and the machine were sampled (those keys absent: n/a)."""
    ours = DeviceColumn("vnvme dbbuf", "", "dbbuf")
    ours.repeats = [[_result(1, 3000.0, 1.0, 40.0, 180.0)]]
    builtin = DeviceColumn("QEMU built-in nvme", "")
    builtin.repeats = [[_result(1, 9000.0, None, None, 150.0)]]
    run: dict[str, Any] = {
        "kernel": "6.1.0-57-amd64",
        "smp": 2,
        "numjobs": 2,
        "depths": [1],
        "repeat": 1,
        "columns": [column.to_json([1]) for column in (ours, builtin)],
    }
    summary = _vm_summary()
    now = summary.section(run, "6.1-smp2.md")
    assert "| server CPU us/IO, dbbuf | 40 |" in now
    assert "| guest QEMU CPU us/IO, dbbuf | 180 |" in now
    assert "| guest QEMU CPU us/IO, QEMU built-in | 150 |" in now
    assert not any("QEMU over vfio-user" in line for line in now)  # no such column in this run
    for column in run["columns"]:
        for row in column["median"]:
            for key in ("server_cpu_us", "guest_qemu_cpu_us", "machine_busy_cpus"):
                del row[key]
    before = summary.section(run, "6.1-smp2.md")
    assert "| server CPU us/IO, dbbuf | n/a |" in before
    assert "| guest QEMU CPU us/IO, dbbuf | n/a |" in before
    assert "| guest QEMU CPU us/IO, QEMU built-in | n/a |" in before
