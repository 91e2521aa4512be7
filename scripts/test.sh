#!/usr/bin/env bash
# Set up (idempotently, including the VM test dependencies) and run the whole test suite against
# the real kernel, in network namespaces. Extra arguments go to pytest.
# NFTSYNC_SLOW=1 also runs the soak/scale tests marked slow (CI does).
set -uo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
scripts/setup.sh --vm || exit 1

.venv/bin/ruff check nftsync tests benchmarks || exit 1
.venv/bin/python -m pytest -p no:cacheprovider "$@"
rc=$?
if [[ $rc -eq 5 ]]; then
    echo "test.sh: pytest collected no tests: that is a failure, not a pass" >&2
    exit 1
fi
leftover=$(ip netns list | awk '{print $1}')
if [[ -n "$leftover" ]]; then
    echo "test.sh: tests left network namespaces behind: $leftover" >&2
    [[ $rc -eq 0 ]] && rc=1
fi
exit $rc
