#!/bin/sh
# A task for the fault suite: appends its attempt to the file MARK_DIR/TASK_ID (one line per
# run, so that runs can be counted even across a SIGKILLed server), sleeps SECONDS, then exits
# with CODE if it is not 0, or writes id.txt (the task id) and ok.txt ("ok").
# Usage: crashable.sh MARK_DIR SECONDS CODE
set -eu
echo "$TASKGATE_ATTEMPT" >> "$1/$TASKGATE_TASK_ID"
sleep "$2"
if [ "$3" != 0 ]; then
  echo "failing as asked" >&2
  exit "$3"
fi
printf '%s' "$TASKGATE_TASK_ID" > "$TASKGATE_OUTPUT_DIR/id.txt"
printf 'ok' > "$TASKGATE_OUTPUT_DIR/ok.txt"
