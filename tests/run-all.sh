#!/bin/sh
# The whole test suite, as README and .ci/run call it:
#   1. installs the Debian packages it needs (deploy/install-deps.sh, idempotent),
#   2. builds three trees: build/ (normal), build-asan/ (AddressSanitizer +
#      UndefinedBehaviorSanitizer) and build-fuzz/ (clang, libFuzzer targets),
#   3. runs one ctest over all three: unit and integration tests on the normal and the
#      sanitizer build, corpus replays, and each fuzz target for PD_FUZZ_SECONDS (30).
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
mkdir -p build build-asan build-fuzz
build build -DCMAKE_BUILD_TYPE=RelWithDebInfo
build build-asan -DCMAKE_BUILD_TYPE=Debug -DPD_SANITIZE=ON
CC=clang build build-fuzz -DCMAKE_BUILD_TYPE=RelWithDebInfo -DPD_PURE_ONLY=ON -DPD_FUZZ=ON \
	-DPD_FUZZ_SECONDS="$fuzz_seconds"

# One ctest run over the three trees, so that its closing summary counts every test.
mkdir -p build-all
cat >build-all/CTestTestfile.cmake <<EOT
subdirs("$top/build" "$top/build-asan" "$top/build-fuzz")
EOT

# Sanitizers: fail on the first error, report leaks, and keep reports in the log.
export ASAN_OPTIONS="abort_on_error=1:detect_leaks=1:strict_string_checks=1"
export UBSAN_OPTIONS="print_stacktrace=1:halt_on_error=1"
cd build-all
exec ctest --output-on-failure --timeout 900 "$@"
