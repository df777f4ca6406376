#!/bin/sh
# Leaves several files of different types in the output directory, one in a subdirectory.
set -eu
out="$TASKGATE_OUTPUT_DIR"
printf 'hello from a command model\n' > "$out/greeting.txt"
printf '{"ok":true}' > "$out/data.json"
printf '\211PNG\r\n\032\nnot really a png' > "$out/picture.png"
printf 'spaces and brackets' > "$out/my image (1).png"
mkdir -p "$out/clips"
printf 'fake mp4 bytes' > "$out/clips/clip.mp4"
