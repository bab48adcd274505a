#!/bin/sh
# Make sure the PostgreSQL server binaries (initdb, pg_ctl) are installed, for the tests of
# distributed optimization (tests/distributed/, which start a throwaway cluster with
# scripts/postgres.sh). Looks in PATH and /usr/lib/postgresql/*/bin; when they are missing,
# installs Debian's `postgresql` package with apt-get as root (or with password-less sudo),
# otherwise says how and exits 1.
#
# This script never starts Debian's system cluster; if apt-get starts it, it is left alone
# (the tests run their own cluster on a free port).
set -eu

have_binaries() {
    if command -v pg_ctl >/dev/null 2>&1 && command -v initdb >/dev/null 2>&1; then
        return 0
    fi
    for dir in /usr/lib/postgresql/*/bin; do
        if [ -x "$dir/pg_ctl" ] && [ -x "$dir/initdb" ]; then
            return 0
        fi
    done
    return 1
}

if have_binaries; then
    exit 0
fi

if ! command -v apt-get >/dev/null 2>&1; then
    echo "ensure-postgres: PostgreSQL (initdb, pg_ctl) is missing and apt-get is not available;" \
        "install the PostgreSQL server with your package manager (e.g. 'dnf install postgresql-server'" \
        "or 'brew install postgresql') and make sure pg_ctl is on PATH" >&2
    exit 1
fi

if [ "$(id -u)" -eq 0 ]; then
    SUDO=""
elif command -v sudo >/dev/null 2>&1 && sudo -n true 2>/dev/null; then
    SUDO="sudo -n"
else
    echo "ensure-postgres: PostgreSQL (initdb, pg_ctl) is missing and installing it needs root;" \
        "run 'sudo apt-get install -y postgresql' and then 'make test' again" >&2
    exit 1
fi

echo "ensure-postgres: installing Debian's postgresql package (tests of distributed optimization) ..."
export DEBIAN_FRONTEND=noninteractive
install() {
    $SUDO apt-get install -y -qq --no-install-recommends postgresql >/dev/null
}
if ! install; then
    # the package lists may be missing or stale: refresh them once and try again
    $SUDO apt-get update -qq || true
    install || true
fi
if have_binaries; then
    echo "ensure-postgres: installed $(ls -d /usr/lib/postgresql/*/bin 2>/dev/null | tail -n 1)"
    exit 0
fi
echo "ensure-postgres: 'apt-get install postgresql' failed or did not provide initdb/pg_ctl;" \
    "install the PostgreSQL server yourself and run 'make test' again" >&2
exit 1
