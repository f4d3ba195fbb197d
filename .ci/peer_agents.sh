#!/usr/bin/env bash
# The OpenAI Agents SDK's own tests/memory/test_session.py, at the pinned version, with its
# SQLiteSession replaced by tinysession.AgentsSession over an SQLiteStore
# (.ci/peers/agents/tinysession_agents.py). Fails unless exactly the tests the README's Agents SDK section
# lists as not applying fail.
set -euo pipefail
here=$(cd "$(dirname "$0")/.." && pwd)
version=0.24.0
expected_file="$here/.ci/peers/agents/expected_failures.txt"
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
export PIP_DISABLE_PIP_VERSION_CHECK=1
python3 -m venv "$work/venv"
"$work/venv/bin/pip" install -q "openai-agents==$version" "pytest==9.2.0" "pytest-asyncio==1.5.0"
(cd "$work" && "$work/venv/bin/pip" download -q --no-binary :all: --no-deps "openai-agents==$version")
tar -xzf "$work/openai_agents-$version.tar.gz" -C "$work"
cd "$work/openai_agents-$version"
rm -rf src  # test the installed package, as pip put it there
status=0
PYTHONPATH="$here:$here/.ci/peers/agents:." "$work/venv/bin/python" -m pytest -p tinysession_agents \
    -p no:cacheprovider -q -rf tests/memory/test_session.py > "$work/log" 2>&1 || status=$?
cat "$work/log"
failed=$(sed -n 's/^FAILED \([^ ]*\).*/\1/p' "$work/log" | sort)
if [[ $status -gt 1 ]]; then
    echo "peer_agents: pytest could not run the suite (exit $status)"; exit 1
fi
if [[ "$failed" != "$(sort "$expected_file")" ]]; then
    echo "peer_agents: the failures differ from the list in the README's Agents SDK section"
    diff <(sort "$expected_file") <(echo "$failed") || true
    exit 1
fi
echo "peer_agents: all of openai-agents $version's session tests pass but the $(wc -l < "$expected_file") listed in the README's Agents SDK section"
