#!/bin/sh
# Build the patched xt_recent.ko out of tree.
#
#   compat/kernel/build.sh [-s SOURCE] [-k KVER] [-o OUTDIR]
#
#   SOURCE  a linux source tree (directory) or tarball (.tar.xz/.tar.gz/.tar) holding
#           net/netfilter/xt_recent.c; default /usr/src/linux-source-6.1.tar.xz (Debian's
#           linux-source-6.1). Only that one file is extracted.
#   KVER    the kernel whose headers package provides /lib/modules/KVER/build; default: the
#           only (or newest) 6.1 directory under /lib/modules.
#   OUTDIR  where to build (gitignored); default /work/main/.vm/module/KVER, or
#           $NFTSYNC_VM_DIR/module/KVER. The module ends up in OUTDIR/xt_recent.ko.
#
# Why out of tree: the module is the stock one plus one proc command, built against the distro's
# own headers, so it loads into the distro kernel in place of the stock xt_recent (same name and
# symbols). Prints the path of the built .ko on its last line. A module already built from the
# same inputs is reused (NFTSYNC_REBUILD=1 forces a build).
set -eu
here=$(cd "$(dirname "$0")" && pwd)
repo=$(cd "$here/../.." && pwd)
src=/usr/src/linux-source-6.1.tar.xz
kver=""
out=""
while getopts s:k:o: opt; do
    case $opt in
        s) src=$OPTARG ;;
        k) kver=$OPTARG ;;
        o) out=$OPTARG ;;
        *) sed -n '2,16p' "$0" >&2; exit 2 ;;
    esac
done
if [ -z "$kver" ]; then
    kver=$(ls /lib/modules 2>/dev/null | grep '^6\.1\.' | sort -V | tail -n1 || true)
fi
[ -n "$kver" ] && [ -e "/lib/modules/$kver/build/Makefile" ] || {
    echo "build.sh: no kernel headers at /lib/modules/${kver:-<none>}/build (run compat/vm/setup.sh)" >&2
    exit 1
}
[ -n "$out" ] || out=${NFTSYNC_VM_DIR:-$repo/.vm}/module/$kver
mkdir -p "$out"
# Reuse a module built from the same patch, Kbuild and source (extracting from the 140 MB tarball
# is most of the build time).
if [ -e "$out/xt_recent.ko" ] && [ -z "${NFTSYNC_REBUILD:-}" ] \
   && [ "$out/xt_recent.ko" -nt "$here/xt_recent-set-timestamps.patch" ] \
   && [ "$out/xt_recent.ko" -nt "$here/Kbuild" ] && [ "$out/xt_recent.ko" -nt "$src" ] \
   && [ "$(cat "$out/.source" 2>/dev/null)" = "$src" ]; then
    echo "$out/xt_recent.ko"
    exit 0
fi
rm -f "$out/xt_recent.c" "$out/xt_recent.ko"
echo "$src" > "$out/.source"

rel=net/netfilter/xt_recent.c
if [ -d "$src" ]; then
    cp "$src/$rel" "$out/xt_recent.c"
else
    [ -e "$src" ] || { echo "build.sh: no linux source at $src (apt-get install linux-source-6.1)" >&2; exit 1; }
    top=$(basename "$src"); top=${top%.tar.xz}; top=${top%.tar.gz}; top=${top%.tar}
    tmp=$(mktemp -d)
    trap 'rm -rf "$tmp"' EXIT
    tar -xf "$src" -C "$tmp" "$top/$rel"
    cp "$tmp/$top/$rel" "$out/xt_recent.c"
fi
(cd "$out" && patch -p3 --quiet --no-backup-if-mismatch xt_recent.c) \
    < "$here/xt_recent-set-timestamps.patch"
cp "$here/Kbuild" "$out/Kbuild"
make -s -C "/lib/modules/$kver/build" M="$out" modules >&2
[ -e "$out/xt_recent.ko" ] || { echo "build.sh: no xt_recent.ko produced" >&2; exit 1; }
echo "$out/xt_recent.ko"
