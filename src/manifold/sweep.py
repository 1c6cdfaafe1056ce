"""Runs every variant an experiment file lists in `get_sweep()`, then tabulates and plots them."""

from __future__ import annotations

import inspect
import json
import os
import re
import statistics
import sys
import tempfile
import time
from typing import Any, Callable, Sequence

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from manifold import files  # noqa: E402
from manifold.config import ConfigError, experiment_module, load_config, model_config  # noqa: E402
from manifold.processes import Child, child_env, serialized, stop, stops_on_sigterm  # noqa: E402
from manifold.results import fmt, source_commit, write_results  # noqa: E402
from manifold.train.loop import TrainingDiverged, train  # noqa: E402
from manifold.train.metrics import read_metrics  # noqa: E402

# A logged value is a spike when it tops this multiple of the median of the SPIKE_WINDOW logged
# values before it (training loss; gradient norm).
SPIKE_WINDOW = 10
LOSS_SPIKE_FACTOR = 1.1
GRAD_NORM_SPIKE_FACTOR = 2.0


def _experiment(config_path: str):
  module = experiment_module(config_path)
  if not hasattr(module, "get_sweep"):
    raise ConfigError(f"--config {config_path}: defines no get_sweep(); list the variants to run there")
  return module


def sweep_args(config_path: str, common: str = "") -> list[str]:
  """The config arguments of `get_sweep()` in the experiment file; a `get_sweep(arg)` that
  takes one is given `common`, the arguments every variant shares (it may depend on them)."""
  get_sweep = _experiment(config_path).get_sweep
  takes_arg = bool(inspect.signature(get_sweep).parameters)
  return list(get_sweep(common or None) if takes_arg else get_sweep())


def spikes(values: Sequence[float], factor: float, window: int = SPIKE_WINDOW) -> int:
  """How many of `values` top `factor` times the median of the `window` values before them."""
  return sum(values[i] > factor * statistics.median(values[i - window : i]) for i in range(window, len(values)))


def run_name(arg: str) -> str:
  return re.sub(r"[^A-Za-z0-9_.-]+", "-", arg).strip("-")


def summary_path(workdir: str, arg: str):
  """Where the variant `arg`'s finished run keeps its results row: `<workdir>/<name>/summary.json`."""
  return files.path(workdir) / run_name(arg) / "summary.json"


def summarize(
  run_dir: str, cfg, *, name: str, command: str, wall_time_s: float, diverged: str | None = None
) -> dict[str, Any]:
  """The results-table row of one finished run, or of one the divergence checks stopped
  (`diverged`: why; it has no final validation loss)."""
  import jax

  rows = read_metrics(files.path(run_dir) / "metrics.jsonl")
  val = [r for r in rows if "val_loss" in r]
  train_rows = [r for r in rows if r.get("loss") is not None and r.get("grad_norm") is not None]
  gains = [r["residual/amax_gain"] for r in val if r.get("residual/amax_gain") is not None]
  tokens = [r["tokens_per_s"] for r in rows if r.get("tokens_per_s") is not None]
  return {
    "run": name,
    "seed": cfg.train.seed,
    "residual": cfg.model.residual,
    "diverged": diverged,
    "final_val_loss": None if diverged else val[-1]["val_loss"],
    "final_val_bits_per_byte": None if diverged else val[-1]["val_bits_per_byte"],
    "final_amax_gain": gains[-1] if gains else None,
    "peak_amax_gain": max(gains) if gains else None,
    "tokens": cfg.train.steps * cfg.train.batch_size * cfg.train.seq_len,
    "tokens_per_s": sum(tokens) / len(tokens) if tokens else None,
    "loss_spikes": spikes([r["loss"] for r in train_rows], LOSS_SPIKE_FACTOR),
    "grad_norm_spikes": spikes([r["grad_norm"] for r in train_rows], GRAD_NORM_SPIKE_FACTOR),
    "wall_time_s": wall_time_s,
    "command": command,
    "device": jax.devices()[0].device_kind,
    "commit": source_commit(),
    "validation": [
      {
        "step": r["step"],
        "val_loss": r["val_loss"],
        **{k: r.get(f"residual/{k}") for k in ("amax_gain", "forward_gain", "backward_gain")},
      }
      for r in val
    ],
    "training": [{"step": r["step"], "loss": r["loss"], "grad_norm": r["grad_norm"]} for r in train_rows],
  }


