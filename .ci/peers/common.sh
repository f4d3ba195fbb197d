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

# peer_debian_source PACKAGE TARBALL SHA256: for a peer whose PyPI sdist ships no tests, the upstream
# release tarball (TARBALL) of Debian's source package PACKAGE in trixie, which ships them: apt-get
# source fetches it from the Debian archive this machine's apt already uses, through a throwaway
# deb-src list, lists and cache under $work (the machine's apt state is not touched). apt checks it
# against the signed index; SHA256 pins it; it is unpacked into $work.
peer_debian_source() {
    local package=$1 tarball=$2 sha256=$3 apt=$work/apt uri
    uri=$(sed -n 's/^URIs: *//p' /etc/apt/sources.list.d/debian.sources 2>/dev/null | head -n 1)
    if [[ -z $uri ]]; then
        echo "peer_debian_source: no Debian archive (URIs:) in /etc/apt/sources.list.d/debian.sources" >&2
        return 1
    fi
    mkdir -p "$apt/lists/partial" "$apt/cache/archives/partial"
    echo "deb-src $uri trixie main" >"$apt/sources.list"
    local options=(-o Dir::Etc::sourcelist="$apt/sources.list" -o Dir::Etc::sourceparts=-
        -o Dir::State::Lists="$apt/lists" -o Dir::Cache="$apt/cache" -o APT::Sandbox::User=root)
    apt-get -qq "${options[@]}" update
    (cd "$work" && apt-get -qq "${options[@]}" source --download-only --tar-only "$package" >/dev/null)
    echo "$sha256  $work/$tarball" | sha256sum --check --quiet
    tar xzf "$work/$tarball" -C "$work"
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
    failed=$(sed -n 's/^\(FAILED\|ERROR\) \([^ ][^ ]*\).*/\2/p' "$log" | sort)  # not "ERROR    logger:..."
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
