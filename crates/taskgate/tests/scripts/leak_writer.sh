#!/bin/sh
# Writes its own output, first.txt, but first leaves a writer behind in a session of its own
# (out of reach of the kill of the program's process group). Once the file GO exists, that
# writer tries for a second to put leak.txt into this attempt's output directory, recreating the
# directory if it is gone, and records each try in MARKER: "started", then "wrote", "recreated"
# or "refused" per try, then "done". Usage: leak_writer.sh MARKER GO
marker="$1"
go="$2"
setsid sh -c '
  dir="$1"; marker="$2"; go="$3"
  echo "started $$" >> "$marker"
  n=0
  while [ ! -e "$go" ] && [ $n -lt 200 ]; do sleep 0.05; n=$((n+1)); done
  i=0
  while [ $i -lt 10 ]; do
    if (echo leak > "$dir/leak.txt") 2>/dev/null; then echo wrote >> "$marker"
    elif mkdir -p "$dir" 2>/dev/null && (echo leak > "$dir/leak.txt") 2>/dev/null; then echo recreated >> "$marker"
    else echo refused >> "$marker"; fi
    sleep 0.1
    i=$((i+1))
  done
  echo done >> "$marker"
' leak-writer "$TASKGATE_OUTPUT_DIR" "$marker" "$go" </dev/null >/dev/null 2>&1 &
# Wait (up to 5 s) until the writer runs in its own session, so that it escapes the group kill.
n=0
while ! grep -q started "$marker" 2>/dev/null && [ $n -lt 100 ]; do sleep 0.05; n=$((n+1)); done
echo first > "$TASKGATE_OUTPUT_DIR/first.txt"
