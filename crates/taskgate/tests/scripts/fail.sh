#!/bin/sh
# Writes more stderr than the server keeps, ending in a clear reason, and exits 3.
i=0
while [ "$i" -lt 60 ]; do
  echo "noise line $i: xxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxx" >&2
  i=$((i + 1))
done
echo "fatal: the model ran out of GPU memory" >&2
exit 3
