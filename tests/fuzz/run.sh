#!/usr/bin/env bash
# Run each atheris harness for a bounded time.
#   tests/fuzz/run.sh SECONDS            each harness for SECONDS, stop at its first crash
#   KEEP_GOING=1 tests/fuzz/run.sh 300   keep fuzzing after a failure: the first input of each distinct
#                                         failure is saved (tests/fuzz/_harness.py), the run goes on
#   FUZZ_OUT=DIR                          where corpora and crash artifacts go (default: a new temp dir)
#   FUZZ_JOBS=N                           harnesses in parallel (default: the number of CPUs, at most 2)
#   FUZZ_SEED=N FUZZ_RUNS=M               reproducible: libFuzzer's seed N and M inputs per harness (the
#                                         time limit stays as a bound). The test suite uses these, so CI
#                                         fails on a known input, never by luck; long random runs are local.
# Exit status: 0 when no harness found anything, 1 otherwise (the artifacts are listed at the end).
# A crash input replays with:  python tests/fuzz/fuzz_NAME.py ARTIFACT   (and belongs in tests/regressions/).
set -euo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
repo="$(cd "$here/../.." && pwd)"
seconds="${1:?usage: tests/fuzz/run.sh SECONDS}"
case "$seconds" in ''|*[!0-9]*) echo "SECONDS must be a whole number" >&2; exit 2 ;; esac
py="${PYTHON:-$repo/.venv/bin/python}"
[ -x "$py" ] || py=python3
if ! "$py" -c 'import atheris' 2>/dev/null; then
  echo "run.sh: atheris is not installed for $py (pip install 'atheris>=3.0'; wheels exist for CPython 3.11-3.13 on Linux x86_64)" >&2
  exit 2
fi
out="${FUZZ_OUT:-$(mktemp -d "${TMPDIR:-/tmp}/httpsdump-fuzz.XXXXXX")}"
jobs="${FUZZ_JOBS:-$(nproc 2>/dev/null || echo 1)}"
[ "$jobs" -gt 2 ] && jobs=2

run_one() {
  local name="$1" dir="$out/$1"
  mkdir -p "$dir/corpus" "$dir/seeds" "$dir/artifacts"
  PYTHONPATH="$repo" "$py" "$here/fuzz_$name.py" --write-seeds "$dir/seeds"
  echo "run.sh: fuzzing $name for ${seconds}s (log: $dir/log)" >&2
  # The first corpus directory receives the new inputs; the seeds are only read.
  local keep="" repro=()
  [ "${KEEP_GOING:-0}" = 1 ] && keep="$dir/artifacts"
  [ -n "${FUZZ_SEED:-}" ] && repro+=(-seed="$FUZZ_SEED")
  [ -n "${FUZZ_RUNS:-}" ] && repro+=(-runs="$FUZZ_RUNS")
  (cd "$dir" && FUZZ_KEEP_GOING="$keep" PYTHONPATH="$repo" timeout -k 10 $((seconds + 120)) \
     "$py" "$here/fuzz_$name.py" "${repro[@]}" -max_total_time="$seconds" -timeout=10 -rss_limit_mb=2048 -max_len=20000 \
     -print_final_stats=1 -artifact_prefix="$dir/artifacts/" "$dir/corpus" "$dir/seeds" \
     >"$dir/log" 2>&1) || true
  grep -h "stat::number_of_executed_units\|^Done [0-9]* runs\|Uncaught Python exception\|FUZZ_KEEP_GOING: new" "$dir/log" \
    | sed "s/^/  $name: /" >&2 || true
}

names=(clienthello http1)
if [ "$jobs" -ge 2 ]; then
  for n in "${names[@]}"; do run_one "$n" & done
  wait
else
  for n in "${names[@]}"; do run_one "$n"; done
fi

found=0
for n in "${names[@]}"; do
  for a in "$out/$n/artifacts"/*; do
    [ -e "$a" ] || continue
    found=1
    echo "run.sh: $n found $(basename "$a"): replay with  PYTHONPATH=$repo $py $here/fuzz_$n.py $a"
  done
done
echo "run.sh: output in $out"
exit "$found"
