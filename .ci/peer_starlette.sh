#!/usr/bin/env bash
# Starlette's own tests/middleware/test_session.py, at the pinned version: first with its own
# SessionMiddleware (the baseline: every test must pass), then with it replaced by
# tinysession.ASGISessionMiddleware over a FileStore (.ci/peers/starlette/tinysession_starlette.py):
# exactly the tests the ASGI section of README.md lists as not applying
# (.ci/peers/starlette/expected_failures.txt) may fail.
source "$(dirname "$0")/peers/common.sh"
version=1.10.0
passed=12 expected="$root/.ci/peers/starlette/expected_failures.txt"
peer_venv "starlette==$version" itsdangerous==2.2.0 httpx2==2.0.0 pytest==9.2.0
peer_sources "starlette==$version"
cd "$work/starlette-$version"
rm -rf starlette  # test the installed package, as pip put it there
break_conftest tests
run_pytest "$work/baseline.log" . tests/middleware/test_session.py
PYTHONPATH="$root:$root/.ci/peers/starlette" run_pytest "$work/ours.log" . -p tinysession_starlette \
    tests/middleware/test_session.py
check_run "Starlette $version, its own SessionMiddleware" "$work/baseline.log" $((passed + $(wc -l <"$expected")))
check_run "Starlette $version, tinysession.ASGISessionMiddleware" "$work/ours.log" $passed "$expected"
if [[ $verdict == 0 ]]; then
    echo "peer_starlette: all of Starlette $version's session tests pass but the $(wc -l <"$expected") listed in the ASGI section of README.md"
fi
exit $verdict