def variant_of(run: str) -> str:
  """A run's sweep argument without its `seed=`: "residual=hc,seed=2" -> "residual=hc"."""
  return ",".join(p for p in run.split(",") if not p.startswith("seed="))


def by_variant(summaries: list[dict[str, Any]], baseline: str | None) -> list[dict[str, Any]]:
  """One row per variant (a sweep argument without its `seed=`): over its seeds the mean and
  spread (sample standard deviation; 0 for one seed) of the final validation loss, and of its
  gap to its baseline's run of the same seed (negative: better than the baseline).

  A variant's baseline is the variant that has every `key=value` of `baseline` and shares the
  most other arguments with it: with baseline "residual=plain", "size=s,residual=hc" is
  compared with "size=s,residual=plain"."""
  groups: dict[str, list[dict]] = {}
  for s in summaries:
    groups.setdefault(variant_of(s["run"]), []).append(s)
  bases = [v for v in groups if baseline and set(baseline.split(",")) <= set(v.split(","))]

  def base_losses(variant: str) -> dict[int, float]:
    if not bases:
      return {}
    base = max(bases, key=lambda b: len(set(b.split(",")) & set(variant.split(","))))
    return {s["seed"]: s["final_val_loss"] for s in groups[base]}

  def mean_and_spread(values):
    return (statistics.mean(values), statistics.stdev(values) if len(values) > 1 else 0.0) if values else (None, None)

  rows = []
  for variant, runs in groups.items():
    finished = [r for r in runs if r["final_val_loss"] is not None]
    loss_mean, loss_spread = mean_and_spread([r["final_val_loss"] for r in finished])
    base = base_losses(variant)
    gaps = [r["final_val_loss"] - base[r["seed"]] for r in finished if base.get(r["seed"]) is not None]
    gap_mean, gap_spread = mean_and_spread(gaps)
    gains = [r["peak_amax_gain"] for r in runs if r["peak_amax_gain"] is not None]
    rows.append(
      {
        "variant": variant,
        "seeds": sorted(r["seed"] for r in runs),
        "diverged": sorted(r["seed"] for r in runs if r["final_val_loss"] is None),
        "val_loss_mean": loss_mean,
        "val_loss_spread": loss_spread,
        "gap_mean": gap_mean if baseline else None,
        "gap_spread": gap_spread if baseline else None,
        "peak_amax_gain": max(gains) if gains else None,
        "loss_spikes": sum(r["loss_spikes"] for r in runs),
        "grad_norm_spikes": sum(r["grad_norm_spikes"] for r in runs),
      }
    )
  return rows


def training_flops(cfg) -> float:
  """A run's model FLOPs, forward and backward, over all its steps (`manifold params`' count)."""
  from manifold.model.accounting import training_flops_per_token

  tokens = cfg.train.steps * cfg.train.batch_size * cfg.train.seq_len
  return training_flops_per_token(model_config(cfg), cfg.train.seq_len) * tokens


def seed_rank(arg: str, sweep: Sequence[str]) -> int:
  """How many runs of `sweep` come before `arg` among those that differ from it only in their
  seed: 0 for a variant's first seed, 1 for its second, ..."""
  same = [other for other in sweep if variant_of(other) == variant_of(arg)]
  return same.index(arg)


def claim(claims: str, arg: str) -> bool:
  """Whether this process is the first to claim variant `arg` in the folder `claims` (an
  exclusive create: atomic on a local disk and on NFS)."""
  try:
    os.close(os.open(os.path.join(claims, run_name(arg)), os.O_CREAT | os.O_EXCL | os.O_WRONLY))
  except FileExistsError:
    return False
  return True


