"""The mHC paper's scale ablations: DeepSeek-V3-style MoE models of about 3B, 9B and 27B
parameters with a plain residual, Hyper-Connections or mHC (n = 4), and its token-scaling
run of the 3B model on 1.05T tokens.

  manifold params  --config experiments/mhc_paper.py:27b,residual=mhc
  manifold compile --config experiments/mhc_paper.py:27b,residual=mhc --topology v5p-32
  manifold train   --config experiments/mhc_paper.py:3b,residual=mhc --workdir gs://...

Arguments (`:key=value,...`): size (3b | 9b | 27b | 3b-1t), residual (plain | hc | mhc);
3b-1t is the 3b model trained on 1.05T tokens.

From the paper's appendix table (Xie et al. 2025, "mHC: Manifold-Constrained
Hyper-Connections", Table 5; the same for all four columns unless listed):

  size   layers  width  heads  experts  expert width  batch  steps    tokens  lr
  3b     12      1280   16     64       896           320    30,000   39.3B   8.6e-4
  9b     18      1920   24     64       1280          512    50,000   105B    5.9e-4
  27b    30      2560   32     72       1536          1280   50,000   262B    4.0e-4
  3b-1t  (as 3b)                                      2560   100,000  1.05T   9.0e-4

  1 leading dense layer; 2 shared + 6 active routed experts; auxiliary-loss-free load
  balancing; MLA with KV rank 512, per-head attention width 128 and RoPE width 64, RoPE
  theta 10,000; RMSNorm with eps 1e-20 (model.norm_eps); vocabulary 129,280; sequence
  4,096; n = 4 streams with gates initialised to 0.01 and t_max = 20 Sinkhorn iterations;
  AdamW (0.9, 0.95) with eps 1e-20 (train.eps) and weight decay 0.1; 2,000 warmup steps,
  then a step schedule that drops the rate to 0.316x at 80% and 0.1x at 90% of training.

  `manifold params` for residual=mhc gives 2.973B / 9.178B / 27.048B main-model
  parameters against the paper's 2.97B / 9.18B / 27.0B, and 612.3M / 1.661B / 4.139B
  active ones without the embedding table against 612M / 1.66B / 4.14B
  (tests/test_paper_configs.py). Cross-checks of the transcription against the table's
  own derived rows: vocabulary parameters (2 x 129,280 x width = 331M / 496M / 662M),
  training tokens (batch x steps x 4,096) and the parameter totals all agree.

Where the paper gives no value, this follows DeepSeek-V3 (and says so here):
  - no query compression (q_lora_rank 0: DeepSeek-V2-Lite at this scale); value head 128;
  - the leading dense layer's FFN width is 8 x the expert width, the width of the FFN a
    token passes through in an MoE layer (2 shared + 6 routed experts);
  - group-limited routing with 8 groups, top 4 of them; routed_scaling_factor 2.5;
    bias update rate 0.001; sequence-wise balance loss weight 1e-4; init std 0.006;
  - one MTP module with loss weight 0.3 (not counted in the parameter totals, as in V3);
  - bfloat16 compute with float32 parameters and optimizer state; gradient clip 1.0;
  - HC's static parts (b_pre, b_post, b_res) get no weight decay, as in the HC paper
    (train/optimizer.py); every other matrix, mHC's phi included, decays.

Not from the paper: the mesh, microbatches and rematerialisation (their fit on v5p
slices: experiments/results/compile/README.md; 3b-1t runs microbatches of the same 8
sequences as 3b, so it needs what 3b needs per chip, but was not compiled itself); the
evaluation batch (3b-1t evaluates on 3b's batches, so the two runs' validation losses
compare); data defaults to the embedded corpus with the byte tokenizer, so point
`data.sources` / `data.tokenizer` at a real corpus and a 129k tokenizer for a real run.
"""

from manifold.config import ConfigError, base_config, parse_arg

MODELS = {  # layers, width, heads, routed experts, expert width
  "3b": (12, 1280, 16, 64, 896),
  "9b": (18, 1920, 24, 64, 1280),
  "27b": (30, 2560, 32, 72, 1536),
}

