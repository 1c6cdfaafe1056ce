"""The training loop: data, sharded state, resume, evaluation, metrics, checkpoints."""

from __future__ import annotations

import dataclasses
import json
import os
import signal
import time

import jax
import jax.numpy as jnp
import numpy as np
import tqdm

from manifold.config import ConfigError, model_config, validate
from manifold.data import Data, eval_batches, load_data, write_manifest
from manifold.data.loader import BatchIterator
from manifold.model.accounting import training_flops_per_token
from manifold.parallel import sharding
from manifold.parallel.mesh import check_fits, make_mesh
from manifold.train import plot
from manifold.train.checkpoint import Checkpointer
from manifold.train.hardware import peak_tflops
from manifold.train.metrics import MetricsWriter
from manifold.train.optimizer import learning_rate_schedule, make_optimizer
from manifold.train.state import StateSpec, TrainState, make_state_spec
from manifold.train.step import make_eval_step, make_residual_stats_step, make_train_step


class TrainingDiverged(RuntimeError):
  """The loss became NaN or infinite; no checkpoint was written past the last finite step."""


@dataclasses.dataclass
class TrainResult:
  state: TrainState
  spec: StateSpec
  data: Data
  step: int
  stopped_early: bool  # SIGTERM: saved and left before train.steps


def default_cache_dir() -> str:
  return os.environ.get("MANIFOLD_CACHE") or os.path.join(os.path.expanduser("~"), ".cache", "manifold")


def prepare_workdir(cfg, workdir: str) -> None:
  """Creates `workdir` and records the config; refuses a workdir trained with another model or data."""
  os.makedirs(workdir, exist_ok=True)
  path = os.path.join(workdir, "config.json")
  if os.path.exists(path):
    with open(path) as f:
      saved = json.load(f)
    for section in ("model", "data"):
      for key, value in saved.get(section, {}).items():
        if cfg[section].get(key) != value:
          raise ConfigError(
            f"{section}.{key}={cfg[section].get(key)!r}: {workdir} was trained with {value!r}; "
            f"use the same value to resume, or a new --workdir"
          )
  tmp = f"{path}.tmp{os.getpid()}"  # every process of a job writes it
  with open(tmp, "w") as f:
    f.write(cfg.to_json(indent=2))
  os.replace(tmp, path)


def load_run_data(cfg) -> Data:
  """The tokenizer and token streams for `cfg.data`, checked against `model.vocab_size`."""
  data = load_data(
    sources=cfg.data.sources,
    tokenizer=cfg.data.tokenizer,
    jsonl_field=cfg.data.jsonl_field,
    val_fraction=cfg.data.val_fraction,
    cache_dir=cfg.data.cache_dir or default_cache_dir(),
  )
  if cfg.model.vocab_size < data.tokenizer.vocab_size:
    raise ConfigError(
      f"model.vocab_size={cfg.model.vocab_size}: must be >= the tokenizer's {data.tokenizer.vocab_size} ids"
    )
  return data


def token_byte_table(data: Data, vocab_size: int) -> jax.Array:
  """[V] bytes per token id (ids beyond the tokenizer's vocabulary count 1)."""
  table = np.ones(vocab_size, np.float32)
  table[: data.tokenizer.vocab_size] = data.tokenizer.token_byte_lengths
  return jnp.asarray(table)


def evaluate(eval_step, state: TrainState, batches: list[np.ndarray], mesh) -> dict[str, float]:
  """Validation loss (nats/token) and bits per byte over fixed batches."""
  totals = {"nats": 0.0, "bytes": 0.0, "tokens": 0.0}
  for batch in batches:
    out = jax.device_get(eval_step(state.params, state.extra, _global_batch(batch, mesh, eval_batch=True)))
    totals = {k: totals[k] + float(out[k]) for k in totals}
  return {
    "val_loss": totals["nats"] / totals["tokens"],
    "val_bits_per_byte": totals["nats"] / np.log(2) / totals["bytes"],
  }


