#!/bin/sh
# Boot Debian's 6.1 kernel under qemu (TCG, no network device) with the patched xt_recent and
# run tests/kernel/vm/guest-test.sh inside; prints the guest's console (RESULT/SUMMARY lines).
#
#   compat/vm/run.sh [-k KVER] [-t TIMEOUT_S] [-S] [-L] [-N]
#
# Stages in one boot: 1. tests/kernel/vm/guest-test.sh (busybox sh: the kernel command itself, ~20 s with
# the build); 2. unless -S, tests/kernel/vm/guest_adapter.py (nftsync's adapter against the patched
# kernel, +15 s), run in a chroot of this host's root shared read-only over 9p (-virtfs), so the
# guest has Python and the repository without building a root file system; 3. with -L (or
# NFTSYNC_VM_LAB=1), the legacy farm lab of tests/kernel/test_compat_iptables.py with iptables-legacy
# on the 6.1 kernel (+20-30 s under TCG). 4. -N runs stage 4 *alone* (no xt_recent build, so no
# linux-headers/linux-source needed): nftsync's nf_tables path on 6.1, with 2 vCPUs and 2 GiB:
# compat/vm/nft61.sh loads the netfilter modules, compat/vm/guest_nft61.py checks the pre-6.12
# refresh path, then pytest runs the farm, nft-event and daemon replication tests in the guest
# (default timeout 480 s; NFTSYNC_VM_SELECT=a,b overrides the pytest selection, `full` runs
# all of test_farm.py and test_nft_events.py: give it -t 1000).
#
# Needs the packages compat/vm/setup.sh installs. Builds under $NFTSYNC_VM_DIR (default: .vm/ in
# the repository, gitignored): the module (compat/kernel/build.sh), then an initramfs of
# busybox-static + iptables-legacy (xtables-legacy-multi, its libraries, libxt_recent/standard)
# + the modules x_tables ip_tables iptable_filter (+ virtio/9p for stage 2) + xt_recent.ko.
# Exit status: 0 when every RESULT line says PASS (and both stages reported), 1 otherwise,
# 124 on timeout. Console log: $NFTSYNC_VM_DIR/console-KVER.log (-N: console-nft61-KVER.log).
set -eu
here=$(cd "$(dirname "$0")" && pwd)
repo=$(cd "$here/../.." && pwd)
kver=""
timeout_s=120
stage2=1
lab=${NFTSYNC_VM_LAB:-0}
nft61=0
while getopts k:t:SLN opt; do
    case $opt in
        k) kver=$OPTARG ;;
        t) timeout_s=$OPTARG ;;
        S) stage2=0 ;;
        L) lab=1 ;;
        N) nft61=1 ;;
        *) sed -n '2,24p' "$0" >&2; exit 2 ;;
    esac
done
[ -n "$kver" ] || kver=$(ls /lib/modules 2>/dev/null | grep '^6\.1\.' | sort -V | tail -n1 || true)
vmdir=${NFTSYNC_VM_DIR:-$repo/.vm}
kernel=/boot/vmlinuz-$kver
moddir=/lib/modules/$kver/kernel
for f in "$kernel" "$moddir/net/netfilter/x_tables.ko" /bin/busybox \
         /usr/sbin/xtables-legacy-multi; do
    [ -e "$f" ] || { echo "run.sh: missing $f (run compat/vm/setup.sh)" >&2; exit 1; }
