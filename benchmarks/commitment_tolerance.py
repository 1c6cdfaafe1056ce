"""How far a rollout worker's log-probs and an honest recomputation disagree, per compute dtype: the
data behind `manifold.rl.commitment.DEFAULT_TOLERANCE`.

  PYTHONPATH=src:. python benchmarks/commitment_tolerance.py                    # grpo.py:default, 24 batches
  PYTHONPATH=src:. python benchmarks/commitment_tolerance.py --variant tiny --batches 64 --init-std 1.0

For each dtype, a randomly initialised policy of the experiment's model (`--init-std` 0.5 by default:
peaked distributions, with logits the size of a trained model's, not the near-uniform ones of the
default init) makes `--batches` rollout batches the worker's way (`manifold.rl.rollout.make_batch`,
then `manifold.rl.commitment.commit`), and a verifier recomputes each (`commitment._recompute`) over
its own row set: the committed rows and others picked with a fresh salt, in another order and batch
size than the worker's forward, and than the engine's cached decoding that gave behaviour_logp.
Disagreements |delta log-p| (temperature 1) of every committed log-prob, and of the behaviour
log-prob of every completion token of the checked rows; the table gives their max and 99.9th
percentile, and `TOLERANCE_MULTIPLE` x the max rounded up to one significant digit (the defaults in
manifold.rl.commitment are the largest of these over CPU and an H200). It also gives the honest batches
the verifier rejects at the default tolerances (expect none), the sampling test's smallest z (and the
widest limit), and the share of honest rows that repeat a row of an earlier batch (why copies are
judged per batch, not per row).
"""

from __future__ import annotations

import argparse
import hashlib
import math
import time

import jax
import numpy as np
from flax import nnx

from manifold.config import load_config, model_config, task_settings, validate
from manifold.data import load_tokenizer
from manifold.rl import commitment
from manifold.rl.rollout import make_batch, seed_of
from manifold.rl.tasks import get_task
from manifold.store import StoredObject
from manifold.train.state import build_model


def round_up(x: float) -> float:
  """`x` rounded up to one significant digit."""
  e = 10 ** math.floor(math.log10(x))
  return float(f"{math.ceil(x / e * (1 - 1e-9)) * e:.1g}")


