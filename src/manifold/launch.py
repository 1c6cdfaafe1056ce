"""Commands that start one training job on many hosts: a Cloud TPU VM slice, a SLURM GPU
cluster, or a list of SSH-reachable GPU nodes. Each process runs `manifold train`, which
joins the job through `jax.distributed.initialize` (manifold/parallel/distributed.py).

Every argument is checked here (a bad one is one `ConfigError` naming its flag) and every
command is an argv list: remote command strings quote each value with `shlex`, and nothing
runs through a local shell.
"""

from __future__ import annotations

import dataclasses
import ipaddress
import os
import pathlib
import re
import shlex
from typing import Sequence

from manifold.schema import require

REPO_DIR = "~/manifold"  # where the code lives on every host
SOURCE_ROOT = pathlib.Path(__file__).resolve().parents[2]  # the checkout this package runs from
SHIPPED = ("src", "kernels", "pyproject.toml", "requirements.txt", "README.md")  # what `pip install -e .` reads

_LABEL = r"[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?"
_HOST_NAME = re.compile(rf"{_LABEL}(?:\.{_LABEL})*")
_USER = re.compile(r"[A-Za-z_][A-Za-z0-9_.-]{0,31}")
_TPU_NAME = re.compile(r"[a-z](?:[-a-z0-9]{0,61}[a-z0-9])?")
_ZONE = re.compile(r"[a-z]+-[a-z]+[0-9]+-[a-z]")
_PROJECT = re.compile(r"(?:[a-z0-9.-]+:)?[a-z][-a-z0-9]{4,28}[a-z0-9]")
_PARTITION = re.compile(r"[A-Za-z0-9_.-]+(?:,[A-Za-z0-9_.-]+)*")


def slice_overrides(overrides: list[str], slices: int) -> list[str]:
  """The config overrides of a run over `slices` TPU slices: the data axis crosses them
  (`mesh.dcn.data = slices`) unless the overrides set a DCN factor themselves."""
  if slices > 1 and not any(o.startswith("--config.mesh.dcn.") for o in overrides):
    return [*overrides, f"--config.mesh.dcn.data={slices}"]
  return list(overrides)


def _match(flag: str, value: str, pattern: re.Pattern, allowed: str) -> None:
  require(pattern.fullmatch(value) is not None, f"{flag} {value!r}: must be {allowed}")


def _positive(flag: str, value: int) -> None:
  require(value > 0, f"{flag} {value}: must be a positive integer")


