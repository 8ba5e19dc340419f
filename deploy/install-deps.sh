#!/bin/sh
# Installs every Debian package pgdual needs to build, test, benchmark and run its demo.
# Idempotent: safe to run again; apt-get skips what is already installed.
set -eu

if [ "$(id -u)" -ne 0 ]; then
	echo "install-deps.sh: must run as root (it calls apt-get); try: sudo $0" >&2
	exit 2
fi

export DEBIAN_FRONTEND=noninteractive

PACKAGES="
	build-essential cmake pkg-config clang llvm libclang-rt-dev
	libuv1-dev libpq-dev libssl-dev libcyaml-dev libpg-query-dev libprotobuf-c-dev
	libjansson-dev libcmocka-dev
	postgresql-15 postgresql-client-15 postgresql-contrib
	python3 python3-psycopg2 python3-yaml pgbouncer pgpool2 openssl procps iproute2 util-linux
"

apt-get update -q
# shellcheck disable=SC2086
apt-get install -y -q --no-install-recommends $PACKAGES

# Debian's postgresql package starts a cluster on port 5432; pgdual's tests and demo
# start their own clusters on high ports and need nothing from it.
echo "install-deps.sh: all pgdual dependencies are installed"
