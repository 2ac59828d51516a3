"""The environment an instance process starts with (pure)."""

from __future__ import annotations

from collections.abc import Mapping

from gpufleet.agent.runtime.spec import InstanceSpec

# Only these are inherited from the agent: an instance must not see the agent's own
# settings (tokens, proxies, CUDA_* of the agent's shell), and must behave the same on every
# node whatever shell started the agent.
INHERITED_VARS = ("PATH", "HOME", "LANG")


def mps_memory_limit_value(device_count: int, limit_mib: int) -> str:
    """Value of CUDA_MPS_PINNED_DEVICE_MEM_LIMIT, e.g. "0=2048M".

    The MPS docs (docs.nvidia.com/deploy/mps, "CUDA_MPS_PINNED_DEVICE_MEM_LIMIT") define a
    comma-separated list of `<device ordinal>=<limit>`; ordinals are as the client enumerates
    devices, i.e. after CUDA_VISIBLE_DEVICES, so they are 0..count-1 here.
    """
    return ",".join(f"{index}={limit_mib}M" for index in range(device_count))


def build_instance_env(
    spec: InstanceSpec, port: int, agent_env: Mapping[str, str]
) -> dict[str, str]:
    """Agent basics, then the deployment's env, then the variables the agent owns.

    The agent's variables come last so a deployment cannot widen its GPU access by setting
    CUDA_VISIBLE_DEVICES or lifting its MPS limits in its own env.
    """
    env = {name: agent_env[name] for name in INHERITED_VARS if name in agent_env}
    env.update(spec.env)
    # Empty CUDA_VISIBLE_DEVICES hides every GPU; unset would expose all of them.
    env["CUDA_VISIBLE_DEVICES"] = ",".join(spec.gpu_uuids)
    for name in ("CUDA_MPS_ACTIVE_THREAD_PERCENTAGE", "CUDA_MPS_PINNED_DEVICE_MEM_LIMIT"):
        env.pop(name, None)
    if spec.gpu_uuids and spec.mps_core_percent > 0:
        env["CUDA_MPS_ACTIVE_THREAD_PERCENTAGE"] = str(spec.mps_core_percent)
    if spec.gpu_uuids and spec.mps_memory_limit_mib > 0:
        env["CUDA_MPS_PINNED_DEVICE_MEM_LIMIT"] = mps_memory_limit_value(
            len(spec.gpu_uuids), spec.mps_memory_limit_mib
        )
    env["PORT"] = str(port)
    env["GPUFLEET_INSTANCE_ID"] = spec.instance_id
    env["GPUFLEET_DEPLOYMENT"] = spec.deployment
    return env
