#!/usr/bin/env bash
# `make run`: start the control plane in the background on the embedded defaults, apply the
# example deployment, list it, and leave the control plane running.
set -euo pipefail
cd "$(dirname "$0")/.."

export GPUFLEET_STATE_DIR="${GPUFLEET_STATE_DIR:-$PWD/.gpufleet}"
export GPUFLEET_SERVER="${GPUFLEET_SERVER:-127.0.0.1:50051}"
GPUFLEET=.venv/bin/gpufleet
mkdir -p "$GPUFLEET_STATE_DIR"
pid_file="$GPUFLEET_STATE_DIR/server.pid"
log_file="$GPUFLEET_STATE_DIR/server.log"

if [[ -f "$pid_file" ]] && kill -0 "$(cat "$pid_file")" 2>/dev/null; then
  echo "control plane already running (pid $(cat "$pid_file")); 'make stop' stops it"
else
  # setsid: the control plane outlives this script and is stopped by `make stop`.
  setsid "$GPUFLEET" server --listen "$GPUFLEET_SERVER" >"$log_file.out" 2>"$log_file" &
  echo $! >"$pid_file"
  for _ in $(seq 1 100); do
    grep -q "listening on" "$log_file.out" 2>/dev/null && break
    if ! kill -0 "$(cat "$pid_file")" 2>/dev/null; then
      echo "control plane failed to start; its log ($log_file):" >&2
      tail -n 20 "$log_file" >&2
      exit 1
    fi
    sleep 0.1
  done
  grep -q "listening on" "$log_file.out" || { echo "control plane did not start within 10 s; see $log_file" >&2; exit 1; }
  cat "$log_file.out"
fi

echo
echo "\$ gpufleet apply -f examples/echo.yaml"
"$GPUFLEET" apply -f examples/echo.yaml
echo
echo "\$ gpufleet list"
"$GPUFLEET" list
echo
echo "Control plane running on $GPUFLEET_SERVER (state in $GPUFLEET_STATE_DIR)."
echo "Try:  GPUFLEET_STATE_DIR=$GPUFLEET_STATE_DIR $GPUFLEET get echo -o yaml"
echo "Stop: make stop"