def _global_batch(local: np.ndarray, mesh, eval_batch: bool = False) -> jax.Array:
  """This process's rows -> one global array sharded over the data axes."""
  if eval_batch and jax.process_count() > 1:  # every process holds the full eval batch
    rows = local.shape[0] // jax.process_count()
    local = local[jax.process_index() * rows : (jax.process_index() + 1) * rows]
  return jax.make_array_from_process_local_data(sharding.batch_sharding(mesh), local)


class _StopRequest:
  """Turns SIGTERM into a flag the loop checks between steps."""

  def __init__(self):
    self.requested = False
    self._previous = None

  def __enter__(self):
    self._previous = signal.signal(signal.SIGTERM, self._handle)
    return self

  def _handle(self, signum, frame):
    self.requested = True

  def __exit__(self, *exc):
    signal.signal(signal.SIGTERM, self._previous)


def train(cfg, workdir: str, *, progress: bool = True) -> TrainResult:
  """Trains `cfg` in `workdir`, resuming from its newest checkpoint if there is one."""
  validate(cfg)
  prepare_workdir(cfg, workdir)
  tc = cfg.train
  is_main = jax.process_index() == 0
  data = load_run_data(cfg)
  if is_main:
    write_manifest(
      os.path.join(workdir, "manifest.json"),
      data.records,
      tokenizer_name=data.tokenizer.name,
      tokens={"train": len(data.train), "val": len(data.val)},
    )

  model_cfg = model_config(cfg)
  mesh = make_mesh(cfg.mesh)
  check_fits(cfg, mesh)
  tx = make_optimizer(tc)
  spec = make_state_spec(model_cfg, tx, mesh)
  token_bytes = token_byte_table(data, model_cfg.vocab_size)
  train_step = make_train_step(spec, tx, mesh, token_bytes, tc)
  eval_step = make_eval_step(spec, mesh, token_bytes)
  residual_stats = make_residual_stats_step(spec, mesh) if model_cfg.residual != "plain" else None
  schedule = learning_rate_schedule(tc)

  iterator = BatchIterator(
    data.train,
    batch_size=tc.batch_size,
    seq_len=tc.seq_len,
    seed=tc.seed,
    shard_index=jax.process_index(),
    shard_count=jax.process_count(),
  )
  val_batches = eval_batches(
    data.val, batch_size=cfg.eval.batch_size, seq_len=tc.seq_len, num_batches=cfg.eval.num_batches
  )
  checkpointer = Checkpointer(workdir, keep=tc.keep_checkpoints)
  start = checkpointer.latest_step()
  if start is None:
    start = 0
    state = spec.init(jax.random.key(tc.seed))
  else:
    state, data_state = checkpointer.restore(start, spec.abstract)
    iterator.load_state_dict(data_state)
  writer = MetricsWriter(workdir, resume_step=start, enabled=is_main)

  tokens_per_step = tc.batch_size * tc.seq_len
  flops_per_token = training_flops_per_token(model_cfg, tc.seq_len)
  peak = peak_tflops(jax.devices()[0], tc.peak_tflops_per_device)
  say = tqdm.tqdm.write if is_main else (lambda *_: None)

  def evaluate_and_log(at_step: int) -> dict[str, float]:
    values = evaluate(eval_step, state, val_batches, mesh)
    if residual_stats is not None:  # the streams' mixing matrices on the first validation batch
      stats = jax.device_get(
        residual_stats(state.params, state.extra, _global_batch(val_batches[0], mesh, eval_batch=True))
      )
      values.update({f"residual/{k}": v for k, v in stats.items()})
    writer.write(at_step, values)
    return values

  say(
    f"{jax.process_count()} process(es), {jax.device_count()} {jax.devices()[0].platform} device(s), "
    f"mesh {dict(mesh.shape)}, {tokens_per_step:,} tokens per step"
  )
  if start == 0:
    evaluate_and_log(0)
  elif start >= tc.steps:
    say(f"{workdir}: already trained to step {start} (train.steps={tc.steps}); raise train.steps to continue")
  else:
    say(f"resuming from step {start} in {checkpointer.directory}")

  bar = tqdm.tqdm(
    total=tc.steps, initial=start, disable=not (progress and is_main), unit="step", dynamic_ncols=True, mininterval=1.0
  )
  step, pending = start, None
  interval_start, interval_steps = time.perf_counter(), 0
  stopped_early = False

  def check_finite(step_metrics, at_step):
    """Loss, gradient norm and the updated parameters' norm must all be finite."""
    values = {k: float(step_metrics[k]) for k in ("loss", "grad_norm", "param_norm")}
    bad = {k: v for k, v in values.items() if not np.isfinite(v)}
    if bad:
      checkpointer.wait()
      raise TrainingDiverged(
        f"non-finite {bad} at step {at_step}: stopped; the newest checkpoint (step {checkpointer.latest_step()}) "
        f"in {checkpointer.directory} is intact. Lower train.learning_rate or raise train.warmup_steps, then rerun"
      )

  try:
    with _StopRequest() as stop:
      while step < tc.steps:
        batch = _global_batch(next(iterator), mesh)
        state, metrics = train_step(state, batch)
        step += 1
        interval_steps += 1
        if pending is not None:  # one step late, so the host never stalls the device queue
          check_finite(*pending)
        pending = (metrics, step)

        values = {}
        if step == start + 1:  # the first step includes compilation: time throughput from here on
          check_finite(*pending)
          values["compile_and_first_step_s"] = time.perf_counter() - interval_start
          interval_start, interval_steps = time.perf_counter(), 0
        if step % tc.log_every == 0 or step == tc.steps:
          values.update(jax.device_get(metrics))
          values["learning_rate"] = float(schedule(step - 1))
          if interval_steps:
            elapsed = time.perf_counter() - interval_start
            tokens_per_s = interval_steps * tokens_per_step / elapsed
            tflops = flops_per_token * tokens_per_s / jax.device_count() / 1e12
            values.update(
              step_time_s=elapsed / interval_steps, tokens_per_s=tokens_per_s, model_tflops_per_s_per_device=tflops
            )
            if peak is not None:
              values["mfu"] = tflops / peak
            bar.set_postfix(
              loss=f"{values['loss']:.3f}", bpb=f"{float(values['bits_per_byte']):.2f}", tok_s=f"{tokens_per_s:,.0f}"
            )
          interval_start, interval_steps = time.perf_counter(), 0
        if values:
          writer.write(step, values)

        if step % tc.eval_every == 0 or step == tc.steps:
          check_finite(*pending)
          val = evaluate_and_log(step)
          gain = f"  amax_gain {val['residual/amax_gain']:.3f}" if residual_stats is not None else ""
          say(f"step {step}: val_loss {val['val_loss']:.4f}  val_bits_per_byte {val['val_bits_per_byte']:.3f}{gain}")
          interval_start = time.perf_counter()  # keep evaluation out of the throughput figures
        if step % tc.checkpoint_every == 0 or step == tc.steps or stop.requested:
          check_finite(*pending)
          checkpointer.save(step, state, iterator.state_dict())
        bar.update(1)
        if stop.requested:
          stopped_early = step < tc.steps
          say(f"SIGTERM: saved step {step} to {checkpointer.directory}; rerun the same command to resume")
          break
  finally:
    bar.close()
    checkpointer.wait()
    checkpointer.close()
    writer.close()

  if is_main:
    plot.loss_curves(os.path.join(workdir, "metrics.jsonl"), os.path.join(workdir, "loss.png"))
  return TrainResult(state=state, spec=spec, data=data, step=step, stopped_early=stopped_early)
