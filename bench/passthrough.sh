#!/bin/bash
# passthrough.sh — pgbench through nothing, pgbouncer and pgdual, side by side.
#
# Starts a throwaway PostgreSQL cluster (tests/integration/pgcluster.py), pgbouncer in
# session mode and pgdual in pass-through mode in front of it (twice: `pgdual` as
# configured by default, with its relay thread, and `pgdual1` with limits.relay_threads:
# 0, one event loop as pgbouncer has), initialises pgbench at
# scale 10, then runs ROUNDS rounds; each round runs select-only (-S -M prepared) and
# tpcb-like (-M prepared) for DURATION seconds against each target in turn, 16 clients,
# 2 threads. Prints per-round TPS, the median per target, the ratios pgdual/direct and
# pgdual/pgbouncer, each round's ratio to pgbouncer, and for each proxy the CPU time and the context switches of its
# process per transaction (from /proc, which does not depend on how busy the machine is).
# Exits non-zero only when something fails to run.
#
# Environment:
#   BUILD_DIR  where pgdual was built (default: build/ in the repository)
#   ROUNDS     rounds (default 5)
#   DURATION   seconds per pgbench run (default 10)
#   CLIENTS    pgbench clients (default 16); THREADS pgbench threads (default 2)
#   SCALE      pgbench scale (default 10)
# Everything listens on 127.0.0.1 at free high ports; everything started is stopped and
# every temporary file removed on exit, also on failure or Ctrl-C.
set -euo pipefail

HERE=$(cd "$(dirname "$0")" && pwd)
REPO=$(cd "$HERE/.." && pwd)
BUILD_DIR=${BUILD_DIR:-$REPO/build}
ROUNDS=${ROUNDS:-5}
DURATION=${DURATION:-10}
CLIENTS=${CLIENTS:-16}
THREADS=${THREADS:-2}
SCALE=${SCALE:-10}
PY=/usr/bin/python3
PGBIN=/usr/lib/postgresql/15/bin
PGBENCH=$PGBIN/pgbench
PSQL=$PGBIN/psql
PGBOUNCER=${PGBOUNCER:-/usr/sbin/pgbouncer}
DB=bench

BENCH=passthrough.sh
# shellcheck source=bench/lib.sh
. "$HERE/lib.sh"

require_executables "$BUILD_DIR/pgdual" "$PGBENCH" "$PSQL" "$PGBOUNCER" "$PY"
require_positive ROUNDS DURATION CLIENTS THREADS SCALE

WORK=$(mktemp -d /tmp/pgdual-bench-XXXXXX)
PGDUAL_PID=
PGDUAL1_PID=
BOUNCER_PIDFILE=$WORK/bouncer/pgbouncer.pid

cleanup() {
	local rc=$?
	trap - EXIT INT TERM
	stop_pid "$PGDUAL_PID"
	stop_pid "$PGDUAL1_PID"
	if [ -f "$BOUNCER_PIDFILE" ]; then
		stop_pid "$(cat "$BOUNCER_PIDFILE" 2>/dev/null || true)" INT
	fi
	stop_cluster "$WORK/pg"
	rm -rf "$WORK"
	exit "$rc"
}
trap cleanup EXIT
trap 'exit 130' INT TERM

# --- PostgreSQL -------------------------------------------------------------------------
echo "== starting PostgreSQL" >&2
PGPORT=$(start_cluster "$WORK/pg")
"$PSQL" -X -q -h 127.0.0.1 -p "$PGPORT" -U postgres -d postgres -c "CREATE DATABASE $DB" \
	|| die "CREATE DATABASE failed"

# --- pgbouncer (refuses to run as root: run it as postgres) ------------------------------
echo "== starting pgbouncer" >&2
BPORT=$(free_port)
mkdir -p "$WORK/bouncer"
cat >"$WORK/bouncer/pgbouncer.ini" <<EOF
[databases]
$DB = host=127.0.0.1 port=$PGPORT dbname=$DB

[pgbouncer]
listen_addr = 127.0.0.1
listen_port = $BPORT
unix_socket_dir =
auth_type = trust
auth_file = $WORK/bouncer/userlist.txt
pool_mode = session
max_client_conn = 200
default_pool_size = $((CLIENTS + 8))
logfile = $WORK/bouncer/pgbouncer.log
pidfile = $BOUNCER_PIDFILE
log_connections = 0
log_disconnections = 0
EOF
echo '"postgres" ""' >"$WORK/bouncer/userlist.txt"
if [ "$(id -u)" -eq 0 ]; then
	chmod 755 "$WORK"
	chown -R postgres: "$WORK/bouncer"
	runuser -u postgres -- "$PGBOUNCER" -d -q "$WORK/bouncer/pgbouncer.ini" \
		|| die "pgbouncer failed to start: $(tail -5 "$WORK/bouncer/pgbouncer.log" 2>/dev/null)"