done
command -v qemu-system-x86_64 > /dev/null || { echo "run.sh: no qemu-system-x86_64" >&2; exit 1; }
if [ "$nft61" = 1 ]; then
    for f in "$moddir/net/netfilter/nf_tables.ko" /usr/sbin/nft /sbin/modprobe; do
        [ -e "$f" ] || { echo "run.sh: missing $f (run compat/vm/setup.sh)" >&2; exit 1; }
    done
    [ "$timeout_s" != 120 ] || timeout_s=480
    stage2=1
    lab=0
    # Bytecode for everything the guest imports, compiled here into a cache of our own (the
    # repository has no __pycache__ and is read-only in the guest, where compiling every module
    # in every process costs seconds under TCG). Reused while sources are unchanged.
    hostpy=$repo/.venv/bin/python
    [ -x "$hostpy" ] || hostpy=python3
    pycache=$vmdir/pycache
    # shellcheck disable=SC2046 # the interpreter's own paths, several words on purpose
    PYTHONPYCACHEPREFIX=$pycache "$hostpy" -m compileall -q -j0 "$repo/nftsync" "$repo/tests" \
        "$repo/netns-lab" "$repo/compat" $("$hostpy" -c 'import sysconfig, site
print(sysconfig.get_path("stdlib"), sysconfig.get_path("purelib"), *site.getsitepackages())') \
        > /dev/null 2>&1 || echo "run.sh: some files did not byte-compile (stdlib tests)" >&2
else
    ko=$("$here/../kernel/build.sh" -k "$kver" -o "$vmdir/module/$kver" | tail -n1)
fi

tag=$kver
[ "$nft61" = 1 ] && tag=nft61-$kver  # its own initramfs and log: may run beside the default stages
root=$vmdir/initramfs/$tag
rm -rf "$root"
mkdir -p "$root/bin" "$root/sbin" "$root/proc" "$root/sys" "$root/run" "$root/dev" \
         "$root/modules" "$root/etc"
cp /bin/busybox "$root/bin/busybox"
ln -s busybox "$root/bin/sh"
for m in net/netfilter/x_tables net/ipv4/netfilter/ip_tables net/ipv4/netfilter/iptable_filter \
         drivers/virtio/virtio_ring drivers/virtio/virtio drivers/virtio/virtio_pci_modern_dev \
         drivers/virtio/virtio_pci_legacy_dev drivers/virtio/virtio_pci fs/netfs/netfs \
         fs/fscache/fscache net/9p/9pnet net/9p/9pnet_virtio fs/9p/9p; do
    src=$moddir/$m.ko
    if [ -e "$src" ]; then cp "$src" "$root/modules/"
    elif [ -e "$src.xz" ]; then xz -dc "$src.xz" > "$root/modules/$(basename "$m").ko"
    else echo "run.sh: no module $m" >&2; exit 1; fi
done
[ "$nft61" = 1 ] || cp "$ko" "$root/modules/xt_recent.ko"

# iptables-legacy and what it loads: ldd's libraries, the two extensions the test uses (+icmp).
xt=/usr/lib/x86_64-linux-gnu/xtables
cp /usr/sbin/xtables-legacy-multi "$root/sbin/"
ln -s xtables-legacy-multi "$root/sbin/iptables-legacy"
mkdir -p "$root$xt"
for ext in libxt_recent.so libxt_standard.so libipt_icmp.so libxt_icmp.so; do
    [ -e "$xt/$ext" ] && cp "$xt/$ext" "$root$xt/"
done
for bin in /usr/sbin/xtables-legacy-multi "$root$xt"/*.so; do
    ldd "$bin" | awk '/=>/ {print $3} /^\t\/lib/ {print $1}'
done | sort -u | while read -r lib; do
    [ -n "$lib" ] || continue
    mkdir -p "$root$(dirname "$lib")"
    cp -L "$lib" "$root$lib"
done
[ -e /lib64/ld-linux-x86-64.so.2 ] && mkdir -p "$root/lib64" \
    && cp -L /lib64/ld-linux-x86-64.so.2 "$root/lib64/"
echo 'root:x:0:0:root:/:/bin/sh' > "$root/etc/passwd"
echo 'tcp 6 TCP' > "$root/etc/protocols"; echo 'icmp 1 ICMP' >> "$root/etc/protocols"
cp "$here/init" "$root/init"
cp "$repo/tests/kernel/vm/guest-test.sh" "$root/guest-test.sh"
cp "$here/nft61.sh" "$root/nft61.sh"
chmod +x "$root/init"
initrd=$vmdir/initramfs-$tag.cpio.gz
(cd "$root" && find . | cpio -o -H newc --quiet | gzip -1) > "$initrd"

hz=$(sed -n 's/^CONFIG_HZ=//p' "/boot/config-$kver" 2>/dev/null || true)
log=$vmdir/console-$tag.log
set +e
share=""
append="console=ttyS0 panic=-1 quiet nftsync.hz=${hz:-250}"
if [ "$stage2" = 1 ]; then
    share="-virtfs local,path=/,mount_tag=hostroot,security_model=none,readonly=on,multidevs=remap"
    # The checkout on its own too: it may sit on a mount the root share does not reach into (a
    # CI clone under /tmp, which the guest covers with a tmpfs).
    share="$share -virtfs local,path=$repo,mount_tag=repo,security_model=none,readonly=on"
    share="$share,multidevs=remap"
    append="$append nftsync.repo=$repo"
    [ "$lab" = 1 ] && append="$append nftsync.lab=1"
fi
mem=768 cpus=1 accel=tcg
if [ "$nft61" = 1 ]; then
    # pytest in the guest gets what is left of the run after boot and the direct checks.
    append="$append nftsync.nft61=1 nftsync.deadline=$timeout_s"
    append="$append nftsync.pycache=$pycache"
    [ -n "${NFTSYNC_VM_SELECT:-}" ] && append="$append nftsync.select=$NFTSYNC_VM_SELECT"
    mem=2048 cpus=2 accel=tcg,thread=multi
fi
# shellcheck disable=SC2086 # $share is several words on purpose
timeout --kill-after=5 "$timeout_s" qemu-system-x86_64 -accel $accel -m $mem -smp $cpus -nographic \
    -no-reboot -nic none -kernel "$kernel" -initrd "$initrd" $share \
    -append "$append" < /dev/null > "$log" 2>&1
rc=$?
set -e
tr -d '\r' < "$log"
[ $rc = 124 ] && { echo "run.sh: the VM did not finish within ${timeout_s}s" >&2; exit 124; }
if [ "$nft61" = 1 ]; then
    # Pass: the modules, the direct checks and pytest reported, and nothing failed.
    ! grep -q '^RESULT [^ ]* FAIL' "$log" || exit 1
    for r in nft61_modules_loaded nft61_sink_refresh_changes_expiry nft61_pytest_exit \
             nft61_no_namespaces_left; do
        grep -q "^RESULT $r PASS" "$log" || exit 1
    done
    exit 0
fi
# Pass: the shell stage summed up with no failure, no FAIL line anywhere, and stage 2 reported.
grep -q '^SUMMARY pass=[0-9]* fail=0' "$log" || exit 1
! grep -q '^RESULT [^ ]* FAIL' "$log" || exit 1
[ "$stage2" = 0 ] || grep -q '^RESULT adapter_[^ ]* PASS' "$log" || exit 1
[ "$stage2" = 0 ] || [ "$lab" != 1 ] || grep -q '^RESULT legacy_farm_lab PASS' "$log" || exit 1
