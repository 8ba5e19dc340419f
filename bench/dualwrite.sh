#!/bin/bash
# dualwrite.sh — what mirroring every write to a second database costs, and whether the
# two databases end up identical: pgbench tpcb-like against PostgreSQL direct, pgdual at
# writes=old, pgdual at writes=dual (commit: async and commit: lockstep) and pgpool-II in
# native replication mode, all over the same two databases.
#
# Starts two throwaway PostgreSQL clusters, old and new (tests/integration/pgcluster.py),
# each with a database `bench`; two pgdual instances whose database `bench` has old and
# new and a `kind: tables` rule `pgbench` over the four pgbench tables, one with
# `mirror: { commit: async }`, one with `commit: lockstep` (both start at writes=old);
# and pgpool-II (Debian's 4.3) with backend_clustering_mode = 'native_replication', old
# as backend 0 (main) and new as backend 1. Then runs ROUNDS rounds; each round runs every
# configuration once, in an order that rotates from round to round:
#   direct           PostgreSQL old, no proxy (new is not written)
#   pgdual-old       pgdual (async instance) at writes=old (new is not written)
#   pgdual-async     pgdual async instance, flipped to writes=dual with pgdualctl
#   pgdual-lockstep  pgdual lockstep instance, flipped to writes=dual
#   pgpool           pgpool-II native replication (writes go to both backends)
# Each run starts from freshly initialised, identical tables (pgbench -i -s SCALE on old
# and on new, once in full, then `-I gv` before every run: truncate and refill; the data
# pgbench -i generates is deterministic, and the script checks once at the start that
# both sides come out identical), then runs pgbench tpcb-like (-M MODE, CLIENTS clients,
# THREADS threads, DURATION seconds) through the target, then compares old and new: a
# count and an md5 over every row of each pgbench table, ordered by all its columns
# (pgbench_history has no key), computed in each database directly. Before comparing
# after a mirrored run it waits (up to SETTLE seconds) until new has as many
# pgbench_history rows as old and no session busy in `bench`, so that an async mirror
# can catch up. A pgdual run flips writes=dual before and writes=old after.
#
# Prints per-round TPS and average latency, the medians per configuration, the data
# check per configuration (match / MISMATCH; "n/a (not mirrored)" for direct and
# pgdual-old, where new must stay untouched), and the ratios pgdual-async/pgpool,
# pgdual-lockstep/pgpool, pgdual-async/direct and pgdual-old/direct (target: pgdual async
# >= 1.5x pgpool with identical data).
#
# A pgdual that refuses the flip to writes=dual (a version without mirroring) does not
# fail the script: that configuration is reported as "skipped: <pgdual's message>". A
# MISMATCH (or a write that reached new under a configuration that must not write it)
# exits non-zero once every run is done; anything that fails to run exits non-zero at
# once; the figures never do.
#
# Environment:
#   BUILD_DIR  where pgdual and pgdualctl were built (default: build/ in the repository)
#   ROUNDS     rounds (default 3)
#   DURATION   seconds per pgbench run (default 10)
#   CLIENTS    pgbench clients (default 16); THREADS pgbench threads (default 2)
#   SCALE      pgbench scale (default 10)
#   MODE       pgbench -M: prepared (default), extended or simple
#   WORKLOAD   tpcb (default: pgbench's tpcb-like, one transaction of five statements) or
#              autocommit (the same five statements without BEGIN/END, each its own
#              transaction: what pgdual's wrap of autocommit writes costs)
#   READS      old (default) or new: the mirrored pgdual runs also set reads=new, so the
#              workload's SELECT runs on new and each session changes sides around it
#              (what serving reads from green before the switchover costs)
#   SETTLE     seconds to wait after a mirrored run for new to catch up before the data
#              check (default 60)
#   PGPOOL     the pgpool-II binary (default /usr/sbin/pgpool)
# Everything listens on 127.0.0.1 at free high ports; everything started is stopped and
# every temporary file removed on exit, also on failure or Ctrl-C.
set -euo pipefail

