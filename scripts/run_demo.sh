#!/usr/bin/env bash
# `make run`: start `gpufleet up` (control plane, gateway, one agent with simulated GPUs) in
# the background, deploy the echo and tokens example models onto one GPU, call both through
# the gateway (unary, then streaming), show the packing, and leave everything running.
# `make stop` (scripts/stop_demo.sh) stops it, instances included.
#
# Environment overrides (port 0 picks a free port; the real one is read from the log):
#   GPUFLEET_STATE_DIR  state, logs, pid file and invoke tokens (default: ./.gpufleet)
#   GPUFLEET_SERVER     control plane address (default: 127.0.0.1:50051)
#   GPUFLEET_GATEWAY    gateway address (default: 127.0.0.1:8001)
#   GPUFLEET_DEMO_GPUS  simulated GPUs, COUNTxMIB (default: 2x81559)
#   GPUFLEET_DEMO_WAIT  seconds to wait for startup and for READY instances (default: 90)
set -euo pipefail
cd "$(dirname "$0")/.."
repo=$PWD

export GPUFLEET_STATE_DIR="${GPUFLEET_STATE_DIR:-$repo/.gpufleet}"
server="${GPUFLEET_SERVER:-127.0.0.1:50051}"
gateway="${GPUFLEET_GATEWAY:-127.0.0.1:8001}"
gpus="${GPUFLEET_DEMO_GPUS:-2x81559}"
wait_s="${GPUFLEET_DEMO_WAIT:-90}"
# Instances run `python -m examples.model_server`: `python` must be this venv's.
export PATH="$repo/.venv/bin:$PATH"
gpufleet="$repo/.venv/bin/gpufleet"
python="$repo/.venv/bin/python"

mkdir -p "$GPUFLEET_STATE_DIR/tokens"
chmod 700 "$GPUFLEET_STATE_DIR" "$GPUFLEET_STATE_DIR/tokens"
pid_file="$GPUFLEET_STATE_DIR/up.pid"
log_file="$GPUFLEET_STATE_DIR/up.log"
tokens_dir="$GPUFLEET_STATE_DIR/tokens"
deadline=$((SECONDS + wait_s))

if [[ -t 1 ]]; then bold=$'\033[1m' plain=$'\033[0m'; else bold="" plain=""; fi
step() { printf '\n%s==> %s%s\n' "$bold" "$*" "$plain"; }
show() { printf '$ %s\n' "$*"; }
fail() {
  echo "error: $*" >&2
  [[ -f "$log_file" ]] && { echo "last lines of $log_file:" >&2; tail -n 20 "$log_file" >&2; }
  exit 1
}
# The address printed on a "... listening on HOST:PORT" line of the log.
listening() { sed -n "s/^gpufleet $1 listening on \(.*\)$/\1/p" "$log_file" | tail -n 1; }
alive() { [[ -f "$pid_file" ]] && kill -0 "$(cat "$pid_file")" 2>/dev/null; }

step "gpufleet up: control plane, gateway and a local agent with simulated GPUs ($gpus)"
if alive; then
  echo "already running (pid $(cat "$pid_file")); 'make stop' stops it"
else
  show "gpufleet up --listen $server --gateway-listen $gateway --simulate-gpus $gpus &"
  # setsid: the stack outlives this script and its terminal; `make stop` ends it.
  setsid "$gpufleet" up --state-dir "$GPUFLEET_STATE_DIR" --listen "$server" \
    --gateway-listen "$gateway" --simulate-gpus "$gpus" --workdir "$repo" \
    >"$log_file" 2>&1 </dev/null &
  echo $! >"$pid_file"
  until [[ -n "$(listening gateway)" ]]; do
    alive || fail "gpufleet up exited during startup"
    ((SECONDS < deadline)) || fail "gpufleet up did not start within ${wait_s} s"
    sleep 0.2
  done
fi
server=$(listening "control plane")
gateway=$(listening gateway)
[[ -n "$server" && -n "$gateway" ]] || fail "no listening lines in $log_file"
export GPUFLEET_SERVER="$server"
echo "control plane $server, gateway $gateway (pid $(cat "$pid_file"), log $log_file)"

