#!/bin/sh
# Counts its runs in the file $1; exits 75 (temporary failure) for the first $2 runs, then
# succeeds. Usage: tempfail.sh COUNTER_FILE FAILURES
set -eu
n=$(cat "$1" 2>/dev/null || echo 0)
n=$((n + 1))
echo "$n" > "$1"
if [ "$n" -le "$2" ]; then
  echo "backend busy (run $n)" >&2
  exit 75
fi
echo "succeeded on run $n" > "$TASKGATE_OUTPUT_DIR/result.txt"
