#!/bin/sh
# PostgreSQL in the foreground on 127.0.0.1:PORT, its cluster under STATE (created on the
# first start). Run it as the postgres user (`user = "postgres"`): it refuses root.
# Usage: postgres.sh STATE PORT
set -eu
state="$1"; port="$2"
bin=$(ls -d /usr/lib/postgresql/*/bin | sort -V | tail -n 1)
if [ ! -s "$state/data/PG_VERSION" ]; then
  "$bin/initdb" -D "$state/data" -U postgres -A trust --no-sync > "$state/initdb.log"
fi
exec "$bin/postgres" -D "$state/data" -p "$port" -h 127.0.0.1 -k "$state" -c fsync=off
