#!/bin/bash
# rewrite.sh — what a `columns` rule costs: writes=old versus writes=dual, reads=old
# versus reads=new, with PostgreSQL direct as the reference.
#
# Starts a throwaway PostgreSQL cluster (tests/integration/pgcluster.py), creates
# public.users(id, email, email_address, note) with ROWS rows, and starts one pgdual with
# the rule users-email (email -> email_address, up lower(email), down email_address), an
# admin socket and a state file. Then runs ROUNDS rounds; each round runs two pgbench
# custom scripts (-M MODE, prepared by default; 16 clients, 2 threads, DURATION seconds),
# each against three targets in turn (the order rotates from round to round):
#   write: an UPDATE of email and an INSERT ... ON CONFLICT (id) DO UPDATE of email, on
#          random ids — direct, pgdual with writes=old, pgdual with writes=dual, and
#          "direct (rw)": the statements as pgdual rewrites them, sent straight to
#          PostgreSQL (what writing the second column costs the database itself);
#   read:  SELECT email FROM users WHERE id = random — direct, pgdual with reads=old,
#          pgdual with reads=new (both under writes=dual: reads=new needs it).
# Flags are flipped with pgdualctl between runs. Prints per-round TPS, the median per
# target and the ratios dual/old, new/old and pgdual/direct.
#
# Checks: after every writes=dual run, every row that run (or an earlier dual run) wrote
# last must have email_address = lower(email) (checked directly in PostgreSQL); with
# reads=new, a sentinel row whose old and new columns differ must be read from the new
# one. A failed check, or anything that fails to run, exits non-zero; the figures never do.
#
# Environment:
#   BUILD_DIR  where pgdual and pgdualctl were built (default: build/ in the repository)
#   ROUNDS     rounds (default 5)
#   DURATION   seconds per pgbench run (default 10)
#   CLIENTS    pgbench clients (default 16); THREADS pgbench threads (default 2)
#   ROWS       rows in public.users (default 100000)
#   MODE       pgbench -M: prepared (default; pgdual rewrites each statement once per
#              session, at Parse), extended (a Parse of the same text before every
#              execution: a rewrite-cache lookup each time) or simple (values inlined in
#              the text, so every statement is parsed and rewritten: the worst case)
#   PERF_OUT   a directory: when set, pgdual is profiled (perf record, DWARF call graphs)
#              during round 1's writes=dual and reads=new runs (which slows those two
#              runs down); the perf data and `perf report --stdio` (by library, and
#              inclusive time by function) are left there
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
ROWS=${ROWS:-100000}
PERF_OUT=${PERF_OUT:-}
MODE=${MODE:-prepared}
PY=/usr/bin/python3
PGBIN=/usr/lib/postgresql/15/bin
PGBENCH=$PGBIN/pgbench
PSQL=$PGBIN/psql
PERF=${PERF:-/usr/bin/perf}
DB=bench
RULE=users-email

BENCH=rewrite.sh
# shellcheck source=bench/lib.sh
. "$HERE/lib.sh"

require_executables "$BUILD_DIR/pgdual" "$BUILD_DIR/pgdualctl" "$PGBENCH" "$PSQL" "$PY"
require_positive ROUNDS DURATION CLIENTS THREADS ROWS
[[ $MODE =~ ^(prepared|extended|simple)$ ]] || die "MODE must be prepared, extended or simple, not '$MODE'"
if [ -n "$PERF_OUT" ]; then
	[ -x "$PERF" ] || die "PERF_OUT is set but $PERF is not installed"
	mkdir -p "$PERF_OUT" || die "cannot create $PERF_OUT"
	PERF_OUT=$(cd "$PERF_OUT" && pwd)
fi

WORK=$(mktemp -d /tmp/pgdual-bench-XXXXXX)
PGDUAL_PID=
PERF_PID=

cleanup() {
	local rc=$?
	trap - EXIT INT TERM
	if [ -n "$PERF_PID" ] && kill -0 "$PERF_PID" 2>/dev/null; then
		kill -INT "$PERF_PID" 2>/dev/null || true
		wait "$PERF_PID" 2>/dev/null || true
	fi
	stop_pid "$PGDUAL_PID"
	stop_cluster "$WORK/pg"
	rm -rf "$WORK"
	exit "$rc"
}
trap cleanup EXIT
trap 'exit 130' INT TERM

