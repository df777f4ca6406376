#!/bin/sh
# Starts a grandchild in a new session that records its pid in $1 and exits at once; waits
# until it is a zombie (dead, not yet reaped), then succeeds, so the zombie is orphaned.
# Usage: orphan_zombie.sh PID_FILE
setsid sh -c 'echo $$ > "$1.tmp"; mv "$1.tmp" "$1"' orphan "$1" &
while [ ! -s "$1" ]; do sleep 0.02; done
pid=$(cat "$1")
while [ -e "/proc/$pid" ] && ! grep -q ') Z' "/proc/$pid/stat"; do sleep 0.02; done
echo "done" > "$TASKGATE_OUTPUT_DIR/result.txt"
exit 0
