#!/bin/sh
# Runs inside the qemu VM (busybox sh, Debian 6.1 kernel, patched xt_recent.ko loaded).
# Prints one machine-readable line per check:
#   RESULT <name> PASS|FAIL <detail>
# then "SUMMARY pass=N fail=M". The host side (tests/kernel/vm/test_xt_recent_vm.py) parses them.
# HZ comes from the kernel command line (nftsync.hz=...), written there by compat/vm/run.sh from
# the kernel's own config, because the Debian kernel has no /proc/config.gz.
PASS=0
FAIL=0
T=demo
P=/proc/net/xt_recent/$T

result() { # name ok(0/1) detail
    if [ "$2" = 0 ]; then PASS=$((PASS + 1)); echo "RESULT $1 PASS $3"
    else FAIL=$((FAIL + 1)); echo "RESULT $1 FAIL $3"; fi
}

# write LINE to the table in one write(2); prints the errno text on failure (empty on success)
wr() {
    err=$( { echo "$1" > "$P"; } 2>&1 ) && { echo OK; return; }
    case "$err" in
        *"Invalid argument"*) echo EINVAL ;;
        *"Argument list too long"*) echo E2BIG ;;
        *"out of range"*) echo ERANGE ;;
        *) echo "OTHER:$err" ;;
    esac
}

HZ=$(sed -n 's/.*nftsync\.hz=\([0-9]*\).*/\1/p' /proc/cmdline)
[ -n "$HZ" ] || HZ=250
echo "INFO kernel $(uname -r) hz=$HZ"

ip link set lo up
# A table made by rules that only check (no --set): nothing stamps it behind the test's back.
# hitcount 0 and ip_pkt_list_tot 0 give a 32-slot ring per entry.
iptables-legacy -A INPUT -s 127.0.0.1 -p icmp -m recent --name $T --rcheck --seconds 60 --rsource \
    || echo "INFO iptables rule A failed"
iptables-legacy -A INPUT -s 127.0.0.1 -p icmp -m recent --name $T --rcheck --seconds 10 --rsource \
    || echo "INFO iptables rule B failed"
[ -e "$P" ]; result table_created $? "$P"

# "now" in jiffies, from the kernel itself: stamp a scratch address with "+", read it, remove it.
echo +198.51.100.99 > "$P"
N=$(sed -n 's/^src=198\.51\.100\.99 ttl: 0 last_seen: \([0-9]*\) .*/\1/p' "$P")
echo -198.51.100.99 > "$P"
[ -n "$N" ]; result now_jiffies $? "N=$N"
echo "INFO N=$N"

# 1. IPv4 round trip: exactly the stamps, ttl, last_seen = newest, oldest_pkt = count.
r=$(wr "*192.0.2.1;64;$((N - 30));$((N - 20));$((N - 10));")
got=$(grep '^src=192\.0\.2\.1 ' "$P")
want="src=192.0.2.1 ttl: 64 last_seen: $((N - 10)) oldest_pkt: 3 $((N - 30)), $((N - 20)), $((N - 10))"
[ "$r" = OK ] && [ "$got" = "$want" ]; result ipv4_roundtrip $? "write=$r got=[$got]"

# 2. IPv6 round trip (the kernel prints the full, uncompressed form).
r=$(wr "*2001:db8::7;0;$((N - 5));$N;")
got=$(grep '^src=2001:0db8:' "$P")
want="src=2001:0db8:0000:0000:0000:0000:0000:0007 ttl: 0 last_seen: $N oldest_pkt: 2 $((N - 5)), $N"
[ "$r" = OK ] && [ "$got" = "$want" ]; result ipv6_roundtrip $? "write=$r got=[$got]"

# 3. Replace: the same address again with other stamps leaves one entry with the new stamps only.
r=$(wr "*192.0.2.1;7;$((N - 1));")
got=$(grep '^src=192\.0\.2\.1 ' "$P")
want="src=192.0.2.1 ttl: 7 last_seen: $((N - 1)) oldest_pkt: 1 $((N - 1))"
[ "$r" = OK ] && [ "$got" = "$want" ]; result replace $? "write=$r got=[$got]"

# 4. Equal stamps are allowed (two packets in one tick).
r=$(wr "*192.0.2.2;0;$((N - 3));$((N - 3));")
got=$(grep '^src=192\.0\.2\.2 ' "$P")
want="src=192.0.2.2 ttl: 0 last_seen: $((N - 3)) oldest_pkt: 2 $((N - 3)), $((N - 3))"
[ "$r" = OK ] && [ "$got" = "$want" ]; result equal_stamps $? "write=$r got=[$got]"

# 5. A full ring (32 stamps): newest in slot 0, next write at slot 1, as after 33 packets.
line="*192.0.2.3;0;"
i=31
while [ $i -ge 0 ]; do line="$line$((N - i));"; i=$((i - 1)); done
r=$(wr "$line")
got=$(grep '^src=192\.0\.2\.3 ' "$P")
want="src=192.0.2.3 ttl: 0 last_seen: $N oldest_pkt: 1 $N"
i=31
while [ $i -ge 1 ]; do want="$want, $((N - i))"; i=$((i - 1)); done
[ "$r" = OK ] && [ "$got" = "$want" ]; result full_ring $? "write=$r got=[$got]"

