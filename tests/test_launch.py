"""Multi-host launch commands: what every host runs."""

from __future__ import annotations

import shlex
import subprocess

import pytest

from manifold import launch
from manifold.cli import main
from manifold.config import ConfigError


def test_tpu_commands_copy_install_and_train_on_every_worker():
  commands = launch.tpu_plan(
    "pod", "us-east5-a", "experiments/mhc_paper.py:27b", "gs://b/r", ["--config.train.steps=5"]
  ).commands()
  for command in commands:
    assert command[:4] == ["gcloud", "compute", "tpus", "tpu-vm"]
    assert command[command.index("--worker") + 1] == "all" and command[command.index("--zone") + 1] == "us-east5-a"
  copy, install, run = commands[1], commands[-2], commands[-1]
  assert "pod:~/manifold" in copy
  assert "jax[tpu]" in install[-1]
  remote = run[-1]
  assert "MANIFOLD_DISTRIBUTED=1" in remote  # each process joins the job through jax.distributed
  assert shlex.split(remote.split("&& ", 1)[1])[1:] == [
    ".venv/bin/manifold", "train", "--config", "experiments/mhc_paper.py:27b", "--workdir", "gs://b/r",
    "--config.train.steps=5",
  ]  # fmt: skip


def test_tpu_copies_only_the_package_and_the_config():
  """Not the working directory: no runs/, .venv or data travel to the workers."""
  commands = launch.tpu_plan("pod", "us-east5-a", "experiments/quickstart.py:tiny", "gs://b/r").commands()
  copies = [c for c in commands if c[4] == "scp"]
  sent = {arg for c in copies for arg in c[5 : c.index("--zone") - 1] if arg != "--recurse"}
  root = launch.SOURCE_ROOT
  shipped = {"src", "kernels", "pyproject.toml", "requirements.txt", "README.md", "experiments/quickstart.py"}
  assert sent == {str(root / p) for p in shipped}
  assert [c[c.index("--zone") - 1] for c in copies] == ["pod:~/manifold", "pod:~/manifold/experiments/"]


def test_tpu_creates_a_queued_resource_of_slices_then_starts_every_slice():
  """--accelerator-type: a queued resource first (one node per slice), its state to wait on;
  two slices get their own setup and start, and the run's data axis crosses them over DCN."""
  plan = launch.tpu_plan("pod", "us-east5-a", "experiments/quickstart.py", "gs://b/r", project="my-proj",
                         accelerator_type="v5p-128", slices=2, spot=True)  # fmt: skip
  (create,) = plan.create
  assert create[:6] == ["gcloud", "compute", "tpus", "queued-resources", "create", "pod"]
  flag = lambda command, name: command[command.index(name) + 1]  # noqa: E731
  assert flag(create, "--accelerator-type") == "v5p-128" and flag(create, "--runtime-version") == "v2-alpha-tpuv5"
  assert flag(create, "--node-count") == "2" and flag(create, "--node-prefix") == "pod" and create[-1] == "--spot"
  assert flag(create, "--project") == "my-proj" and flag(create, "--zone") == "us-east5-a"
  assert plan.ready[4:6] == ["describe", "pod"] and flag(plan.ready, "--format") == "value(state.state)"
  assert [c[5] for c in plan.setup if c[4] == "ssh"] == ["pod-0", "pod-0", "pod-1", "pod-1"]
  assert [c[5] for c in plan.start] == ["pod-0", "pod-1"]
  for start in plan.start:
    assert shlex.split(start[-1].split("&& ", 1)[1])[-1] == "--config.mesh.dcn.data=2"
  one = launch.tpu_plan("pod", "us-east5-a", "experiments/quickstart.py", "gs://b/r", accelerator_type="v6e-8")
  assert flag(one.create[0], "--node-id") == "pod" and flag(one.create[0], "--runtime-version") == "v2-alpha-tpuv6e"
  assert "dcn" not in one.start[0][-1]


def test_tpu_run_waits_for_the_queued_resource_then_starts_every_slice_at_once(monkeypatch, capsys):
  """--run: create, poll the state until ACTIVE, set every slice up in turn, then start them together."""
  ran, started, states = [], [], iter(["WAITING_FOR_RESOURCES", "PROVISIONING", "ACTIVE"])

  def run(argv, **kwargs):
    ran.append(argv)
    out = next(states) + "\n" if "describe" in argv else ""
    return subprocess.CompletedProcess(argv, 0, stdout=out, stderr="")

  class Worker:
    def __init__(self, argv, **kwargs):
      started.append(argv)

    def wait(self):
      return 0

  monkeypatch.setattr(subprocess, "run", run)
  monkeypatch.setattr(subprocess, "Popen", Worker)
  monkeypatch.setattr("shutil.which", lambda program: f"/usr/bin/{program}")
  monkeypatch.setattr("time.sleep", lambda seconds: None)
  args = ["launch", "tpu", "--name", "pod", "--zone", "us-east5-a", "--config", "experiments/quickstart.py",
          "--workdir", "gs://b/r", "--accelerator-type", "v5p-16", "--slices", "2", "--run"]  # fmt: skip
  assert main(args) == 0
  assert [c[4] for c in ran] == ["create", "describe", "describe", "describe"] + ["ssh", "scp", "scp", "ssh"] * 2
  assert [c[5] for c in started] == ["pod-0", "pod-1"]
  assert "queued resource: PROVISIONING" in capsys.readouterr().out


