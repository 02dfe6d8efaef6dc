#!/bin/busybox sh
# /init of one `vnvme vm soak` boot. The host adds this file to the boot's own cpio, where it
# replaces the cached initramfs's /init (guest_init.sh) for that boot only: the cached image is
# shared, and rebuilding it for a second scenario would change it under everyone else.
#
# Output protocol as guest_init.sh (serial port 1): @@begin NAME / output / @@end NAME RC, and
# @@note TEXT. The host decides what happens when (reset times, fault windows); the guest runs
# the I/O, reports, and decides nothing.
#
# /scenario.env: BOOT, IO_SECONDS, SEED, REGIONS ("OFFSET:SIZE OFFSET:SIZE", one verify job per
# vCPU), FAULT_AREA (OFFSET:SIZE), RESETS (seconds after the I/O starts), CHECK_BEFORE (1: the
# regions' checksums first, before anything writes).

/bin/busybox mkdir -p /usr/bin /usr/sbin /proc /sys /dev /tmp
/bin/busybox --install -s
export PATH=/usr/sbin:/usr/bin:/sbin:/bin
mount -t proc proc /proc
mount -t sysfs sysfs /sys
mount -t devtmpfs devtmpfs /dev
mount -t tmpfs tmpfs /tmp

R=/dev/ttyS1
note() { echo "@@note $*" > $R; }
emit() {  # emit NAME FILE RC: a file as one block, with the exit status of what wrote it
    echo "@@begin $1" > $R
    cat "$2" > $R 2>&1
    echo "@@end $1 $3" > $R
}
uptime_s() { cut -d' ' -f1 /proc/uptime; }

. /scenario.env
note "boot kernel=$(uname -r) soak boot=$BOOT cpus=$(grep -c ^processor /proc/cpuinfo)"
for m in $(cat /lib/modules/load-order); do
    insmod /lib/modules/$m || note "insmod $m failed"
done

i=0
while [ ! -e /sys/block/nvme0n1/nsid ] && [ $i -lt 600 ]; do usleep 100000; i=$((i + 1)); done
DEV=/dev/nvme0n1
[ -e $DEV ] || { note "no nvme device"; poweroff -f; }
note "device $DEV queues=$(ls /sys/block/nvme0n1/mq | wc -l)"

wait_live() {
    i=0
    while [ "$(cat /sys/class/nvme/nvme0/state)" != live ] && [ $i -lt 600 ]; do
        usleep 100000; i=$((i + 1))
    done
    [ "$(cat /sys/class/nvme/nvme0/state)" = live ]
}

# One md5 per region, read with the page cache dropped (fio wrote around it with O_DIRECT).
sums() {
    sync
    echo 3 > /proc/sys/vm/drop_caches
    out=""
    for r in $REGIONS; do
        off=${r%:*}; size=${r#*:}
        s=$(dd if=$DEV bs=65536 skip=$((off / 65536)) count=$((size / 65536)) 2>/dev/null | md5sum | cut -d' ' -f1)
        out="$out $s"
    done
    echo $out
}

if [ "$CHECK_BEFORE" = 1 ]; then
    note "sums-before $(sums)"
fi

# The verify jobs: randrw with crc32c headers on their own region, one per vCPU (job i on CPU
# i), checking what they wrote every 64 blocks and at the end; an fsync at the end (a Flush) so
# the data outlives the server's SIGKILL after this boot.
set -- $REGIONS
cpu=0
jobs=""
for r in "$@"; do
    jobs="$jobs --name=verify$cpu --offset=${r%:*} --size=${r#*:} --cpus_allowed=$cpu"
    cpu=$((cpu + 1))
done
area_off=${FAULT_AREA%:*}
area_size=${FAULT_AREA#*:}

progress() {  # completed reads and writes of the device, every 2 s
    while true; do
        set -- $(cat /sys/block/nvme0n1/stat)
        note "progress $(uptime_s) $1 $5"
        sleep 2
    done
}

resets() {
    started=$1
    n=0
    for at in $RESETS; do
        n=$((n + 1))
        while [ "$(awk -v s="$started" -v a="$at" '{ print ($1 - s >= a) }' /proc/uptime)" = 0 ]; do
            usleep 200000
        done
        note "reset $n begin $(uptime_s)"
        if echo 1 > /sys/class/nvme/nvme0/reset_controller && wait_live; then
            note "reset $n live $(uptime_s)"
        else
            note "reset $n failed state=$(cat /sys/class/nvme/nvme0/state)"
        fi
    done
}

progress &
progress_pid=$!
started=$(uptime_s)
note "io-start $started"
fio --filename=$DEV --rw=randrw --bs=4k --ioengine=libaio --direct=1 --iodepth=4 \
    --verify=crc32c --verify_backlog=64 --runtime="$IO_SECONDS" --time_based --randseed="$SEED" \
    --end_fsync=1 --output-format=json --output=/tmp/verify.json $jobs 2> /tmp/verify.err &
verify_pid=$!
# The fault job: every failed I/O is one line with its offset (error_dump), and it carries on
# after EIO (5) and ENODATA (61: Linux's errno for a media error, BLK_STS_MEDIUM), reads and writes.
fio --name=faults --filename=$DEV --offset="$area_off" --size="$area_size" --rw=randrw --bs=4k \
    --ioengine=libaio --direct=1 --iodepth=1 --continue_on_error=all --error_dump=1 \
    --ignore_error=5:61,5:61 \
    --runtime="$IO_SECONDS" --time_based --randseed="$((SEED + 1))" --output-format=json \
    --output=/tmp/faults.json 2> /tmp/faults.err &
faults_pid=$!
resets "$started" &
resets_pid=$!
wait $verify_pid
verify_rc=$?
wait $faults_pid
faults_rc=$?
wait $resets_pid
kill $progress_pid
note "io-end $(uptime_s)"
emit verify-json /tmp/verify.json $verify_rc
emit verify-stderr /tmp/verify.err $verify_rc
emit faults-json /tmp/faults.json $faults_rc
emit faults-stderr /tmp/faults.err $faults_rc
note "sums-after $(sums)"
note "done $(uptime_s)"
poweroff -f
sleep 30
