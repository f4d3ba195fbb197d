#!/usr/bin/env bash
# Peers' own tests against FlaskSessionInterface, at pinned versions: Flask's
# session tests, then Flask-Login's and Flask-WTF's suites, each run with
# flask.session served by tinysession over a FileStore, an SQLiteStore and a
# RedisStore, and once with Flask's own cookie sessions. Fails if any run with
# tinysession fails a test that the run with Flask's own sessions passes.
set -euo pipefail
cd "$(dirname "$0")/.."
root=$PWD
work=$(mktemp -d)
redis_pid=
cleanup() { [[ -n $redis_pid ]] && kill "$redis_pid" 2>/dev/null; rm -rf "$work"; }
trap cleanup EXIT
export PIP_DISABLE_PIP_VERSION_CHECK=1

FLASK=3.1.3 WERKZEUG=3.1.8 FLASK_LOGIN=0.6.3 FLASK_WTF=1.2.2 WTFORMS=3.2.1

python3 -m venv "$work/venv"
pip="$work/venv/bin/pip"
"$pip" install -q "flask==$FLASK" "werkzeug==$WERKZEUG" "flask-login==$FLASK_LOGIN" "flask-wtf==$FLASK_WTF" \
    "wtforms==$WTFORMS" pytest==8.3.5 redis==5.2.1 asgiref==3.8.1 semantic-version==2.10.0
(cd "$work" && "$pip" download -q --no-binary :all: --no-deps \
    "flask==$FLASK" "flask-login==$FLASK_LOGIN" "flask-wtf==$FLASK_WTF" && for f in *.tar.gz; do tar xzf "$f"; done)

port=$(python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
redis-server --port "$port" --bind 127.0.0.1 --save '' --appendonly no >"$work/redis.log" 2>&1 &
redis_pid=$!
export TINYSESSION_REDIS_URL="redis://127.0.0.1:$port/0"
for _ in $(seq 50); do "$work/venv/bin/python" -c "import redis; redis.Redis.from_url('$TINYSESSION_REDIS_URL').ping()" 2>/dev/null && break; sleep 0.1; done

status=0
suite() {  # suite NAME DIRECTORY TEST-PATHS...
    local name=$1 directory=$2
    shift 2
    for store in flask file sqlite redis; do
        (cd "$directory" && TINYSESSION_STORE=$store PYTHONPATH="$root:$root/.ci/peers/flask" \
            "$work/venv/bin/python" -m pytest -q -p no:cacheprovider -p tinysession_plugin -rfE "$@" \
            >"$work/$name-$store.log" 2>&1) || true
        grep -E '^(FAILED|ERROR) ' "$work/$name-$store.log" | sed 's/ - .*//' | sort >"$work/$name-$store.failed" || true
        echo "$name with $store sessions: $(tail -n 1 "$work/$name-$store.log")"
        if [[ $store != flask ]] && [[ -n $(comm -13 "$work/$name-flask.failed" "$work/$name-$store.failed") ]]; then
            echo "  fails here but passes with Flask's own sessions:"; comm -13 "$work/$name-flask.failed" "$work/$name-$store.failed"
            status=1
        fi
    done
}
suite flask "$work/flask-$FLASK" tests/test_basic.py tests/test_testing.py tests/test_session_interface.py
suite flask-login "$work/Flask-Login-$FLASK_LOGIN" tests
suite flask-wtf "$work/flask_wtf-$FLASK_WTF" tests
exit $status