# 6. Bad input is refused with the documented errno and changes nothing.
before=$(cat "$P")
line="*192.0.2.4;0;"
i=32
while [ $i -ge 0 ]; do line="$line$((N - i));"; i=$((i - 1)); done
check_reject() { # name expected-errno line
    r=$(wr "$3")
    [ "$r" = "$2" ]; result "reject_$1" $? "want=$2 got=$r"
}
check_reject too_many_stamps E2BIG "$line"
check_reject bad_ipv4 EINVAL "*192.0.2.300;0;$N;"
check_reject bad_ipv6 EINVAL "*2001:db8::zz;0;$N;"
check_reject ipv4_trailing_junk EINVAL "*192.0.2.5x;0;$N;"
check_reject ipv6_trailing_junk EINVAL "*2001:db8::5/64;0;$N;"
check_reject ipv6_two_gaps EINVAL "*2001::db8::5;0;$N;"
check_reject empty_addr EINVAL "*;0;$N;"
check_reject garbage_stamp EINVAL "*192.0.2.5;0;12x;"
check_reject signed_stamp EINVAL "*192.0.2.5;0;+$N;"
check_reject space EINVAL "*192.0.2.5; 0;$N;"
check_reject empty_field EINVAL "*192.0.2.5;0;$N;;"
check_reject no_stamps EINVAL "*192.0.2.5;0;"
check_reject no_trailing_semicolon EINVAL "*192.0.2.5;0;$N"
check_reject decreasing EINVAL "*192.0.2.5;0;$N;$((N - 1));"
check_reject future_stamp ERANGE "*192.0.2.5;0;$((N + 100000));"
check_reject overflow ERANGE "*192.0.2.5;0;99999999999999999999;"
check_reject ttl_too_big ERANGE "*192.0.2.5;256;$N;"
check_reject two_lines EINVAL "*192.0.2.5;0;$N;
*192.0.2.6;0;$N;"
after=$(cat "$P")
[ "$before" = "$after" ]; result reject_changes_nothing $? ""

# 7. The stock commands still work.
r=$(wr "+192.0.2.50")
c1=$(grep -c '^src=192\.0\.2\.50 ttl: 0 last_seen: [0-9]* oldest_pkt: 1 [0-9]*$' "$P")
r2=$(wr "+192.0.2.50")
c2=$(grep -c '^src=192\.0\.2\.50 ttl: 0 last_seen: [0-9]* oldest_pkt: 2 [0-9]*, [0-9]*$' "$P")
[ "$r$r2" = OKOK ] && [ "$c1" = 1 ] && [ "$c2" = 1 ]; result stock_add $? "write=$r/$r2 c=$c1/$c2"
r=$(wr "+2001:db8::50")
c1=$(grep -c '^src=2001:0db8:0000:0000:0000:0000:0000:0050 ' "$P")
[ "$r" = OK ] && [ "$c1" = 1 ]; result stock_add_ipv6 $? "write=$r c=$c1"
r=$(wr "-192.0.2.50")
c1=$(grep -c '^src=192\.0\.2\.50 ' "$P")
[ "$r" = OK ] && [ "$c1" = 0 ]; result stock_del $? "write=$r c=$c1"
r=$(wr "?192.0.2.50")
[ "$r" = EINVAL ]; result stock_bad_command $? "got=$r"
r=$(wr "/")
c1=$(wc -l < "$P")
[ "$r" = OK ] && [ "$c1" = 0 ]; result stock_flush $? "write=$r lines=$c1"

# 8. iptables --rcheck matches an inserted address by its stamps: one stamp 20 s old matches
#    "--seconds 60" (rule 1) but not "--seconds 10" (rule 2). Packets: ping over lo.
r=$(wr "*127.0.0.1;0;$((N - 20 * HZ));")
iptables-legacy -Z INPUT
ping -c 2 -W 2 127.0.0.1 > /dev/null 2>&1
a=$(iptables-legacy -L INPUT -v -n -x | awk 'NR == 3 {print $1}')
b=$(iptables-legacy -L INPUT -v -n -x | awk 'NR == 4 {print $1}')
# An echo request and its reply both come in from 127.0.0.1: 2 pings -> 4 packets.
[ "$r" = OK ] && [ "${a:-0}" -ge 2 ] && [ "${b:-1}" = 0 ]
result rcheck_seconds $? "write=$r match60=$a match10=$b"
# ... and once "+" adds a stamp of now, both match.
r=$(wr "+127.0.0.1")
iptables-legacy -Z INPUT
ping -c 2 -W 2 127.0.0.1 > /dev/null 2>&1
a=$(iptables-legacy -L INPUT -v -n -x | awk 'NR == 3 {print $1}')
b=$(iptables-legacy -L INPUT -v -n -x | awk 'NR == 4 {print $1}')
[ "$r" = OK ] && [ "${a:-0}" -ge 2 ] && [ "${b:-0}" -ge 2 ]
result rcheck_fresh $? "write=$r match60=$a match10=$b"

echo "SUMMARY pass=$PASS fail=$FAIL"
