#!/bin/sh
# Succeeds at once but leaves a background child behind that still holds stderr open, and
# records that child's pid in $1. Usage: background.sh PID_FILE
sleep 1000 &
echo "$!" > "$1.tmp"
mv "$1.tmp" "$1"
echo "done" > "$TASKGATE_OUTPUT_DIR/result.txt"
exit 0
