"""Setting a training run up: its workdir, data, mesh, jitted steps, and where it resumes."""

from __future__ import annotations

import dataclasses
import json
import os
import time
from typing import Any, Callable, Protocol

import jax
import jax.numpy as jnp
import numpy as np
import tqdm

from manifold import files
from manifold.config import ConfigError, config_from_json, model_config, validate
from manifold.data import Data, absolute_sources, check_manifest, eval_batches, load_data, write_manifest
from manifold.data.loader import BatchIterator
from manifold.model import ModelConfig
from manifold.model.accounting import training_flops_per_token
from manifold.parallel import sharding
from manifold.parallel.mesh import check_fits, islands_of, make_mesh
from manifold.provenance.data_roots import write_data_roots
from manifold.schema import differences
from manifold.train.checkpoint import Checkpointer
from manifold.train.hardware import peak_tflops
from manifold.train.metrics import MetricsWriter
from manifold.train.optimizer import learning_rate_schedule, make_optimizer
from manifold.train.state import StateSpec, TrainState, make_state_spec
from manifold.train.step import make_eval_step, make_residual_stats_step, make_train_step


def default_cache_dir() -> str:
  return os.environ.get("MANIFOLD_CACHE") or os.path.join(os.path.expanduser("~"), ".cache", "manifold")


def tensorboard_dir(workdir: str, cache_dir: str = "") -> str:
  """Where TensorBoard event files are written as the run goes: `<workdir>/tensorboard`, or for a
  bucket workdir (TensorBoard writes local files) `<cache>/tensorboard/<bucket>/<path>`, copied
  into `<workdir>/tensorboard` when the run ends."""
  if not files.is_remote(workdir):
    return os.path.join(workdir, "tensorboard")
  return os.path.join(cache_dir or default_cache_dir(), "tensorboard", workdir.split("://", 1)[1].strip("/"))


def with_absolute_paths(cfg):
  """A copy of `cfg` whose data.sources entries, data.tokenizer, data.cache_dir, distill.teacher and distill.cache are absolute
  (as a run records them, so `eval` and `generate` work from any directory)."""
  cfg = cfg.copy_and_resolve_references()
  d = cfg.data
  d.sources = absolute_sources(d.sources)
  if d.tokenizer != "byte":
    d.tokenizer = os.fspath(files.path(d.tokenizer))
  if d.cache_dir:
    d.cache_dir = os.path.abspath(os.path.expanduser(d.cache_dir))
  for name in ("teacher", "cache"):
    value = cfg.distill[name]
    if value and not files.is_remote(value):
      cfg.distill[name] = os.path.abspath(os.path.expanduser(value))
  return cfg


def resume_changes(cfg, workdir: str) -> dict[str, list]:
  """`{field: [saved, new]}` for each field `cfg` changes from the run in `workdir` ({} for a
  new run). Raises `ConfigError` naming the first field a resumed run may not change
  (`manifold.schema.Resume`: the model, the data, the data order, clipping on or off)."""
  text = files.read_text(files.path(workdir) / "config.json")
  if text is None:
    return {}
  saved = validate(with_absolute_paths(config_from_json(text)))
  new = validate(cfg)
  changes = {}
  for name, section in new.sections.items():
    for dotted, old, value, rule in differences(saved.sections[name], section):
      if rule.key(old) != rule.key(value):
        why = f"; {rule.why}" if rule.why else ""
        raise ConfigError(
          f"{dotted}={value!r}: {workdir} was trained with {old!r}{why}; use the same value to resume, or a new --workdir"
        )
      changes[dotted] = [old, value]
  return changes