psql_on() { # port args... (one value per line, no headers)
	local port=$1
	shift
	timeout 120 "$PSQL" -X -q -At -v ON_ERROR_STOP=1 -h 127.0.0.1 -p "$port" -U postgres -d "$DB" "$@"
}

pgdual_tail() { tail -20 "$WORK/pgdual.log" >&2; }

# --- PostgreSQL and the table -------------------------------------------------------------
echo "== starting PostgreSQL" >&2
PGPORT=$(start_cluster "$WORK/pg")
timeout 120 "$PSQL" -X -q -h 127.0.0.1 -p "$PGPORT" -U postgres -d postgres -c "CREATE DATABASE $DB" \
	|| die "CREATE DATABASE failed"

# The starting values are not what lower() of the benchmark's writes gives, so a write
# that missed its rewrite leaves email_address visibly stale. Row 0 is a sentinel that the
# scripts never touch: its old and new columns differ, to prove that reads=new reads new.
echo "== creating public.users with $ROWS rows" >&2
psql_on "$PGPORT" >/dev/null <<EOF || die "could not create public.users"
CREATE TABLE public.users (id bigint PRIMARY KEY, email text, email_address text, note text);
INSERT INTO public.users (id, email, email_address)
    SELECT i, 'User' || i || '@Example.ORG', lower('User' || i || '@Example.ORG')
    FROM generate_series(1, $ROWS) AS i;
INSERT INTO public.users (id, email, email_address) VALUES (0, 'Sentinel@OLD', 'sentinel@new');
VACUUM ANALYZE public.users;
EOF

# --- pgdual -------------------------------------------------------------------------------
echo "== starting pgdual ($BUILD_DIR/pgdual)" >&2
DPORT=$(free_port)
ADMIN=$WORK/admin.sock
cat >"$WORK/pgdual.yaml" <<EOF
listen: { host: 127.0.0.1, port: $DPORT }
log: { level: warning }
admin: { socket: $ADMIN }
state: $WORK/state.json
databases:
  - name: $DB
    old: "host=127.0.0.1 port=$PGPORT dbname=$DB"
rules:
  - name: $RULE
    database: $DB
    kind: columns
    table: public.users
    key: [id]
    columns:
      - { old: email, new: email_address, up: "lower(email)", down: "email_address" }
    writes: old
    reads: old
EOF
# pgdual's own connections (catalog checks) use libpq's defaults when the conninfo names
# no user: make that postgres.
# Its own session (see passthrough.sh: scheduler autogroups).
PGUSER=postgres setsid "$BUILD_DIR/pgdual" -c "$WORK/pgdual.yaml" >"$WORK/pgdual.log" 2>&1 &
PGDUAL_PID=$!
wait_port "$DPORT" || { pgdual_tail; die "pgdual is not listening on $DPORT"; }
for _ in $(seq 50); do [ -S "$ADMIN" ] && break; sleep 0.1; done

ctl() { # args...
	local out
	if ! out=$(timeout 60 "$BUILD_DIR/pgdualctl" -s "$ADMIN" "$@" 2>&1); then
		echo "$out" >&2
		pgdual_tail
		die "pgdualctl $* failed"
	fi
}

ctl rules

# --- the scripts --------------------------------------------------------------------------
# One write script per target, identical but for the note it writes: 'dual' under
# writes=dual, 'old' under writes=old, 'direct' straight to PostgreSQL, so that the check
# below looks only at rows whose last write went through the dual rewrite. (A literal
# rather than a pgbench variable, so that the scripts work with every MODE.)
for t in direct old dual; do
	cat >"$WORK/write-$t.sql" <<EOF
\\set id random(1, $ROWS)
\\set id2 random(1, $ROWS)
UPDATE users SET email = 'U' || :id || '@Example.COM', note = '$t' WHERE id = :id;
INSERT INTO users (id, email, note) VALUES (:id2, 'I' || :id2 || '@Example.COM', '$t')
    ON CONFLICT (id) DO UPDATE SET email = EXCLUDED.email, note = EXCLUDED.note;
