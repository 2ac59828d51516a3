#!/usr/bin/env bash
# Check a GPU node end to end with real NVML:
#   1. `python -m gpufleet.agent.gpu.selftest`: NVML is readable (GPUs, memory, SM use);
#   2. `gpufleet up` on this node's real GPUs, a deployment of the example model server that
#      holds GPU memory with PyTorch, READY, one call through the gateway;
#   3. `gpufleet instances` / `gpufleet nodes`: the memory NVML measured for the instance next
#      to what it reserved, and the GPU's own reading;
#   4. everything stopped, the instance included.
# Exit status 0 only if every step worked and NVML attributed GPU memory to the instance.
#
# Usage: scripts/gpu_node_check.sh [--simulate COUNTxMIB]
#   --simulate runs the same steps on simulated GPUs (no NVML, no memory attribution
#   check): a dry run of this script on a machine without a GPU.
# Environment: GPUFLEET_CHECK_HOLD_MIB (GPU memory the instance holds, default 1024),
#   GPUFLEET_CHECK_WAIT (seconds to wait for start-up and READY, default 120).
# `gpufleet` and `python` (with gpufleet and torch importable) must be on PATH.
set -euo pipefail
cd "$(dirname "$0")/.."
repo=$PWD

simulate=""
if [[ "${1:-}" == "--simulate" ]]; then
  simulate=${2:?--simulate needs COUNTxMIB, e.g. 1x81559}
fi
hold_mib="${GPUFLEET_CHECK_HOLD_MIB:-1024}"
wait_s="${GPUFLEET_CHECK_WAIT:-120}"
state=$(mktemp -d "${TMPDIR:-/tmp}/gpufleet-gpu-check.XXXXXX")
log="$state/up.log"
up_pid=""

step() { printf '\n==> %s\n' "$*"; }
fail() {
  echo "gpu node check FAILED: $*" >&2
  [[ -f "$log" ]] && { echo "last lines of $log:" >&2; tail -n 30 "$log" >&2; }
  exit 1
}
stop_up() {
  if [[ -n "$up_pid" ]] && kill -0 "$up_pid" 2>/dev/null; then
    kill -TERM "$up_pid"
    wait "$up_pid" 2>/dev/null || true
  fi
}
trap stop_up EXIT
# The first lines of the check instance's own output, for a failure report.
instance_log() {
  local id
  id=$(gpufleet instances gpu-check -o json 2>/dev/null \
    | python -c 'import json, sys; print(next((i["id"] for i in json.load(sys.stdin)), ""))' \
    2>/dev/null) || return 0
  [[ -n "$id" ]] || return 0
  echo "last lines of instance $id:" >&2
  gpufleet logs "$id" -n 30 --agent-state-dir "$state/agent" >&2 || true
}
listening() { sed -n "s/^gpufleet $1 listening on \(.*\)$/\1/p" "$log" | tail -n 1; }

if [[ -z "$simulate" ]]; then
  step "NVML self-test"
  python -m gpufleet.agent.gpu.selftest || fail "NVML self-test failed"
fi

step "gpufleet up ${simulate:+(simulated GPUs $simulate)}"
up_args=(up --state-dir "$state" --listen 127.0.0.1:0 --gateway-listen 127.0.0.1:0 --workdir "$repo")
[[ -n "$simulate" ]] && up_args+=(--simulate-gpus "$simulate")
gpufleet "${up_args[@]}" >"$log" 2>&1 </dev/null &
up_pid=$!
deadline=$((SECONDS + wait_s))
until [[ -n "$(listening gateway)" ]]; do
  kill -0 "$up_pid" 2>/dev/null || fail "gpufleet up exited during start-up"
  ((SECONDS < deadline)) || fail "gpufleet up did not start within $wait_s s"
  sleep 0.2
done
export GPUFLEET_SERVER GPUFLEET_GATEWAY GPUFLEET_STATE_DIR="$state"
GPUFLEET_SERVER=$(listening "control plane")
GPUFLEET_GATEWAY=$(listening gateway)
echo "control plane $GPUFLEET_SERVER, gateway $GPUFLEET_GATEWAY"

step "deploy gpu-check: the example model server holding $hold_mib MiB of GPU memory"
spec="$state/gpu-check.yaml"
# Instances inherit only PATH, HOME and LANG from the agent: pass this shell's import path on.
env_line=""
[[ -n "${PYTHONPATH:-}" ]] && env_line="  env: {PYTHONPATH: \"$PYTHONPATH\"}"
cat >"$spec" <<EOF
name: gpu-check
spec:
  command: python -m examples.model_server --port \$PORT --gpu-memory-mib $hold_mib
  port: 0
  gpu: {memory_mib: $((hold_mib * 2 + 1024)), core_percent: 25}
  scaling: {min_instances: 1, max_instances: 1, idle_retention: 300s}
  readiness_probe: {grpc: {}, period: 0.5s}
$env_line
EOF
applied=$(gpufleet apply -f "$spec" -o json) || fail "apply refused the deployment"
token=$(python -c 'import json, sys; print(json.load(sys.stdin)[0]["invoke_token"])' <<<"$applied")
gpufleet apply -f "$spec" --wait --timeout "$wait_s" || { instance_log; fail "gpu-check did not become ready"; }

step "one call through the gateway"
gpufleet invoke gpu-check --invoke-token "$token" --input INPUT0='[[1, 2], [3, 4]]' \
  || { instance_log; fail "the call through the gateway failed"; }

step "what the agent reports (measured memory arrives with the next heartbeats)"
attributed=0
for _ in $(seq 1 40); do
  instances=$(gpufleet instances gpu-check -o json)
  attributed=$(python -c '
import json, sys
instances = json.load(sys.stdin)
print(max((int(i.get("gpu_memory_used_mib", 0) or 0) for i in instances), default=0))
' <<<"$instances")
  ((attributed > 0)) && break
  [[ -n "$simulate" ]] && break
  sleep 0.5
done
gpufleet instances gpu-check
echo
gpufleet nodes
echo
gpufleet nodes -o json
if [[ -z "$simulate" ]]; then
  ((attributed >= hold_mib)) \
    || { instance_log; fail "NVML attributed $attributed MiB to the instance; it holds at least $hold_mib MiB"; }
  echo "NVML attributed $attributed MiB to the instance (it holds $hold_mib MiB plus its CUDA context)"
fi

step "stop"
stop_up
up_pid=""
if pgrep -f "examples.model_server --port .* --gpu-memory-mib $hold_mib" >/dev/null; then
  fail "an instance outlived gpufleet up"
fi
rm -rf "$state"
echo "gpu node check passed"