def record_run(cfg, workdir: str, *, step: int, changes: dict[str, list], data: Data | None = None) -> None:
  """Writes config.json (the config of the newest `train` in `workdir`), manifest.json and
  data_roots.json (with `data`), and appends `{step, changes}` to config_history.jsonl when a resume changed fields."""
  root = files.path(workdir)
  root.mkdir(parents=True, exist_ok=True)
  files.write_atomic(root / "config.json", cfg.to_json(indent=2))  # every process of a job writes it
  if jax.process_index() != 0:
    return
  if data is not None:
    tokens = {"train": len(data.train), "val": len(data.val)}
    write_manifest(root / "manifest.json", data.records, tokenizer=data.tokenizer, tokens=tokens)
    d, shards = cfg.distill, []
    if d.teacher and d.mode == "cache":
      from manifold.distill.cache import data_shard

      shards.append(data_shard(d.cache))
    write_data_roots(workdir, data.records, cfg.data.jsonl_field, shards)
  if changes:
    row = {"step": step, "time": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "changes": changes}
    files.append_text(root / "config_history.jsonl", json.dumps(row) + "\n")


def prepare_workdir(cfg, workdir: str) -> None:
  """Checks `cfg` against the run in `workdir` (`resume_changes`) and records it (`record_run`)."""
  cfg = with_absolute_paths(cfg)
  record_run(cfg, workdir, step=0, changes=resume_changes(cfg, workdir))


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


def document_separator(cfg, data: Data) -> int | None:
  """The token that ends a packed document when `train.document_mask` is on (the steps'
  `separator`), else None."""
  return data.tokenizer.eos_id if cfg.train.document_mask else None


def token_byte_table(data: Data, vocab_size: int) -> jax.Array:
  """[V] bytes per token id (ids beyond the tokenizer's vocabulary count 1)."""
  table = np.ones(vocab_size, np.float32)
  table[: data.tokenizer.vocab_size] = data.tokenizer.token_byte_lengths
  return jnp.asarray(table)


def global_batch(local: np.ndarray, mesh, eval_batch: bool = False, batch_sharding=None) -> jax.Array:
  """This process's rows -> one global array sharded over the data axes (or as `batch_sharding` says)."""
  if eval_batch and jax.process_count() > 1:  # every process holds the full eval batch
    rows = local.shape[0] // jax.process_count()
    local = local[jax.process_index() * rows : (jax.process_index() + 1) * rows]
  return jax.make_array_from_process_local_data(batch_sharding or sharding.batch_sharding(mesh), local)


def evaluate(eval_step, state: TrainState, batches: list[np.ndarray], mesh) -> dict[str, float]:
  """Validation loss (nats/token) and bits per byte over fixed batches."""
  totals = {"nats": 0.0, "bytes": 0.0, "tokens": 0.0}
  for batch in batches:
    out = jax.device_get(eval_step(state.params, state.extra, global_batch(batch, mesh, eval_batch=True)))
    totals = {k: totals[k] + float(out[k]) for k in totals}
  return {
    "val_loss": totals["nats"] / totals["tokens"],
    "val_bits_per_byte": totals["nats"] / np.log(2) / totals["bytes"],
  }


class IslandSync(Protocol):
  """How a run meets other islands between steps (manifold.islands builds one)."""

  def after_step(self, state: TrainState, step: int) -> tuple[TrainState, dict[str, float]]:
    """Called after every inner step `step` (1-based); returns the state to continue from
    and metrics to log (bytes sent and received, members, ...)."""

  def close(self) -> None:
    """Stops background work (heartbeats) and waits for writes in flight."""


