#!/bin/busybox sh
# /init of vnvme's test guest (busybox, fio, nvme-cli, the nvme modules).
#
# The host appends /scenario.env (shell variables) to the initramfs of each run. Everything the
# host needs goes to the second serial port (/dev/ttyS1), kernel messages stay on ttyS0:
#   @@begin NAME           then the raw output of one command
#   @@end NAME RC          its exit status
#   @@note TEXT            anything else worth keeping
# The guest decides nothing: the host reads the blocks and judges each scenario.

/bin/busybox mkdir -p /usr/bin /usr/sbin /proc /sys /dev /tmp
/bin/busybox --install -s
export PATH=/usr/sbin:/usr/bin:/sbin:/bin
mount -t proc proc /proc
mount -t sysfs sysfs /sys
mount -t devtmpfs devtmpfs /dev
mount -t tmpfs tmpfs /tmp

R=/dev/ttyS1
note() { echo "@@note $*" > $R; }
# run NAME COMMAND...: one block with the command's output and exit status
run() {
    name=$1; shift
    echo "@@begin $name" > $R
    "$@" > $R 2>&1
    rc=$?
    echo "@@end $name $rc" > $R
    return $rc
}

. /scenario.env
note "boot kernel=$(uname -r) phase=${PHASE} uptime=$(cut -d' ' -f1 /proc/uptime)"

for m in $(cat /lib/modules/load-order); do
    insmod /lib/modules/$m || note "insmod $m failed"
done

wait_for() {  # wait_for PATH SECONDS
    i=0
    while [ ! -e "$1" ] && [ $i -lt $(($2 * 10)) ]; do usleep 100000; i=$((i + 1)); done
    [ -e "$1" ]
}

wait_live() {  # the controller is back after a reset
    i=0
    while [ "$(cat /sys/class/nvme/nvme0/state 2>/dev/null)" != live ] && [ $i -lt 300 ]; do
        usleep 100000; i=$((i + 1))
    done
    cat /sys/class/nvme/nvme0/state
    [ "$(cat /sys/class/nvme/nvme0/state)" = live ]
}

# Block device names follow the order namespaces were probed in (asynchronous since Linux 6.x),
# not their NSIDs: find a namespace's device through sysfs.
dev_for_nsid() {
    i=0
    while [ $i -lt 300 ]; do
        for b in /sys/block/nvme0n*; do
            if [ "$(cat "$b/nsid" 2>/dev/null)" = "$1" ]; then echo "/dev/${b##*/}"; return 0; fi
        done
        usleep 100000; i=$((i + 1))
    done
    return 1
}

probe() {
    wait_for /dev/nvme0n1 ${PROBE_TIMEOUT:-60}
    echo "state $(cat /sys/class/nvme/nvme0/state)"
    echo "model $(cat /sys/class/nvme/nvme0/model)"
    echo "queues $(ls /sys/block/nvme0n1/mq | wc -l)"
    for b in /sys/block/nvme0n*; do echo "${b##*/} nsid $(cat $b/nsid)"; done
    dmesg | grep -i nvme
    [ -e /dev/nvme0n1 ]
}

# The controller's doorbell counters (vnvme's vendor log page C0h), as hex bytes; and a Get
# Features (Number of Queues) that a traced QEMU logs, to cut its trace at the same points.
mark() {
    if [ "${COUNTERS:-0}" = 1 ]; then
        run "counters-$1" sh -c 'nvme get-log /dev/nvme0 --log-id=0xc0 --log-len=512 --raw-binary | od -An -v -tx1'
    fi
    nvme get-feature /dev/nvme0 --feature-id=7 > /dev/null 2>&1
}

# NUMJOBS jobs of DEPTH each, one per CPU (job i on CPU i: cpus_allowed_policy=split), reported
# as one (group_reporting: summed IOPS, merged latency percentiles).
fio_read() {  # fio_read NAME DEPTH RUNTIME
    jobs=${NUMJOBS:-1}
    pin=""
    [ "$jobs" -gt 1 ] && pin="--cpus_allowed=0-$((jobs - 1)) --cpus_allowed_policy=split"
    fio --name="$1" --filename="$READ_DEV" --rw=randread --bs=4k --ioengine=libaio --direct=1 \
        --iodepth="$2" --runtime="$3" --ramp_time="${RAMP:-1}" --time_based --size="${READ_SIZE:-1G}" \
        --randrepeat=0 --numjobs="$jobs" $pin --group_reporting --output-format=json
}

# What the guest saw around one job: its interrupt counts (the host sums the nvme I/O queues'
# vectors) and the block device's statistics (reads completed: the I/Os, ramp included).
guest_counts() {
    run "irq-$1" cat /proc/interrupts
    run "iostat-$1" cat "/sys/block/${READ_DEV#/dev/}/stat"
}

