# Sourced by each .ci/peer_*.sh: a temporary work directory, the peer's sources, and the one check
# every run of a peer's own tests must pass, so that no script can pass by accident: pytest ran
# (exit 0 or 1), exactly the expected number of tests passed, and exactly the listed tests failed
# (none for the baseline, the run with the peer's own backend).
#
# The proof: PEER_BREAK_CONFTEST=1 bash .ci/peer_NAME.sh makes the peer's tests/conftest.py raise at
# import (as Flask's did under pytest 9.2: every run errors, the baseline too); the script must exit 1.
set -euo pipefail
root=$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)
work=$(mktemp -d)
verdict=0
servers=()  # process ids to stop on exit
peer_cleanup() {
    for pid in "${servers[@]}"; do kill "$pid" 2>/dev/null || true; done
    rm -rf "$work"
}
trap peer_cleanup EXIT
export PIP_DISABLE_PIP_VERSION_CHECK=1 PYTHONDONTWRITEBYTECODE=1

# peer_venv PACKAGE...: a fresh virtual environment in $work/venv with the pinned PACKAGEs.
peer_venv() {
    python3 -m venv "$work/venv"
    "$work/venv/bin/pip" install -q "$@"
}

# peer_sources SPEC...: download the sdists (the peers' tests ship in them) into $work and unpack them.
peer_sources() {
    (cd "$work" && "$work/venv/bin/pip" download -q --no-binary :all: --no-deps "$@" \
        && for sdist in *.tar.gz; do tar xzf "$sdist"; done)
}

# break_conftest DIRECTORY: the proof's sabotage, only with PEER_BREAK_CONFTEST=1.
break_conftest() {
    if [[ ${PEER_BREAK_CONFTEST:-} == 1 ]]; then
        echo 'raise RuntimeError("PEER_BREAK_CONFTEST=1: a deliberately broken conftest")' >>"$1/conftest.py"
    fi
}

# run_pytest LOG DIRECTORY ARG...: run the venv's pytest in DIRECTORY; its output goes to LOG, its
# exit status to LOG.status (so runs can go side by side: run_pytest ... & wait).
run_pytest() {
    local log=$1 directory=$2 status=0
    shift 2
    (cd "$directory" && "$work/venv/bin/python" -m pytest -p no:cacheprovider -q -rfE "$@") >"$log" 2>&1 || status=$?
    echo "$status" >"$log.status"
}

# check_run NAME LOG PASSED [EXPECTED-FAILURES-FILE]: print the run's summary; set verdict=1 unless
# pytest ran, PASSED tests passed and exactly the tests listed in the file failed or errored.
check_run() {
    local name=$1 log=$2 passed=$3 expected=${4:-/dev/null} status failed got
    status=$(cat "$log.status")
    failed=$(sed -n 's/^\(FAILED\|ERROR\) \([^ ]*\).*/\2/p' "$log" | sort)
    got=$(tail -n 1 "$log" | sed -n 's/.*\b\([0-9][0-9]*\) passed.*/\1/p')
    echo "$name: $(tail -n 1 "$log")"
    if [[ $status -gt 1 ]]; then
        echo "  FAIL: pytest could not run the suite (exit $status):"; tail -n 20 "$log" | sed 's/^/  | /'
        verdict=1
    elif [[ $failed != "$(sort "$expected")" ]]; then
        echo "  FAIL: the failures differ from the list (< expected, > got):"
        diff <(sort "$expected") <(echo "$failed") | sed 's/^/  /' || true
        verdict=1
    elif [[ ${got:-0} != "$passed" ]]; then
        echo "  FAIL: ${got:-0} passed, $passed expected"
        verdict=1
    fi
}
