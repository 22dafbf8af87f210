#!/usr/bin/env bash
# The whole test suite from a fresh clone: system tools, the project with its test extras, ruff, then pytest, in
# parallel, with this script's arguments (e.g. `scripts/test.sh -m "not slow"`). .ci/run runs exactly this.
set -euo pipefail
cd "$(dirname "$0")/.."

# tests/test_cluster_launcher.py brings up a cluster of network namespaces, each running its own sshd: it
# needs sshd, ssh, ssh-keygen, rsync and ip. On Debian/Ubuntu, install those that are missing. policy-rc.d
# keeps apt from starting the ssh service: the test runs its own sshds and stops them.
need=()
[ -x /usr/sbin/sshd ] || command -v sshd >/dev/null 2>&1 || need+=(openssh-server)
{ command -v ssh && command -v ssh-keygen; } >/dev/null 2>&1 || need+=(openssh-client)
command -v rsync >/dev/null 2>&1 || need+=(rsync)
[ -x /usr/sbin/ip ] || command -v ip >/dev/null 2>&1 || need+=(iproute2)
if [ "${#need[@]}" -gt 0 ]; then
    if [ "$(id -u)" -ne 0 ] || ! command -v apt-get >/dev/null 2>&1; then
        echo "scripts/test.sh: cannot install ${need[*]} (needs root and apt-get);" \
             "tests/test_cluster_launcher.py will fail without them" >&2
    else
        echo "scripts/test.sh: installing ${need[*]} (apt-get; no service is started)" >&2
        if [ ! -e /usr/sbin/policy-rc.d ]; then
            printf '#!/bin/sh\nexit 101\n' > /usr/sbin/policy-rc.d && chmod +x /usr/sbin/policy-rc.d
            trap 'rm -f /usr/sbin/policy-rc.d' EXIT
        fi
        apt-get update -qq
        DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${need[@]}"
    fi
fi

python -m pip install -e ".[test]"
# Layout and lint are the formatter's (ruff, configured in pyproject.toml), checked before any test.
python -m ruff check .
python -m ruff format --check .
# In parallel (pytest-xdist): each test goes to any worker, except the modules that share one Ray cluster
# among their tests (marked xdist_group; --dist loadgroup keeps each on one worker); slow tests are handed
# out first (tests/conftest.py). Every worker's jobs start Ray clusters of their own. Workers: one more than
# the machine's cores (the tests also wait on Ray's start, subprocesses and sleeps; docs/results.md, "The test
# suite's wall time"), at most 4 (memory: each worker's Ray clusters and torch processes take a few GiB).
# HSIC_RAY_TEST_WORKERS overrides; `scripts/test.sh -n 0` runs serially.
workers="${HSIC_RAY_TEST_WORKERS:-$(python -c 'import os; print(min(4, (os.cpu_count() or 1) + 1))')}"
python -m pytest -n "$workers" --dist loadgroup "$@"
