#!/bin/sh
# PostgreSQL 15 (Debian bookworm) for the real-application node tests: creates the cluster on
# first start (trust authentication, for a pod reachable only on the node's own bridge), then
# execs the server with any extra `-c name=value` arguments.
set -eu
PGDATA=${PGDATA:-/tmp/pgdata}
BIN=/usr/lib/postgresql/15/bin
export TZ=UTC
if [ ! -s "$PGDATA/PG_VERSION" ]; then
    "$BIN/initdb" --pgdata="$PGDATA" --username=postgres --auth=trust --encoding=UTF8 --locale=C \
        --no-sync >/dev/null
    echo "host all all 0.0.0.0/0 trust" >>"$PGDATA/pg_hba.conf"
fi
exec "$BIN/postgres" -D "$PGDATA" -c listen_addresses='*' -c unix_socket_directories=/tmp "$@"