def measure(variant: str, dtype: str, batches: int, init_std: float, seed: int) -> dict:
  cfg = load_config(f"experiments/grpo.py:{variant}", [f"--config.model.dtype={dtype}",
                                                       f"--config.model.init_std={init_std}"])  # fmt: skip
  c = validate(cfg)
  rl = c.rl
  task, tokenizer = get_task(rl.task, **task_settings(rl.difficulty)), load_tokenizer(cfg.data.tokenizer)
  model = build_model(model_config(cfg), jax.random.key(seed))
  graphdef, params, extra = nnx.split(model, nnx.Param, ...)
  params, extra = nnx.to_pure_dict(params), nnx.to_pure_dict(extra)
  verifier = commitment.Verifier(c, graphdef, task=task, tokenizer=tokenizer)  # the default tolerances
  commit_d, behaviour_d, zs, rejected, rows_seen, repeats = [], [], [], {}, set(), 0
  began = time.monotonic()
  for i in range(batches):
    parent = hashlib.sha256(f"policy {i}".encode()).hexdigest()
    examples = task.prompts("train", seed_of(c.train.seed, 0, 0, i), rl.prompts_per_step)
    arrays = make_batch(
      model, task, tokenizer, examples, group_size=rl.group_size, max_new_tokens=rl.max_new_tokens,
      temperature=rl.temperature, seq_len=c.train.seq_len, format_weight=rl.format_weight, key=jax.random.key(i),
    )  # fmt: skip
    arrays.update(commitment.commit((graphdef, params, extra), arrays, parent, count=rl.commit_positions,
                                    top_k=rl.commit_top_k))  # fmt: skip
    rows, cols = arrays["commit_rows"], arrays["commit_cols"]
    width = min(2 * rl.commit_positions, len(arrays["tokens"]))
    public = sorted(set(rows.tolist()))
    rest = [r for r in np.random.default_rng(i).permutation(len(arrays["tokens"])).tolist() if r not in public]
    order = rest[: width - len(public)] + public[::-1]  # another row set and order than the worker's
    out = commitment._recompute(
      graphdef, params, extra, arrays["tokens"][order], commitment._row_index(rows, order), cols,
      arrays["commit_ids"], temperature=float(rl.temperature), floor=float(verifier.floor),
    )  # fmt: skip
    token_logp, committed = np.asarray(out[0], np.float64), np.asarray(out[1], np.float64)
    on = arrays["mask"][order].astype(bool)
    commit_d.append(np.abs(committed - arrays["commit_logp"]).reshape(-1))
    behaviour_d.append(np.abs(token_logp - arrays["behaviour_logp"][order])[on])
    obj = StoredObject({"parents": [parent], "meta": {}}, arrays, hashlib.sha256(b"%d" % i).hexdigest(), "")
    verdict = verifier.judge(obj, version=0, worker=0, seq=i, policy=lambda: (params, extra))
    rejected[verdict.reason] = rejected.get(verdict.reason, 0) + (not verdict.ok)
    zs.append((verdict.detail["z"], verdict.detail["z_limit"]))
    hashes = [hashlib.sha256(r.tobytes()).digest() for r in arrays["tokens"]]
    repeats += sum(h in rows_seen for h in hashes)
    rows_seen.update(hashes)
  commit_all, behaviour_all = np.concatenate(commit_d), np.concatenate(behaviour_d)
  return {
    "dtype": dtype,
    "commitment": (commit_all.max(), np.quantile(commit_all, 0.999), commit_all.size),
    "behaviour": (behaviour_all.max(), np.quantile(behaviour_all, 0.999), behaviour_all.size),
    "defaults": (commitment.COMMIT_TOLERANCE[dtype], commitment.BEHAVIOUR_TOLERANCE[dtype]),
    "rejected": {k: v for k, v in rejected.items() if v},
    "z": (min(z for z, _ in zs), max(limit for _, limit in zs)),
    "row_repeats": repeats / (batches * len(arrays["tokens"])),
    "seconds": time.monotonic() - began,
  }


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--variant", default="default", help="experiments/grpo.py variant (default, tiny)")
  parser.add_argument("--batches", type=int, default=24)
  parser.add_argument("--dtypes", default="float32,bfloat16")
  parser.add_argument("--init-std", type=float, default=0.5)
  parser.add_argument("--seed", type=int, default=0)
  args = parser.parse_args()
  m = commitment.TOLERANCE_MULTIPLE
  print(f"grpo.py:{args.variant}, init_std {args.init_std}, {args.batches} batches per dtype, {jax.devices()[0]}")
  print(f"| dtype | what | values | max | p99.9 | x{m} rounded up | default | honest batches rejected | "
        "min z (limit) | honest rows repeating an earlier batch's |")  # fmt: skip
  print("|---|---|---|---|---|---|---|---|---|---|")
  for dtype in args.dtypes.split(","):
    r = measure(args.variant, dtype, args.batches, args.init_std, args.seed)
    rejected = f"{sum(r['rejected'].values())}/{args.batches} {r['rejected'] or ''}"
    for what, default in zip(("commitment", "behaviour"), r["defaults"]):
      top, p999, n = r[what]
      tail = (
        f"{rejected} | {r['z'][0]:.2f} ({r['z'][1]:.2f}) | {r['row_repeats']:.1%} |"
        if what == "commitment"
        else "| | |"
      )
      chosen = round_up(m * top) if top else 0
      print(f"| {dtype} | {what} | {n} | {top:.2e} | {p999:.2e} | {chosen:g} | {default:g} | {tail}")
    print(f"({dtype}: {r['seconds']:.0f} s)", flush=True)


if __name__ == "__main__":
  main()