def run_sweep(
  config: str,
  workdir: str,
  results_dir: str,
  overrides: Sequence[str] = (),
  shard: tuple[int, int] | None = None,
  train_missing: bool = True,
  claims: str | None = None,
) -> list[dict[str, Any]] | None:
  """Trains (or resumes) each variant of `config` (`experiments/<name>.py`, or with `:args`
  that go before every variant's, e.g. `:scale=gpu`) in `<workdir>/<name>`, then writes
  results.{json,md}, by_variant.{json,md} where variants have seeds, and curves.png.
  `shard` (i, k): only every k-th variant from the i-th, and no tables (a rerun without it
  writes them from the finished runs). `claims`: a folder the processes of one sweep share;
  this one trains each unfinished variant that it `claim`s there first, and writes no tables.
  It claims every variant's first seed before any variant's second (runs that differ only in
  their seed compile one program, so a later seed finds it in the shared compilation cache
  instead of compiling it beside the first), and within a seed the most training FLOPs first
  (so the longest runs start first and the processes end close together).
  `train_missing=False`: the tables from the finished runs alone; a variant without a summary
  is named and left out.

  Returns the results rows (the shard's, or those this process trained or found finished), or
  None if SIGTERM stopped a run (saved; rerunning resumes).
  """
  config_path, _, common = config.partition(":")
  experiment = _experiment(config_path)
  sweep = sweep_args(config_path, common)
  variants = []  # every variant's config is checked before anything is written
  for arg in sweep:
    spec = f"{config_path}:{common},{arg}" if common else f"{config_path}:{arg}"
    variants.append((arg, spec, load_config(spec, overrides)))
  if shard is not None:
    variants = variants[shard[0] :: shard[1]]
  elif claims is not None:
    variants.sort(key=lambda variant: (seed_rank(variant[0], sweep), -training_flops(variant[2])))
  else:
    files.path(results_dir).mkdir(parents=True, exist_ok=True)
  summaries = []
  for arg, spec, cfg in variants:
    run_dir, summary_file = os.path.join(workdir, run_name(arg)), summary_path(workdir, arg)
    if (saved := files.read_text(summary_file)) is not None:
      summary = json.loads(saved)
      if "training" not in summary:  # written by an older manifold: its metrics give the rest
        known = {k: summary.get(k) for k in ("device", "commit")}  # None: not recorded then
        summary = {
          **summarize(run_dir, cfg, name=arg, command=summary["command"], wall_time_s=summary["wall_time_s"]),
          **known,
        }
        files.write_atomic(summary_file, json.dumps(summary, indent=2))
      summaries.append(summary)
      continue
    if not train_missing:
      print(f"{arg}: not finished in {run_dir}; left out of the tables")
      continue
    if claims is not None and not claim(claims, arg):
      continue  # another process of the sweep trains it
    print(f"=== {spec} -> {run_dir}")
    started, diverged = time.perf_counter(), None
    try:
      if train(cfg, run_dir).stopped_early:  # SIGTERM: the run is saved; leave the rest for the rerun
        print(f"stopped during {spec}; rerun the same command to resume the sweep")
        return None
    except TrainingDiverged as e:  # a result of the sweep (e.g. a learning rate past the stable one)
      diverged = str(e).split(": stopped", 1)[0]
      print(f"{spec} diverged: {diverged}")
    command = " ".join(["manifold train", f"--config {spec}", f"--workdir {run_dir}", *overrides])
    summary = summarize(
      run_dir, cfg, name=arg, command=command, wall_time_s=time.perf_counter() - started, diverged=diverged
    )
    files.write_atomic(summary_file, json.dumps(summary, indent=2))
    summaries.append(summary)
  if shard is not None or claims is not None:
    return summaries
  if not summaries:
    raise ConfigError(f"--workdir {workdir}: no finished run of {config_path} to tabulate; train them first")
  write_results(results_dir, summaries, COLUMNS)
  if any("seed=" in s["run"] for s in summaries):  # runs over seeds: a row per variant too
    write_results(
      results_dir, by_variant(summaries, getattr(experiment, "BASELINE", None)), VARIANT_COLUMNS, name="by_variant"
    )
  plot_sweep(summaries, files.path(results_dir) / "curves.png")
  return summaries


