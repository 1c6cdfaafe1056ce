"""Bad configs and command lines, generated from the schema and the commands: each is refused
with exit 2 and one `manifold: error:` line on stderr naming the field, flag or file at fault
(no traceback), and the finished run that the command names stays byte for byte as it was."""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import pathlib
import shutil
import subprocess
import sys
import typing

import pytest

import manifold
from manifold.cli import main
from manifold.config import SECTIONS
from manifold.schema import Section

from .conftest import TINY

FIXTURES = pathlib.Path(__file__).parent / "fixtures"

# An experiment whose get_config("section.field=<json>") returns a config with only that value set.
ONE_VALUE_EXPERIMENT = """
import json

import ml_collections


def get_config(arg):
  dotted, value = arg.split("=", 1)
  *parents, leaf = dotted.split(".")
  tree = node = {}
  for key in parents:
    node = node.setdefault(key, {})
  node[leaf] = json.loads(value)
  return ml_collections.ConfigDict(tree)
"""

WRONG_TYPE = {int: "x", float: "x", bool: "x", str: 5}
OUT_OF_RANGE = {int: [0, -1, -2], float: [-1.0, 2.0], str: ["", "nope"]}


def fields(section: type[Section], prefix: str):
  """(dotted name, type, check) of every field, nested sections included as themselves."""
  kinds = typing.get_type_hints(section)
  for f in dataclasses.fields(section):
    kind, name = kinds[f.name], f"{prefix}.{f.name}"
    yield name, kind, f.metadata.get("check")
    if isinstance(kind, type) and issubclass(kind, Section):
      yield from fields(kind, name)


ALL_FIELDS = [field for name, section in SECTIONS.items() for field in fields(section, name)]


def wrong_type_cases():
  for name, kind, _ in ALL_FIELDS:
    value = WRONG_TYPE.get(kind, 5)  # a nested section gets a number
    yield pytest.param(f"{name}={json.dumps(value)}", name, id=f"type-{name}")


def out_of_range_cases():
  for name, kind, check in ALL_FIELDS:
    if check is not None:
      value = next((v for v in OUT_OF_RANGE[kind] if not check.ok(v)), None)
      assert value is not None, f"{name}: add an out-of-range candidate for {check.allowed!r}"
      yield pytest.param(f"--config.{name}={value}", name, id=f"range-{name}")


def tree_digest(root: pathlib.Path) -> str:
  digest = hashlib.sha256()
  for path in sorted(root.rglob("*")):
    digest.update(str(path.relative_to(root)).encode())
    if path.is_file():
      digest.update(path.read_bytes())
  return digest.hexdigest()


@pytest.fixture
def refused(trained_workdir, capsys):
  """`refused(argv, named)`: runs `manifold argv` in this process and checks the refusal."""

  def check(argv: list[str], named: str) -> None:
    before = tree_digest(trained_workdir)
    try:
      code = main(argv)
    except SystemExit as e:  # argparse
      code = e.code
    out, err = capsys.readouterr()
    lines = err.strip().splitlines()
    assert code == 2 and not out and len(lines) == 1 and lines[0].startswith("manifold: error: "), (argv, out, err)
    assert named in lines[0], (named, lines[0])
    assert tree_digest(trained_workdir) == before, argv

  return check


@pytest.fixture(scope="module")
def one_value_experiment(tmp_path_factory):
  path = tmp_path_factory.mktemp("experiments") / "one_value.py"
  path.write_text(ONE_VALUE_EXPERIMENT)
  return path


@pytest.mark.parametrize("arg, named", list(wrong_type_cases()))
def test_a_field_of_the_wrong_type_is_refused_naming_it(arg, named, one_value_experiment, trained_workdir, refused):
  refused(["train", "--config", f"{one_value_experiment}:{arg}", "--workdir", str(trained_workdir)], named)


@pytest.mark.parametrize("override, named", list(out_of_range_cases()))
def test_a_field_out_of_its_range_is_refused_naming_it(override, named, trained_workdir, refused):
  refused(["train", "--config", TINY, "--workdir", str(trained_workdir), override], f"{named}=")


