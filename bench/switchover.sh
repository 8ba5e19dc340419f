#!/bin/bash
# switchover.sh — what a switchover costs the clients: pgbench tpcb-like (-M prepared,
# CLIENTS clients at a steady --rate) through pgdual while pgdualctl switchover and rollback
# alternate CYCLES times; prints each pause as pgdual measured it (pause_ms), the longest
# and median client transaction latency with the flips and in a run of the same load
# without them, pgbench's failed transactions, and whether old and new hold the same rows
# at the end. Target (issue 5): maximum client-visible stall under 100 ms, zero errors.
#
# Starts two throwaway PostgreSQL clusters (old and new, tests/integration/pgcluster.py),
# each with database `bench` initialised by pgbench -i -s SCALE (identical data), and a
# pgdual whose database `bench` has a `kind: tables` rule over every table at
# writes=dual (async mirror); runs a verify (the switchover's guardrail); then
#   baseline  pgbench DURATION s, no flips;
#   flips     pgbench DURATION s; after 2 s, switchover, then every GAP s the other verb,
#             CYCLES switchovers and CYCLES rollbacks in all (each waiting for the last
#             to be answered).
# The stall of a client is its transaction latency (pgbench's per-transaction log, which
# under --rate includes the time the transaction waited to start).
#
# Environment: BUILD_DIR (default build/), CLIENTS (16), THREADS (2), SCALE (10),
# DURATION (20), RATE (transactions per second in all, default 800), CYCLES (3), GAP (2).
# Everything listens on 127.0.0.1 at free high ports; everything started is stopped and
# every temporary file removed on exit, also on failure or Ctrl-C.
set -euo pipefail

HERE=$(cd "$(dirname "$0")" && pwd)
REPO=$(cd "$HERE/.." && pwd)
BUILD_DIR=${BUILD_DIR:-$REPO/build}
CLIENTS=${CLIENTS:-16}
THREADS=${THREADS:-2}
SCALE=${SCALE:-10}
DURATION=${DURATION:-20}
RATE=${RATE:-800}
CYCLES=${CYCLES:-3}
GAP=${GAP:-2}
PY=/usr/bin/python3
PGBIN=/usr/lib/postgresql/15/bin
PGBENCH=$PGBIN/pgbench
PSQL=$PGBIN/psql
DB=bench
BENCH=switchover.sh
# shellcheck source=bench/lib.sh
. "$HERE/lib.sh"

require_executables "$BUILD_DIR/pgdual" "$BUILD_DIR/pgdualctl" "$PGBENCH" "$PSQL" "$PY"
require_positive CLIENTS THREADS SCALE DURATION RATE CYCLES GAP
[ $((2 + 2 * CYCLES * GAP)) -lt "$DURATION" ] || die "DURATION must exceed 2 + 2 x CYCLES x GAP seconds"

WORK=$(mktemp -d /tmp/pgdual-bench-XXXXXX)
PGDUAL_PID=
cleanup() {
	local rc=$?
	trap - EXIT INT TERM
	stop_pid "$PGDUAL_PID"
	stop_cluster "$WORK/old"
	stop_cluster "$WORK/new"
	rm -rf "$WORK"
	exit "$rc"
}
trap cleanup EXIT
trap 'exit 130' INT TERM

declare -A PORT
for side in old new; do
	echo "== starting PostgreSQL ($side)" >&2
	PORT[$side]=$(start_cluster "$WORK/$side")
	timeout 120 "$PSQL" -X -q -h 127.0.0.1 -p "${PORT[$side]}" -U postgres -d postgres \
		-c "CREATE DATABASE $DB" || die "CREATE DATABASE on $side failed"
	timeout 300 "$PGBENCH" -i -q -s "$SCALE" -h 127.0.0.1 -p "${PORT[$side]}" -U postgres "$DB" \
		>"$WORK/init-$side.log" 2>&1 || die "pgbench -i on $side failed"
done

DPORT=$(free_port)
ADMIN=$WORK/admin.sock
cat >"$WORK/pgdual.yaml" <<EOF
listen: { host: 127.0.0.1, port: $DPORT }
log: { level: warning }
admin: { socket: $ADMIN }
state: $WORK/state.json
divergence: { log: $WORK/divergence.jsonl }
databases:
  - name: $DB
    old: "host=127.0.0.1 port=${PORT[old]} dbname=$DB"
    new: "host=127.0.0.1 port=${PORT[new]} dbname=$DB"
rules:
  - { name: bench, database: $DB, kind: tables, writes: dual, reads: old }