HERE=$(cd "$(dirname "$0")" && pwd)
REPO=$(cd "$HERE/.." && pwd)
BUILD_DIR=${BUILD_DIR:-$REPO/build}
ROUNDS=${ROUNDS:-3}
DURATION=${DURATION:-10}
CLIENTS=${CLIENTS:-16}
THREADS=${THREADS:-2}
SCALE=${SCALE:-10}
MODE=${MODE:-prepared}
WORKLOAD=${WORKLOAD:-tpcb}
READS=${READS:-old}
SETTLE=${SETTLE:-60}
PGPOOL=${PGPOOL:-/usr/sbin/pgpool}
PY=/usr/bin/python3
PGBIN=/usr/lib/postgresql/15/bin
PGBENCH=$PGBIN/pgbench
PSQL=$PGBIN/psql
DB=bench
RULE=pgbench

BENCH=dualwrite.sh
# shellcheck source=bench/lib.sh
. "$HERE/lib.sh"

require_executables "$BUILD_DIR/pgdual" "$BUILD_DIR/pgdualctl" "$PGBENCH" "$PSQL" "$PGPOOL" "$PY"
require_positive ROUNDS DURATION CLIENTS THREADS SCALE SETTLE
[[ $MODE =~ ^(prepared|extended|simple)$ ]] || die "MODE must be prepared, extended or simple, not '$MODE'"

[[ $WORKLOAD =~ ^(tpcb|autocommit)$ ]] || die "WORKLOAD must be tpcb or autocommit, not '$WORKLOAD'"
[[ $READS =~ ^(old|new)$ ]] || die "READS must be old or new, not '$READS'"

WORK=$(mktemp -d /tmp/pgdual-bench-XXXXXX)
if [ "$WORKLOAD" = tpcb ]; then
	WL_LABEL=tpcb-like
	SCRIPT_ARGS=(-b tpcb-like)
else
	WL_LABEL="tpcb statements in autocommit"
	cat >"$WORK/autocommit.sql" <<'EOF'
\set aid random(1, 100000 * :scale)
\set bid random(1, 1 * :scale)
\set tid random(1, 10 * :scale)
\set delta random(-5000, 5000)
UPDATE pgbench_accounts SET abalance = abalance + :delta WHERE aid = :aid;
SELECT abalance FROM pgbench_accounts WHERE aid = :aid;
UPDATE pgbench_tellers SET tbalance = tbalance + :delta WHERE tid = :tid;
UPDATE pgbench_branches SET bbalance = bbalance + :delta WHERE bid = :bid;
INSERT INTO pgbench_history (tid, bid, aid, delta, mtime) VALUES (:tid, :bid, :aid, :delta, CURRENT_TIMESTAMP);
EOF
	SCRIPT_ARGS=(-f "$WORK/autocommit.sql" -D "scale=$SCALE")
fi
declare -A PGDUAL_PID=()
PGPOOL_PID=
PGPOOL_PIDFILE=$WORK/pgpool/pgpool.pid

cleanup() {
	local rc=$?
	trap - EXIT INT TERM
	local p
	for p in "${PGDUAL_PID[@]}"; do stop_pid "$p"; done
	# pgpool's main process (from its pid file) shuts its children down on SIGINT (fast
	# shutdown); PGPOOL_PID is what this script started (runuser, or pgpool itself).
	if [ -f "$PGPOOL_PIDFILE" ]; then
		stop_pid "$(tr -dc 0-9 <"$PGPOOL_PIDFILE" 2>/dev/null || true)" INT
	fi
	stop_pid "$PGPOOL_PID" INT
	stop_cluster "$WORK/old"
	stop_cluster "$WORK/new"
	rm -rf "$WORK"
	exit "$rc"
}
trap cleanup EXIT
trap 'exit 130' INT TERM

psql_on() { # port args... (one value per line, no headers)
	local port=$1
	shift
	timeout 300 "$PSQL" -X -q -At -v ON_ERROR_STOP=1 -h 127.0.0.1 -p "$port" -U postgres -d "$DB" "$@"
}

pgbench_on() { # port args...
	local port=$1
	shift
	timeout $((DURATION + 300)) "$PGBENCH" -h 127.0.0.1 -p "$port" -U postgres "$@" "$DB"
}

