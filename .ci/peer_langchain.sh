#!/usr/bin/env bash
# trim_messages on LangChain's own serialised messages: test_tinysession.TrimReadsLangChainDumps with
# langchain-core installed at the pinned version, so test_real_langchain_messages runs (it skips where
# langchain-core is missing) on the dicts that BaseMessage.model_dump() and messages_to_dict() make.
source "$(dirname "$0")/peers/common.sh"
peer_venv langchain-core==1.8.3 pytest==9.2.0
break_conftest "$work"
cp -r "$root/tinysession.py" "$root/test_tinysession.py" "$root/README.md" "$root/requirements-test.txt" "$root/examples" "$work/"
run_pytest "$work/langchain.log" "$work" test_tinysession.py -k TrimReadsLangChainDumps
check_run "langchain-core 1.8.3, TrimReadsLangChainDumps" "$work/langchain.log" 8
exit $verdict
