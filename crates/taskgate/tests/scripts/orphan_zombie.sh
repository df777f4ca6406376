#!/bin/sh
# Leaves a dead, unreaped grandchild orphaned to the server: an intermediate process starts it
# in a new session and exits at once, so it is reparented to the server (a subreaper), not to
# us; it records its pid in $1 and exits. Succeeds once that grandchild is a zombie.
# Usage: orphan_zombie.sh PID_FILE
case "$2" in
    grandchild)
        echo $$ > "$1.tmp"
        mv "$1.tmp" "$1"
        exit 0
        ;;
    intermediate)
        setsid sh "$0" "$1" grandchild &
        exit 0
        ;;
esac
sh "$0" "$1" intermediate
while [ ! -s "$1" ]; do sleep 0.02; done
pid=$(cat "$1")
while [ -e "/proc/$pid" ] && ! grep -q ') Z' "/proc/$pid/stat"; do sleep 0.02; done
echo "done" > "$TASKGATE_OUTPUT_DIR/result.txt"
exit 0