@stops_on_sigterm
def run_sweep_workers(
  config: str,
  workdir: str,
  results_dir: str,
  overrides: Sequence[str] = (),
  workers: int = 2,
  echo: Callable[[str], None] = print,
) -> int:
  """`run_sweep` with `workers` variants training at once, each worker a `manifold sweep
  --claims` process (its log in `<workdir>/worker-<i>/log.txt`; each takes its share of the
  GPUs' memory) that takes the next unclaimed variant (`run_sweep`'s order: first seeds first,
  then the longest) whenever its last ends; then the tables from the finished runs. Returns 0,
  or the first failed worker's exit code (130 after Ctrl-C or SIGTERM: the workers save their
  runs; rerunning resumes)."""
  # variants that differ only in their seed compile once
  env = child_env(workers, compile_cache=os.path.join(os.path.abspath(workdir), "xla_cache"))
  say = serialized(echo)
  command = [sys.executable, "-m", "manifold.cli", "sweep", "--config", config, "--workdir", workdir]
  with tempfile.TemporaryDirectory(prefix="manifold-sweep-claims-") as claims:  # this launch's; a rerun starts afresh
    children = [
      Child(f"worker {i}", [*command, "--claims", claims, *overrides], os.path.join(workdir, f"worker-{i}"), say)
      for i in range(workers)
    ]
    code = _wait_for_workers(children, env, say)
  if code is not None:
    return code
  config_path, _, common = config.partition(":")
  missing = [arg for arg in sweep_args(config_path, common) if not summary_path(workdir, arg).exists()]
  if missing:
    say(f"stopped before {len(missing)} variant(s) finished ({missing[0]}, ...); rerun the same command to resume")
    return 1
  return 0 if run_sweep(config, workdir, results_dir, overrides) is not None else 1


def _wait_for_workers(children: list[Child], env: dict[str, str], say: Callable[[str], None]) -> int | None:
  """Starts `children` (in `env`) and waits for all to end: None when every one exited 0, else the
  sweep's exit code (the first failed worker's, 130 after Ctrl-C); none is left running."""
  try:
    for child in children:
      child.start(env)
    while True:
      codes = [child.poll() for child in children]
      failed = next((child for child, code in zip(children, codes) if code not in (None, 0)), None)
      if failed is not None or None not in codes:
        break
      time.sleep(0.2)
    if failed is not None:
      say(f"{failed.name} failed (exit code {failed.code}; see {failed.workdir}/log.txt); stopping the others")
      stop(children, grace_s=60)
      return failed.code if failed.code > 0 else 1
  except KeyboardInterrupt:
    say("interrupted: stopping the workers (each saves its run; rerun the same command to resume)")
    stop(children, grace_s=60)
    return 130
  finally:
    stop(children, grace_s=10)  # nothing outlives the sweep
  return None


# The sweep table: one row per variant, with the command that trained it.
COLUMNS = [
  ("run", lambda s: s["run"]),
  ("final val loss", lambda s: f"diverged: {s['diverged']}" if s.get("diverged") else fmt(s["final_val_loss"], ".4f")),
  ("final val bits/byte", lambda s: fmt(s["final_val_bits_per_byte"], ".4f")),
  ("final Amax gain", lambda s: fmt(s["final_amax_gain"], ".3f")),
  ("peak Amax gain", lambda s: fmt(s["peak_amax_gain"], ".3f")),
  ("tokens", lambda s: f"{s['tokens']:,}"),
  ("tokens/s", lambda s: fmt(s["tokens_per_s"], ",.0f")),
  ("loss / grad-norm spikes", lambda s: f"{s['loss_spikes']} / {s['grad_norm_spikes']}"),
  ("wall time", lambda s: f"{s['wall_time_s'] / 60:.1f} min"),
  ("device, commit", lambda s: f"{s['device'] or '-'}, {s['commit'] or '-'}"),
  ("command", lambda s: f"`{s['command']}`"),
]


