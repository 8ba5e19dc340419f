#!/bin/sh
# The whole test suite, as README and .ci/run call it:
#   1. installs the Debian packages it needs (deploy/install-deps.sh, idempotent),
#   2. builds four trees: build/ (normal), build-asan/ (AddressSanitizer +
#      UndefinedBehaviorSanitizer), build-tsan/ (ThreadSanitizer) and build-fuzz/ (clang,
#      libFuzzer targets),
#   3. runs one ctest over all four: unit and integration tests on the normal and the
#      ASan build, the integration tests that relay sessions on the relay threads on the
#      TSan build, corpus replays, and each fuzz target for PD_FUZZ_SECONDS (30).
# Environment: JOBS (build parallelism, default nproc), PD_FUZZ_SECONDS,
# PD_SKIP_INSTALL=1 to skip step 1 on a machine known to be set up.
set -eu
cd "$(dirname "$0")/.."
top=$(pwd)
jobs=${JOBS:-$(nproc)}
fuzz_seconds=${PD_FUZZ_SECONDS:-30}

if [ "${PD_SKIP_INSTALL:-0}" != 1 ]; then
	deploy/install-deps.sh
fi

build() {
	dir=$1
	shift
	echo "== building $dir"
	cmake -S . -B "$dir" "$@" >"$dir.configure.log" 2>&1 || { cat "$dir.configure.log"; exit 1; }
	cmake --build "$dir" -j "$jobs"
}
mkdir -p build build-asan build-tsan build-fuzz
build build -DCMAKE_BUILD_TYPE=RelWithDebInfo
build build-asan -DCMAKE_BUILD_TYPE=Debug -DPD_SANITIZE=ON
build build-tsan -DCMAKE_BUILD_TYPE=Debug -DPD_TSAN=ON
CC=clang build build-fuzz -DCMAKE_BUILD_TYPE=RelWithDebInfo -DPD_PURE_ONLY=ON -DPD_FUZZ=ON \
	-DPD_FUZZ_SECONDS="$fuzz_seconds"

# One ctest run over the four trees, so that its closing summary counts every test.
mkdir -p build-all
cat >build-all/CTestTestfile.cmake <<EOT
subdirs("$top/build" "$top/build-asan" "$top/build-tsan" "$top/build-fuzz")
EOT

# Sanitizers: fail on the first error, report leaks, and keep reports in the log.
export ASAN_OPTIONS="abort_on_error=1:detect_leaks=1:strict_string_checks=1"
export UBSAN_OPTIONS="print_stacktrace=1:halt_on_error=1"
# io_sync=0: ThreadSanitizer would otherwise take every socket read after a write as
# synchronisation (one sync object for all sockets), which hides races of a proxy.
export TSAN_OPTIONS="halt_on_error=1:second_deadlock_stack=1:io_sync=0"
cd build-all
exec ctest --output-on-failure --timeout 900 "$@"
