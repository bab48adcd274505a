#!/bin/sh
# A throwaway PostgreSQL cluster for distributed optimization (tests, or several
# `stageopt worker` processes on one machine).
#
#   sh scripts/postgres.sh start DATADIR PORT   # initdb when needed, start, create database `stageopt`,
#                                                # print postgresql://postgres@127.0.0.1:PORT/stageopt
#   sh scripts/postgres.sh stop DATADIR         # stop it (does nothing when it is not running)
#
# The cluster listens on 127.0.0.1 only with trust authentication (no passwords: do not expose
# it), keeps its unix socket and its log (server.log) inside DATADIR and allows 200
# connections. PostgreSQL refuses to run as root, so as root the cluster belongs to the
# `postgres` user (set PG_USER to use another) and the binaries run through runuser or su;
# DATADIR's parent directories get o+x when that user could not reach DATADIR otherwise.
# Only the URL goes to stdout, so `URL=$(sh scripts/postgres.sh start /tmp/pg 5432)` works.
set -eu

usage() {
    echo "usage: sh scripts/postgres.sh start DATADIR PORT | stop DATADIR" >&2
    exit 2
}

say() {
    echo "postgres.sh: $*" >&2
}

find_bindir() {
    if command -v pg_ctl >/dev/null 2>&1 && command -v initdb >/dev/null 2>&1; then
        # follow symlinks to the directory that also holds psql and createdb
        dirname "$(readlink -f "$(command -v pg_ctl)" 2>/dev/null || command -v pg_ctl)"
        return 0
    fi
    # the newest installed major version (Debian keeps the server binaries off PATH)
    found=""
    for dir in $(ls -d /usr/lib/postgresql/*/bin 2>/dev/null | sort -V); do
        if [ -x "$dir/pg_ctl" ] && [ -x "$dir/initdb" ]; then
            found="$dir"
        fi
    done
    if [ -n "$found" ]; then
        echo "$found"
        return 0
    fi
    return 1
}

# A client tool (psql, createdb) from BINDIR, else from PATH.
client() {
    if [ -x "$BINDIR/$1" ]; then
        echo "$BINDIR/$1"
    else
        command -v "$1" || echo "$1"
    fi
}

# Quote each argument for `su -c`.
quote_args() {
    for arg in "$@"; do
        printf "'%s' " "$(printf '%s' "$arg" | sed "s/'/'\\\\''/g")"
    done
}

# Run a command as the cluster's owner: PG_USER when we are root, else ourselves.
as_owner() {
    if [ -z "$RUN_AS" ]; then
        "$@"
    elif command -v runuser >/dev/null 2>&1; then
        runuser -u "$RUN_AS" -- "$@"
    else
        su "$RUN_AS" -s /bin/sh -c "$(quote_args "$@")"
    fi
}

# Give o+x to each ancestor of DATADIR the owner cannot traverse (mktemp makes 0700 directories).
make_reachable() {
    [ -n "$RUN_AS" ] || return 0
    set -f
    old_ifs=$IFS
    IFS=/
    path=""
    for part in $(dirname "$DATADIR"); do
        [ -n "$part" ] || continue
        path="$path/$part"
        if ! as_owner test -x "$path"; then
            chmod o+x "$path"
            say "chmod o+x $path (so that user $RUN_AS can reach $DATADIR)"
        fi
    done
    IFS=$old_ifs
    set +f
}

# The port a running cluster listens on (4th line of postmaster.pid).
running_port() {
    sed -n 4p "$DATADIR/postmaster.pid" 2>/dev/null
}

is_running() {
    [ -f "$DATADIR/postmaster.pid" ] && as_owner "$BINDIR/pg_ctl" status -D "$DATADIR" >/dev/null 2>&1
}

start() {
    if [ -d "$DATADIR" ] && [ ! -f "$DATADIR/PG_VERSION" ] && [ -n "$(ls -A "$DATADIR")" ]; then
        say "$DATADIR exists, is not empty and holds no PostgreSQL cluster; give an empty or new directory"
        exit 1
    fi
    mkdir -p "$DATADIR"
    if [ -n "$RUN_AS" ] && [ ! -f "$DATADIR/PG_VERSION" ]; then
        chown "$RUN_AS" "$DATADIR"
    fi
    chmod 700 "$DATADIR"
    make_reachable

    if [ ! -f "$DATADIR/PG_VERSION" ]; then
        say "initdb $DATADIR"
        initdb_log=$(mktemp)
        if ! as_owner "$BINDIR/initdb" -D "$DATADIR" -U postgres -A trust -E UTF8 --no-locale \
            >"$initdb_log" 2>&1; then
            cat "$initdb_log" >&2
            rm -f "$initdb_log"
            say "initdb failed (output above)"
            exit 1
        fi
        rm -f "$initdb_log"
        echo "include_if_exists = 'stageopt.conf'" >>"$DATADIR/postgresql.conf"
        # trust, and only over the socket inside DATADIR and 127.0.0.1
        printf '%s\n' \
            "# written by scripts/postgres.sh: a throwaway cluster, trust on 127.0.0.1 only" \
            "local all all trust" \
            "host all all 127.0.0.1/32 trust" >"$DATADIR/pg_hba.conf"
    fi

    if is_running; then
        PORT=$(running_port)
        say "already running on port $PORT"
    else
        printf '%s\n' \
            "# written by scripts/postgres.sh at each start" \
            "listen_addresses = '127.0.0.1'" \
            "port = $PORT" \
            "unix_socket_directories = '$DATADIR'" \
            "max_connections = 200" >"$DATADIR/stageopt.conf"
        if [ -n "$RUN_AS" ]; then
            chown "$RUN_AS" "$DATADIR/stageopt.conf" "$DATADIR/pg_hba.conf" "$DATADIR/postgresql.conf"
        fi
        if ! as_owner "$BINDIR/pg_ctl" -D "$DATADIR" -l "$DATADIR/server.log" -w -t 60 -s start >&2; then
            tail -n 20 "$DATADIR/server.log" >&2 || true
            say "the server did not start (log above: is port $PORT already in use?)"
            exit 1
        fi
    fi

    exists=$("$(client psql)" -X -q -t -A -h 127.0.0.1 -p "$PORT" -U postgres -d postgres \
        -c "SELECT 1 FROM pg_database WHERE datname = 'stageopt'")
    if [ "$exists" != "1" ]; then
        "$(client createdb)" -h 127.0.0.1 -p "$PORT" -U postgres stageopt
    fi
    echo "postgresql://postgres@127.0.0.1:$PORT/stageopt"
}

stop() {
    if [ ! -f "$DATADIR/postmaster.pid" ]; then
        say "not running ($DATADIR has no postmaster.pid)"
        return 0
    fi
    if ! is_running; then
        say "not running (stale postmaster.pid in $DATADIR)"
        return 0
    fi
    as_owner "$BINDIR/pg_ctl" -D "$DATADIR" -m fast -w -t 60 -s stop >&2
    say "stopped $DATADIR"
}

[ $# -ge 2 ] || usage
COMMAND=$1
case "$COMMAND" in
start) [ $# -eq 3 ] || usage ;;
stop) [ $# -eq 2 ] || usage ;;
*) usage ;;
esac

if ! BINDIR=$(find_bindir); then
    say "PostgreSQL's initdb/pg_ctl not found (PATH, /usr/lib/postgresql/*/bin); run 'sh scripts/ensure-postgres.sh'"
    exit 1
fi

RUN_AS=""
if [ "$(id -u)" -eq 0 ]; then
    RUN_AS="${PG_USER:-postgres}"
    if ! id "$RUN_AS" >/dev/null 2>&1; then
        say "running as root, and PostgreSQL refuses root: create the user '$RUN_AS'" \
            "('useradd --system --create-home $RUN_AS') or set PG_USER to an existing unprivileged user"
        exit 1
    fi
fi

case "$2" in
/*) DATADIR=$2 ;;
*) DATADIR="$(pwd)/$2" ;;
esac
DATADIR=${DATADIR%/}
# the owner may not be allowed into our working directory
cd /

if [ "$COMMAND" = start ]; then
    PORT=$3
    case "$PORT" in
    '' | *[!0-9]*)
        say "PORT must be a number, got '$PORT'"
        exit 2
        ;;
    esac
    start
else
    stop
fi