def _mean_spread(mean: float | None, spread: float | None, sign: str) -> str:
  return "-" if mean is None else f"{mean:{sign}.4f} ± {spread:.4f}"


# The table over seeds (by_variant.md): one row per variant.
VARIANT_COLUMNS = [
  ("variant", lambda r: r["variant"]),
  ("seeds", lambda r: ", ".join(map(str, r["seeds"]))),
  ("final val loss: mean ± spread", lambda r: _mean_spread(r["val_loss_mean"], r["val_loss_spread"], "")),
  ("gap to baseline: mean ± spread", lambda r: _mean_spread(r["gap_mean"], r["gap_spread"], "+")),
  ("diverged (seeds)", lambda r: ", ".join(map(str, r["diverged"])) or "-"),
  ("peak Amax gain", lambda r: fmt(r["peak_amax_gain"], ".3f")),
  ("loss / grad-norm spikes (all seeds)", lambda r: f"{r['loss_spikes']} / {r['grad_norm_spikes']}"),
]


def variant_looks(variants: list[str]) -> dict[str, dict[str, Any]]:
  """Each variant's matplotlib colour and line style: tab10's colours, tab20's past 10 variants,
  then tab20's again with another line style per 20 (distinct up to 80 variants)."""
  palette = plt.cm.tab10.colors if len(variants) <= 10 else plt.cm.tab20.colors
  styles = ("-", "--", ":", "-.")
  return {v: {"color": palette[i % len(palette)], "linestyle": styles[i // len(palette) % len(styles)]}
          for i, v in enumerate(variants)}  # fmt: skip


def plot_sweep(summaries: list[dict[str, Any]], out_path: str | os.PathLike) -> int:
  """Validation loss (after step 0, so the runs' differences show) against step, and the
  composite Amax gain where runs have residual streams: every run, one colour and line style per
  variant (`variant_looks`; its seeds share them), a legend entry per variant. Returns how many
  loss curves it drew."""
  variants = list(dict.fromkeys(variant_of(s["run"]) for s in summaries))
  looks = variant_looks(variants)
  with_gain = any(s["validation"][0]["amax_gain"] is not None for s in summaries)
  columns = 3 if with_gain else 2
  legend_rows = -(-len(variants) // columns)
  legend_in = 0.25 * legend_rows + 0.1  # the legend goes under the plots, a row per `columns` variants
  height = 3.8 + legend_in
  fig, axes = plt.subplots(1, 2 if with_gain else 1, figsize=(11 if with_gain else 6, height), squeeze=False)
  ax_loss = axes[0, 0]
  labelled = set()
  for s in summaries:
    rows, variant = s["validation"], variant_of(s["run"])
    style = dict(marker="o", markersize=3, **looks[variant], label=None if variant in labelled else variant)
    labelled.add(variant)
    trained = [r for r in rows if r["step"] > 0]
    ax_loss.plot([r["step"] for r in trained], [r["val_loss"] for r in trained], **style)
    if with_gain and rows[0]["amax_gain"] is not None:
      axes[0, 1].plot([r["step"] for r in rows], [r["amax_gain"] for r in rows], **style)
  ax_loss.set(xlabel="step", ylabel="validation loss (nats/token)", title="validation loss")
  if with_gain:
    axes[0, 1].set(xlabel="step", ylabel="Amax gain of prod H_res", title="composite mixing gain", yscale="log")
  for ax in axes.flat:
    ax.grid(alpha=0.3)
  handles, labels = ax_loss.get_legend_handles_labels()  # every variant has its entry there
  fig.legend(handles, labels, loc="lower center", ncol=columns, fontsize="small", frameon=False)
  fig.tight_layout(rect=(0, legend_in / height, 1, 1))
  with files.atomic_path(out_path) as tmp:
    fig.savefig(tmp, dpi=120, format="png")
  plt.close(fig)
  return len(ax_loss.lines)
