"""GRPO post-training on integer arithmetic: a learner and rollout workers that meet through a store.

  manifold rl corpus  --config experiments/grpo.py:sft --out runs/grpo/sft-data --count 100000
  manifold train      --config experiments/grpo.py:sft --workdir runs/grpo/sft
  manifold rl local   --config experiments/grpo.py --workdir runs/grpo/rl --workers 2 --init-from runs/grpo/sft

Variants (`:arg`):
  default  a small dense byte-level model (4 blocks x 128, GQA, 64-token context) on two-digit
           additions and subtractions ("47-12="): 16 prompts x 16 samples per batch, asynchronous
           (rollouts up to 2 policy versions old are used, importance weight capped at 2).
  sync     the same, synchronous: every step trains on rollouts of the policy it just published.
  sft      the warm-up `manifold train` run of the same model on `manifold rl corpus` output,
           whose checkpoint `rl.init_from` starts the policy (and its KL reference) from.
  tiny     a seconds-long run for the tests: a 1-block, 32-wide model on one-digit problems, two
           updates per step.
"""

from manifold.config import ConfigError, base_config, parse_arg


def _small_model(c) -> None:
  c.model.update(
    vocab_size=257, d_model=128, n_layers=4, n_heads=4, n_kv_heads=4, head_dim=32, d_ff=384, max_seq_len=64
  )
  c.data.tokenizer = "byte"
  c.rl.update(task="arithmetic", difficulty="digits=2,ops=1,operators=+-")


def get_config(arg: str | None = None):
  args = parse_arg(arg, variant="default")
  c = base_config()
  if args.variant in ("default", "sync"):
    _small_model(c)
    c.train.update(steps=200, seq_len=16, learning_rate=1e-4, warmup_steps=10, grad_clip=1.0, weight_decay=0.0)
    c.train.update(log_every=1, eval_every=20, checkpoint_every=20)
    c.rl.update(
      group_size=16, prompts_per_step=16, max_new_tokens=8, temperature=1.0, format_weight=0.1, heldout_size=256,
      max_staleness=2 if args.variant == "default" else 0, is_cap=2.0, kl_coef=1e-3,
    )  # fmt: skip
  elif args.variant == "sft":
    _small_model(c)
    c.data.update(sources="runs/grpo/sft-data/*.jsonl", val_fraction=0.1)
    c.train.update(steps=2000, batch_size=32, seq_len=64, learning_rate=3e-3, warmup_steps=30)
    c.train.update(log_every=20, eval_every=250, checkpoint_every=250)
    c.eval.update(batch_size=32, num_batches=4)
    c.sample.update(prompt="47-12=", max_new_tokens=8, temperature=0.0)
  elif args.variant == "tiny":
    c.model.update(
      vocab_size=257, d_model=32, n_layers=1, n_heads=2, n_kv_heads=2, head_dim=16, d_ff=64, max_seq_len=16
    )
    c.data.tokenizer = "byte"
    c.train.update(steps=4, seq_len=12, learning_rate=1e-3, warmup_steps=0, log_every=1, eval_every=2)
    c.train.update(checkpoint_every=2, keep_checkpoints=5)
    c.rl.update(
      task="arithmetic", difficulty="digits=1,ops=1", group_size=4, prompts_per_step=2, max_new_tokens=4,
      batches_per_step=2, updates_per_batch=2, heldout_size=4, heartbeat_s=0.5, poll_s=0.05, deadline_s=120.0,
    )  # fmt: skip
  else:
    raise ConfigError(f"experiments/grpo.py: unknown variant {args.variant!r}; use default, sync, sft or tiny")
  return c
