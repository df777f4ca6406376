#!/bin/sh
# Starts a grandchild in a new session (so a process-group kill misses it) that records its pid
# in $1/pid, sleeps $2 seconds, then writes $1/late and a late output. With $3 = "hang" the
# program then never finishes; otherwise it writes its result and exits 0 at once.
# Usage: escape.sh DIR SECONDS [hang]
setsid sh -c 'echo $$ > "$1/pid.tmp"; mv "$1/pid.tmp" "$1/pid"; sleep "$2"; echo late > "$1/late"; echo late > "$TASKGATE_OUTPUT_DIR/late.txt"' escape "$1" "$2" &
# Exit only once the grandchild has escaped, so the test knows whom to look for.
while [ ! -s "$1/pid" ]; do sleep 0.02; done
if [ "$3" = "hang" ]; then
    sleep 1000
fi
echo "done" > "$TASKGATE_OUTPUT_DIR/result.txt"
exit 0
