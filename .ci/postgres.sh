# Starts a throwaway PostgreSQL server for the tests, listening on loopback only, and
# exports its URL as STOCKROOM_PG_URL. Source it (`source .ci/postgres.sh`); it registers
# an EXIT trap that stops the server and removes its files when the shell exits.
#
# Installs Debian's postgresql package when the server binaries are missing. The server
# refuses to run as root, so as root it runs as the `postgres` system user.

stockroom_pg_bin() {
    local dir
    for dir in /usr/lib/postgresql/*/bin; do
        if [ -x "$dir/initdb" ] && [ -x "$dir/pg_ctl" ]; then
            echo "$dir"
            return 0
        fi
    done
    return 1
}

stockroom_pg_start() {
    local bin port dir
    if ! bin=$(stockroom_pg_bin); then
        echo "== installing PostgreSQL (server binaries missing)"
        DEBIAN_FRONTEND=noninteractive apt-get update -qq || return 1
        DEBIAN_FRONTEND=noninteractive apt-get install -y -qq postgresql >/dev/null || return 1
        bin=$(stockroom_pg_bin) || return 1
    fi
    port=${STOCKROOM_PG_PORT:-54329}
    dir=$(mktemp -d /tmp/stockroom-pg.XXXXXX) || return 1
    STOCKROOM_PG_DIR=$dir
    STOCKROOM_PG_BINDIR=$bin
    if [ "$(id -u)" = 0 ]; then
        id postgres >/dev/null 2>&1 || useradd --system --no-create-home postgres || return 1
        chown postgres "$dir" || return 1
        STOCKROOM_PG_AS="runuser -u postgres --"
    else
        STOCKROOM_PG_AS=""
    fi
    $STOCKROOM_PG_AS "$bin/initdb" -D "$dir/data" -U stockroom -A trust --no-sync \
        >"$dir/initdb.log" 2>&1 || { cat "$dir/initdb.log"; return 1; }
    # A throwaway server: no fsync (durability is tested on SQLite), enough connections
    # for parallel tests, loopback and a private socket folder only.
    $STOCKROOM_PG_AS "$bin/pg_ctl" -D "$dir/data" -l "$dir/server.log" -w -t 60 \
        -o "-c listen_addresses=127.0.0.1 -p $port -k $dir -c fsync=off -c synchronous_commit=off -c max_connections=300" \
        start >/dev/null || { cat "$dir/server.log"; return 1; }
    trap stockroom_pg_stop EXIT
    "$bin/psql" -h 127.0.0.1 -p "$port" -U stockroom -d postgres -qc \
        "CREATE DATABASE stockroom_test" || return 1
    export STOCKROOM_PG_URL="postgres://stockroom@127.0.0.1:$port/stockroom_test"
    echo "== PostgreSQL $("$bin/postgres" --version | awk '{print $3}') at $STOCKROOM_PG_URL"
}

stockroom_pg_stop() {
    if [ -n "${STOCKROOM_PG_DIR:-}" ]; then
        $STOCKROOM_PG_AS "$STOCKROOM_PG_BINDIR/pg_ctl" -D "$STOCKROOM_PG_DIR/data" -m fast stop \
            >/dev/null 2>&1 || true
        rm -rf "$STOCKROOM_PG_DIR"
        STOCKROOM_PG_DIR=
    fi
}