SIZES = {  # Table 5's columns: model, batch, steps, learning rate
  "3b": ("3b", 320, 30_000, 8.6e-4),
  "9b": ("9b", 512, 50_000, 5.9e-4),
  "27b": ("27b", 1280, 50_000, 4.0e-4),
  "3b-1t": ("3b", 2560, 100_000, 9.0e-4),
}

# Per size: mesh axes (fsdp takes the rest), microbatches (one or two sequences per chip
# each), remat and the expert exchange's capacity factor. 3B and 9B fit a v5p-8 and 27B a
# v5p-32 with these (experiments/results/compile/README.md says what was tried): 9B only with
# the bounded exchange (2 rounds at expert 4), 27B with less memory in one round (at expert 8
# the 4 bounded rounds' buffers took 10 GiB more per chip).
PARALLELISM = {
  "3b": dict(expert=4, microbatches=40, remat="dots", capacity=2.0),
  "9b": dict(expert=4, microbatches=64, remat="full", capacity=2.0),
  "27b": dict(expert=8, microbatches=80, remat="full", capacity=0.0),
  "3b-1t": dict(expert=4, microbatches=320, remat="dots", capacity=2.0),
}


def get_config(arg: str | None = None):
  args = parse_arg(arg, size="3b", residual="mhc")
  if args.size not in SIZES:
    raise ConfigError(f"experiments/mhc_paper.py: size={args.size!r}; use one of {', '.join(SIZES)}")
  if args.residual not in ("plain", "hc", "mhc"):
    raise ConfigError(f"experiments/mhc_paper.py: residual={args.residual!r}; use plain, hc or mhc")
  model, batch, steps, lr = SIZES[args.size]
  layers, width, heads, experts, expert_width = MODELS[model]
  parallel = PARALLELISM[args.size]
  c = base_config()
  c.model.update(
    vocab_size=129_280,
    d_model=width,
    n_layers=layers,
    n_heads=heads,
    n_kv_heads=heads,
    max_seq_len=4096,
    rope_theta=10_000.0,
    norm_eps=1e-20,
    init_std=0.006,
    dtype="bfloat16",
    attention="mla",
    q_lora_rank=0,
    kv_lora_rank=512,
    qk_nope_head_dim=128,
    qk_rope_head_dim=64,
    v_head_dim=128,
    ffn="moe",
    d_ff=8 * expert_width,
    n_routed_experts=experts,
    n_shared_experts=2,
    experts_per_token=6,
    moe_d_ff=expert_width,
    n_group=8,
    topk_group=4,
    routed_scaling_factor=2.5,
    first_k_dense_replace=1,
    mtp_depth=1,
    residual=args.residual,
    streams=4,
    mhc_sinkhorn="exp",
    sinkhorn_iters=20,
    mhc_alpha_init=0.01,
    hc_scale_init=0.01,
    remat=parallel["remat"],
    expert_capacity_factor=parallel["capacity"],
  )
  c.train.update(
    steps=steps,
    batch_size=batch,
    seq_len=4096,
    microbatches=parallel["microbatches"],
    learning_rate=lr,
    warmup_steps=2000,
    lr_schedule="step",
    lr_decay_at="0.8,0.9",
    lr_decay_to="0.316,0.1",
    weight_decay=0.1,
    b1=0.9,
    b2=0.95,
    eps=1e-20,
    grad_clip=1.0,
    router_bias_rate=0.001,
    balance_loss_weight=1e-4,
    mtp_weight=0.3,
    log_every=10,
    eval_every=1000,
    checkpoint_every=1000,
  )
  c.eval.update(batch_size=SIZES[model][1], num_batches=4)
  c.mesh.update(data=1, fsdp=-1, expert=parallel["expert"], tensor=1)
  c.sample.max_new_tokens = 0
  return c


def get_sweep():
  """All twelve: Table 5's four columns by three residual streams."""
  return [f"{size},residual={residual}" for size in SIZES for residual in ("plain", "hc", "mhc")]