else
	"$PGBOUNCER" -d -q "$WORK/bouncer/pgbouncer.ini" || die "pgbouncer failed to start"
fi
wait_port "$BPORT" || die "pgbouncer is not listening on $BPORT: $(tail -5 "$WORK/bouncer/pgbouncer.log")"

# --- pgdual -------------------------------------------------------------------------------
echo "== starting pgdual ($BUILD_DIR/pgdual)" >&2
DPORT=$(free_port)
cat >"$WORK/pgdual.yaml" <<EOF
listen: { host: 127.0.0.1, port: $DPORT }
log: { level: warning }
databases:
  - name: $DB
    old: "host=127.0.0.1 port=$PGPORT dbname=$DB"
EOF
# In a session of its own, like the daemonized pgbouncer: with the scheduler's autogroups
# enabled, a proxy left in this script's session would share its CPU slice with pgbench.
setsid "$BUILD_DIR/pgdual" -c "$WORK/pgdual.yaml" >"$WORK/pgdual.log" 2>&1 &
PGDUAL_PID=$!
wait_port "$DPORT" || die "pgdual is not listening on $DPORT: $(tail -20 "$WORK/pgdual.log")"
D1PORT=$(free_port)
sed -e "s/port: $DPORT/port: $D1PORT/" -e '$a limits: { relay_threads: 0 }' \
	"$WORK/pgdual.yaml" >"$WORK/pgdual1.yaml"
setsid "$BUILD_DIR/pgdual" -c "$WORK/pgdual1.yaml" >"$WORK/pgdual1.log" 2>&1 &
PGDUAL1_PID=$!
wait_port "$D1PORT" || die "pgdual1 is not listening on $D1PORT: $(tail -20 "$WORK/pgdual1.log")"

# --- the runs -----------------------------------------------------------------------------
pgbench_on() { # port args...
	local port=$1
	shift
	timeout $((DURATION + 120)) "$PGBENCH" -h 127.0.0.1 -p "$port" -U postgres "$@" "$DB"
}

echo "== pgbench -i -s $SCALE" >&2
pgbench_on "$PGPORT" -i -q -s "$SCALE" >"$WORK/init.log" 2>&1 || die "pgbench -i failed: $(tail -5 "$WORK/init.log")"

declare -A PORT=([direct]=$PGPORT [pgbouncer]=$BPORT [pgdual]=$DPORT [pgdual1]=$D1PORT)
TARGETS=(direct pgbouncer pgdual pgdual1)
WORKLOADS=(select tpcb)
declare -A ARGS=([select]="-S -M prepared" [tpcb]="-M prepared")
declare -A TPS CPU CSW
CLK_TCK=$(getconf CLK_TCK)

proxy_pid() { # target: the proxy's PID, nothing for direct
	case $1 in
	pgdual) echo "$PGDUAL_PID" ;;
	pgdual1) echo "$PGDUAL1_PID" ;;
	pgbouncer) cat "$BOUNCER_PIDFILE" ;;
	esac
}

