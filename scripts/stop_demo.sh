#!/usr/bin/env bash
# `make stop`: stop what `make run` started (SIGTERM, then SIGKILL after 10 s).
set -euo pipefail
cd "$(dirname "$0")/.."
state_dir="${GPUFLEET_STATE_DIR:-$PWD/.gpufleet}"
for pid_file in "$state_dir"/*.pid; do
  [[ -f "$pid_file" ]] || continue
  pid=$(cat "$pid_file")
  if kill -0 "$pid" 2>/dev/null; then
    kill -TERM "$pid"
    for _ in $(seq 1 100); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
    kill -0 "$pid" 2>/dev/null && kill -KILL "$pid"
    echo "stopped $(basename "$pid_file" .pid) (pid $pid)"
  fi
  rm -f "$pid_file"
done
