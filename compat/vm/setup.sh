#!/bin/sh
# Install, idempotently, the Debian 12 packages the xt_recent VM test needs:
#   qemu-system-x86        qemu-system-x86_64 (run under TCG: no KVM needed)
#   linux-image-<KVER>     the 6.1 kernel that boots in the VM, and its modules (x_tables, ...)
#   linux-headers-<KVER>   /lib/modules/<KVER>/build, to build the patched xt_recent.ko
#   linux-source-6.1       /usr/src/linux-source-6.1.tar.xz, the stock xt_recent.c we patch
#   busybox-static cpio    the initramfs userland and its packer
#   iptables gcc make      iptables-legacy (xtables-legacy-multi + libxt_recent.so), the compiler
# KVER defaults to the ABI that Debian's linux-headers-amd64 meta package points at, so image and
# headers always match. Override: KVER=6.1.0-56-amd64 compat/vm/setup.sh
# Prints the chosen KVER on its last line (build.sh / the tests read it from there or from
# `ls /lib/modules`).
set -eu
export DEBIAN_FRONTEND=noninteractive

if [ -z "${KVER:-}" ]; then
    KVER=$(apt-cache depends linux-headers-amd64 2>/dev/null \
        | sed -n 's/^ *Depends: linux-headers-\(6\.1\.[0-9]*-[0-9]*-amd64\)$/\1/p' | head -n1)
    if [ -z "$KVER" ]; then
        apt-get update -qq
        KVER=$(apt-cache depends linux-headers-amd64 \
            | sed -n 's/^ *Depends: linux-headers-\(6\.1\.[0-9]*-[0-9]*-amd64\)$/\1/p' | head -n1)
    fi
fi
case "$KVER" in
    6.1.*-amd64) ;;
    *) echo "setup.sh: could not find a Debian 6.1 amd64 kernel ABI (got '$KVER')" >&2; exit 1 ;;
esac

pkgs="qemu-system-x86 linux-image-$KVER linux-headers-$KVER linux-source-6.1 busybox-static cpio
      iptables gcc make xz-utils"
missing=""
for p in $pkgs; do
    if ! dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q 'install ok installed'; then
        missing="$missing $p"
    fi
done
if [ -n "$missing" ]; then
    echo "setup.sh: installing:$missing" >&2
    apt-get install -y -qq --no-install-recommends $missing >&2 \
        || { apt-get update -qq >&2 && apt-get install -y -qq --no-install-recommends $missing >&2; }
else
    echo "setup.sh: all packages present" >&2
fi
[ -e "/lib/modules/$KVER/build/Makefile" ] \
    || { echo "setup.sh: /lib/modules/$KVER/build missing after install" >&2; exit 1; }
[ -e /usr/src/linux-source-6.1.tar.xz ] \
    || { echo "setup.sh: /usr/src/linux-source-6.1.tar.xz missing after install" >&2; exit 1; }
echo "$KVER"