# --- PostgreSQL old and new ---------------------------------------------------------------
declare -A PORT
for side in old new; do
	echo "== starting PostgreSQL ($side)" >&2
	PORT[$side]=$(start_cluster "$WORK/$side")
	timeout 120 "$PSQL" -X -q -h 127.0.0.1 -p "${PORT[$side]}" -U postgres -d postgres \
		-c "CREATE DATABASE $DB" || die "CREATE DATABASE on $side failed"
done

# Fresh pgbench tables on both sides, in parallel: with no argument pgbench -i creates
# them; with `-I gv` it truncates and refills the existing ones (the same data), so that
# the tables pgdual and pgpool know keep their identity from run to run.
init_tables() { # [pgbench -i options]
	local side failed=
	declare -A pid
	for side in old new; do
		pgbench_on "${PORT[$side]}" -i -q -s "$SCALE" "$@" >"$WORK/init-$side.log" 2>&1 &
		pid[$side]=$!
	done
	for side in old new; do
		wait "${pid[$side]}" || failed+=" $side"
	done
	[ -z "$failed" ] || die "pgbench -i failed on$failed: $(tail -5 "$WORK/init-${failed##* }.log")"
}

# Every pgbench table, all its columns in the ORDER BY (pgbench_history has no key, and
# identical rows must sort alike on both sides).
TABLES=(pgbench_accounts pgbench_branches pgbench_tellers pgbench_history)
declare -A ORDER=(
	[pgbench_accounts]="aid, bid, abalance, filler"
	[pgbench_branches]="bid, bbalance, filler"
	[pgbench_tellers]="tid, bid, tbalance, filler"
	[pgbench_history]="tid, bid, aid, delta, mtime, filler"
)

# One line per table: "table rows md5", the md5 over the md5s of the rows' text forms.
fingerprint() { # side
	local t sql=""
	for t in "${TABLES[@]}"; do
		sql+="SELECT '$t', count(*), coalesce(md5(string_agg(md5(x::text), '' ORDER BY ${ORDER[$t]})), '-') FROM $t x;"
	done
	psql_on "${PORT[$1]}" -F ' ' -c "$sql" || die "fingerprint query on $1 failed"
}

# Prints "match" or "MISMATCH: <tables>"; the fingerprints are left in $WORK.
compare() {
	local a
	fingerprint old >"$WORK/fp-old"
	fingerprint new >"$WORK/fp-new"
	if cmp -s "$WORK/fp-old" "$WORK/fp-new"; then
		echo match
		return
	fi
	a=$(join <(sort "$WORK/fp-old") <(sort "$WORK/fp-new") | awk '$2 != $4 || $3 != $5 { printf " %s", $1 }')
	echo "MISMATCH:${a:- (tables differ)}"
	echo "   old:" >&2
	sed 's/^/      /' "$WORK/fp-old" >&2
	echo "   new:" >&2
	sed 's/^/      /' "$WORK/fp-new" >&2
}

echo "== pgbench -i -s $SCALE on old and new" >&2
init_tables
[ "$(compare)" = match ] || die "old and new differ right after pgbench -i: the comparison cannot be trusted"
echo "   old and new identical after pgbench -i" >&2

# --- pgdual: one instance per commit mode ---------------------------------------------------
declare -A DPORT ADMIN
pgdual_tail() { tail -20 "$WORK/pgdual-$1/pgdual.log" >&2; }

for commit in async lockstep; do
	echo "== starting pgdual, commit: $commit ($BUILD_DIR/pgdual)" >&2
	d=$WORK/pgdual-$commit
	mkdir -p "$d"
	DPORT[$commit]=$(free_port)
	ADMIN[$commit]=$d/admin.sock
	cat >"$d/pgdual.yaml" <<EOF
listen: { host: 127.0.0.1, port: ${DPORT[$commit]} }
log: { level: warning }
admin: { socket: ${ADMIN[$commit]} }
state: $d/state.json
divergence: { log: $d/divergence.jsonl }
databases:
  - name: $DB
    old: "host=127.0.0.1 port=${PORT[old]} dbname=$DB"
    new: "host=127.0.0.1 port=${PORT[new]} dbname=$DB"
rules:
  # The keys come from the catalog: pgbench -i gives accounts, branches and tellers
  # primary keys (aid, bid, tid); pgbench_history has none.
  - name: $RULE
    database: $DB
    kind: tables
    tables: [public.pgbench_accounts, public.pgbench_branches, public.pgbench_tellers, public.pgbench_history]
    writes: old
    reads: old
    mirror: { commit: $commit }
EOF
	# pgdual's own connections use libpq's defaults when the conninfo names no user: make
	# that postgres. Its own session (see passthrough.sh: scheduler autogroups).
	PGUSER=postgres setsid "$BUILD_DIR/pgdual" -c "$d/pgdual.yaml" >"$d/pgdual.log" 2>&1 &
	PGDUAL_PID[$commit]=$!
	wait_port "${DPORT[$commit]}" || { pgdual_tail "$commit"; die "pgdual ($commit) is not listening on ${DPORT[$commit]}"; }
	for _ in $(seq 50); do [ -S "${ADMIN[$commit]}" ] && break; sleep 0.1; done
done

# pgdualctl --json on instance $1; the reply goes to CTL_OUT, the exit status is returned
# (0 done, 1 refused or failed, 2 usage or connection error).
ctl() { # commit args...
	local commit=$1 rc=0
	shift
	CTL_OUT=$(timeout 60 "$BUILD_DIR/pgdualctl" -s "${ADMIN[$commit]}" --json "$@" 2>&1) || rc=$?
	return "$rc"
}

# A command that must succeed.
ctl_ok() { # commit args...
	ctl "$@" || { echo "$CTL_OUT" >&2; pgdual_tail "$1"; die "pgdualctl $* failed"; }
}

reply_error() { # the "error" of the JSON reply in CTL_OUT (or CTL_OUT itself)
	"$PY" -c 'import json, sys
t = sys.stdin.read()
try:
    print(json.loads(t).get("error") or t.strip())
except ValueError:
    print(t.strip())' <<<"$CTL_OUT"
}

for commit in async lockstep; do ctl_ok "$commit" rules; done

# --- pgpool-II, native replication ------------------------------------------------------------
echo "== starting pgpool-II, native replication ($PGPOOL)" >&2
PPORT=$(free_port)
P=$WORK/pgpool
mkdir -p "$P"
cat >"$P/pgpool.conf" <<EOF
backend_clustering_mode = 'native_replication'
listen_addresses = '127.0.0.1'
port = $PPORT
socket_dir = '$P'
pcp_listen_addresses = ''
pcp_port = $(free_port)
pcp_socket_dir = '$P'
backend_hostname0 = '127.0.0.1'
backend_port0 = ${PORT[old]}
backend_weight0 = 1
backend_flag0 = 'DISALLOW_TO_FAILOVER'
backend_hostname1 = '127.0.0.1'
backend_port1 = ${PORT[new]}
backend_weight1 = 1
backend_flag1 = 'DISALLOW_TO_FAILOVER'
enable_pool_hba = off
pool_passwd = ''
num_init_children = $((CLIENTS + 4))
max_pool = 1
log_destination = 'stderr'
log_min_messages = warning
pid_file_name = '$PGPOOL_PIDFILE'
logdir = '$P'
replicate_select = off
insert_lock = off
replication_stop_on_mismatch = off
failover_if_affected_tuples_mismatch = off
failover_on_backend_error = off
load_balance_mode = off
health_check_period = 0
sr_check_period = 0
use_watchdog = off
wd_ipc_socket_dir = '$P'
memory_cache_enabled = off
EOF
: >"$P/pcp.conf"
echo "host all all 127.0.0.1/32 trust" >"$P/pool_hba.conf"
PGPOOL_ARGS=(-n -D -f "$P/pgpool.conf" -F "$P/pcp.conf" -a "$P/pool_hba.conf")
# In a session of its own, as a service manager would start it (see passthrough.sh); as
# the postgres user when we are root, like pgbouncer in passthrough.sh.
if [ "$(id -u)" -eq 0 ]; then
	chmod 755 "$WORK"
	chown -R postgres: "$P"
	setsid runuser -u postgres -- "$PGPOOL" "${PGPOOL_ARGS[@]}" >"$P/pgpool.log" 2>&1 &
else
	setsid "$PGPOOL" "${PGPOOL_ARGS[@]}" >"$P/pgpool.log" 2>&1 &
fi
PGPOOL_PID=$!
wait_port "$PPORT" || die "pgpool is not listening on $PPORT: $(tail -20 "$P/pgpool.log")"
# Accepting TCP is not yet serving: wait for a query to go through.
for _ in $(seq 100); do
	psql_on "$PPORT" -c "SELECT 1" >/dev/null 2>&1 && break
	sleep 0.1
done
psql_on "$PPORT" -c "SELECT 1" >/dev/null || die "pgpool does not answer queries: $(tail -20 "$P/pgpool.log")"

# --- the runs -----------------------------------------------------------------------------
TARGETS=(direct pgdual-old pgdual-async pgdual-lockstep pgpool)
declare -A LABEL=([direct]="direct (old)" [pgdual-old]="pgdual writes=old" [pgdual-async]="pgdual async"
	[pgdual-lockstep]="pgdual lockstep" [pgpool]="pgpool native")
declare -A TPORT=([direct]=${PORT[old]} [pgdual-old]=${DPORT[async]} [pgdual-async]=${DPORT[async]}
	[pgdual-lockstep]=${DPORT[lockstep]} [pgpool]=$PPORT)
declare -A INSTANCE=([pgdual-old]=async [pgdual-async]=async [pgdual-lockstep]=lockstep)
declare -A TPS LAT CHECK SKIP
FAILED=

mirrored() { [[ $1 == pgdual-async || $1 == pgdual-lockstep || $1 == pgpool ]]; }

# After a mirrored run: until new has as many pgbench_history rows as old and no session
# is busy in `bench` on new (an async mirror still applying), up to SETTLE seconds.
settle() {
	local n_old n_new busy
	n_old=$(psql_on "${PORT[old]}" -c "SELECT count(*) FROM pgbench_history") || die "count on old failed"
	for _ in $(seq $((SETTLE * 4))); do
		n_new=$(psql_on "${PORT[new]}" -c "SELECT count(*) FROM pgbench_history") || die "count on new failed"
		busy=$(psql_on "${PORT[new]}" -c "SELECT count(*) FROM pg_stat_activity
			WHERE datname = '$DB' AND pid <> pg_backend_pid() AND state IS DISTINCT FROM 'idle'") \
			|| die "pg_stat_activity on new failed"
		[ "$n_new" = "$n_old" ] && [ "$busy" = 0 ] && return 0
		sleep 0.25
	done
	echo "   new did not catch up within ${SETTLE}s: pgbench_history $n_new rows on new, $n_old on old, $busy busy sessions" >&2
}

run_one() { # target round
	local t=$1 r=$2 out tps lat check events=0
	if [[ $t == pgdual-async || $t == pgdual-lockstep ]]; then
		local rc=0
		ctl "${INSTANCE[$t]}" flag "$RULE" writes=dual || rc=$?
		if [ "$rc" != 0 ]; then
			# 1: pgdual refused (or failed) the flip; anything else: pgdualctl could not ask.
			[ "$rc" = 1 ] || { echo "$CTL_OUT" >&2; die "pgdualctl flag $RULE writes=dual ($t) could not run"; }
			SKIP[$t]=$(reply_error)
			printf "   round %d  %-17s skipped: %s\n" "$r" "${LABEL[$t]}" "${SKIP[$t]}" >&2
			return 0
		fi
		[ "$READS" = old ] || ctl_ok "${INSTANCE[$t]}" flag "$RULE" reads=new
		events=$(wc -l <"$WORK/pgdual-${INSTANCE[$t]}/divergence.jsonl" 2>/dev/null || echo 0)
	fi
	init_tables -I gv
	if ! out=$(pgbench_on "${TPORT[$t]}" -n -M "$MODE" "${SCRIPT_ARGS[@]}" -c "$CLIENTS" -j "$THREADS" -T "$DURATION" 2>&1); then
		echo "$out" >&2
		case $t in
		pgdual-*) pgdual_tail "${INSTANCE[$t]}" ;;
		pgpool) tail -20 "$P/pgpool.log" >&2 ;;
		esac
		die "pgbench against ${LABEL[$t]} failed (round $r)"
	fi
	tps=$(pgbench_tps "$out" "against ${LABEL[$t]} (round $r)")
	lat=$(echo "$out" | sed -n 's/^latency average = \([0-9.]*\) ms$/\1/p')
	[ -n "$lat" ] || { echo "$out" >&2; die "no latency in pgbench output (${LABEL[$t]})"; }
	TPS[tpcb,$t,$r]=$tps
	LAT[$t,$r]=$lat
	if mirrored "$t"; then
		settle
		check=$(compare)
		[ "$check" = match ] || FAILED+=" ${LABEL[$t]} (round $r)"
	else
		# Nothing may reach new: its pgbench_history must still be empty.
		local n
		n=$(psql_on "${PORT[new]}" -c "SELECT count(*) FROM pgbench_history") || die "count on new failed"
		if [ "$n" = 0 ]; then
			check="n/a (not mirrored)"
		else
			check="UNEXPECTED: $n pgbench_history rows reached new"
			FAILED+=" ${LABEL[$t]} (round $r)"
		fi
	fi
	CHECK[$t,$r]=$check
	printf "   round %d  %-17s %8.0f tps %8.2f ms  %s\n" "$r" "${LABEL[$t]}" "$tps" "$lat" "$check" >&2
	if [[ $t == pgdual-async || $t == pgdual-lockstep ]]; then
		local now
		now=$(wc -l <"$WORK/pgdual-${INSTANCE[$t]}/divergence.jsonl" 2>/dev/null || echo 0)
		[ "$now" = "$events" ] || echo "   pgdual recorded $((now - events)) divergence events" >&2
		[ "$READS" = old ] || ctl_ok "${INSTANCE[$t]}" flag "$RULE" reads=old
		ctl_ok "${INSTANCE[$t]}" flag "$RULE" writes=old
	fi
	return 0
}

