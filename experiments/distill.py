"""Distillation: the quickstart's DeepSeek-style model as teacher, a ~5x smaller dense student.

  manifold train   --config experiments/distill.py:teacher --workdir runs/distill/teacher
  manifold train   --config experiments/distill.py:scratch --workdir runs/distill/scratch
  manifold distill --config experiments/distill.py:logit --teacher runs/distill/teacher --workdir runs/distill/logit
  manifold distill cache --config experiments/distill.py:logit_cache --teacher runs/distill/teacher --out runs/distill/cache
  manifold distill --config experiments/distill.py:logit_cache --teacher runs/distill/teacher \
      --config.distill.cache=runs/distill/cache --workdir runs/distill/logit_cache
  manifold distill generate --config experiments/distill.py:sequence --teacher runs/distill/teacher --out runs/distill/gen
  manifold train   --config experiments/distill.py:sequence --workdir runs/distill/sequence \
      --config.data.sources='runs/distill/gen/*.jsonl'
  manifold distill --config experiments/distill.py:on_policy --teacher runs/distill/teacher --workdir runs/distill/on_policy

(`python experiments/distill_table.py` runs all of them and writes the table.)

Variants (`:variant[,size=tiny]`):
  teacher      experiments/quickstart.py's model (MLA, DeepSeekMoE, MTP, mHC; 1.6M parameters without
               MTP) trained 4x longer than the quickstart
  scratch      the student (4 blocks x 64 wide, GQA, dense SwiGLU, plain residual; 0.29M parameters)
               on the data alone; every student trains train.steps x batch x seq_len tokens
  logit        online logit distillation: w * T^2 * KL(teacher || student) + (1 - w) * CE, w = 0.9, T = 1
  logit_cache  the same from the teacher's top-k cache
  sequence     the student trains on the teacher's samples (`manifold distill generate`)
  on_policy    the student samples, the teacher scores, per-token reverse KL (GKD, lambda = 1)
size=tiny shrinks every model and run to seconds, and caches all V log-probs (k = V: the cached run
must equal the online one; the tests and the notebook check use it).
"""

import os

from manifold.config import ConfigError, base_config, experiment_module, parse_arg

VARIANTS = ("teacher", "scratch", "logit", "logit_cache", "sequence", "on_policy")


def _quickstart():
  """experiments/quickstart.py, the teacher's one definition."""
  return experiment_module(os.path.join(os.path.dirname(__file__), "quickstart.py"))


def get_config(arg: str | None = None):
  args = parse_arg(arg, variant="scratch", size="default")
  if args.variant not in VARIANTS:
    raise ConfigError(f"experiments/distill.py: unknown variant {args.variant!r}; use one of {', '.join(VARIANTS)}")
  if args.size not in ("default", "tiny"):
    raise ConfigError(f"experiments/distill.py: size={args.size!r}; use default or tiny")
  tiny = args.size == "tiny"
  c = base_config()
  if args.variant == "teacher":
    c = _quickstart().get_config("tiny" if tiny else None)
    c.train.steps *= 4
    c.train.update(eval_every=c.train.steps // 4, checkpoint_every=c.train.steps // 4)
    c.sample.max_new_tokens = 0
    return c
  if tiny:
    c.model.update(d_model=32, n_layers=1, n_heads=2, n_kv_heads=1, head_dim=16, d_ff=64, max_seq_len=64)
    c.train.update(steps=12, batch_size=8, seq_len=64, warmup_steps=2, log_every=4, eval_every=6, checkpoint_every=6)
    c.eval.update(batch_size=8, num_batches=2)
    c.distill.update(prompt_tokens=16, max_new_tokens=48, prompts=64, samples_per_prompt=4,
                     top_k=c.model.vocab_size, generate_batch=128, min_new_tokens=1)  # fmt: skip
  else:
    c.model.update(
      d_model=64, n_layers=4, n_heads=4, n_kv_heads=2, head_dim=16, attention="gqa", ffn="dense", d_ff=256,
      residual="plain", mtp_depth=0, max_seq_len=128,
    )  # fmt: skip
    c.train.update(steps=360, batch_size=16, seq_len=128, learning_rate=3e-3, warmup_steps=20)
    c.train.update(eval_every=120, checkpoint_every=120)
    c.distill.update(prompt_tokens=32, max_new_tokens=96, prompts=2048, samples_per_prompt=4, top_k=32)
  c.sample.max_new_tokens = 0
  if args.variant in ("logit", "logit_cache"):
    c.distill.update(mode="online" if args.variant == "logit" else "cache", weight=0.9, temperature=1.0)
  elif args.variant == "on_policy":
    c.distill.update(mode="on_policy", divergence="reverse_kl", weight=1.0)
  return c
