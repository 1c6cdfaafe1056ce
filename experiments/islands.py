"""Islands as independent jobs: DiLoCo and Streaming DiLoCo through a store, against data parallel.

Each island is one `manifold train` process; the islands share only a store (README.md,
"Islands across jobs"). On this machine, M islands at once:

  manifold islands --config experiments/islands.py:streaming --workdir runs/islands/streaming --count 2

or one island per machine, every machine pointing at the same bucket:

  manifold train --config experiments/islands.py:streaming --workdir runs/island-0 \\
      --islands.store gs://BUCKET/runs/streaming --islands.id 0

Variants (`:variant[,count=M,steps=S,inner_steps=H]`), all on one small model (4 blocks x 128 wide,
plain multi-head attention, 128-byte context: a few minutes per island on 2 CPU cores), each island
taking `train.batch_size` sequences per step on its own shard of the data:

  dp           the baseline: one job of M x the batch (what M data-parallel islands would compute,
               all-reducing every step); run it with plain `manifold train`, no store
  diloco       DiLoCo: every H steps, float32 outer gradients, Nesterov outer step (lr 0.7, mu 0.9)
  streaming    Streaming DiLoCo: P = 2 fragments of layers, synced at staggered steps
  int4         streaming, with int4 outer gradients and error feedback
  int4_tau1    int4, with the outer update landing one step after it is sent (overlap, mixed 0.5)
  tiny         a seconds-long run for the tests (the quickstart's tiny model, H = 4)

Without `--islands.store` an island variant trains alone (islands.* is ignored).
"""

from manifold.config import ConfigError, base_config, parse_arg, schedule

VARIANTS = ("dp", "diloco", "streaming", "int4", "int4_tau1", "tiny")


def get_config(arg: str | None = None):
  args = parse_arg(arg, variant="streaming", count=2, steps=480, inner_steps=24)
  if args.variant not in VARIANTS:
    raise ConfigError(f"experiments/islands.py: unknown variant {args.variant!r}; use one of {', '.join(VARIANTS)}")
  c = base_config()
  c.islands.update(count=args.count, inner_steps=args.inner_steps, heartbeat_s=1.0, deadline_s=30.0)
  if args.variant == "tiny":
    c.model.update(d_model=64, n_layers=2, n_heads=4, n_kv_heads=2, head_dim=16, d_ff=128, max_seq_len=64)
    c.train.update(steps=24, batch_size=8, seq_len=64, warmup_steps=2, log_every=4, eval_every=12, checkpoint_every=8)
    c.eval.update(batch_size=8, num_batches=2)
    c.islands.update(inner_steps=4, fragments=2, heartbeat_s=0.5, deadline_s=5.0)
    c.sample.max_new_tokens = 0
    return c
  c.model.update(d_model=128, n_layers=4, n_heads=4, n_kv_heads=4, head_dim=32, d_ff=384, max_seq_len=128)
  batch = 8 * (args.count if args.variant == "dp" else 1)
  c.train.update(
    batch_size=batch,
    seq_len=128,
    learning_rate=3e-3,
    **schedule(args.steps, validations=8, checkpoints=4),
    log_every=args.inner_steps // 2 or 1,
  )
  c.eval.update(batch_size=16, num_batches=8)
  c.sample.max_new_tokens = 0
  if args.variant in ("streaming", "int4", "int4_tau1"):
    c.islands.fragments = 2
  if args.variant in ("int4", "int4_tau1"):
    c.islands.update(bits=4, error_feedback=True)
  if args.variant == "int4_tau1":
    c.islands.overlap_steps = 1
  return c
