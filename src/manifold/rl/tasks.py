"""Prompt sources with a programmatic verifier each, for RL from verifiable rewards.

A task draws problems from a seeded generator and checks completions by string handling
alone: nothing a model writes is ever evaluated, imported or converted beyond comparing
characters. Tasks:

  arithmetic  an integer expression over +, - and * (usual precedence), e.g. "47+5*12="
              -> "107"; difficulty: `digits` per operand, `ops` operators, `operators`.
  sort        "sort 3,1,4,1,5=" -> "1,1,3,4,5"; difficulty: `length`, `max_value`.
  reverse     "reverse 3,1,4,1,5=" -> "5,1,4,1,3"; same difficulty.

Answer format: the prompt ends with the marker "=", and the answer is the completion's
first line (the text before the first newline; surrounding whitespace ignored), written in
canonical form (integers in ASCII decimal, no leading zeros or "+", lists joined by ","
without spaces). Rollouts can stop at the newline; `decode_completion` cuts at the
tokenizer's end-of-text id. The SFT warm-up text of an example is prompt + answer + "\\n"
(the data loader appends `<|endoftext|>`), short enough for a byte-level model to learn.

Reward: 1 if correct, plus `format_weight` if the answer line is well formed (an integer,
or a list of integers), whether or not it is right.

Held-out split: a problem is held out iff sha256 of its prompt, read as a number in [0, 1),
falls below `heldout_fraction`, so the two splits are disjoint by construction and stay so
across seeds, counts and difficulties. Each split is drawn by rejection from one stream.
"""

from __future__ import annotations

import abc
import dataclasses
import hashlib
import json
import os
import re
from collections.abc import Sequence
from typing import Any

import numpy as np

from manifold.files import write_atomic

SPLITS = ("train", "heldout")
MARKER = "="
TERMINATOR = "\n"

_INTEGER = re.compile(r"-?(?:0|[1-9][0-9]*)")
_LIST = re.compile(r"(?:0|[1-9][0-9]*)(?:,(?:0|[1-9][0-9]*))*")
_MAX_DRAWS_PER_EXAMPLE = 1000


@dataclasses.dataclass(frozen=True)
class Example:
  """One problem: the text the policy continues, and the canonical answer."""

  prompt: str
  answer: str


def answer_line(completion: str) -> str:
  """The answer a completion gives: its text before the first newline, stripped."""
  return completion.split(TERMINATOR, 1)[0].strip()


def decode_completion(tokenizer: Any, ids: Sequence[int] | np.ndarray) -> str:
  """Text of generated `ids` up to (not including) the first `tokenizer.eos_id`."""
  ids = np.asarray(ids, np.int64).ravel()
  ends = np.flatnonzero(ids == tokenizer.eos_id)
  return tokenizer.decode(ids[: ends[0]] if ends.size else ids)


def heldout_score(prompt: str) -> float:
  """Uniform in [0, 1), a pure function of the prompt: sha256's first 8 hex digits / 2**32."""
  return int(hashlib.sha256(prompt.encode("utf-8")).hexdigest()[:8], 16) / 2**32


class Task(abc.ABC):
  """A prompt source and its verifier. Subclasses draw one problem and say what a
  well-formed answer looks like; splits, rewards and SFT text are shared."""

  name: str
  heldout_fraction: float

  @abc.abstractmethod
  def sample(self, rng: np.random.Generator) -> Example:
    """One problem drawn from `rng`, from either split."""

  @abc.abstractmethod
  def well_formed(self, line: str) -> bool:
    """Whether an answer line has the answer's shape (right or wrong)."""

  @abc.abstractmethod
  def max_prompt_bytes(self) -> int:
    """The most UTF-8 bytes a prompt can have (a bound on its tokens for byte-level tokenizers)."""

  def split_of(self, example: Example) -> str:
    """The split the example belongs to ("train" or "heldout"), from its prompt's hash."""
    return "heldout" if heldout_score(example.prompt) < self.heldout_fraction else "train"

  def prompts(self, split: str, seed: int, count: int) -> list[Example]:
    """`count` problems of `split` ("train" or "heldout"), the same for the same seed."""
    if split not in SPLITS:
      raise ValueError(f"split={split!r} is not one of {', '.join(map(repr, SPLITS))}")
    if count < 0:
      raise ValueError(f"count={count} must be non-negative")
    rng = np.random.default_rng(seed)
    examples: list[Example] = []
    for _ in range(_MAX_DRAWS_PER_EXAMPLE * count + 10_000):
      if len(examples) == count:
        return examples
      example = self.sample(rng)
      if self.split_of(example) == split:
        examples.append(example)
    if len(examples) == count:
      return examples
    raise ValueError(f"rl.task {self.name}: too few {split} problems at this difficulty; make the task harder")

  def correct(self, example: Example, completion: str) -> bool:
    """Whether the completion's answer line is exactly the example's answer."""
    return answer_line(completion) == example.answer

  def reward(self, example: Example, completion: str, *, format_weight: float = 0.0) -> float:
    """1 if correct, plus `format_weight` if the answer line is well formed."""
    if not format_weight >= 0:
      raise ValueError(f"rl.format_weight={format_weight} must be non-negative")
    line = answer_line(completion)
    return float(line == example.answer) + format_weight * float(self.well_formed(line))

  def sft_text(self, example: Example) -> str:
    """The warm-up document: prompt, answer, newline."""
    return example.prompt + example.answer + TERMINATOR