@pytest.fixture(scope="module")
def paths(trained_workdir, tmp_path_factory):
  """What the command cases name: the finished run, a file, and broken copies of the tiny
  DeepSeek-V3 checkpoint (config.json garbage, a list, a mistyped key; 0-byte weights)."""
  root = tmp_path_factory.mktemp("fuzz")
  (root / "a-file").write_text("")
  source = FIXTURES / "deepseek_v3_tiny"
  typed = {**json.loads((source / "config.json").read_text()), "v_head_dim": "8"}
  broken = {
    "garbage": ("{not json", None),
    "list": ("[]", None),
    "typed": (json.dumps(typed), None),
    "empty": (None, b""),
  }
  out = {"run": str(trained_workdir), "a_file": str(root / "a-file"), "tmp": str(root)}
  for name, (config, weights) in broken.items():
    folder = root / f"hf-{name}"
    shutil.copytree(source, folder)
    if config is not None:
      (folder / "config.json").write_text(config)
    if weights is not None:
      (folder / "model.safetensors").write_bytes(weights)
    out[f"hf_{name}"] = str(folder)
  return out


LAUNCH = ["--config", TINY, "--workdir", "{run}"]
TOKENIZER = ["tokenizer", "train", "--config", TINY, "--vocab-size", "400", "--out"]
COMMANDS = {  # id: (argv, what the error line names); {run}, {a_file}, ... are the `paths` fixture's
  "train-workdir-is-a-file": (["train", "--config", TINY, "--workdir", "{a_file}"], "{a_file}: is a file"),
  "train-workdir-under-a-file": (["train", "--config", TINY, "--workdir", "{a_file}/run"], "{a_file} is a file"),
  "train-no-such-config": (["train", "--config", "experiments/nope.py", "--workdir", "{run}"], "'experiments/nope.py'"),
  "train-unknown-variant": (["train", "--config", "experiments/quickstart.py:huge", "--workdir", "{run}"], "'huge'"),
  "train-unknown-field": (["train", "--config", TINY, "--workdir", "{run}", "--config.model.nope=1"], "model.nope"),
  "train-unparsable-value": (
    ["train", "--config", TINY, "--workdir", "{run}", "--config.model.d_model=abc"],
    "--config.model.d_model=abc",
  ),
  "train-other-model-in-run": (
    ["train", "--config", TINY, "--workdir", "{run}", "--config.model.d_model=32"],
    "model.d_model=32",
  ),
  "train-cache-under-a-file": (
    ["train", "--config", TINY, "--workdir", "{run}", "--config.data.cache_dir={a_file}/cache"],
    "{a_file} is a file",
  ),
  "train-no-config-flag": (["train", "--workdir", "{run}"], "--config"),
  "eval-override": (["eval", "--workdir", "{run}", "--config.train.steps=3"], "no --config.* overrides"),
  "eval-num-batches": (["eval", "--workdir", "{run}", "--num-batches", "0"], "--num-batches: eval.num_batches=0"),
  "eval-no-such-step": (["eval", "--workdir", "{run}", "--step", "7"], "--step 7: no such checkpoint"),
  "eval-workdir-is-a-file": (["eval", "--workdir", "{a_file}"], "is a file"),
  "generate-empty-prompt": (["generate", "--workdir", "{run}", "--prompt", ""], "--prompt: sample.prompt=''"),
  "generate-temperature": (
    ["generate", "--workdir", "{run}", "--prompt", "x", "--temperature", "-1"],
    "--temperature: sample.temperature=",
  ),
  "generate-top-p-0": (["generate", "--workdir", "{run}", "--prompt", "x", "--top-p", "0"], "--top-p: sample.top_p="),
  "generate-top-p-2": (["generate", "--workdir", "{run}", "--prompt", "x", "--top-p", "2"], "--top-p: sample.top_p="),
  "generate-top-k": (["generate", "--workdir", "{run}", "--prompt", "x", "--top-k", "-1"], "--top-k: sample.top_k="),
  "generate-seed": (["generate", "--workdir", "{run}", "--prompt", "x", "--seed", "-1"], "--seed: sample.seed="),
  "generate-max-new-tokens": (
    ["generate", "--workdir", "{run}", "--prompt", "x", "--max-new-tokens", "-1"],
    "--max-new-tokens: sample.",
  ),
  "generate-too-long": (
    ["generate", "--workdir", "{run}", "--prompt", "x", "--max-new-tokens", "500"],
    "exceeds model.max_seq_len=64",
  ),
  "generate-not-a-number": (
    ["generate", "--workdir", "{run}", "--prompt", "x", "--temperature", "hot"],
    "argument --temperature",
  ),
  "generate-speculative-without-mtp": (
    ["generate", "--workdir", "{run}", "--prompt", "x", "--speculative"],
    "model.mtp_depth=0",
  ),
  "convert-neither-direction": (
    ["convert", "--workdir", "{run}"],
    "exactly one of --from-hf DIR, --to-hf DIR or --to-gguf FILE",
  ),
  "convert-no-folder": (["convert", "--workdir", "{run}", "--from-hf", "/missing/hf"], "/missing/hf: no such folder"),
  "convert-config-garbage": (["convert", "--workdir", "{run}", "--from-hf", "{hf_garbage}"], "config.json is not JSON"),
  "convert-config-list": (["convert", "--workdir", "{run}", "--from-hf", "{hf_list}"], "config.json holds a list"),
  "convert-config-mistyped": (
    ["convert", "--workdir", "{run}", "--from-hf", "{hf_typed}"],
    "config.json v_head_dim='8': must be an integer",
  ),
  "convert-empty-weights": (
    ["convert", "--workdir", "{run}", "--from-hf", "{hf_empty}"],
    "model.safetensors: not a safetensors file",
  ),
  "convert-into-a-file": (["convert", "--workdir", "{run}", "--to-hf", "{a_file}"], "--to-hf {a_file}: is a file"),
  "launch-slurm-nodes": (["launch", "slurm", *LAUNCH, "--nodes", "0"], "--nodes 0"),
  "launch-ssh-shell-code": (
    ["launch", "ssh", *LAUNCH, "--hosts", "node0;touch${{IFS}}/tmp/x,node1"],
    "--hosts: 'node0;touch",
  ),
  "launch-ssh-port": (["launch", "ssh", *LAUNCH, "--hosts", "a", "--port", "-1"], "--port -1"),
  "launch-tpu-name": (["launch", "tpu", *LAUNCH, "--name", "pod;ls", "--zone", "us-east5-a"], "--name 'pod;ls'"),
  "tokenizer-out-under-a-file": ([*TOKENIZER, "{a_file}/t.json"], "--out {a_file}/t.json: {a_file} is a file"),
  "tokenizer-out-is-a-directory": ([*TOKENIZER, "{run}"], "--out {run}: is a directory"),
  "params-bad-field": (["params", "--config", TINY, "--config.train.eval_every=0"], "train.eval_every=0"),
  "sweep-without-get-sweep": (
    ["sweep", "--config", "experiments/quickstart.py", "--workdir", "{tmp}/s"],
    "get_sweep()",
  ),
  "sweep-unknown-common-argument": (
    ["sweep", "--config", "experiments/hc_components.py:bogus=1", "--workdir", "{tmp}/s"],
    "config argument 'bogus': unknown",
  ),
  "compile-results-under-a-file": (
    ["compile", "--config", TINY, "--topology", "v5p-8", "--results", "{a_file}/r"],
    "--results {a_file}/r",
  ),
  "compile-sweep-no-such-file": (
    ["compile", "--config", "experiments/nope.py", "--topology", "v5p-8", "--sweep"],
    "experiments/nope.py: no such",
  ),
  "unknown-command": (["nope"], "invalid choice: 'nope'"),
}


