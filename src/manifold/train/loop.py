"""The training loop: steps, logging, evaluation, checkpoints, and stopping cleanly.

Setting a run up (workdir, data, mesh, jitted steps, resume) lives in `run.py`.
"""

from __future__ import annotations

import dataclasses
import os
import signal
import time

import jax
import tqdm

from manifold import files
from manifold.data import Data
from manifold.train import plot
from manifold.train.divergence import DivergenceCheck
from manifold.train.run import Run, Throughput, set_up
from manifold.train.state import StateSpec, TrainState


class TrainingDiverged(RuntimeError):
  """The run diverged (`DivergenceCheck`); no checkpoint was written past the last healthy step."""


@dataclasses.dataclass
class TrainResult:
  state: TrainState
  spec: StateSpec
  data: Data
  step: int  # reached
  start: int  # resumed from
  steps: int  # train.steps
  minutes: float
  workdir: str
  interrupted_by: str | None  # "SIGINT" or "SIGTERM": saved at `step` and left

  @property
  def stopped_early(self) -> bool:
    """A signal stopped the run before train.steps (it saved; rerunning resumes)."""
    return self.interrupted_by is not None and self.step < self.steps

  @property
  def exit_code(self) -> int:
    """130 after Ctrl-C (the shell's convention), else 0."""
    return 130 if self.interrupted_by == "SIGINT" else 0

  def summary(self) -> str:
    """One line: how far the run got in this invocation, and where its results are."""
    if self.interrupted_by is not None:
      return (
        f"stopped at step {self.step} of {self.steps} by {self.interrupted_by} after {self.minutes:.1f} min; "
        f"saved step {self.step} in {os.path.join(self.workdir, 'checkpoints')}; rerun the same command to resume"
      )
    done = f"{self.step - self.start} steps in {self.minutes:.1f} min" if self.step > self.start else "nothing to do"
    return (
      f"trained to step {self.step} of {self.steps} ({done}); metrics: {os.path.join(self.workdir, 'metrics.jsonl')}, "
      f"curve: {os.path.join(self.workdir, 'loss.png')}"
    )


class _StopRequest:
  """Turns SIGTERM and SIGINT (Ctrl-C) into a flag the loop checks between steps; a second
  Ctrl-C interrupts at once."""

  SIGNALS = (signal.SIGTERM, signal.SIGINT)

  def __init__(self):
    self.signal: str | None = None
    self._previous = {}

  def __enter__(self):
    self._previous = {s: signal.signal(s, self._handle) for s in self.SIGNALS}
    return self

  def _handle(self, signum, frame):
    if self.signal is not None and signum == signal.SIGINT:
      raise KeyboardInterrupt
    self.signal = signal.Signals(signum).name

  def __exit__(self, *exc):
    for s, previous in self._previous.items():
      signal.signal(s, previous)


class _Guard:
  """Runs `DivergenceCheck` on every step's metrics once, in step order, and stops the run
  with `TrainingDiverged` before a diverged state is checkpointed."""

  def __init__(self, run: Run):
    self.run = run
    self.check = DivergenceCheck(run.cfg.train)
    self.checked = run.start  # the last step whose metrics passed

  def __call__(self, metrics, step: int, *, saving: bool = False) -> None:
    if step > self.checked:
      self.checked = step
      self._stop_if(self.check.update(*(float(metrics[k]) for k in ("loss", "grad_norm", "param_norm"))), step)
    if saving:
      self._stop_if(self.check.before_save(), step)

  def _stop_if(self, reason: str | None, step: int) -> None:
    if reason is None:
      return
    checkpointer = self.run.checkpointer
    checkpointer.wait()
    latest = checkpointer.latest_step()
    kept = f"the newest checkpoint (step {latest}) in {checkpointer.directory} is intact"
    kept = kept if latest is not None else "no checkpoint was written"
    raise TrainingDiverged(
      f"{reason} at step {step}: stopped; {kept}. Lower train.learning_rate or raise train.warmup_steps, then rerun "
      "(train.spike_factor, train.param_norm_factor and train.grad_norm_floor set the checks; 0 turns one off)"
    )


