#!/usr/bin/env bash
# Quart's own test suite (all of tests/: sessions, the test client, websockets and the rest), at the
# pinned version, with every app's session served by tinysession.QuartSessionInterface over a FileStore
# (.ci/peers/quart/tinysession_quart.py), after a baseline run on Quart's own cookie sessions. Quart's
# sdists on PyPI ship no tests and CI reaches no GitHub: the tests come from the same release's source in
# Debian's archive (trixie's quart 0.20.0-1, its upstream tarball), checked against its SHA-256. Fails
# unless the baseline passes whole and exactly the tests the Quart section of README.md lists fail.
set -euo pipefail
here=$(cd "$(dirname "$0")/.." && pwd)
version=0.20.0
sha256=5e0a6b984cc4f001d5f59d73153d18744b57e3c6ec5944d354c42cc61e463b17
expected=""
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
export PIP_DISABLE_PIP_VERSION_CHECK=1
python3 -c 'import sys, urllib.request; urllib.request.urlretrieve(sys.argv[1], sys.argv[2])' \
    "http://deb.debian.org/debian/pool/main/q/quart/quart_$version.orig.tar.xz" "$work/quart.tar.xz"
echo "$sha256  $work/quart.tar.xz" | sha256sum --check --quiet
tar -xJf "$work/quart.tar.xz" -C "$work"
cd "$work/quart-$version"
rm -rf src  # test the installed package, as pip put it there
python3 -m venv "$work/venv"
# Quart's own pinned test requirements (pytest 8.3.3 among them), and the Flask and Click of its release.
"$work/venv/bin/pip" install -q "quart==$version" flask==3.1.3 werkzeug==3.1.8 click==8.1.8 \
    -r requirements/tests.txt

run() {  # run SESSIONS: the suite on Quart's own sessions ("quart") or ours ("file"); sets status, failed
    status=0
    TINYSESSION_STORE=$1 PYTHONPATH="$here:$here/.ci/peers/quart" timeout 900 "$work/venv/bin/python" -m pytest \
        -p tinysession_quart -p no:sugar -p no:cacheprovider -q -rfE tests > "$work/$1.log" 2>&1 || status=$?
    echo "Quart $version's tests with $1 sessions: $(tail -n 1 "$work/$1.log")"
    failed=$(sed -n 's/^\(FAILED\|ERROR\) \([^ ]*\).*/\2/p' "$work/$1.log" | sort)
}
run quart
if [[ $status -ne 0 ]]; then
    cat "$work/quart.log"; echo "peer_quart: the baseline run on Quart's own sessions does not pass (exit $status)"
    exit 1
fi
run file
if [[ $status -gt 1 ]]; then
    cat "$work/file.log"; echo "peer_quart: pytest could not run the suite (exit $status)"; exit 1
fi
if [[ "$failed" != "$expected" ]]; then
    cat "$work/file.log"; echo "peer_quart: the failures differ from the list in the Quart section of README.md"
    diff <(echo "$expected") <(echo "$failed") || true
    exit 1
fi
echo "peer_quart: all of Quart $version's tests pass on tinysession's sessions"