step "apply two deployments that share one GPU: echo (2 x 2 GiB) and tokens (1 x 4 GiB)"
show "gpufleet apply -f examples/echo.yaml -f examples/demo/tokens.yaml"
applied=$("$gpufleet" apply -f examples/echo.yaml -f examples/demo/tokens.yaml -o json)
# Invoke tokens are shown once, at creation: keep them where the calls below (and you) find
# them. A re-run finds the deployments unchanged and keeps the saved tokens.
APPLIED="$applied" TOKENS_DIR="$tokens_dir" "$python" - <<'PY'
import json, os, pathlib
for result in json.loads(os.environ["APPLIED"]):
    name, action = result["name"], result["action"]
    note = ""
    if result.get("invoke_token"):
        path = pathlib.Path(os.environ["TOKENS_DIR"]) / name
        path.write_text(result["invoke_token"] + "\n")
        path.chmod(0o600)
        note = f" (invoke token saved to {path})"
    print(f"deployment/{name} {action}{note}")
PY
for name in echo tokens; do
  if [[ ! -s "$tokens_dir/$name" ]]; then
    # Created before this state dir kept tokens: issue a new one.
    "$gpufleet" rotate-token "$name" -o json \
      | "$python" -c 'import json, sys; print(json.load(sys.stdin)["invoke_token"])' \
      >"$tokens_dir/$name"
    chmod 600 "$tokens_dir/$name"
    echo "deployment/$name: new invoke token saved to $tokens_dir/$name"
  fi
done

step "wait until the instances are READY"
last=""
while true; do
  progress=$("$gpufleet" instances -o json | "$python" -c '
import json, sys
want = {"echo": 2, "tokens": 1}
ready = {name: 0 for name in want}
for instance in json.load(sys.stdin):
    if instance.get("state") == "INSTANCE_STATE_READY" and instance.get("deployment") in ready:
        ready[instance["deployment"]] += 1
done = all(ready[name] >= count for name, count in want.items())
print(("done " if done else "wait ") + ", ".join(f"{n} {ready[n]}/{c}" for n, c in want.items()))
')
  if [[ "$progress" != "$last" ]]; then
    echo "ready: ${progress#* }"
    last=$progress
  fi
  [[ "$progress" == done* ]] && break
  alive || fail "gpufleet up exited"
  ((SECONDS < deadline)) || fail "instances not READY within ${wait_s} s; see 'gpufleet instances'"
  sleep 0.5
done

step "a unary call through the gateway (model echo)"
show "gpufleet invoke echo --gateway $gateway --invoke-token \$(cat $tokens_dir/echo) --input INPUT0='[[1, 2], [3, 4]]'"
"$gpufleet" invoke echo --gateway "$gateway" --invoke-token "$(cat "$tokens_dir/echo")" \
  --input INPUT0='[[1, 2], [3, 4]]'

step "a streaming call through the gateway (model tokens)"
show "gpufleet invoke tokens --stream --gateway $gateway --invoke-token \$(cat $tokens_dir/tokens) --input PROMPT='hello from gpufleet' --input MAX_TOKENS=6"
"$gpufleet" invoke tokens --stream --gateway "$gateway" \
  --invoke-token "$(cat "$tokens_dir/tokens")" \
  --input PROMPT='hello from gpufleet' --input MAX_TOKENS=6

step "the packing: three instances of two deployments on one GPU"
show "gpufleet list"
"$gpufleet" list
echo
show "gpufleet instances"
"$gpufleet" instances
echo
show "gpufleet nodes"
"$gpufleet" nodes

stop_hint="make stop"
if [[ "$GPUFLEET_STATE_DIR" != "$repo/.gpufleet" ]]; then
  stop_hint="GPUFLEET_STATE_DIR=$GPUFLEET_STATE_DIR make stop"
fi
cat <<EOF

gpufleet is running (pid $(cat "$pid_file"); log $log_file).
  call it:  gateway $gateway (Open Inference Protocol; model name = deployment name), invoke
            tokens in $tokens_dir/NAME, e.g.
            $gpufleet invoke tokens --stream --gateway $gateway --invoke-token "\$(cat $tokens_dir/tokens)" --input PROMPT='your words'
  manage:   export GPUFLEET_STATE_DIR=$GPUFLEET_STATE_DIR GPUFLEET_SERVER=$server; $gpufleet list
  stop it:  $stop_hint   (stops the gateway, the control plane, the agent and its instances)
EOF