def _announce(run: Run) -> None:
  tc, mesh = run.cfg.train, run.mesh
  run.say(
    f"{jax.process_count()} process(es), {jax.device_count()} {jax.devices()[0].platform} device(s), "
    f"mesh {dict(mesh.shape)}, {tc.batch_size * tc.seq_len:,} tokens per step"
  )
  if run.start >= tc.steps:
    run.say(
      f"{run.workdir}: already trained to step {run.start} (train.steps={tc.steps}); raise train.steps to continue"
    )
  elif run.start:
    run.say(f"resuming from step {run.start} in {run.checkpointer.directory}")


def train(cfg, workdir: str, *, progress: bool = True) -> TrainResult:
  """Trains `cfg` in `workdir`, resuming from its newest checkpoint that restores, if any.

  SIGTERM and SIGINT, from before the first compilation on, save a checkpoint at the next
  step boundary and return (`TrainResult.interrupted_by`).
  """
  started = time.perf_counter()
  is_main = jax.process_index() == 0
  run = set_up(cfg, workdir, say=lambda text: tqdm.tqdm.write(text) if is_main else None)
  tc = run.cfg.train
  bar = tqdm.tqdm(
    total=tc.steps, initial=run.start, disable=not (progress and run.is_main), unit="step", dynamic_ncols=True,
    mininterval=1.0,
  )  # fmt: skip
  state, step = run.state, run.start
  try:
    with _StopRequest() as stop:  # before the first compilation
      _announce(run)
      if run.start == 0:
        run.evaluate(run.state, 0)
      guard, pending, meter = _Guard(run), None, Throughput(run)
      while step < tc.steps:
        state, metrics = run.train_step(state, run.next_batch())
        step += 1
        meter.steps += 1
        if pending is not None:  # one step late, so the host never stalls the device queue
          guard(*pending)
        pending = (metrics, step)
        values = {}
        if run.islands is not None:
          state, values = run.islands.after_step(state, step)
        if step == run.start + 1:  # the first step includes compilation: time throughput from here on
          guard(*pending)
          values["compile_and_first_step_s"] = meter.elapsed()
          meter.restart()
        if step % tc.log_every == 0 or step == tc.steps:
          values.update(jax.device_get(metrics), learning_rate=float(run.schedule(step - 1)), **meter.reading())
          if "tokens_per_s" in values:
            shown = {"loss": f"{values['loss']:.3f}", "tok_s": f"{values['tokens_per_s']:,.0f}"}
            if "bits_per_byte" in values:  # not on a distilled student's own samples
              shown["bpb"] = f"{float(values['bits_per_byte']):.2f}"
            bar.set_postfix(shown)
        if values:
          run.writer.write(step, values)
        if step % tc.eval_every == 0 or step == tc.steps:
          guard(*pending)
          val = run.evaluate(state, step)
          gain = f"  amax_gain {val['residual/amax_gain']:.3f}" if run.residual_stats is not None else ""
          run.say(
            f"step {step}: val_loss {val['val_loss']:.4f}  val_bits_per_byte {val['val_bits_per_byte']:.3f}{gain}"
          )
          run.writer.flush()
          meter.restart()  # keep evaluation out of the throughput figures
        if step % tc.checkpoint_every == 0 or step == tc.steps or stop.signal:
          guard(*pending, saving=True)
          run.checkpointer.save(step, state, run.iterator.state_dict())
          run.writer.flush()
        bar.update(1)
        if stop.signal:
          run.say(f"{stop.signal}: saved step {step} to {run.checkpointer.directory}; rerun the same command to resume")
          break
  finally:
    bar.close()
    if run.islands is not None:
      run.islands.close()
    run.checkpointer.wait()
    run.checkpointer.close()
    run.writer.close()
  if run.is_main:
    plot.loss_curves(files.path(workdir) / "metrics.jsonl", files.path(workdir) / "loss.png")
  return TrainResult(
    state=state,
    spec=run.spec,
    data=run.data,
    step=step,
    start=run.start,
    steps=tc.steps,
    minutes=(time.perf_counter() - started) / 60,
    workdir=workdir,
    interrupted_by=stop.signal,
  )
