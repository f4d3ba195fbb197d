#!/usr/bin/env bash
# Peers' own tests against FlaskSessionInterface, at pinned versions: Flask's session tests, then
# Flask-Login's and Flask-WTF's suites. Each runs first with Flask's own cookie sessions (the
# baseline), then with flask.session served by tinysession over a FileStore, an SQLiteStore and a
# RedisStore (.ci/peers/flask/tinysession_plugin.py). Every run must pass every test: the numbers
# below are the README's ("Flask's and its extensions' own tests").
source "$(dirname "$0")/peers/common.sh"
FLASK=3.1.3 WERKZEUG=3.1.8 FLASK_LOGIN=0.6.3 FLASK_WTF=1.3.0 WTFORMS=3.2.1

peer_venv "flask==$FLASK" "werkzeug==$WERKZEUG" "flask-login==$FLASK_LOGIN" "flask-wtf==$FLASK_WTF" \
    "wtforms==$WTFORMS" pytest==8.3.5 redis==5.2.1 asgiref==3.8.1 semantic-version==2.10.0
peer_sources "flask==$FLASK" "flask-login==$FLASK_LOGIN" "flask-wtf==$FLASK_WTF"

port=$(python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
redis-server --port "$port" --bind 127.0.0.1 --save '' --appendonly no >"$work/redis.log" 2>&1 &
servers+=($!)
export TINYSESSION_REDIS_URL="redis://127.0.0.1:$port/0"
for _ in $(seq 50); do "$work/venv/bin/python" -c "import redis; redis.Redis.from_url('$TINYSESSION_REDIS_URL').ping()" 2>/dev/null && break; sleep 0.1; done

suite() {  # suite NAME DIRECTORY PASSED TEST-PATH...
    local name=$1 directory=$2 passed=$3
    shift 3
    break_conftest "$directory/tests"
    for store in flask file sqlite redis; do
        TINYSESSION_STORE=$store PYTHONPATH="$root:$root/.ci/peers/flask" \
            run_pytest "$work/$name-$store.log" "$directory" -p tinysession_plugin "$@"
        check_run "$name with $store sessions" "$work/$name-$store.log" "$passed"
    done
}
suite flask "$work/flask-$FLASK" 156 tests/test_basic.py tests/test_testing.py tests/test_session_interface.py
suite flask-login "$work/Flask-Login-$FLASK_LOGIN" 114 tests
suite flask-wtf "$work/flask_wtf-$FLASK_WTF" 80 tests  # and 3 skipped: Flask-Babel, Flask-Uploads not installed
exit $verdict
