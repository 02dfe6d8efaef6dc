"""A real Linux guest against vnvme: QEMU's vfio-user client, the Linux nvme driver, fio, nvme-cli.

``vnvme vm provision`` builds (once, cached) a Debian trixie root with QEMU from trixie-backports
(the first Debian QEMU with ``-device vfio-user-pci``), a Debian guest kernel and an initramfs
with busybox, fio and nvme-cli. ``vnvme vm run`` boots guests under TCG against ``vnvme serve``
and runs the scenario list; ``vnvme vm compare`` puts vnvme beside QEMU's built-in NVMe device.
"""