def test_slurm_script_runs_one_process_per_node():
  script = launch.slurm_script(4, 8, "experiments/quickstart.py", "/shared/run", partition="gpu")
  assert "#SBATCH --nodes=4" in script and "#SBATCH --ntasks-per-node=1" in script
  assert "#SBATCH --gpus-per-node=8" in script and "#SBATCH --partition=gpu" in script
  assert script.splitlines()[-1].startswith("srun ") and "--workdir /shared/run" in script


def test_ssh_commands_share_one_coordinator():
  commands = launch.ssh_commands(["a", "b", "c"], 1234, "experiments/quickstart.py", "/shared/run")
  assert len(commands) == 3
  for index, command in enumerate(commands):
    remote = command[2]
    assert f"JAX_COORDINATOR_ADDRESS=a:1234 JAX_NUM_PROCESSES=3 JAX_PROCESS_ID={index}" in remote


def test_ssh_takes_host_names_addresses_and_users_and_the_coordinator_drops_the_user():
  hosts = ["me@node-0.cluster.local", "10.0.0.2", "fe80::1"]
  commands = launch.ssh_commands(hosts, 1234, "experiments/quickstart.py", "/r")
  assert [c[1] for c in commands] == hosts
  assert "JAX_COORDINATOR_ADDRESS=node-0.cluster.local:1234 " in commands[0][2]
  ipv6_first = launch.ssh_commands(hosts[::-1], 1234, "experiments/quickstart.py", "/r")
  assert "JAX_COORDINATOR_ADDRESS='[fe80::1]:1234' " in ipv6_first[0][2]


def test_ssh_refuses_a_host_list_carrying_shell_code(monkeypatch, capsys):
  started = []
  monkeypatch.setattr(subprocess, "Popen", lambda *a, **k: started.append(a))
  hosts = "node0;touch${IFS}/tmp/x,node1"
  code = main(["launch", "ssh", "--hosts", hosts, "--config", "experiments/quickstart.py", "--workdir", "/r", "--run"])
  out, err = capsys.readouterr()
  assert code == 2 and not out and not started
  assert err.count("\n") == 1 and "--hosts: 'node0;touch${IFS}/tmp/x' is not a host name" in err, err
  with pytest.raises(ConfigError, match="is not a host name"):
    launch.ssh_commands(["node0;touch${IFS}/tmp/x"], 8476, "experiments/quickstart.py", "/r")


def test_ssh_quotes_every_argument_and_runs_each_host_without_a_shell(monkeypatch, capsys):
  started = []

  class Worker:
    def __init__(self, argv, **kwargs):
      started.append((argv, kwargs))

    def wait(self):
      return 0

  monkeypatch.setattr(subprocess, "Popen", Worker)
  args = ["launch", "ssh", "--hosts", "a,b", "--config", "experiments/quickstart.py", "--workdir", "/shared/my run"]
  assert main([*args, "--run"]) == 0
  printed = capsys.readouterr().out.splitlines()
  assert [shlex.split(line) for line in printed] == [argv for argv, _ in started]
  for argv, kwargs in started:
    assert argv[:2] == ["ssh", argv[1]] and not kwargs.get("shell")
    train = shlex.split(argv[2].split("&& ", 1)[1])
    assert train[train.index("--workdir") + 1] == "/shared/my run"


@pytest.mark.parametrize(
  "args, message",
  [
    (["slurm", "--nodes", "0"], "--nodes 0: must be a positive integer"),
    (["slurm", "--nodes", "2", "--gpus-per-node", "-1"], "--gpus-per-node -1: must be a positive integer"),
    (["slurm", "--nodes", "2", "--partition", "gpu\nrm -rf /"], "--partition 'gpu\\nrm -rf /': must be"),
    (["ssh", "--hosts", "a,,b"], "--hosts: '' is not a host name"),
    (["ssh", "--hosts", "a", "--port", "0"], "--port 0: must be a port number in 1..65535"),
    (["ssh", "--hosts", "a", "--port", "70000"], "--port 70000: must be a port number in 1..65535"),
    (["tpu", "--name", "My_Pod", "--zone", "us-east5-a"], "--name 'My_Pod': must be"),
    (["tpu", "--name", "pod", "--zone", "us east"], "--zone 'us east': must be"),
    (["tpu", "--name", "pod", "--zone", "us-east5-a", "--project", "p;x"], "--project 'p;x': must be"),
    (
      ["tpu", "--name", "pod", "--zone", "us-east5-a", "--accelerator-type", "v5p"],
      "--accelerator-type 'v5p': must be",
    ),
    (["tpu", "--name", "pod", "--zone", "us-east5-a", "--slices", "0"], "--slices 0: must be a positive integer"),
    (["tpu", "--name", "pod", "--zone", "us-east5-a", "--spot"], "--runtime-version / --spot: they go with"),
  ],
)
def test_launch_refuses_a_bad_argument_in_one_line_naming_it(args, message, capsys):
  target, *rest = args
  assert main(["launch", target, "--config", "experiments/quickstart.py", "--workdir", "/r", *rest]) == 2
  out, err = capsys.readouterr()
  assert not out and err.count("\n") == 1 and err.startswith("manifold: error: ") and message in err, err


def test_launch_checks_the_config_before_printing(capsys):
  code = main(["launch", "slurm", "--config", "experiments/quickstart.py", "--workdir", "/r", "--nodes", "2",
               "--config.train.steps=0"])  # fmt: skip
  assert code == 2
  assert "train.steps=0: must be a positive integer" in capsys.readouterr().err
