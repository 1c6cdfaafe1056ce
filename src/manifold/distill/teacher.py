"""The teacher: a trained (or imported) run loaded frozen, checked against the student's data."""

from __future__ import annotations

import dataclasses
import hashlib
import json
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import Mesh

from manifold import files
from manifold.config import ConfigError, model_config
from manifold.data import load_tokenizer
from manifold.model import ModelConfig
from manifold.parallel import sharding
from manifold.train.state import build_model


@dataclasses.dataclass(frozen=True)
class Teacher:
  """A frozen model: its variables (params and extra, no optimizer state) sharded over the
  student's mesh, and what identifies it (for the cache's fingerprint)."""

  workdir: str
  step: int
  model_cfg: ModelConfig
  graphdef: nnx.GraphDef
  variables: dict[str, Any]  # {"params": ..., "extra": ...}
  shardings: dict[str, Any]  # like `variables`
  tokenizer_fingerprint: str
  digest: str  # sha256 of the variables' bytes (float32 as stored)

  def logits(self, variables, tokens_bt: jax.Array) -> jax.Array:
    """[B, T, V] float32 logits of `tokens_bt` under `variables` (traced or concrete), outside the gradient."""
    model = nnx.merge(self.graphdef, variables["params"], variables["extra"])
    logits, _ = model(tokens_bt)
    return jax.lax.stop_gradient(logits.astype(jnp.float32))


def _tokenizer_fingerprint(workdir: str, cfg) -> str:
  manifest = files.read_text(files.path(workdir) / "manifest.json")
  if manifest is not None and "tokenizer_fingerprint" in json.loads(manifest):
    return json.loads(manifest)["tokenizer_fingerprint"]
  return load_tokenizer(cfg.data.tokenizer).fingerprint


def _digest(tree) -> str:
  h = hashlib.sha256()
  for path, leaf in sorted(jax.tree_util.tree_leaves_with_path(tree), key=lambda kv: jax.tree_util.keystr(kv[0])):
    h.update(jax.tree_util.keystr(path).encode())
    h.update(np.ascontiguousarray(jax.device_get(leaf)).tobytes())
  return h.hexdigest()


def load_teacher(
  workdir: str,
  *,
  step: int,
  dtype: str,
  student_cfg: ModelConfig,
  tokenizer_fingerprint: str,
  mesh: Mesh,
  say: Callable[[str], None],
) -> Teacher:
  """The teacher in `workdir` at checkpoint `step` (-1: its newest), in compute `dtype`, its
  variables sharded over `mesh`. ConfigError (naming distill.teacher) for a workdir without a
  run or checkpoint, another tokenizer, or another vocabulary size than `student_cfg`'s."""
  from manifold.train.restore import load_trained

  flag = f"distill.teacher={workdir}"
  if files.read_text(files.path(workdir) / "config.json") is None:
    raise ConfigError(f"{flag}: no `manifold train` run or `manifold convert` import there (no config.json)")
  try:
    run = load_trained(workdir, None if step < 0 else step, data=False, say=say)
  except ConfigError as e:
    raise ConfigError(f"{flag}: {e}") from None
  fingerprint = _tokenizer_fingerprint(workdir, run.cfg)
  if fingerprint != tokenizer_fingerprint:
    raise ConfigError(
      f"{flag}: the teacher's tokenizer (sha256 {fingerprint[:12]}...) is not the student's data.tokenizer "
      f"(sha256 {tokenizer_fingerprint[:12]}...); distil with the tokenizer the teacher was trained with"
    )
  teacher_cfg = model_config(run.cfg)
  if teacher_cfg.vocab_size != student_cfg.vocab_size:
    raise ConfigError(
      f"{flag}: the teacher has model.vocab_size={teacher_cfg.vocab_size}, the student {student_cfg.vocab_size}; "
      "their logits must cover the same ids: set the student's model.vocab_size to the teacher's"
    )
  teacher_cfg = dataclasses.replace(teacher_cfg, dtype=dtype)
  abstract = nnx.eval_shape(lambda: build_model(teacher_cfg, jax.random.key(0)))
  graphdef, abstract_params, abstract_extra = nnx.split(abstract, nnx.Param, ...)
  variables = {"params": run.state.params, "extra": run.state.extra}
  shardings = {
    "params": sharding.state_shardings(abstract_params, mesh),
    "extra": sharding.state_shardings(abstract_extra, mesh),
  }
  digest = _digest(variables)
  variables = jax.device_put(variables, shardings)
  say(f"teacher: {workdir} at step {run.step} ({teacher_cfg.n_layers} layers x {teacher_cfg.d_model}, {dtype})")
  return Teacher(
    workdir=workdir,
    step=run.step,
    model_cfg=teacher_cfg,
    graphdef=graphdef,
    variables=variables,
    shardings=shardings,
    tokenizer_fingerprint=fingerprint,
    digest=digest,
  )
