#!/bin/sh
# Marks that it started (file $2/started-TASK-ATTEMPT holding its pid), then waits until the
# file $1 exists and writes a result naming its attempt. Usage: gate.sh GATE_FILE MARK_DIR
set -eu
echo $$ > "$2/started-$TASKGATE_TASK_ID-$TASKGATE_ATTEMPT"
while [ ! -e "$1" ]; do
  sleep 0.05
done
echo "attempt $TASKGATE_ATTEMPT" > "$TASKGATE_OUTPUT_DIR/result.txt"
