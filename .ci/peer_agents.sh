#!/usr/bin/env bash
# The OpenAI Agents SDK's own tests that use SQLiteSession, at the pinned version: its session tests
# (tests/memory/test_session.py, test_session_limit.py) and the Runner's tests that run with a
# session. First with the SDK's SQLiteSession (the baseline: every test must pass), then with
# SQLiteSession replaced by a subclass of tinysession.AgentsSession over an SQLiteStore
# (.ci/peers/agents/tinysession_agents.py): exactly the tests the README's Agents SDK section lists
# as not applying (.ci/peers/agents/expected_failures.txt) may fail. The two runs go side by side.
source "$(dirname "$0")/peers/common.sh"
version=0.24.0
passed=1048 expected="$root/.ci/peers/agents/expected_failures.txt"
tests=(tests/memory/test_session.py tests/memory/test_session_limit.py tests/test_agent_runner.py
    tests/test_agent_runner_streamed.py tests/test_max_turns.py tests/test_tool_batch_failure_history.py
    tests/test_native_tool_failure_history.py tests/test_programmatic_tool_calling.py
    tests/test_run_impl_resume_paths.py tests/test_tool_failure_boundaries.py tests/test_soft_cancel.py)
peer_venv "openai-agents==$version" pytest==9.2.0 pytest-asyncio==1.5.0 pytest-mock==3.17.0 \
    inline-snapshot==0.37.0 httpx==0.29.0
peer_sources "openai-agents==$version"
cd "$work/openai_agents-$version"
rm -rf src  # test the installed package, as pip put it there
break_conftest tests
run_pytest "$work/baseline.log" . "${tests[@]}" &
PYTHONPATH="$root:$root/.ci/peers/agents" run_pytest "$work/ours.log" . -p tinysession_agents "${tests[@]}" &
wait
check_run "openai-agents $version, its own SQLiteSession" "$work/baseline.log" $((passed + $(wc -l <"$expected")))
check_run "openai-agents $version, tinysession.AgentsSession" "$work/ours.log" $passed "$expected"
if [[ $verdict == 0 ]]; then
    echo "peer_agents: all of openai-agents $version's tests above pass but the $(wc -l <"$expected") listed in the README's Agents SDK section"
fi
exit $verdict
