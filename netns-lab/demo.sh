#!/usr/bin/env bash
# A short demo in the netns lab: the seed's farm (rulesets/farm.nft) on lb1, 12 clients connect
# three times each to the VIP, and the table shows each client stuck to one backend, the clients
# spread over both, and the sessions nftsync sees in the kernel. Cleans up after itself.
set -euo pipefail
HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
ROOT="$(cd "$HERE/.." && pwd)"
PY="$ROOT/.venv/bin/python"
export LAB="${LAB:-demo}" LAB_CLIENTS=12 LAB_BACKENDS=2 LAB_PYTHON="$PY"

cleanup() { "$HERE/lab.sh" down >/dev/null 2>&1 || true; }
trap cleanup EXIT INT TERM
"$HERE/lab.sh" down >/dev/null 2>&1 || true
"$HERE/lab.sh" up >/dev/null

in_ns() { local node=$1; shift; ip netns exec "$LAB-$node" "$@"; }

echo "== lb1: nftsync apply rulesets/farm.nft"
in_ns lb1 "$PY" -m nftsync apply "$ROOT/rulesets/farm.nft" | sed 's/^/   /'
echo
echo "== 12 clients x 3 connections to VIP 10.10.0.100:60"
in_ns client "$PY" "$HERE/client.py" request --vip 10.10.0.100 --port 60 \
    --sources 10.10.1.1-10.10.1.12 --repeat 3 --parallel 4 >"/tmp/nftsync-demo-$$.json"
"$PY" - "/tmp/nftsync-demo-$$.json" <<'PYEOF'
import collections, json, sys
rows = [json.loads(l) for l in open(sys.argv[1]) if l.strip()]
rows = [r for r in rows if "src" in r]
seen = collections.defaultdict(list)
for r in rows:
    seen[r["src"]].append(r["backend"] or "-")
print(f"   {'client':12} {'backends of its 3 connections':32} sticky")
for src in sorted(seen, key=lambda s: tuple(int(x) for x in s.split("."))):
    b = seen[src]
    print(f"   {src:12} {' '.join(b):32} {'yes' if len(set(b)) == 1 else 'NO'}")
spread = collections.Counter(b[0] for b in seen.values())
print("   spread over backends:", ", ".join(f"{k}: {v} clients" for k, v in sorted(spread.items())))
PYEOF
rm -f "/tmp/nftsync-demo-$$.json"
echo
echo "== lb1: nftsync sessions list"
in_ns lb1 "$PY" -m nftsync sessions list | sed 's/^/   /'
