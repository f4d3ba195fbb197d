#!/usr/bin/env bash
# Flask-Session's own backend tests (filesystem, cachelib, redis, SQLAlchemy) with tinysession as the
# backend: Session(app) installs FlaskSessionInterface over a FileStore, an SQLiteStore or a RedisStore
# (.ci/peers/flask_session/tinysession_flask_session.py) instead of Flask-Session's interface. The
# baseline runs Flask-Session's own backends. Flask-Session's PyPI sdist ships no tests: they come from
# the upstream tarball of Debian's source package. The tests give their apps no SECRET_KEY, so each
# store runs twice: as written (our sessions are read-only without a key, as Flask's own are: 1 passes)
# and with a key the adapter sets (3 pass); the README's "Flask-Session's own tests" lists the rest.
source "$(dirname "$0")/peers/common.sh"
FLASK_SESSION=0.8.0
here="$root/.ci/peers/flask_session"

peer_venv "flask-session==$FLASK_SESSION" flask==3.1.3 werkzeug==3.1.8 cachelib==0.17.0 msgspec==0.23.0 \
    redis==5.2.1 flask-sqlalchemy==3.1.1 sqlalchemy==2.1.9 pytest==8.3.5
peer_debian_source flask-session "flask-session_$FLASK_SESSION.orig.tar.gz" \
    017c852d3df6b8492666b5e3544bb4f283a49ca357fac28af465b8cb8017f1e4
directory="$work/flask-session-$FLASK_SESSION"
break_conftest "$directory/tests"

port=$(python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
redis-server --port "$port" --bind 127.0.0.1 --save '' --appendonly no >"$work/redis.log" 2>&1 &
servers+=($!)
export TINYSESSION_REDIS_URL="redis://127.0.0.1:$port/0"
for _ in $(seq 50); do "$work/venv/bin/python" -c "import redis; redis.Redis.from_url('$TINYSESSION_REDIS_URL').ping()" 2>/dev/null && break; sleep 0.1; done

# tests/pytest.ini adds coverage options (pytest-cov): -o addopts= drops them. The MongoDB, DynamoDB
# and memcached tests need servers CI does not run.
tests=(tests/test_basic.py tests/test_filesystem.py tests/test_cachelib.py tests/test_redis.py tests/test_sqlalchemy.py)
run() {  # run LOG STORE [SECRET-KEY]
    TINYSESSION_STORE=$2 TINYSESSION_SECRET_KEY=${3:-} PYTHONPATH="$root:$here" \
        run_pytest "$1" "$directory" -o addopts= -p tinysession_flask_session "${tests[@]}"
}
run "$work/baseline.log" flask-session
check_run "Flask-Session $FLASK_SESSION, its own backends" "$work/baseline.log" 5
for store in file sqlite redis; do
    run "$work/$store.log" "$store"
    check_run "Flask-Session $FLASK_SESSION with $store sessions, no SECRET_KEY" "$work/$store.log" 1 \
        "$here/expected_failures_without_key.txt"
    run "$work/$store-key.log" "$store" "a SECRET_KEY the adapter sets"
    check_run "Flask-Session $FLASK_SESSION with $store sessions and a SECRET_KEY" "$work/$store-key.log" 3 \
        "$here/expected_failures.txt"
done
exit $verdict