EOF
done
# What PostgreSQL itself does under writes=dual: the same statements as pgdual rewrites
# them, sent straight to it. Against this, "dual" measures pgdual's share of the cost;
# the rest is the database writing a second column.
cat >"$WORK/write-rewritten.sql" <<EOF
\\set id random(1, $ROWS)
\\set id2 random(1, $ROWS)
UPDATE users SET email = 'U' || :id || '@Example.COM', note = 'rewritten', email_address = lower('U' || :id || '@Example.COM') WHERE id = :id;
INSERT INTO users (id, email, note, email_address) VALUES (:id2, 'I' || :id2 || '@Example.COM', 'rewritten', lower('I' || :id2 || '@Example.COM'))
    ON CONFLICT (id) DO UPDATE SET email = EXCLUDED.email, note = EXCLUDED.note, email_address = lower(EXCLUDED.email);
EOF
for t in direct old new; do
	cat >"$WORK/read-$t.sql" <<EOF
\\set id random(1, $ROWS)
SELECT email FROM users WHERE id = :id;
EOF
done

# --- the runs -----------------------------------------------------------------------------
WORKLOADS=(write read)
declare -A TARGETS=([write]="direct old dual rewritten" [read]="direct old new")
declare -A TPS

# The flags a target needs. pgdual refuses reads=new under writes=old (reads must come
# from a written side), so the write runs keep reads=old and the read runs keep
# writes=dual, and each pair differs in one flag only. Flipped in an order that never
# passes through a refused pair.
set_target() { # workload target
	case $1,$2 in
	*,direct | *,rewritten) return 0 ;;
	write,*) ctl flag "$RULE" reads=old && ctl flag "$RULE" "writes=$2" ;;
	read,*) ctl flag "$RULE" writes=dual && ctl flag "$RULE" "reads=$2" ;;
	esac
}

check_dual() { # round
	local bad total
	bad=$(psql_on "$PGPORT" -c "SELECT count(*) FROM users WHERE note = 'dual' AND email_address IS DISTINCT FROM lower(email)") \
		|| die "consistency query failed"
	total=$(psql_on "$PGPORT" -c "SELECT count(*) FROM users WHERE note = 'dual'") \
		|| die "consistency query failed"
	if [ "$bad" != 0 ]; then
		echo "rewrite.sh: INCONSISTENT: $bad of $total rows last written under writes=dual have email_address IS DISTINCT FROM lower(email) (round $1); first ones:" >&2
		psql_on "$PGPORT" -c "SELECT id, email, email_address FROM users WHERE note = 'dual' AND email_address IS DISTINCT FROM lower(email) ORDER BY id LIMIT 10" >&2 || true
		exit 1
	fi
	[ "$total" -gt 0 ] || die "no row carries note = 'dual' after a writes=dual run (round $1)"
	printf "   round %d  dual check: %d rows last written under writes=dual, all with email_address = lower(email)\n" "$1" "$total" >&2
}

check_new() {
	local got
	got=$(psql_on "$DPORT" -c "SELECT email FROM users WHERE id = 0") || { pgdual_tail; die "sentinel read through pgdual failed"; }
	[ "$got" = "sentinel@new" ] || die "reads=new: the sentinel row read '$got' through pgdual, expected 'sentinel@new' (the new column)"
}

perf_start() { # name
	# DWARF call graphs: libpg_query and libc have no frame pointers, and -g alone loses
	# every stack that goes through them.
	"$PERF" record --call-graph dwarf,16384 -F 499 -q -p "$PGDUAL_PID" -o "$PERF_OUT/$1.data" \
		>"$PERF_OUT/$1.record.log" 2>&1 &
	PERF_PID=$!
}

perf_stop() { # name
	kill -INT "$PERF_PID" 2>/dev/null || true
	wait "$PERF_PID" 2>/dev/null || true
	PERF_PID=
	{
		"$PERF" report --stdio -i "$PERF_OUT/$1.data" --no-children -g none --sort dso --percent-limit 0.5
		"$PERF" report --stdio -i "$PERF_OUT/$1.data" --children -g none --sort sym --percent-limit 1
	} >"$PERF_OUT/$1.report.txt" 2>/dev/null || true
	echo "   perf report in $PERF_OUT/$1.report.txt" >&2
}

