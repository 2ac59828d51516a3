#!/usr/bin/env bash
# `make stop`: stop what `make run` started. SIGTERM lets `gpufleet up` stop its gateway,
# its instances and its control plane in order; if it has not exited after
# GPUFLEET_STOP_WAIT seconds (default 30) it is killed, and so are the instance processes
# its agent recorded, so that nothing is left running either way.
set -euo pipefail
cd "$(dirname "$0")/.."
repo=$PWD
state_dir="${GPUFLEET_STATE_DIR:-$repo/.gpufleet}"
wait_s="${GPUFLEET_STOP_WAIT:-30}"
python="$repo/.venv/bin/python"

stopped=0
for pid_file in "$state_dir"/*.pid; do
  [[ -f "$pid_file" ]] || continue
  pid=$(cat "$pid_file")
  name=$(basename "$pid_file" .pid)
  if kill -0 "$pid" 2>/dev/null; then
    kill -TERM "$pid"
    deadline=$((SECONDS + wait_s))
    while kill -0 "$pid" 2>/dev/null && ((SECONDS < deadline)); do sleep 0.1; done
    if kill -0 "$pid" 2>/dev/null; then
      echo "$name (pid $pid) did not exit within ${wait_s} s after SIGTERM; killing it" >&2
      kill -KILL "$pid" 2>/dev/null || true
    fi
    echo "stopped $name (pid $pid)"
    stopped=1
  fi
  rm -f "$pid_file"
done

# Instances run in sessions of their own: a killed `up` leaves them behind. The agent's
# state files name them (with their start time, so a reused pid is never hit).
if [[ -d "$state_dir/agent" && -x "$python" ]]; then
  "$python" - "$state_dir/agent" <<'PY'
import os, signal, sys
from pathlib import Path

from gpufleet.agent.runtime import procfs, statefile

records, _ = statefile.load_records(Path(sys.argv[1]))
for record in records:
    if record.pid > 0 and procfs.is_running(record.pid, record.start_ticks):
        try:
            os.killpg(record.pid, signal.SIGKILL)
            print(f"killed leftover instance {record.spec.instance_id} (pid {record.pid})")
        except ProcessLookupError:
            pass
PY
fi
((stopped)) || echo "nothing was running (no live pid file in $state_dir)"