# "utime+stime in clock ticks, voluntary+involuntary context switches" of a process, all
# its threads (pgdual's relay threads; libuv's pool threads forward cancels only).
proc_usage() { # pid
	local ticks csw
	ticks=$(awk '{ sub(/^.*\) /, ""); print $12 + $13 }' "/proc/$1/stat")
	csw=$(cat /proc/"$1"/task/*/status | awk '/ctxt_switches/ { n += $2 } END { print n }')
	echo "$ticks $csw"
}

run_one() { # workload target round
	local out tps pid="" before="" after xacts t0 c0 t1 c1
	pid=$(proxy_pid "$2")
	[ -n "$pid" ] && before=$(proc_usage "$pid")
	# shellcheck disable=SC2086
	if ! out=$(pgbench_on "${PORT[$2]}" -n ${ARGS[$1]} -c "$CLIENTS" -j "$THREADS" -T "$DURATION" 2>&1); then
		echo "$out" >&2
		[ "$2" = pgdual ] && tail -20 "$WORK/pgdual.log" >&2
		[ "$2" = pgdual1 ] && tail -20 "$WORK/pgdual1.log" >&2
		die "pgbench $1 against $2 failed (round $3)"
	fi
	tps=$(pgbench_tps "$out" "$1 against $2 (round $3)")
	TPS[$1,$2,$3]=$tps
	printf "   round %d  %-7s %-10s %10.0f tps\n" "$3" "$1" "$2" "$tps" >&2
	if [ -n "$pid" ]; then
		after=$(proc_usage "$pid")
		xacts=$(echo "$out" | sed -n 's/^number of transactions actually processed: \([0-9]*\).*/\1/p')
		if [ -z "$xacts" ] || [ "$xacts" -eq 0 ]; then
			die "no transaction count in pgbench $1 against $2"
		fi
		read -r t0 c0 <<<"$before"
		read -r t1 c1 <<<"$after"
		CPU[$1,$2,$3]=$(awk -v t="$((t1 - t0))" -v hz="$CLK_TCK" -v n="$xacts" 'BEGIN { printf "%.1f", t * 1e6 / hz / n }')
		CSW[$1,$2,$3]=$(awk -v c="$((c1 - c0))" -v n="$xacts" 'BEGIN { printf "%.2f", c / n }')
	fi
}

echo "== $ROUNDS rounds of ${DURATION}s runs, $CLIENTS clients, $THREADS threads" >&2
for r in $(seq "$ROUNDS"); do
	for w in "${WORKLOADS[@]}"; do
		# Rotate the order each round so that no target always runs first (or last).
		for i in "${!TARGETS[@]}"; do
			run_one "$w" "${TARGETS[$(((i + r) % ${#TARGETS[@]}))]}" "$r"
		done
	done
done

# --- the table ----------------------------------------------------------------------------

declare -A MED
echo
echo "pgbench passthrough benchmark, $(date -u '+%Y-%m-%d %H:%M UTC'), $(nproc) CPUs," \
	"scale $SCALE, $CLIENTS clients, $THREADS threads, ${DURATION}s per run, $ROUNDS rounds"
echo
for w in "${WORKLOADS[@]}"; do
	case $w in
	select) echo "select-only (-S -M prepared), TPS:" ;;
	tpcb) echo "tpcb-like (-M prepared), TPS:" ;;
	esac
	echo
	header="| target    |"
	sep="|-----------|"
	for r in $(seq "$ROUNDS"); do
		header+=$(printf " %8s |" "round $r")
		sep+="----------|"
	done
	echo "$header   median |"
	echo "$sep----------|"
	for t in "${TARGETS[@]}"; do
		tps_row 9 "$t" "$w" "$t"
	done
	echo
done

echo "Ratios of medians:"
echo
echo "| workload    | pgdual/direct | pgdual/pgbouncer | pgdual1/pgbouncer | pgbouncer/direct |"
echo "|-------------|---------------|------------------|-------------------|------------------|"
for w in "${WORKLOADS[@]}"; do
	awk -v w="$w" -v d="${MED[$w,direct]}" -v b="${MED[$w,pgbouncer]}" -v p="${MED[$w,pgdual]}" \
		-v p1="${MED[$w,pgdual1]}" \
		'BEGIN { printf "| %-11s | %13.2f | %16.2f | %17.2f | %16.2f |\n", w, p/d, p/b, p1/b, b/d }'
done

echo
echo "Per round, against pgbouncer (a round runs the targets back to back, so its ratio"
echo "drifts less with the machine's load than the medians' ratio; median of the rounds last):"
echo
for w in "${WORKLOADS[@]}"; do
	for t in pgdual pgdual1; do
		line=$(printf "| %-11s | %-7s |" "$w" "$t")
		vals=""
		for r in $(seq "$ROUNDS"); do
			v=$(awk -v p="${TPS[$w,$t,$r]}" -v b="${TPS[$w,pgbouncer,$r]}" 'BEGIN { printf "%.2f", p/b }')
			line+=" $v |"
			vals+="$v "
		done
		echo "$line median $(echo "$vals" | xargs | median) |"
	done
done

echo
echo "Each proxy's own cost per transaction (median of the rounds; CPU is user + system"
echo "time of its process, switches the context switches of all its threads):"
echo
echo "| workload    | pgbouncer CPU µs | pgdual CPU µs | pgdual1 CPU µs | pgdual/pgbouncer | pgbouncer switches | pgdual switches | pgdual1 switches |"
echo "|-------------|------------------|---------------|----------------|------------------|--------------------|-----------------|------------------|"
for w in "${WORKLOADS[@]}"; do
	declare -A M=()
	for t in pgbouncer pgdual pgdual1; do
		cv="" sv=""
		for r in $(seq "$ROUNDS"); do
			cv+="${CPU[$w,$t,$r]} "
			sv+="${CSW[$w,$t,$r]} "
		done
		M[cpu,$t]=$(echo "$cv" | xargs | median)
		M[csw,$t]=$(echo "$sv" | xargs | median)
	done
	awk -v w="$w" -v bc="${M[cpu,pgbouncer]}" -v pc="${M[cpu,pgdual]}" -v p1c="${M[cpu,pgdual1]}" \
		-v bs="${M[csw,pgbouncer]}" -v ps="${M[csw,pgdual]}" -v p1s="${M[csw,pgdual1]}" \
		'BEGIN { printf "| %-11s | %16.1f | %13.1f | %14.1f | %16.2f | %18.2f | %15.2f | %16.2f |\n", w, bc, pc, p1c, pc/bc, bs, ps, p1s }'
done
