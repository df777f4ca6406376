#!/bin/sh
# Reports on stdout as it works: a log line, `progress: 0.25` and another log line; waits until
# the file $1 exists; a JSON progress of 0.5 with a log line, and a log line; waits until $2
# exists; a last log line and a result. Usage: report.sh GATE1 GATE2
set -eu
echo "loading weights"
echo "progress: 0.25"
echo "step 1 of 2"
while [ ! -e "$1" ]; do
  sleep 0.05
done
echo '{"progress": 0.5, "log": "halfway"}'
echo "step 2 of 2"
while [ ! -e "$2" ]; do
  sleep 0.05
done
echo "done"
echo "ok" > "$TASKGATE_OUTPUT_DIR/result.txt"
