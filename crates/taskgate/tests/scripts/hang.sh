#!/bin/sh
# Starts a grandchild that would outlive us, records both pids in $1, then never finishes.
# Usage: hang.sh PID_FILE
sleep 1000 &
echo "$$ $!" > "$1.tmp"
mv "$1.tmp" "$1"
wait
