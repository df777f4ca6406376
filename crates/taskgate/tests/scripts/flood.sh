#!/bin/sh
# Writes 20000 lines to stdout as fast as it can, then a result.
set -eu
i=0
while [ "$i" -lt 20000 ]; do
  echo "line $i"
  i=$((i + 1))
done
echo "ok" > "$TASKGATE_OUTPUT_DIR/result.txt"
