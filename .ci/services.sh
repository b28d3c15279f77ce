#!/usr/bin/env bash
# System packages and services the test suite uses (run as root on a Debian machine):
# PostgreSQL (a real server with a scratch database), Chromium + ChromeDriver (the dashboard's browser test),
# dicom3tools (dciodvfy validates the DICOM SEG/SR that `lungvl explain` writes).
# Source it (`. .ci/services.sh`) so LUNGVL_TEST_POSTGRES_URL reaches the tests.
set -euo pipefail
if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
    need=""
    command -v pg_ctlcluster >/dev/null || need="$need postgresql"
    command -v chromium >/dev/null || need="$need chromium"
    command -v chromedriver >/dev/null || need="$need chromium-driver"
    command -v dciodvfy >/dev/null || need="$need dicom3tools"
    if [ -n "$need" ]; then
        apt-get update -q
        DEBIAN_FRONTEND=noninteractive apt-get install -y -q $need
    fi
fi
if command -v pg_ctlcluster >/dev/null; then
    ver=$(ls /usr/lib/postgresql | sort -n | tail -1)
    pg_lsclusters -h | grep -q "^$ver main" || pg_createcluster "$ver" main >/dev/null
    pg_ctlcluster "$ver" main start 2>/dev/null || true
    port=$(pg_lsclusters -h | awk -v v="$ver" '$1==v && $2=="main" {print $3}')
    su postgres -c "psql -p $port -qtAc \"SELECT 1 FROM pg_roles WHERE rolname='lungvl'\"" | grep -q 1 ||
        su postgres -c "psql -p $port -qc \"CREATE ROLE lungvl LOGIN SUPERUSER PASSWORD 'lungvl'\""
    su postgres -c "psql -p $port -qtAc \"SELECT 1 FROM pg_database WHERE datname='lungvl_test'\"" | grep -q 1 ||
        su postgres -c "createdb -p $port -O lungvl lungvl_test"
    export LUNGVL_TEST_POSTGRES_URL="postgresql+psycopg://lungvl:lungvl@127.0.0.1:$port/lungvl_test"
    echo "PostgreSQL $ver on port $port: LUNGVL_TEST_POSTGRES_URL=$LUNGVL_TEST_POSTGRES_URL"
fi
