"""The distillation train step: the student's update with the teacher's distribution as target.

`DistillStep` replaces the training step of `manifold train` when `distill.teacher` is
set (`manifold distill`), so a distillation run has everything a training run has (resume,
evaluation, checkpoints, metrics). By `distill.mode`:

  online     the frozen teacher runs inside the same jitted step on the batch;
  cache      the teacher's top-k log-probs of the batch come from `manifold distill cache`;
  on_policy  the student continues the first `distill.prompt_tokens` of each window by
             `distill.max_new_tokens` sampled tokens (the rollout engine), the teacher scores
             them in the step, and the loss is D on the sampled positions only (GKD, lambda = 1).

Besides the training metrics, each step logs `divergence` (mean D per position at T).
"""

from __future__ import annotations

from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np
import optax

from manifold.config import ConfigError, validate
from manifold.distill import losses
from manifold.distill.cache import open_cache
from manifold.distill.teacher import Teacher, load_teacher
from manifold.parallel import sharding
from manifold.rl import rollout
from manifold.train.state import StateSpec
from manifold.train.step import train_step_fn


def distill_objective(teacher: Teacher, teacher_variables, d) -> Callable:
  """`objective(student_logits [B, T, V], batch) -> (loss, stats)` for `train_step_fn` (`d`: the
  distill section); the batch holds "tokens" [B, T+1], and "mask" [B, T] (on_policy) or the cached
  "top_ids", "top_logp", "log_rest" (cache)."""

  def objective(logits, batch):
    tokens = batch["tokens"]
    if d.mode == "cache":

      def divergence_of(student_logp):
        return losses.folded_divergence(
          batch["top_ids"], batch["top_logp"], batch["log_rest"], student_logp, d.divergence, d.jsd_beta
        )

    else:
      teacher_logits = teacher.logits(teacher_variables, tokens[:, :-1])
      teacher_logp = jax.nn.log_softmax(teacher_logits / d.temperature, axis=-1)

      def divergence_of(student_logp):
        return losses.divergence(teacher_logp, student_logp, d.divergence, d.jsd_beta)

    on_policy = d.mode == "on_policy"
    mask = batch["mask"] if on_policy else jnp.ones(tokens[:, 1:].shape, jnp.float32)
    return losses.distill_loss(
      logits,
      None if on_policy else tokens[:, 1:],
      mask,
      divergence_of=divergence_of,
      temperature=d.temperature,
      weight=d.weight,
    )

  return objective


class DistillStep:
  """`(state, batch [B, T+1]) -> (state, metrics)` for the training loop, one call per step in
  order from `start` (the cache and the samples are read by step)."""

  def __init__(self, cfg, spec: StateSpec, tx: optax.GradientTransformation, mesh, token_bytes, data, start: int,
               say: Callable[[str], None]):  # fmt: skip
    self.d = d = validate(cfg).distill
    self.mesh, self.spec, self.step = mesh, spec, start
    self.tokenizer = data.tokenizer
    self.seed = cfg.train.seed
    self.teacher = load_teacher(
      d.teacher,
      step=d.teacher_step,
      dtype=d.teacher_dtype,
      student_cfg=spec.model_cfg,
      tokenizer_fingerprint=data.tokenizer.fingerprint,
      mesh=mesh,
      say=say,
    )
    self.cache = None
    if d.mode == "cache":
      if not d.cache:
        raise ConfigError(
          "distill.cache: empty; with distill.mode=cache pass the folder `manifold distill cache` wrote"
        )
      if jax.process_count() > 1:
        raise ConfigError("distill.mode=cache: runs as one process; use distill.mode=online across hosts")
      self.cache = open_cache(d.cache, data, cfg.train, self.teacher, d.temperature, d.top_k)
      say(f"teacher top-{self.cache.manifest['top_k']} from {d.cache} ({self.cache.manifest['bytes_per_token']:.1f} "
          "bytes per token)")  # fmt: skip
    teacher = self.teacher

    def step(state, teacher_variables, batch):
      fn = train_step_fn(spec, tx, token_bytes, cfg.train, distill_objective(teacher, teacher_variables, d))
      return fn(state, batch)

    rows = sharding.batch_sharding(mesh)
    self._step = sharding.jit_on_mesh(
      step,
      mesh,
      in_shardings=(spec.shardings, teacher.shardings, rows),
      out_shardings=(spec.shardings, sharding.replicated(mesh)),
      donate_argnums=0,
    )

  def __call__(self, state, batch: jax.Array):
    batch = {"tokens": batch}
    if self.d.mode == "cache":
      rows = self.cache.rows(self.step, jax.device_get(batch["tokens"]))
      batch.update(jax.device_put(rows, sharding.batch_sharding(self.mesh)))
    elif self.d.mode == "on_policy":
      batch = self._own_samples(state, jax.device_get(batch["tokens"]))
    self.step += 1
    return self._step(state, self.teacher.variables, batch)

  def _own_samples(self, state, windows: np.ndarray) -> dict[str, jax.Array]:
    """The student's continuations of the windows' first prompt_tokens: tokens [B, P+N] (padded) and
    the mask [B, P+N-1] of the positions that predict a sampled token."""
    d = self.d
    prompts = list(windows[:, : d.prompt_tokens])
    sampled = rollout.sample(
      self.spec.merge(state.params, state.extra),
      prompts,
      max_new_tokens=d.max_new_tokens,
      key=jax.random.fold_in(jax.random.key(rollout.seed_of("on_policy", self.seed)), self.step),
      temperature=d.sample_temperature,
      eos_id=self.tokenizer.eos_id,
    )
    tokens, mask, _ = rollout.pack(prompts, sampled, d.prompt_tokens + d.max_new_tokens - 1)
    return jax.device_put({"tokens": tokens, "mask": mask.astype(np.float32)}, sharding.batch_sharding(self.mesh))
