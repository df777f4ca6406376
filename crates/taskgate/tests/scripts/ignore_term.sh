#!/bin/sh
# Ignores SIGTERM, as does a grandchild it starts; records both pids in $1-TASK_ID, then never
# finishes: only SIGKILL ends them. Usage: ignore_term.sh PID_FILE_PREFIX
trap '' TERM
sh -c 'trap "" TERM; while :; do sleep 1; done' &
out="$1-$TASKGATE_TASK_ID"
echo "$$ $!" > "$out.tmp"
mv "$out.tmp" "$out"
while :; do sleep 1; done
