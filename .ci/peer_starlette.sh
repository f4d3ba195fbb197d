#!/usr/bin/env bash
# Starlette's own tests/middleware/test_session.py, at the pinned version, with its
# SessionMiddleware replaced by tinysession.ASGISessionMiddleware over a FileStore
# (.ci/peers/starlette/tinysession_starlette.py). Fails unless exactly the tests
# the ASGI section of README.md lists as not applying fail.
set -euo pipefail
here=$(cd "$(dirname "$0")/.." && pwd)
version=1.10.0
expected="tests/middleware/test_session.py::test_domain_cookie[asyncio]
tests/middleware/test_session.py::test_partitioned_session[asyncio-True]
tests/middleware/test_session.py::test_session_cookie_subpath[asyncio]"
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
export PIP_DISABLE_PIP_VERSION_CHECK=1
python3 -m venv "$work/venv"
"$work/venv/bin/pip" install -q "starlette==$version" itsdangerous "httpx2>=2.0.0" "pytest>=9.1.1"
(cd "$work" && "$work/venv/bin/pip" download -q --no-binary :all: --no-deps "starlette==$version")
tar -xzf "$work/starlette-$version.tar.gz" -C "$work"
cd "$work/starlette-$version"
rm -rf starlette  # test the installed package, as pip put it there
status=0
PYTHONPATH="$here:$here/.ci/peers/starlette" "$work/venv/bin/python" -m pytest -p tinysession_starlette \
    -p no:cacheprovider -q -rf tests/middleware/test_session.py > "$work/log" 2>&1 || status=$?
cat "$work/log"
failed=$(sed -n 's/^FAILED \([^ ]*\).*/\1/p' "$work/log" | sort)
if [[ $status -gt 1 ]]; then
    echo "peer_starlette: pytest could not run the suite (exit $status)"; exit 1
fi
if [[ "$failed" != "$expected" ]]; then
    echo "peer_starlette: the failures differ from the list in the ASGI section of README.md"
    diff <(echo "$expected") <(echo "$failed") || true
    exit 1
fi
echo "peer_starlette: all of Starlette $version's session tests pass but the $(echo "$expected" | wc -l) listed in the ASGI section of README.md"
