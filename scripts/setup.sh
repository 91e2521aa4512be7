#!/usr/bin/env bash
# Set up nftsync on a fresh Debian 12 machine, idempotently (run as root):
#   - Debian packages: nftables, python3-nftables (libnftables' Python binding), conntrack,
#     iptables, iproute2, keepalived, conntrackd (benchmark comparisons), util-linux (unshare),
#     haproxy (its stick tables are what docs/l7.md replicates; benchmarks/bench_haproxy.py);
#     what scripts/build-deb.sh and its test need (debhelper, dh-python, mmdebstrap, lintian...);
#     prometheus (promtool checks the alert rules and the metrics text, tests/kernel/test_metrics.py
#     runs a Prometheus server in a namespace to scrape a daemon).
#   - a venv on /usr/bin/python3 with --system-site-packages (python3-nftables is not on PyPI),
#     with nftsync installed editable with its test and bench extras (pytest, hypothesis, ruff;
#     pyroute2, which only benchmarks/bench_ctnetlink.py uses, for comparison; py-spy for
#     bench_replication.py --profile).
# With --vm, also what the legacy xt_recent VM tests need (qemu, Debian's 6.1 kernel; see compat/).
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

if [[ $(id -u) -ne 0 ]]; then
    echo "setup.sh: run as root (it installs Debian packages; nftsync itself needs root too)" >&2
    exit 1
fi

packages=(nftables python3-nftables python3-venv conntrack conntrackd iptables iproute2
          keepalived util-linux procps haproxy)
# The Debian package (scripts/build-deb.sh) and its test (tests/kernel/test_package.py, which
# installs it into a clean bookworm root made by mmdebstrap): build dependencies, lintian, groff.
packages+=(build-essential debhelper dh-python pybuild-plugin-pyproject python3-all
           python3-setuptools python3-wheel python3-click mmdebstrap lintian groff-base man-db)
# The metrics endpoint's checks with a real Prometheus (docs/metrics.md): promtool, the server.
packages+=(prometheus)
missing=()
for p in "${packages[@]}"; do
    dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q 'install ok installed' || missing+=("$p")
done
if ((${#missing[@]})); then
    echo "setup.sh: installing ${missing[*]}" >&2
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq
    apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
fi
# keepalived, conntrackd and haproxy are started by the lab and the benchmarks in namespaces,
# prometheus by tests/kernel/test_metrics.py, never as system services.
for svc in keepalived conntrackd prometheus haproxy; do
    systemctl disable --now "$svc" >/dev/null 2>&1 || true
done

if [[ ! -x .venv/bin/python ]] || ! .venv/bin/python -c 'import nftables' 2>/dev/null; then
    rm -rf .venv
    /usr/bin/python3 -m venv --system-site-packages .venv
fi
if ! .venv/bin/python -c 'import nftsync, pytest, hypothesis, pyroute2, click' 2>/dev/null ||
   [[ ! -x .venv/bin/ruff || ! -x .venv/bin/py-spy || pyproject.toml -nt .venv/.installed ]]; then
    .venv/bin/pip install -q --disable-pip-version-check -e '.[test,bench]'
    touch .venv/.installed
fi

if [[ "${1:-}" == "--vm" ]]; then
    sh compat/vm/setup.sh >/dev/null
fi
echo "setup.sh: ready (.venv/bin/nftsync)" >&2
