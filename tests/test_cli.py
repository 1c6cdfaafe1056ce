"""The `manifold` command line on a trained tiny run."""

from __future__ import annotations

import ast
import functools
import os
import pathlib
import re

import pytest

from manifold.cli import main
from manifold.config import SECTIONS
from manifold.data import load_tokenizer

from .conftest import TINY, error_line


def test_eval_reports_validation_bits_per_byte(trained_workdir, capsys):
  assert main(["eval", "--workdir", str(trained_workdir)]) == 0
  out = capsys.readouterr().out
  match = re.search(r"step 20: val_loss ([\d.]+)\s+val_bits_per_byte ([\d.]+)", out)
  assert match and 0 < float(match.group(2)) < 8, out


def test_generate_is_deterministic_for_a_seed_and_starts_with_the_prompt(trained_workdir, capsys):
  args = ["generate", "--workdir", str(trained_workdir), "--prompt", "import ", "--max-new-tokens", "12", "--seed", "3"]
  assert main(args) == 0
  first = capsys.readouterr().out
  assert main(args) == 0
  assert capsys.readouterr().out == first and first.startswith("import ")


def test_generate_rejects_a_too_long_request_in_one_line(trained_workdir, capsys):
  assert main(["generate", "--workdir", str(trained_workdir), "--prompt", "x", "--max-new-tokens", "500"]) == 2
  err = capsys.readouterr().err
  assert "exceeds model.max_seq_len=64" in err and len(err.strip().splitlines()) == 1


def test_eval_without_a_run_says_what_to_do(tmp_path, capsys):
  assert main(["eval", "--workdir", str(tmp_path)]) == 2
  assert "train there first" in capsys.readouterr().err


def test_params_prints_counts_and_flops(capsys):
  assert main(["params", "--config", TINY]) == 0
  out = capsys.readouterr().out
  assert re.search(r"total parameters\s+[\d,]+", out) and "training FLOPs/token" in out


def test_tokenizer_train_writes_a_loadable_bpe(corpus_dir, tmp_path, capsys):
  out_path = tmp_path / "tok.json"
  args = [
    "tokenizer",
    "train",
    "--config",
    TINY,
    "--vocab-size",
    "400",
    "--out",
    str(out_path),
    f"--config.data.sources={corpus_dir}/*.py",
  ]
  assert main(args) == 0
  tokenizer = load_tokenizer(str(out_path))
  assert tokenizer.vocab_size == 400
  assert tokenizer.decode(tokenizer.encode("def f(x):\n    return x")) == "def f(x):\n    return x"
  assert "--config.model.vocab_size=400" in capsys.readouterr().out


@pytest.mark.parametrize("where", ["a-file", "under-a-file", "under-a-read-only-directory"])
def test_an_unusable_workdir_is_refused_in_one_line_naming_it(where, tmp_path, capsys):
  (tmp_path / "a-file").write_text("")
  workdir, named = {
    "a-file": (tmp_path / "a-file", "is a file"),
    "under-a-file": (tmp_path / "a-file" / "run", f"{tmp_path / 'a-file'} is a file"),
    "under-a-read-only-directory": (pathlib.Path("/proc/sys/manifold-run"), "/proc/sys is not writable"),
  }[where]
  if where == "under-a-read-only-directory" and os.access("/proc/sys", os.W_OK):
    pytest.skip("/proc/sys is writable here; no read-only directory to try")
  assert main(["train", "--config", TINY, "--workdir", str(workdir), "--config.train.steps=3"]) == 2
  line = error_line(capsys.readouterr().err)
  assert f"--workdir {workdir}: " in line and named in line, line


@pytest.mark.parametrize(
  "flag, value, message",
  [
    ("--prompt", "", "--prompt: sample.prompt='': must be a non-empty string"),
    ("--temperature", "-1", "--temperature: sample.temperature=-1.0: must be a finite number >= 0"),
    ("--top-p", "0", "--top-p: sample.top_p=0.0: must be a number in (0, 1]"),
    ("--top-p", "2", "--top-p: sample.top_p=2.0: must be a number in (0, 1]"),
    ("--top-k", "-1", "--top-k: sample.top_k=-1: must be an integer >= 0"),
  ],
)
def test_generate_refuses_a_bad_sampling_flag_in_one_line_naming_it(trained_workdir, flag, value, message, capsys):
  assert main(["generate", "--workdir", str(trained_workdir), "--prompt", "x", flag, value]) == 2
  assert message in error_line(capsys.readouterr().err)


def test_generate_says_on_stderr_that_it_compiles_before_the_first_token(trained_workdir, capsys):
  assert main(["generate", "--workdir", str(trained_workdir), "--prompt", "def ", "--max-new-tokens", "2"]) == 0
  assert "compiling the decoder" in capsys.readouterr().err


def test_train_help_lists_every_config_field_with_its_default_and_doc(capsys):
  with pytest.raises(SystemExit):
    main(["train", "--help"])
  out = capsys.readouterr().out
  for name, section in SECTIONS.items():
    defaults = section().to_dict()
    for field, doc in section.docs().items():
      default = functools.reduce(lambda d, k: d[k], field.split("."), defaults)
      row = rf"^ +{re.escape(f'--config.{name}.{field}={default!r}')} +{re.escape(doc)}$"
      assert re.search(row, out, re.M), (name, field)


def test_quickstart_docstring_leaves_its_running_time_to_the_readme():
  doc = ast.get_docstring(ast.parse(pathlib.Path("experiments/quickstart.py").read_text()))
  assert not re.search(r"\d\s*min", doc) and "README" in doc, doc


def test_generate_with_top_k_past_the_vocabulary_samples_as_without_top_k(trained_workdir, capsys):
  args = ["generate", "--workdir", str(trained_workdir), "--prompt", "def ", "--max-new-tokens", "8", "--seed", "1"]
  assert main([*args, "--top-k", "0"]) == 0
  unfiltered = capsys.readouterr().out
  assert main([*args, "--top-k", "100000"]) == 0
  assert capsys.readouterr().out == unfiltered