def _ip(host: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address | None:
  try:
    return ipaddress.ip_address(host) if "%" not in host else None  # no IPv6 zone: it may hold any text
  except ValueError:
    return None


def host_name(host: str) -> str:
  """The host of `[user@]host`: a host name or an IPv4 / IPv6 address; anything else is refused."""
  user, _, name = host.rpartition("@")
  ok = (not user or _USER.fullmatch(user)) and (_ip(name) is not None or _HOST_NAME.fullmatch(name))
  require(bool(ok), f"--hosts: {host!r} is not a host name; give [user@]name, IPv4 or IPv6 addresses, comma-separated")
  return name


def _common(config: str, workdir: str) -> None:
  require(config.split(":", 1)[0] != "", "--config: empty; pass e.g. experiments/quickstart.py[:variant]")
  require(workdir != "", "--workdir: empty; pass the directory every host shares")


def _train(config: str, workdir: str, overrides: Sequence[str]) -> str:
  return shlex.join([".venv/bin/manifold", "train", "--config", config, "--workdir", workdir, *overrides])


RUNTIMES = {  # accelerator family -> the TPU VM runtime (software version) its slices boot
  "v4": "tpu-ubuntu2204-base",
  "v5litepod": "v2-alpha-tpuv5-lite",
  "v5p": "v2-alpha-tpuv5",
  "v6e": "v2-alpha-tpuv6e",
}
_ACCELERATOR = re.compile(rf"({'|'.join(RUNTIMES)})-[1-9][0-9]*")
_RUNTIME = re.compile(r"[a-z0-9][-a-z0-9.]{0,62}")


@dataclasses.dataclass(frozen=True)
class TpuPlan:
  """The gcloud invocations that bring up and start a TPU job, in order."""

  create: list[list[str]]  # the queued resource (none when the slices exist)
  ready: list[str] | None  # prints the queued resource's state: ACTIVE once every slice is up
  setup: list[list[str]]  # per slice, in order: clear, copy the package, copy the config, install
  start: list[list[str]]  # one per slice, started together

  def commands(self) -> list[list[str]]:
    return [*self.create, *([self.ready] if self.ready else []), *self.setup, *self.start]


def tpu_plan(
  name: str,
  zone: str,
  config: str,
  workdir: str,
  overrides: Sequence[str] = (),
  project: str = "",
  *,
  accelerator_type: str = "",
  slices: int = 1,
  runtime_version: str = "",
  spot: bool = False,
) -> TpuPlan:
  """gcloud invocations for TPU VM slices: with `accelerator_type` (e.g. v5p-128), first a
  queued resource `name` of `slices` slices of it (one slice is the node `name`; several are
  `name-0`, `name-1`, ... and the run's `mesh.dcn.data` is set to `slices` unless an override
  sets a DCN axis); then, on every worker of every slice, the package (`SHIPPED`, from the
  checkout this module runs from) and the experiment file copied and installed with
  jax[tpu]; then `manifold train` on all workers at once.

  `MANIFOLD_DISTRIBUTED=1` makes each process call `jax.distributed.initialize()`, which
  finds its peers (and, across slices, the multislice coordinator) from the TPU VM metadata.
  `workdir` should be a bucket (gs://...) every worker can reach; checkpoints are written by
  all processes together.
  """
  _match("--name", name, _TPU_NAME, "a TPU VM name: lowercase letters, digits and hyphens, from a letter")
  _match("--zone", zone, _ZONE, "a zone such as us-east5-a")
  if project:
    _match("--project", project, _PROJECT, "a project ID: 6-30 lowercase letters, digits and hyphens")
  _positive("--slices", slices)
  if accelerator_type:
    _match("--accelerator-type", accelerator_type, _ACCELERATOR, f"a TPU type such as v5p-128 ({', '.join(RUNTIMES)})")
  if runtime_version:
    _match("--runtime-version", runtime_version, _RUNTIME, "a TPU VM runtime such as v2-alpha-tpuv5")
  require(
    accelerator_type or not (runtime_version or spot), "--runtime-version / --spot: they go with --accelerator-type"
  )
  _common(config, workdir)
  where = ["--zone", zone] + (["--project", project] if project else [])
  create, ready = [], None
  if accelerator_type:
    runtime = runtime_version or RUNTIMES[accelerator_type.split("-")[0]]
    nodes = ["--node-id", name] if slices == 1 else ["--node-count", str(slices), "--node-prefix", name]
    queued = ["gcloud", "compute", "tpus", "queued-resources"]
    create = [[*queued, "create", name, *where, "--accelerator-type", accelerator_type,
               "--runtime-version", runtime, *nodes, *(["--spot"] if spot else [])]]  # fmt: skip
    ready = [*queued, "describe", name, *where, "--format", "value(state.state)"]
  overrides = slice_overrides(overrides, slices)
  path, sep, arg = config.partition(":")
  gcloud = ["gcloud", "compute", "tpus", "tpu-vm"]
  prepare = f"rm -rf {REPO_DIR}/src {REPO_DIR}/kernels && mkdir -p {REPO_DIR}/experiments"
  install = (
    f"cd {REPO_DIR} && python3 -m venv .venv && .venv/bin/pip install -q -r requirements.txt 'jax[tpu]' "
    "&& .venv/bin/pip install -q --no-deps -e ."
  )
  remote_config = f"experiments/{os.path.basename(path)}{sep}{arg}"
  run = f"cd {REPO_DIR} && MANIFOLD_DISTRIBUTED=1 {_train(remote_config, workdir, overrides)}"
  sources = [str(SOURCE_ROOT / p) for p in SHIPPED]
  setup, start = [], []
  for node in [name] if slices == 1 else [f"{name}-{i}" for i in range(slices)]:
    target = [*where, "--worker", "all"]
    setup += [
      [*gcloud, "ssh", node, *target, "--command", prepare],
      [*gcloud, "scp", "--recurse", *sources, f"{node}:{REPO_DIR}", *target],
      [*gcloud, "scp", os.path.abspath(path), f"{node}:{REPO_DIR}/experiments/", *target],
      [*gcloud, "ssh", node, *target, "--command", install],
    ]
    start.append([*gcloud, "ssh", node, *target, "--command", run])
  return TpuPlan(create, ready, setup, start)


def slurm_script(
  nodes: int, gpus_per_node: int, config: str, workdir: str, overrides: Sequence[str] = (), partition: str = ""
) -> str:
  """An sbatch script: one process per node owning all its GPUs. JAX reads the job's
  layout from SLURM's environment (SLURM_NTASKS > 1 triggers the initialisation)."""
  _positive("--nodes", nodes)
  _positive("--gpus-per-node", gpus_per_node)
  if partition:
    _match("--partition", partition, _PARTITION, "partition names (letters, digits, _ . -), comma-separated")
  _common(config, workdir)
  lines = [
    "#!/bin/bash",
    "#SBATCH --job-name=manifold",
    f"#SBATCH --nodes={nodes}",
    "#SBATCH --ntasks-per-node=1",
    f"#SBATCH --gpus-per-node={gpus_per_node}",
    "#SBATCH --exclusive",
    *([f"#SBATCH --partition={partition}"] if partition else []),
    "set -euo pipefail",
    'cd "${SLURM_SUBMIT_DIR}"',
    f"srun --kill-on-bad-exit=1 {_train(config, workdir, overrides)}",
  ]
  return "\n".join(lines) + "\n"


def ssh_commands(
  hosts: Sequence[str], port: int, config: str, workdir: str, overrides: Sequence[str] = ()
) -> list[list[str]]:
  """One `ssh` argv per node (without a scheduler): the first host coordinates."""
  names = [host_name(host) for host in hosts]
  require(bool(names), "--hosts: empty; give the nodes' names, comma-separated")
  require(0 < port < 65536, f"--port {port}: must be a port number in 1..65535")
  _common(config, workdir)
  first = names[0]
  coordinator = f"[{first}]:{port}" if isinstance(_ip(first), ipaddress.IPv6Address) else f"{first}:{port}"
  commands = []
  for index, host in enumerate(hosts):
    env = {"JAX_COORDINATOR_ADDRESS": coordinator, "JAX_NUM_PROCESSES": len(hosts), "JAX_PROCESS_ID": index}
    assignments = " ".join(f"{k}={shlex.quote(str(v))}" for k, v in env.items())
    commands.append(["ssh", host, f"cd {REPO_DIR} && {assignments} {_train(config, workdir, overrides)}"])
  return commands
