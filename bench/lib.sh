#!/bin/bash
# lib.sh — what the benchmarks share: sourced by passthrough.sh, rewrite.sh and
# dualwrite.sh after they set BENCH (their name, for messages), REPO and PY.

die() {
	echo "$BENCH: $*" >&2
	exit 1
}

require_executables() { # path...
	local f
	for f in "$@"; do
		[ -x "$f" ] || die "$f not found: build pgdual (cmake -S . -B build && cmake --build build) and run deploy/install-deps.sh"
	done
}

require_positive() { # variable-name...
	local v
	for v in "$@"; do
		[[ ${!v} =~ ^[1-9][0-9]*$ ]] || die "$v must be a positive integer, not '${!v}'"
	done
}

stop_pid() { # pid [signal]: signal, wait up to 5 s, then kill
	local pid=$1 sig=${2:-TERM}
	[ -n "$pid" ] && kill -0 "$pid" 2>/dev/null || return 0
	kill -"$sig" "$pid" 2>/dev/null || true
	for _ in $(seq 50); do kill -0 "$pid" 2>/dev/null || return 0; sleep 0.1; done
	kill -KILL "$pid" 2>/dev/null || true
}

free_port() {
	"$PY" -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'
}

wait_port() { # port: up to 10 s
	for _ in $(seq 100); do
		if "$PY" -c "import socket; socket.create_connection(('127.0.0.1', $1), 0.2)" 2>/dev/null; then
			return 0
		fi
		sleep 0.1
	done
	return 1
}

start_cluster() { # dir: prints the port
	"$PY" "$REPO/tests/integration/pgcluster.py" start "$1" >&2 || die "could not start PostgreSQL"
	"$PY" -c "import json; print(json.load(open('$1/cluster.json'))['port'])"
}

stop_cluster() { # dir
	"$PY" "$REPO/tests/integration/pgcluster.py" stop "$1" >/dev/null 2>&1 || true
}

# The TPS of a pgbench run, from its output; fails, showing the output, when the run had
# failed transactions or printed no TPS. For tps=$(pgbench_tps ...): die ends the
# command substitution, and set -e the script.
pgbench_tps() { # output what (for messages: "select against pgdual (round 2)")
	local tps
	if echo "$1" | grep -Eq "number of failed transactions: [1-9]"; then
		echo "$1" >&2
		die "pgbench $2 had failed transactions"
	fi
	tps=$(echo "$1" | sed -n 's/^tps = \([0-9.]*\) (without initial connection time)$/\1/p')
	[ -n "$tps" ] || { echo "$1" >&2; die "no TPS in the output of pgbench $2"; }
	echo "$tps"
}

median() { tr ' ' '\n' | sort -g | awk '{a[NR]=$1} END {if (NR%2) print a[(NR+1)/2]; else print (a[NR/2]+a[NR/2+1])/2}'; }

# One table row: the label, TPS[$workload,$target,round] for each round, and the median,
# which is also stored in MED[$workload,$target]. TPS, MED and ROUNDS are the caller's.
tps_row() { # label-width label workload target
	local line vals="" r
	line=$(printf "| %-*s |" "$1" "$2")
	for r in $(seq "$ROUNDS"); do
		line+=$(printf " %8.0f |" "${TPS[$3,$4,$r]}")
		vals+="${TPS[$3,$4,$r]} "
	done
	MED[$3,$4]=$(echo "$vals" | xargs | median)
	line+=$(printf " %8.0f |" "${MED[$3,$4]}")
	echo "$line"
}