run_one() { # workload target round
	local port=$DPORT out tps profile=
	[[ $2 == direct || $2 == rewritten ]] && port=$PGPORT
	set_target "$1" "$2"
	[ "$1,$2" = read,new ] && check_new
	[ -n "$PERF_OUT" ] && [ "$3" = 1 ] && [[ $2 == dual || $2 == new ]] && profile=$1-$2
	[ -n "$profile" ] && perf_start "$profile"
	if ! out=$(timeout $((DURATION + 120)) "$PGBENCH" -h 127.0.0.1 -p "$port" -U postgres -n \
		-f "$WORK/$1-$2.sql" -M "$MODE" -c "$CLIENTS" -j "$THREADS" -T "$DURATION" "$DB" 2>&1); then
		echo "$out" >&2
		[ "$2" != direct ] && pgdual_tail
		die "pgbench $1 against $2 failed (round $3)"
	fi
	[ -n "$profile" ] && perf_stop "$profile"
	tps=$(pgbench_tps "$out" "$1 against $2 (round $3)")
	TPS[$1,$2,$3]=$tps
	printf "   round %d  %-5s %-6s %10.0f tps\n" "$3" "$1" "$2" "$tps" >&2
	[ "$1,$2" = write,dual ] && check_dual "$3"
	return 0
}

echo "== $ROUNDS rounds of ${DURATION}s runs, $CLIENTS clients, $THREADS threads" >&2
for r in $(seq "$ROUNDS"); do
	for w in "${WORKLOADS[@]}"; do
		read -r -a ts <<<"${TARGETS[$w]}"
		# Rotate the order each round so that no target always runs first (or last).
		for i in "${!ts[@]}"; do
			run_one "$w" "${ts[$(((i + r) % ${#ts[@]}))]}" "$r"
		done
	done
done
kill -0 "$PGDUAL_PID" 2>/dev/null || { pgdual_tail; die "pgdual is no longer running"; }
echo "== pgdualctl status (statement counters and the rewrite cache)" >&2
timeout 60 "$BUILD_DIR/pgdualctl" -s "$ADMIN" status >&2 || die "pgdualctl status failed"

# --- the tables ---------------------------------------------------------------------------

declare -A MED
echo
echo "pgbench rewrite benchmark, $(date -u '+%Y-%m-%d %H:%M UTC'), $(nproc) CPUs," \
	"$ROWS rows, -M $MODE, $CLIENTS clients, $THREADS threads, ${DURATION}s per run, $ROUNDS rounds"
echo
for w in "${WORKLOADS[@]}"; do
	case $w in
	write) echo "write (UPDATE + INSERT ... ON CONFLICT DO UPDATE, -M $MODE), TPS:" ;;
	read) echo "read (SELECT email ... WHERE id = ?, -M $MODE), TPS:" ;;
	esac
	echo
	header="| target      |"
	sep="|-------------|"
	for r in $(seq "$ROUNDS"); do
		header+=$(printf " %8s |" "round $r")
		sep+="----------|"
	done
	echo "$header   median |"
	echo "$sep----------|"
	read -r -a ts <<<"${TARGETS[$w]}"
	for t in "${ts[@]}"; do
		case $w,$t in
		*,direct) label=direct ;;
		write,rewritten) label="direct (rw)" ;;
		write,*) label="writes=$t" ;;
		read,*) label="reads=$t" ;;
		esac
		tps_row 11 "$label" "$w" "$t"
	done
	echo
done

echo "Ratios of medians (target: rewritten/plain >= 0.90):"
echo
echo "| workload | rewritten/plain | plain/direct | rewritten/direct |"
echo "|----------|-----------------|--------------|------------------|"
awk -v o="${MED[write,old]}" -v n="${MED[write,dual]}" -v d="${MED[write,direct]}" \
	'BEGIN { printf "| write    | %15s | %12.2f | %16.2f |\n", sprintf("dual/old %.2f", n/o), o/d, n/d }'
awk -v o="${MED[read,old]}" -v n="${MED[read,new]}" -v d="${MED[read,direct]}" \
	'BEGIN { printf "| read     | %15s | %12.2f | %16.2f |\n", sprintf("new/old %.2f", n/o), o/d, n/d }'
echo
echo "The database's own share under writes=dual: direct rewritten/direct" \
	"$(awk -v a="${MED[write,rewritten]}" -v d="${MED[write,direct]}" 'BEGIN { printf "%.2f", a/d }');" \
	"pgdual's share: (dual/old) / (direct rewritten/direct) =" \
	"$(awk -v o="${MED[write,old]}" -v n="${MED[write,dual]}" -v a="${MED[write,rewritten]}" -v d="${MED[write,direct]}" 'BEGIN { printf "%.2f", (n/o)/(a/d) }')"