EOF
echo "== starting pgdual" >&2
PGUSER=postgres setsid "$BUILD_DIR/pgdual" -c "$WORK/pgdual.yaml" >"$WORK/pgdual.log" 2>&1 &
PGDUAL_PID=$!
wait_port "$DPORT" || { tail -20 "$WORK/pgdual.log" >&2; die "pgdual is not listening"; }
for _ in $(seq 50); do [ -S "$ADMIN" ] && break; sleep 0.1; done

ctl() { timeout 120 "$BUILD_DIR/pgdualctl" -s "$ADMIN" --json "$@"; }
json_get() { "$PY" -c "import json,sys; print(json.load(sys.stdin)$1)"; }

ctl verify bench >"$WORK/verify.json" || die "verify failed: $(cat "$WORK/verify.json")"

# One pgbench run through pgdual; its per-transaction logs in $WORK/$1/.
run_pgbench() { # name
	mkdir -p "$WORK/$1"
	(cd "$WORK/$1" && timeout $((DURATION + 120)) "$PGBENCH" -n -M prepared -c "$CLIENTS" \
		-j "$THREADS" -T "$DURATION" -R "$RATE" -l -h 127.0.0.1 -p "$DPORT" -U postgres "$DB" \
		>"$WORK/$1.out" 2>&1)
}

# max and median latency (ms) over the per-transaction logs of a run
latencies() { # name
	cat "$WORK/$1"/pgbench_log.* | awk '{print $3 / 1000}' | sort -g |
		awk '{a[NR]=$1} END {printf "%.1f %.1f %d\n", a[NR], a[int((NR+1)/2)], NR}'
}

failed() { # name
	grep -Eo "number of failed transactions: [0-9]+" "$WORK/$1.out" | grep -Eo "[0-9]+$" || echo "?"
}

echo "== baseline: $CLIENTS clients at $RATE tps for $DURATION s, no flips" >&2
run_pgbench baseline || die "pgbench (baseline) failed: $(tail -5 "$WORK/baseline.out")"

echo "== flips: switchover/rollback x $CYCLES under the same load" >&2
run_pgbench flips &
BENCH_PID=$!
sleep 2
PAUSES=()
for i in $(seq "$CYCLES"); do
	for verb in switchover rollback; do
		out=$(ctl "$verb" "$DB") || die "$verb failed: $out"
		PAUSES+=("$(echo "$out" | json_get "['pause_ms']")")
		sleep "$GAP"
	done
done
wait "$BENCH_PID" || die "pgbench (flips) failed: $(tail -5 "$WORK/flips.out")"

# old and new identical (the async mirror may trail a moment)
same=no
for _ in $(seq 60); do
	sums=()
	for side in old new; do
		sums+=("$(timeout 60 "$PSQL" -X -At -h 127.0.0.1 -p "${PORT[$side]}" -U postgres -d "$DB" -c \
			"SELECT string_agg(md5(x), ',') FROM (SELECT (SELECT coalesce(md5(string_agg(t::text, '|' ORDER BY t::text)), '') FROM pgbench_accounts t) UNION ALL SELECT (SELECT coalesce(md5(string_agg(t::text, '|' ORDER BY t::text)), '') FROM pgbench_tellers t) UNION ALL SELECT (SELECT coalesce(md5(string_agg(t::text, '|' ORDER BY t::text)), '') FROM pgbench_branches t) UNION ALL SELECT (SELECT coalesce(md5(string_agg(t::text, '|' ORDER BY t::text)), '') FROM pgbench_history t)) s(x)")")
	done
	if [ "${sums[0]}" = "${sums[1]}" ]; then same=yes; break; fi
	sleep 1
done

read -r bmax bmed bn < <(latencies baseline)
read -r fmax fmed fn < <(latencies flips)
pmed=$(printf '%s\n' "${PAUSES[@]}" | median)
pmax=$(printf '%s\n' "${PAUSES[@]}" | sort -g | tail -1)
echo
echo "switchover.sh: $CLIENTS clients, tpcb-like -M prepared at $RATE tps, scale $SCALE, $DURATION s per run"
printf '%-26s %10s %10s %12s %8s\n' run "max ms" "median ms" transactions failed
printf '%-26s %10s %10s %12s %8s\n' "baseline (no flips)" "$bmax" "$bmed" "$bn" "$(failed baseline)"
printf '%-26s %10s %10s %12s %8s\n' "$((2 * CYCLES)) flips" "$fmax" "$fmed" "$fn" "$(failed flips)"
echo "pauses (pgdual's pause_ms): ${PAUSES[*]}; median $pmed, max $pmax"
echo "old and new identical at the end: $same"
[ "$same" = yes ] || die "old and new differ"
[ "$(failed flips)" = 0 ] || die "transactions failed during the flips"