@dataclasses.dataclass
class Run:
  """Everything the training loop uses, built by `set_up`."""

  cfg: Any  # the ConfigDict
  workdir: str
  model_cfg: ModelConfig
  data: Data
  mesh: jax.sharding.Mesh
  spec: StateSpec
  train_step: Callable  # (state, batch) -> (state, metrics)
  eval_step: Callable
  residual_stats: Callable | None  # streams only
  schedule: Callable[[int], float]
  iterator: BatchIterator
  val_batches: list[np.ndarray]
  checkpointer: Checkpointer
  writer: MetricsWriter
  state: TrainState  # restored or freshly initialised
  start: int  # the step `state` is at
  is_main: bool  # process 0 writes metrics and files
  islands: IslandSync | None = None  # set when the run is one of several islands (manifold.islands)
  batch_sharding: Any = None  # of a training batch, when not `sharding.batch_sharding(mesh)` (islands)

  def say(self, text: str) -> None:
    if self.is_main:
      tqdm.tqdm.write(text)

  def next_batch(self) -> jax.Array:
    return global_batch(next(self.iterator), self.mesh, batch_sharding=self.batch_sharding)

  def evaluate(self, state: TrainState, step: int) -> dict[str, float]:
    """`evaluate` on the run's validation batches (plus, with streams, the mixing statistics
    of the first one), written to the metrics at `step`."""
    values = evaluate(self.eval_step, state, self.val_batches, self.mesh)
    if self.residual_stats is not None:
      first = global_batch(self.val_batches[0], self.mesh, eval_batch=True)
      stats = jax.device_get(self.residual_stats(state.params, state.extra, first))
      values.update({f"residual/{k}": v for k, v in stats.items()})
    self.writer.write(step, values)
    return values


