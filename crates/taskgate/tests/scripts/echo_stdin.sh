#!/bin/sh
# Copies stdin (the task input JSON) to input.json and records the environment it was given.
set -eu
cat > "$TASKGATE_OUTPUT_DIR/input.json"
{
  echo "task_id=$TASKGATE_TASK_ID"
  echo "model=$TASKGATE_MODEL"
  echo "attempt=$TASKGATE_ATTEMPT"
  echo "api_key=${TASKGATE_API_KEY:-}"
  echo "extra=${EXTRA_SETTING:-}"
} > "$TASKGATE_OUTPUT_DIR/env.txt"