@pytest.mark.parametrize("argv, named", list(COMMANDS.values()), ids=list(COMMANDS))
def test_a_bad_command_is_refused_naming_its_flag_or_file(argv, named, paths, refused):
  refused([a.format(**paths) for a in argv], named.format(**paths))


@pytest.mark.parametrize(
  "argv, named",
  [
    (["train", "--config", TINY, "--workdir", "{a_file}"], "is a file"),
    (["generate", "--workdir", "{run}", "--prompt", ""], "--prompt: sample.prompt=''"),
    (["launch", "ssh", "--config", TINY, "--workdir", "{run}", "--hosts", "a;reboot"], "--hosts: 'a;reboot'"),
  ],
  ids=["workdir-is-a-file", "empty-prompt", "host-with-shell-code"],
)
def test_a_real_process_prints_one_line_and_no_traceback(argv, named, trained_workdir, tmp_path):
  (tmp_path / "a-file").write_text("")
  argv = [a.format(a_file=tmp_path / "a-file", run=trained_workdir) for a in argv]
  before = tree_digest(trained_workdir)
  source = pathlib.Path(manifold.__file__).parents[1]
  env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(source), os.environ.get("PYTHONPATH", "")])}
  proc = subprocess.run(
    [sys.executable, "-m", "manifold.cli", *argv], capture_output=True, text=True, timeout=300, env=env
  )
  lines = proc.stderr.strip().splitlines()
  assert proc.returncode == 2 and len(lines) == 1 and lines[0].startswith("manifold: error: "), proc.stderr
  assert named in lines[0] and tree_digest(trained_workdir) == before
