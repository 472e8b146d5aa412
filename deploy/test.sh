#!/usr/bin/env bash
# One command: set up and run the whole test suite (lint, types, unit, integration
# with real DCMTK peers and PostgreSQL, benchmark smoke tests).
# Needs root (or sudo) the first time, to install DCMTK, Orthanc and dicom3tools from
# Debian's packages.
set -euo pipefail
cd "$(dirname "$0")/.."

as_root() { if [ "$(id -u)" = 0 ]; then "$@"; else sudo "$@"; fi; }

# Real peers and validators from Debian's packages: DCMTK (storescu, findscu, dsrdump, …),
# Orthanc (the PACS), dicom3tools (dciodvfy), tcmalloc (the workers preload it), and Redis
# (the broker: tests start private servers, and some use the one on 127.0.0.1:6379).
missing=()
command -v storescu >/dev/null 2>&1 || missing+=(dcmtk)
command -v Orthanc >/dev/null 2>&1 || missing+=(orthanc)
command -v dciodvfy >/dev/null 2>&1 || missing+=(dicom3tools)
[ -e /usr/lib/x86_64-linux-gnu/libtcmalloc_minimal.so.4 ] || missing+=(libtcmalloc-minimal4)
command -v redis-server >/dev/null 2>&1 || missing+=(redis-server)
if [ "${#missing[@]}" -gt 0 ]; then
  as_root apt-get update -qq
  DEBIAN_FRONTEND=noninteractive as_root apt-get install -y -qq "${missing[@]}" >/dev/null
fi

# The tests use a real PostgreSQL on 127.0.0.1:5432 as user postgres without a password.
if ! (echo > /dev/tcp/127.0.0.1/5432) 2>/dev/null; then
  if ! command -v pg_ctlcluster >/dev/null 2>&1; then
    as_root apt-get update -qq
    DEBIAN_FRONTEND=noninteractive as_root apt-get install -y -qq postgresql >/dev/null
    hba=$(ls /etc/postgresql/*/main/pg_hba.conf | head -n 1)
    as_root sed -i '1i host all postgres 127.0.0.1/32 trust' "$hba"
  fi
  as_root pg_ctlcluster --skip-systemctl-redirect "$(ls /etc/postgresql | head -n 1)" main start
fi

if ! (echo > /dev/tcp/127.0.0.1/6379) 2>/dev/null; then
  redis-server --bind 127.0.0.1 --port 6379 --save '' --appendonly no --daemonize yes >/dev/null
fi

bash deploy/setup.sh --test
# Not by PATH: pynetdicom puts its own echoscu, storescu, … into .venv/bin, and the
# tests' peers must be DCMTK's (tests/support/dcmtk.py finds those by absolute path).
.venv/bin/ruff check .
.venv/bin/ruff format --check .
.venv/bin/mypy
exec .venv/bin/pytest "$@"