reads() {
    for d in $DEPTHS; do
        mark "before-d$d"
        guest_counts "before-d$d"
        run "fio-randread-d$d" fio_read "randread-d$d" "$d" "$RUNTIME"
        guest_counts "after-d$d"
        mark "after-d$d"
    done
}

nvme_cli() {
    run id-ctrl nvme id-ctrl /dev/nvme0 --output-format=json
    run id-ns nvme id-ns /dev/nvme0 --namespace-id=1 --output-format=json
    run smart-log nvme smart-log /dev/nvme0 --output-format=json
    run error-log nvme error-log /dev/nvme0 --log-entries=4 --output-format=json
    run get-feature-queues nvme get-feature /dev/nvme0 --feature-id=7 --human-readable
    run get-feature-vwc nvme get-feature /dev/nvme0 --feature-id=6 --human-readable
}

reset_idle() {
    echo 1 > /sys/class/nvme/nvme0/reset_controller || return 1
    wait_live || return 1
    dd if="$READ_DEV" of=/dev/null bs=4k count=64
}

reset_under_io() {
    fio --name=reset-io --filename="$READ_DEV" --rw=randread --bs=4k --ioengine=libaio --direct=1 \
        --iodepth=4 --runtime="${RESET_IO_RUNTIME:-6}" --time_based --output-format=json \
        --output=/tmp/reset-io.json &
    pid=$!
    sleep "${RESET_AFTER:-2}"
    echo "reset at $(cut -d' ' -f1 /proc/uptime)"
    echo 1 > /sys/class/nvme/nvme0/reset_controller
    wait_live
    live=$?
    wait $pid
    rc=$?
    cat /tmp/reset-io.json
    echo "fio rc $rc live $live"
    [ $rc = 0 ] && [ $live = 0 ]
}

# Write with crc32c verify headers on the file-backed namespace, flush at the end; a reboot
# later the same job reads every block back (verify_only).
VERIFY_ARGS="--rw=randwrite --bs=4k --ioengine=libaio --direct=1 --iodepth=4 --verify=crc32c \
--verify_fatal=1 --randrepeat=1 --randseed=1234 --end_fsync=1 --output-format=json"
PHASE_MAGIC=vnvme-phase-verify

phase_marker() {  # the last 4 KiB of the verify namespace says what the next boot does
    dd if="$VERIFY_DEV" bs=4096 skip=$((VERIFY_BLOCKS - 1)) count=1 2>/dev/null | head -c 18
}

write_verify() {
    run write-verify fio --name=write-verify --filename="$VERIFY_DEV" --size="$VERIFY_SIZE" $VERIFY_ARGS \
        || return 1
    { printf '%s' $PHASE_MAGIC; dd if=/dev/zero bs=4078 count=1 2>/dev/null; } > /tmp/marker
    dd if=/tmp/marker of="$VERIFY_DEV" bs=4096 seek=$((VERIFY_BLOCKS - 1)) count=1 conv=fsync 2>/dev/null
    note "rebooting for the read-back"
    reboot -f
    sleep 30
}

read_back() {
    run read-back fio --name=write-verify --filename="$VERIFY_DEV" --size="$VERIFY_SIZE" $VERIFY_ARGS \
        --verify_only=1
    dd if=/dev/zero of="$VERIFY_DEV" bs=4096 seek=$((VERIFY_BLOCKS - 1)) count=1 conv=fsync 2>/dev/null
}

run probe probe || { note "no nvme device"; poweroff -f; }
READ_DEV=$(dev_for_nsid "${READ_NSID:-1}") || note "no block device for nsid ${READ_NSID:-1}"
VERIFY_DEV=""
if [ -n "$VERIFY_NSID" ]; then
    VERIFY_DEV=$(dev_for_nsid "$VERIFY_NSID") || note "no block device for nsid $VERIFY_NSID"
fi
note "read device $READ_DEV (nsid ${READ_NSID:-1}), verify device ${VERIFY_DEV:-none}"
if [ -n "$VERIFY_DEV" ] && [ "$(phase_marker)" = $PHASE_MAGIC ]; then
    PHASE=read-back
fi
case "$PHASE" in
    main)
        nvme_cli
        reads
        run reset-idle reset_idle
        run reset-under-io reset_under_io
        mark final
        [ -n "$VERIFY_DEV" ] && write_verify
        ;;
    read-back)
        read_back
        mark final
        ;;
    quick)
        run id-ctrl nvme id-ctrl /dev/nvme0 --output-format=json
        reads
        ;;
    bench)
        reads
        ;;
esac
note "done uptime=$(cut -d' ' -f1 /proc/uptime)"
sync
poweroff -f
sleep 30