echo "== $ROUNDS rounds of ${DURATION}s $WL_LABEL runs (-M $MODE, mirrored runs at reads=$READS), $CLIENTS clients, $THREADS threads, scale $SCALE" >&2
for r in $(seq "$ROUNDS"); do
	# Rotate the order each round so that no configuration always runs first (or last).
	for i in $(seq 0 $((${#TARGETS[@]} - 1))); do
		run_one "${TARGETS[$(((i + r) % ${#TARGETS[@]}))]}" "$r"
	done
done
for commit in async lockstep; do
	kill -0 "${PGDUAL_PID[$commit]}" 2>/dev/null || { pgdual_tail "$commit"; die "pgdual ($commit) is no longer running"; }
	echo "== pgdualctl status, commit: $commit" >&2
	timeout 60 "$BUILD_DIR/pgdualctl" -s "${ADMIN[$commit]}" status >&2 || die "pgdualctl status failed"
done
kill -0 "$PGPOOL_PID" 2>/dev/null || die "pgpool is no longer running: $(tail -20 "$P/pgpool.log")"

# --- the tables ---------------------------------------------------------------------------

W=17 # label width
declare -A MED LATMED

header() { # what
	local h s r
	h=$(printf "| %-*s |" "$W" "$1")
	s="|$(printf -- '-%.0s' $(seq $((W + 2))))|"
	for r in $(seq "$ROUNDS"); do
		h+=$(printf " %8s |" "round $r")
		s+="----------|"
	done
	echo "$h   median |"
	echo "$s----------|"
}

skipped_row() { # target
	local line r
	line=$(printf "| %-*s |" "$W" "${LABEL[$1]}")
	for r in $(seq "$ROUNDS"); do line+=" skipped  |"; done
	echo "$line        - |"
}

latency_row() { # target (as tps_row, for LAT, two decimals; median into LATMED)
	local line vals="" r
	line=$(printf "| %-*s |" "$W" "${LABEL[$1]}")
	for r in $(seq "$ROUNDS"); do
		line+=$(printf " %8.2f |" "${LAT[$1,$r]}")
		vals+="${LAT[$1,$r]} "
	done
	LATMED[$1]=$(echo "$vals" | xargs | median)
	line+=$(printf " %8.2f |" "${LATMED[$1]}")
	echo "$line"
}

echo
echo "pgbench dual-write benchmark, $(date -u '+%Y-%m-%d %H:%M UTC'), $(nproc) CPUs," \
	"commit $(git -C "$REPO" describe --always --dirty 2>/dev/null || echo unknown)," \
	"scale $SCALE, -M $MODE, $CLIENTS clients, $THREADS threads, ${DURATION}s per run, $ROUNDS rounds"
echo
echo "$WL_LABEL (-M $MODE), TPS:"
echo
header target
for t in "${TARGETS[@]}"; do
	if [ -n "${SKIP[$t]:-}" ]; then skipped_row "$t"; else tps_row "$W" "${LABEL[$t]}" tpcb "$t"; fi
done
echo
echo "$WL_LABEL (-M $MODE), average latency (ms):"
echo
header target
for t in "${TARGETS[@]}"; do
	if [ -n "${SKIP[$t]:-}" ]; then skipped_row "$t"; else latency_row "$t"; fi
done
echo

echo "Medians and old vs new after each run:"
echo
printf "| %-*s | %8s | %8s | %s\n" "$W" target TPS "lat. ms" "old vs new |"
printf "|%s|----------|----------|------------|\n" "$(printf -- '-%.0s' $(seq $((W + 2))))"
for t in "${TARGETS[@]}"; do
	if [ -n "${SKIP[$t]:-}" ]; then
		printf "| %-*s | %8s | %8s | skipped: %s |\n" "$W" "${LABEL[$t]}" - - "${SKIP[$t]}"
		continue
	fi
	# One verdict when every round agrees, else each round's.
	checks=$(for r in $(seq "$ROUNDS"); do echo "${CHECK[$t,$r]}"; done | sort -u)
	if [ "$(echo "$checks" | wc -l)" -gt 1 ]; then
		checks=$(for r in $(seq "$ROUNDS"); do printf "round %d: %s; " "$r" "${CHECK[$t,$r]}"; done)
		checks=${checks%; }
	fi
	printf "| %-*s | %8.0f | %8.2f | %s |\n" "$W" "${LABEL[$t]}" "${MED[tpcb,$t]}" "${LATMED[$t]}" "$checks"
done
echo

ratio() { # numerator-target denominator-target
	if [ -n "${SKIP[$1]:-}" ] || [ -n "${SKIP[$2]:-}" ]; then
		echo "-"
	else
		awk -v a="${MED[tpcb,$1]}" -v b="${MED[tpcb,$2]}" 'BEGIN { printf "%.2f", a / b }'
	fi
}
echo "Ratios of median TPS (target: pgdual async / pgpool >= 1.5, with old = new):"
echo
echo "| pgdual-async/pgpool | pgdual-lockstep/pgpool | pgdual-async/direct | pgdual-old/direct |"
echo "|---------------------|------------------------|---------------------|-------------------|"
printf "| %19s | %22s | %19s | %17s |\n" "$(ratio pgdual-async pgpool)" "$(ratio pgdual-lockstep pgpool)" \
	"$(ratio pgdual-async direct)" "$(ratio pgdual-old direct)"
echo

if [ -n "${SKIP[pgdual-async]:-}" ]; then
	echo "Target not measured: pgdual async was skipped (${SKIP[pgdual-async]})."
elif [[ " $FAILED" != *" ${LABEL[pgdual-async]} ("* ]] &&
	awk -v a="${MED[tpcb,pgdual-async]}" -v b="${MED[tpcb,pgpool]}" 'BEGIN { exit !(a >= 1.5 * b) }'; then
	echo "Target met: pgdual async >= 1.5x pgpool with old = new after every run."
else
	echo "Target missed: pgdual async is $(ratio pgdual-async pgpool)x pgpool (needs >= 1.5x with old = new after every run)."
fi

if [ -n "$FAILED" ]; then
	echo "$BENCH: old and new differ after:$FAILED (fingerprints above, on stderr)" >&2
	exit 1
fi