def set_up(cfg, workdir: str, say: Callable[[str], None]) -> Run:
  """Checks `cfg` (config, mesh fit, the run already in `workdir`, data, vocabulary), builds the
  jitted steps, restores the newest checkpoint that restores (or initialises step 0), and only
  then writes to `workdir`. Checkpoints newer than the one restored that do not restore are
  moved to `checkpoints_unreadable/`, unchanged, each with one line through `say`.

  With `mesh.island > 1` the run is that many DiLoCo islands inside the job
  (`manifold.islands.mesh`): the state, train step and batch layout are the islands',
  `Run.islands` runs the outer syncs, and evaluation reads the global model."""
  cfg = with_absolute_paths(cfg)
  typed = validate(cfg)
  tc = cfg.train
  is_main = jax.process_index() == 0
  model_cfg = model_config(cfg)
  mesh = make_mesh(cfg.mesh)
  check_fits(cfg, mesh)
  changes = resume_changes(cfg, workdir)
  store_sync = None
  if cfg.islands.store:  # one island of an independent-jobs run: store, config and id checked here
    from manifold.islands.store_sync import connect

    store_sync = connect(cfg, workdir, say)
  data = load_run_data(cfg)
  check_manifest(files.path(workdir) / "manifest.json", data.tokenizer, data.records)
  tx = make_optimizer(tc)
  in_job = islands_of(cfg.mesh)  # islands inside this job (mesh.island)
  if in_job > 1:
    from manifold.islands import mesh as island_mesh

    spec = island_mesh.make_island_spec(model_cfg, tx, mesh, typed.islands, in_job)
  else:
    spec = make_state_spec(model_cfg, tx, mesh)
  token_bytes, separator = token_byte_table(data, model_cfg.vocab_size), document_separator(cfg, data)
  island, count = (cfg.islands.id, cfg.islands.count) if store_sync else (0, 1)  # islands read disjoint shards
  iterator = BatchIterator(
    data.train,
    batch_size=tc.batch_size * count,
    seq_len=tc.seq_len,
    seed=tc.seed,
    shard_index=island * jax.process_count() + jax.process_index(),
    shard_count=count * jax.process_count(),
  )
  val_batches = eval_batches(
    data.val, batch_size=cfg.eval.batch_size, seq_len=tc.seq_len, num_batches=cfg.eval.num_batches
  )
  reader = Checkpointer(workdir, keep=tc.keep_checkpoints, create=False)
  try:
    restored = reader.restore_newest(spec.abstract)
  finally:
    reader.close()
  start, state = (0, spec.init(jax.random.key(tc.seed))) if restored is None else (restored.step, restored.state)
  if restored is not None:
    iterator.load_state_dict(restored.data)
  if store_sync is not None:  # from the run's newest global parameters, into its next round
    state = store_sync.join(spec, state, start)
  distill_step = None
  if typed.distill.teacher:  # the student's step, with the teacher's distribution as target (teacher checked here)
    from manifold.distill.step import DistillStep

    distill_step = DistillStep(cfg, spec, tx, mesh, token_bytes, data, start, say)
  record_run(cfg, workdir, step=start, changes=changes, data=data)  # every check has passed
  lineage = None
  if typed.provenance.enabled:
    from manifold.provenance.lineage import Lineage, key_path, load_key, newest_manifest

    origin = {"kind": "init", "seed": tc.seed}
    if typed.distill.teacher:
      origin["teacher"] = {"workdir": typed.distill.teacher, "manifest": newest_manifest(typed.distill.teacher)}
    lineage = Lineage(workdir, load_key(key_path(typed, workdir)), origin=origin, say=say)
    lineage.resume(start if restored is not None else None, state)
  checkpointer = Checkpointer(workdir, keep=tc.keep_checkpoints, lineage=lineage)
  for step, why in (restored.skipped if restored else {}).items():
    where = checkpointer.set_aside(step)
    if is_main:
      say(f"checkpoint {step} does not restore ({why}); resuming from step {start}; moved it, unchanged, to {where}")
  sync, batch_sharding = store_sync, None
  if in_job > 1:
    train_step = island_mesh.island_step(island_mesh.make_island_train_step(spec, tx, mesh, token_bytes, tc, separator))
    outer = island_mesh.make_outer_sync(spec, mesh, typed.islands)
    sync = island_mesh.InJobIslands(outer, typed.islands, tc, in_job, start=start)
    batch_sharding = island_mesh.island_batch_sharding(mesh)
  elif distill_step is not None:
    train_step = distill_step
  else:
    train_step = make_train_step(spec, tx, mesh, token_bytes, tc, separator)
  return Run(
    cfg=cfg,
    workdir=workdir,
    model_cfg=model_cfg,
    data=data,
    mesh=mesh,
    spec=spec,
    train_step=train_step,
    eval_step=make_eval_step(spec, mesh, token_bytes, separator),
    residual_stats=make_residual_stats_step(spec, mesh, separator) if model_cfg.residual != "plain" else None,
    schedule=learning_rate_schedule(tc),
    iterator=iterator,
    val_batches=val_batches,
    checkpointer=checkpointer,
    writer=MetricsWriter(
      workdir, resume_step=start, enabled=is_main, say=say, tensorboard_dir=tensorboard_dir(workdir, cfg.data.cache_dir)
    ),
    state=state,
    start=start,
    is_main=is_main,
    islands=sync,
    batch_sharding=batch_sharding,
  )


class Throughput:
  """Step time, tokens/s, model TFLOP/s per device and MFU over the steps since the last reading."""

  def __init__(self, run: Run):
    tc = run.cfg.train
    self.tokens_per_step = tc.batch_size * tc.seq_len
    self.flops_per_token = training_flops_per_token(run.model_cfg, tc.seq_len)
    self.peak = peak_tflops(jax.devices()[0], tc.peak_tflops_per_device)
    self.restart()

  def restart(self) -> None:
    """Starts a new interval (after compilation, evaluation or a reading)."""
    self.started, self.steps = time.perf_counter(), 0

  def elapsed(self) -> float:
    return time.perf_counter() - self.started

  def reading(self) -> dict[str, float]:
    """The interval's figures (none if it has no steps); starts the next interval."""
    values = {}
    if self.steps:
      elapsed = self.elapsed()
      tokens_per_s = self.steps * self.tokens_per_step / elapsed
      tflops = self.flops_per_token * tokens_per_s / jax.device_count() / 1e12
      values = dict(step_time_s=elapsed / self.steps, tokens_per_s=tokens_per_s, model_tflops_per_s_per_device=tflops)
      if self.peak is not None:
        values["mfu"] = tflops / self.peak
    self.restart()
    return values
