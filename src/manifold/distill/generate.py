"""Sequence distillation (DeepSeek-R1's recipe): the teacher writes the student's training data.

    manifold distill generate --teacher TEACHER --config experiments/distill.py:sequence --out gen/
    manifold train --config experiments/distill.py:sequence --workdir student \
        --config.data.sources='gen/*.jsonl'

For `distill.prompts` prompts, the teacher samples `distill.samples_per_prompt` completions of up
to `distill.max_new_tokens` tokens each (the rollout engine, at `distill.sample_temperature`). A
prompt is the first `distill.prompt_tokens` tokens of a training window (`prompt_source=data`) or
a problem of `rl.task` (`prompt_source=task`, where only completions its verifier accepts are
kept). Completions shorter than `distill.min_new_tokens`, and with `distill.dedup` repeats of a
kept text, are dropped. The kept documents (prompt + completion, `{"text", "prompt",
"completion"}` per line) go into `--files` .jsonl files, since `manifold train` holds files out
for validation.
"""

from __future__ import annotations

import dataclasses
import json
import os
from typing import Callable

import jax
import numpy as np
import tqdm
from flax import nnx

from manifold import files
from manifold.config import ConfigError, task_settings
from manifold.data.loader import BatchIterator
from manifold.distill.teacher import Teacher
from manifold.rl import rollout
from manifold.rl.tasks import decode_completion, get_task


@dataclasses.dataclass
class GenerateReport:
  prompts: int
  sampled: int
  kept: int
  dropped: dict[str, int]  # reason -> completions
  tokens: int  # of the kept documents
  files: list[str]

  def summary(self) -> str:
    dropped = ", ".join(f"{n} {why}" for why, n in self.dropped.items() if n) or "none"
    return (
      f"kept {self.kept} of {self.sampled} completions of {self.prompts} prompts ({self.tokens:,} tokens; dropped: "
      f"{dropped}) in {len(self.files)} files"
    )


def _prompts(cfg, data) -> tuple[list[np.ndarray], list]:
  """(token ids of each prompt, the task's example per prompt or None)."""
  d = cfg.distill
  if d.prompt_source == "task":
    task = get_task(cfg.rl.task, **task_settings(cfg.rl.difficulty))
    examples = task.prompts("train", cfg.train.seed, d.prompts)
    return [rollout.prompt_ids(data.tokenizer, e.prompt) for e in examples], examples
  windows = BatchIterator(data.train, batch_size=d.prompts, seq_len=d.prompt_tokens, seed=cfg.train.seed + 1)
  return list(next(windows)[:, : d.prompt_tokens]), [None] * d.prompts


def generate(
  cfg, teacher: Teacher, data, out: str, *, file_count: int, say: Callable[[str], None], progress: bool = True
) -> GenerateReport:
  """Samples, filters and writes the teacher's documents into `out` (see the module doc)."""
  d = cfg.distill
  task = get_task(cfg.rl.task, **task_settings(cfg.rl.difficulty)) if d.prompt_source == "task" else None
  prompts, examples = _prompts(cfg, data)
  longest = max(len(p) for p in prompts)
  if longest + d.max_new_tokens > teacher.model_cfg.max_seq_len:
    raise ConfigError(
      f"distill.max_new_tokens={d.max_new_tokens}: prompts of up to {longest} tokens plus it exceed the teacher's "
      f"model.max_seq_len={teacher.model_cfg.max_seq_len}"
    )
  model = nnx.merge(teacher.graphdef, teacher.variables["params"], teacher.variables["extra"])
  rows = [(i, s) for i in range(len(prompts)) for s in range(d.samples_per_prompt)]
  seen: set[str] = set()
  dropped = {"short": 0, "unverified": 0, "duplicate": 0}
  docs: list[dict] = []
  tokens = 0
  for start in tqdm.trange(0, len(rows), d.generate_batch, disable=not progress, unit="batch", desc="teacher samples"):
    chunk = rows[start : start + d.generate_batch]
    sampled = rollout.sample(
      model,
      [prompts[i] for i, _ in chunk],
      max_new_tokens=d.max_new_tokens,
      key=jax.random.key(rollout.seed_of("distill-generate", cfg.train.seed, start)),
      temperature=d.sample_temperature,
      eos_id=data.tokenizer.eos_id,
    )
    for b, (i, _) in enumerate(chunk):
      length = int(sampled.lengths[b])
      completion = decode_completion(data.tokenizer, sampled.tokens[b, :length])
      prompt = data.tokenizer.decode(prompts[i][1:] if task else prompts[i])  # a task prompt starts at end-of-text
      if length < d.min_new_tokens:
        dropped["short"] += 1
      elif task is not None and not task.correct(examples[i], completion):
        dropped["unverified"] += 1
      elif d.dedup and prompt + completion in seen:
        dropped["duplicate"] += 1
      else:
        seen.add(prompt + completion)
        docs.append({"text": prompt + completion, "prompt": prompt, "completion": completion})
        tokens += len(prompts[i]) + length
  if not docs:
    raise ConfigError("distill generate: every completion was dropped; lower distill.min_new_tokens or check the task")
  root = files.path(out)
  root.mkdir(parents=True, exist_ok=True)
  paths = []
  for f in range(file_count):
    path = os.fspath(root / f"part-{f:02d}.jsonl")
    files.write_atomic(path, "".join(json.dumps(doc) + "\n" for doc in docs[f::file_count]))
    paths.append(path)
  report = GenerateReport(len(prompts), len(rows), len(docs), dropped, tokens, paths)
  say(report.summary())
  return report