@dataclasses.dataclass(frozen=True)
class Arithmetic(Task):
  """`ops` operators from `operators` between `ops + 1` operands of up to `digits` digits."""

  digits: int = 2
  ops: int = 1
  operators: str = "+-*"
  heldout_fraction: float = 0.1
  name = "arithmetic"

  def __post_init__(self):
    if isinstance(self.digits, bool) or not isinstance(self.digits, int) or not 1 <= self.digits <= 18:
      raise ValueError(f"rl.task arithmetic: digits={self.digits!r} must be an integer in [1, 18]")
    if isinstance(self.ops, bool) or not isinstance(self.ops, int) or not 1 <= self.ops <= 32:
      raise ValueError(f"rl.task arithmetic: ops={self.ops!r} must be an integer in [1, 32]")
    if not self.operators or set(self.operators) - set("+-*") or len(set(self.operators)) != len(self.operators):
      raise ValueError(f"rl.task arithmetic: operators={self.operators!r} must be distinct characters of '+-*'")
    _check_fraction(self.name, self.heldout_fraction)

  def sample(self, rng: np.random.Generator) -> Example:
    operands = [int(x) for x in rng.integers(0, 10**self.digits, size=self.ops + 1)]
    operators = [self.operators[i] for i in rng.integers(0, len(self.operators), size=self.ops)]
    expression = str(operands[0]) + "".join(op + str(x) for op, x in zip(operators, operands[1:]))
    return Example(expression + MARKER, str(_evaluate(operands, operators)))

  def well_formed(self, line: str) -> bool:
    return _INTEGER.fullmatch(line) is not None

  def max_prompt_bytes(self) -> int:
    return (self.ops + 1) * self.digits + self.ops + len(MARKER)


def _evaluate(operands: list[int], operators: list[str]) -> int:
  """The value of `operands[0] op_1 operands[1] ...` with * before + and -, left to right."""
  terms, signs = [operands[0]], []
  for op, x in zip(operators, operands[1:]):
    if op == "*":
      terms[-1] *= x
    else:
      terms.append(x)
      signs.append(1 if op == "+" else -1)
  return terms[0] + sum(s * t for s, t in zip(signs, terms[1:]))


@dataclasses.dataclass(frozen=True)
class ListTask(Task):
  """Sort or reverse a list of `length` integers in [0, max_value]."""

  mode: str = "sort"
  length: int = 5
  max_value: int = 9
  heldout_fraction: float = 0.1

  def __post_init__(self):
    if self.mode not in ("sort", "reverse"):
      raise ValueError(f"rl.task: list mode={self.mode!r} is not 'sort' or 'reverse'")
    if isinstance(self.length, bool) or not isinstance(self.length, int) or not 2 <= self.length <= 64:
      raise ValueError(f"rl.task {self.mode}: length={self.length!r} must be an integer in [2, 64]")
    if isinstance(self.max_value, bool) or not isinstance(self.max_value, int) or not 1 <= self.max_value < 10**9:
      raise ValueError(f"rl.task {self.mode}: max_value={self.max_value!r} must be an integer in [1, 10**9)")
    _check_fraction(self.mode, self.heldout_fraction)

  @property
  def name(self) -> str:
    return self.mode

  def sample(self, rng: np.random.Generator) -> Example:
    values = [int(x) for x in rng.integers(0, self.max_value + 1, size=self.length)]
    result = sorted(values) if self.mode == "sort" else values[::-1]
    return Example(f"{self.mode} {_join(values)}{MARKER}", _join(result))

  def well_formed(self, line: str) -> bool:
    return _LIST.fullmatch(line) is not None

  def max_prompt_bytes(self) -> int:
    return len(self.mode) + 1 + self.length * len(str(self.max_value)) + self.length - 1 + len(MARKER)


def _join(values: list[int]) -> str:
  return ",".join(map(str, values))


def _check_fraction(name: str, fraction: float) -> None:
  if not 0 < fraction < 1:
    raise ValueError(f"rl.task {name}: heldout_fraction={fraction} must lie in (0, 1)")


TASKS: dict[str, tuple[type[Task], dict[str, Any]]] = {
  "arithmetic": (Arithmetic, {}),
  "sort": (ListTask, {"mode": "sort"}),
  "reverse": (ListTask, {"mode": "reverse"}),
}


def get_task(name: str, **difficulty: Any) -> Task:
  """The task called `name`, at the given difficulty (keyword arguments of its class)."""
  if name not in TASKS:
    raise ValueError(f"rl.task={name!r} is not a known task; choose one of {', '.join(sorted(TASKS))}")
  cls, fixed = TASKS[name]
  known = [f.name for f in dataclasses.fields(cls) if f.name not in fixed]
  unknown = sorted(set(difficulty) - set(known))
  if unknown:
    raise ValueError(f"rl.task {name}: unknown setting {unknown[0]!r}; its settings are {', '.join(known)}")
  return cls(**fixed, **difficulty)


def write_sft_corpus(task: Task, path: str | os.PathLike, count: int, seed: int, *, split: str = "train") -> int:
  """Writes `count` warm-up documents of `split` to the .jsonl `path`, one `{"text": ...}` a
  line, for `manifold train --config.data.sources=...`; returns `count`.

  `manifold train` splits train / val by file and needs at least two files: write two
  corpora from the train split with different seeds and pass both (or a glob), so that
  held-out problems stay unseen.
  """
  if not os.fspath(path).endswith(".jsonl"):
    raise ValueError(f"write_sft_corpus: {os.fspath(path)!r} must end in .jsonl for the data loader to read its lines")
  lines = [json.dumps({"text": task.sft_text(e)}) + "\n" for e in task.prompts(split, seed, count)]
  write_atomic(path, "".join(lines))
  return count
