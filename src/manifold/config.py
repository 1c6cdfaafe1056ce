"""The configuration: one frozen dataclass per section, experiment loading with overrides.

Each section (`model`, `data`, `train`, `eval`, `mesh`, `sample`) is a dataclass whose
fields declare their default, one-line doc and check (`manifold.schema`); `SECTIONS` lists
them, and adding a field is one line in its dataclass. Every experiment file in
`experiments/` defines `get_config(arg) -> ConfigDict` starting from `base_config()`,
which is built from the dataclasses; `load_config` reads `path[:arg]` plus
`--config.a.b=v` overrides (ml_collections' own parser) and `validate` rebuilds the
dataclasses from the result, so a bad value is one `ConfigError` line that names the
field, the value and what is allowed.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import json
import math
import os
from typing import Any, Sequence

import ml_collections
from absl import flags
from ml_collections import config_flags

from manifold.distill.losses import DIVERGENCES
from manifold.model.config import ModelConfig
from manifold.schema import (
  FIXED,
  FREE,
  NONEMPTY,
  NONNEGATIVE,
  NONNEGATIVE_FLOAT,
  OPEN_UNIT,
  POSITIVE,
  POSITIVE_FLOAT,
  UNIT,
  Check,
  ConfigError,
  Resume,
  Section,
  field,
  floats,
  one_of,
  require,
)

__all__ = [
  "ConfigError",
  "Config",
  "SECTIONS",
  "base_config",
  "schedule",
  "load_config",
  "validate",
  "model_config",
  "config_from_json",
]

_BELOW_ONE = Check(lambda v: 0 <= v < 1, "a number in [0, 1)")
_FRACTIONS = Check(
  lambda v: floats(v) is not None and all(0 < f < 1 for f in floats(v)),
  "comma-separated fractions in (0, 1), e.g. '0.8,0.9'",
)
_MULTIPLES = Check(
  lambda v: floats(v) is not None and all(0 <= f <= 1 for f in floats(v)),
  "comma-separated multiples in [0, 1], e.g. '0.316,0.1'",
)
_MESH_AXIS = Check(lambda v: v > 0 or v == -1, "a positive integer or -1")
_FACTOR = Check(lambda v: v == 0 or (math.isfinite(v) and v > 1), "0 (off) or a finite number > 1")


@dataclasses.dataclass(frozen=True)
class DataConfig(Section):
  SECTION = "data"

  sources: str = field("stdlib", '"stdlib" or comma-separated files / globs (.jsonl reads `jsonl_field`)', NONEMPTY)
  tokenizer: str = field("byte", '"byte" or a tokenizer.json from `manifold tokenizer train`', NONEMPTY)
  jsonl_field: str = field("text", "the field of each .jsonl line that holds a document", NONEMPTY)
  val_fraction: float = field(0.02, "share of files held out for validation (split by file hash)", OPEN_UNIT)
  cache_dir: str = field("", 'tokenized-data cache; "" means $MANIFOLD_CACHE or ~/.cache/manifold', resume=FREE)


@dataclasses.dataclass(frozen=True)
class TrainConfig(Section):
  """A resumed run may change every field but those whose `resume` says otherwise: the data
  order (`seed`, `seq_len`) and clipping on or off (it is part of the optimizer state)."""

  SECTION = "train"
  RESUME = FREE

  seed: int = field(0, "parameter initialisation and data order", NONNEGATIVE, resume=FIXED)
  steps: int = field(1000, "optimizer steps", POSITIVE)
  batch_size: int = field(32, "global batch, in sequences", POSITIVE)
  seq_len: int = field(256, "tokens per sequence; <= model.max_seq_len", POSITIVE, resume=FIXED)
  microbatches: int = field(1, "gradient accumulation: the batch runs as this many equal slices", POSITIVE)
  document_mask: bool = field(
    False,
    "packed documents attend only within themselves (split at end-of-text; positions restart); "
    "DeepSeek-V3 trained without (off)",
  )
  learning_rate: float = field(3e-3, "peak learning rate", POSITIVE_FLOAT)
  warmup_steps: int = field(100, "linear warmup steps", NONNEGATIVE)
  lr_schedule: str = field(
    "cosine", "cosine | step (DeepSeek: constant, then drops at lr_decay_at)", one_of("cosine", "step")
  )
  min_lr_ratio: float = field(0.1, "cosine decays to learning_rate * min_lr_ratio", UNIT)
  lr_decay_at: str = field("0.8,0.9", "step: fractions of train.steps where the rate drops ...", _FRACTIONS)
  lr_decay_to: str = field("0.316,0.1", "step: ... to these multiples of learning_rate", _MULTIPLES)
  weight_decay: float = field(0.1, "AdamW weight decay (matrices only)", NONNEGATIVE_FLOAT)
  b1: float = field(0.9, "AdamW beta1", _BELOW_ONE)
  b2: float = field(0.95, "AdamW beta2", _BELOW_ONE)
  eps: float = field(1e-8, "AdamW epsilon (the mHC paper: 1e-20)", POSITIVE_FLOAT)
  moments_dtype: str = field(
    "float32",
    "AdamW moments as stored: float32 | bfloat16 (half their memory and traffic; the update computes in float32)",
    one_of("float32", "bfloat16"),
    resume=FIXED,
  )
  grad_clip: float = field(
    1.0,
    "global-norm clip; 0 disables",
    NONNEGATIVE_FLOAT,
    resume=Resume(lambda v: v > 0, "clipping on (> 0) or off (0) is part of the optimizer state"),
  )
  log_every: int = field(10, "steps between metrics rows", POSITIVE)
  eval_every: int = field(200, "steps between validation runs", POSITIVE)
  checkpoint_every: int = field(200, "steps between checkpoints", POSITIVE)
  keep_checkpoints: int = field(3, "newest checkpoints kept", POSITIVE)
  peak_tflops_per_device: float = field(0.0, "for MFU; 0 looks the device kind up", NONNEGATIVE_FLOAT)
  router_bias_rate: float = field(0.001, "moe: gamma of auxiliary-loss-free balancing", NONNEGATIVE_FLOAT)
  mtp_weight: float = field(0.3, "lambda: the MTP loss term is lambda / D * sum_k CE_k", NONNEGATIVE_FLOAT)
  balance_loss_weight: float = field(1e-4, "moe: alpha of the sequence-wise balance loss", NONNEGATIVE_FLOAT)
  spike_factor: float = field(
    3.0, "divergence: stop if the loss tops this multiple of its median over divergence_window steps; 0: off", _FACTOR
  )
  param_norm_factor: float = field(
    10.0, "divergence: stop if the parameter norm tops this multiple of its median, likewise; 0: off", _FACTOR
  )
  divergence_window: int = field(20, "steps of history the loss-spike and parameter-norm checks use", POSITIVE)
  grad_norm_floor: float = field(
    1e-6,
    "divergence: stop if the gradient norm stays below this while the loss does not fall; 0: off",
    NONNEGATIVE_FLOAT,
  )
  collapse_steps: int = field(3, "steps below grad_norm_floor that stop a run (a checkpoint step: one)", POSITIVE)

  def check(self) -> None:
    require(
      self.warmup_steps < self.steps, f"train.warmup_steps={self.warmup_steps}: must be < train.steps={self.steps}"
    )
    require(
      self.batch_size % self.microbatches == 0,
      f"train.microbatches={self.microbatches}: must divide train.batch_size={self.batch_size}",
    )
    require(
      self.lr_schedule != "step" or all(f * self.steps > self.warmup_steps for f in floats(self.lr_decay_at)),
      f"train.lr_decay_at={self.lr_decay_at!r}: every drop must come after train.warmup_steps={self.warmup_steps} "
      f"of train.steps={self.steps}",
    )
    require(
      len(floats(self.lr_decay_at)) == len(floats(self.lr_decay_to)),
      f"train.lr_decay_to={self.lr_decay_to!r}: give one multiple per train.lr_decay_at={self.lr_decay_at!r} fraction",
    )


@dataclasses.dataclass(frozen=True)
class EvalConfig(Section):
  SECTION = "eval"
  RESUME = FREE

  batch_size: int = field(32, "validation batch, in sequences", POSITIVE)
  num_batches: int = field(8, "validation batches per evaluation", POSITIVE)


@dataclasses.dataclass(frozen=True)
class DcnConfig(Section):
  """Factors of each axis across TPU slices / GPU nodes (see manifold/parallel/mesh.py)."""

  SECTION = "mesh.dcn"
  RESUME = FREE

  data: int = field(1, "data-parallel factor across slices / nodes", POSITIVE)
  fsdp: int = field(1, "fsdp factor across slices / nodes", POSITIVE)
  expert: int = field(1, "expert-parallel factor across slices / nodes", POSITIVE)
  tensor: int = field(1, "tensor-parallel factor across slices / nodes (keep 1)", POSITIVE)


@dataclasses.dataclass(frozen=True)
class MeshConfig(Section):
  """Axis sizes within a slice / node (-1 takes the remaining devices)."""

  SECTION = "mesh"
  RESUME = FREE  # checkpoints restore onto any mesh

  island: int = field(
    1,
    "DiLoCo islands inside one job (the outermost mesh axis, across slices / nodes where there are several; "
    "`islands` section); 1: off",
    POSITIVE,
    resume=Resume(lambda v: v, "a checkpoint holds one copy of the train state per island"),
  )
  data: int = field(-1, "data parallelism", _MESH_AXIS)
  fsdp: int = field(1, "ZeRO-3 parameter and optimizer sharding", _MESH_AXIS)
  expert: int = field(1, "expert parallelism (a data axis outside the routed experts)", _MESH_AXIS)
  tensor: int = field(1, "tensor parallelism over heads and FFN width", _MESH_AXIS)
  dcn: DcnConfig = field(DcnConfig(), "factors across slices / nodes")

  def check(self) -> None:
    free = [a for a in ("data", "fsdp", "expert", "tensor") if getattr(self, a) == -1]
    require(len(free) <= 1, f"mesh: at most one axis may be -1, got {', '.join('mesh.' + a for a in free)}")


@dataclasses.dataclass(frozen=True)
class SampleConfig(Section):
  SECTION = "sample"
  RESUME = FREE

  prompt: str = field("def ", "the text generation continues", NONEMPTY)
  max_new_tokens: int = field(200, "tokens to generate", NONNEGATIVE)
  temperature: float = field(0.8, "softmax temperature; 0 is greedy", NONNEGATIVE_FLOAT)
  top_k: int = field(0, "keep the k likeliest tokens; 0 keeps all", NONNEGATIVE)
  top_p: float = field(0.95, "nucleus sampling mass", Check(lambda v: 0 < v <= 1, "a number in (0, 1]"))
  seed: int = field(0, "sampling seed", NONNEGATIVE)


_BITS = Check(lambda v: v in (4, 8, 32), "4, 8 or 32 (int4, int8 or float32 outer gradients)")


@dataclasses.dataclass(frozen=True)
class IslandsConfig(Section):
  """DiLoCo across islands (manifold/islands): groups of devices that each run `inner_steps`
  AdamW steps on their own data, then meet through an outer step. Inside one job the islands
  are the `mesh.island` axis; as independent jobs they share only `store`. Every island of a
  run must agree on these fields but `id` (and the store refuses one that does not)."""

  SECTION = "islands"

  count: int = field(
    1, "islands of an independent-jobs run (store set); in one job, mesh.island is the count", POSITIVE
  )
  store: str = field(
    "", 'the store URL islands meet through (file:///..., gs://..., s3://...); "": one job', resume=FREE
  )
  id: int = field(-1, "this island's id in [0, count) (store set)", resume=FREE)
  inner_steps: int = field(100, "H: inner AdamW steps between outer steps of a fragment", POSITIVE)
  outer_learning_rate: float = field(0.7, "outer Nesterov SGD learning rate (DiLoCo paper: 0.7)", POSITIVE_FLOAT)
  outer_momentum: float = field(0.9, "outer Nesterov momentum (DiLoCo paper: 0.9)", _BELOW_ONE)
  fragments: int = field(1, "P: Streaming DiLoCo fragments of layers, synced at staggered steps; 1: DiLoCo", POSITIVE)
  fragment_pattern: str = field(
    "strided", "layers to fragments: strided (i mod P) or sequential", one_of("strided", "sequential")
  )
  overlap_steps: int = field(
    0, "tau: a fragment's outer update lands this many inner steps after it is sent", NONNEGATIVE
  )
  mix_alpha: float = field(0.5, "with overlap: params <- alpha * local + (1 - alpha) * outer", UNIT)
  bits: int = field(32, "outer-gradient quantisation: 4, 8 or 32", _BITS)
  quant_block: int = field(128, "values per absmax scale when quantising", POSITIVE)
  error_feedback: bool = field(False, "carry each island's quantisation error into its next outer gradient")
  heartbeat_s: float = field(2.0, "store: seconds between an island's heartbeats", POSITIVE_FLOAT, resume=FREE)
  deadline_s: float = field(
    60.0, "store: an island silent this long is dropped from the round", POSITIVE_FLOAT, resume=FREE
  )
  snapshot_every: int = field(
    10,
    "store: rounds between the leader's full float32 snapshots of a fragment's global parameters and outer "
    "momentum (for joiners and a new leader); 1: every round",
    POSITIVE,
  )
  aggregate: str = field(
    "mean",
    "store: how the round's leader combines the deltas it kept (manifold/islands/robust.py): mean (token-weighted) "
    "| trimmed_mean | median (coordinate-wise, unweighted)",
    one_of("mean", "trimmed_mean", "median"),
  )
  trim: float = field(
    0.25,
    "trimmed_mean: share of the islands dropped at each end per coordinate (floor(trim x n))",
    Check(lambda v: 0 <= v < 0.5, "a number in [0, 0.5)"),
  )
  max_norm_ratio: float = field(
    10.0,
    "store: the leader rejects a delta whose L2 norm is > this x the median of the other islands' (honest runs: "
    "0.81-1.30); 0: off",
    _FACTOR,
  )
  min_cosine: float = field(
    0.0,
    "store: the leader rejects a delta whose cosine to the coordinate-wise median of the round's deltas is < this "
    "(with 3 or more; honest runs: 0.68-0.98); -1: off",
    Check(lambda v: -1 <= v <= 1, "a number in [-1, 1]"),
  )

  def check(self) -> None:
    require(
      self.store == "" or 0 <= self.id < self.count,
      f"islands.id={self.id}: must be in [0, islands.count={self.count}) when islands.store is set",
    )
    require(
      self.overlap_steps < self.inner_steps // self.fragments,
      f"islands.overlap_steps={self.overlap_steps}: must be < islands.inner_steps / islands.fragments "
      f"= {self.inner_steps // self.fragments} (a fragment's update lands before its next send)",
    )
    require(
      self.inner_steps % self.fragments == 0,
      f"islands.fragments={self.fragments}: must divide islands.inner_steps={self.inner_steps} (staggered offsets)",
    )


_GROUP = Check(lambda v: v >= 2, "an integer >= 2 (a group of one has no baseline to compare against)")


def task_settings(text: str) -> dict[str, Any]:
  """'digits=2,ops=1' -> {'digits': 2, 'ops': 1} (integers where they parse, else strings); a
  ConfigError naming `rl.difficulty` for an item without '='."""
  out: dict[str, Any] = {}
  for item in filter(None, (part.strip() for part in text.split(","))):
    key, sep, value = item.partition("=")
    require(bool(sep and key), f"rl.difficulty={text!r}: items must be name=value, e.g. 'digits=2,ops=1'")
    try:
      out[key.strip()] = int(value)
    except ValueError:
      out[key.strip()] = value.strip()
  return out


@dataclasses.dataclass(frozen=True)
class RLConfig(Section):
  """GRPO post-training (manifold/rl): a learner and rollout workers that meet only through
  `store`. The learner's steps, learning rate, logging, evaluation and checkpoint cadence are
  train.*; a learner step trains on `batches_per_step` rollout batches of `prompts_per_step`
  prompts x `group_size` completions each. Workers must run the learner's model and rollout
  settings (`manifold.rl.protocol.WORKER_FIELDS`); the store refuses one that does not."""

  SECTION = "rl"
  RESUME = FREE

  task: str = field("arithmetic", "arithmetic | sort | reverse (manifold/rl/tasks.py)")
  difficulty: str = field("digits=2,ops=1", "the task's settings as name=value,... (e.g. digits, ops; length)")
  format_weight: float = field(0.0, "reward bonus for a well-formed answer line, right or wrong", NONNEGATIVE_FLOAT)
  group_size: int = field(8, "G: completions sampled per prompt (advantages are normalised within a group)", _GROUP)
  prompts_per_step: int = field(8, "prompts in one rollout batch (a worker's unit of work)", POSITIVE)
  batches_per_step: int = field(1, "rollout batches the learner trains on per step", POSITIVE)
  updates_per_batch: int = field(1, "optimizer updates on each step's rollouts (> 1: the PPO ratio moves)", POSITIVE)
  max_new_tokens: int = field(16, "tokens a completion may have (it stops earlier at end-of-text)", POSITIVE)
  temperature: float = field(1.0, "sampling temperature of the workers", POSITIVE_FLOAT)
  clip_low: float = field(0.2, "the ratio is clipped below at 1 - clip_low", UNIT)
  clip_high: float = field(0.28, "the ratio is clipped above at 1 + clip_high (DAPO clip-higher)", NONNEGATIVE_FLOAT)
  kl_coef: float = field(1e-3, "beta of the k3 KL term to the reference policy; 0: no reference", NONNEGATIVE_FLOAT)
  is_cap: float = field(2.0, "cap of the importance weight exp(old - behaviour); 0 turns it off", NONNEGATIVE_FLOAT)
  aggregation: str = field("grpo", "grpo (mean per completion, then over them) | dapo (mean over tokens)",
                           one_of("grpo", "dapo"))  # fmt: skip
  max_staleness: int = field(
    8, "rollouts more than this many policy versions behind the learner are dropped; 0: synchronous", NONNEGATIVE
  )
  init_from: str = field("", 'workdir of a `manifold train` run (e.g. SFT warm-up) to start from; "": fresh init')
  reference: str = field("", 'workdir of a run whose newest checkpoint is the KL reference; "": the initial policy')
  heldout_size: int = field(64, "held-out problems the learner scores greedily every train.eval_every steps; 0: none",
                            NONNEGATIVE)  # fmt: skip
  keep_policies: int = field(4, "newest policy versions kept in the store", POSITIVE)
  store: str = field("", 'the store URL the learner and workers meet through; "": <workdir>/store (rl local)')
  worker: int = field(-1, "this worker's id (manifold rl worker --id)", Check(lambda v: v >= -1, "an integer >= -1"))
  heartbeat_s: float = field(2.0, "seconds between heartbeats", POSITIVE_FLOAT)
  poll_s: float = field(0.2, "seconds between looks at the store while waiting", POSITIVE_FLOAT)
  deadline_s: float = field(
    600.0, "a learner without usable rollouts, or a worker without a live learner, this long stops", POSITIVE_FLOAT
  )
  commit_positions: int = field(
    16, "completion positions (row, col) a worker commits to per batch, derived from the batch's hash", POSITIVE
  )
  commit_top_k: int = field(4, "top-k log-probs (temperature 1) a worker commits to at each position", POSITIVE)
  commit_tolerance: float = field(
    0.0,
    "max |committed log-prob - the learner's recomputation|; 0: by model.dtype (manifold/rl/commitment.py)",
    NONNEGATIVE_FLOAT,
  )
  behaviour_tolerance: float = field(
    0.0,
    "max |behaviour log-prob - the learner's recomputation|; 0: by model.dtype (manifold/rl/commitment.py)",
    NONNEGATIVE_FLOAT,
  )
  verify_fraction: float = field(1.0, "share of rollout batches the learner recomputes (picked with a secret)", UNIT)
  sampling_z: float = field(
    5.0, "the sampling test rejects at this many standard deviations (false rejections <= exp(-z^2/2))", POSITIVE_FLOAT
  )

  def check(self) -> None:
    from manifold.rl.tasks import get_task

    try:
      get_task(self.task, **task_settings(self.difficulty))
    except ValueError as e:
      raise ConfigError(str(e)) from None


@dataclasses.dataclass(frozen=True)
class DistillConfig(Section):
  """Distillation (manifold/distill) of this config's model (the student) from `teacher`, the
  workdir of a `manifold train` run or a `manifold convert --from-hf` import with the same
  tokenizer and vocabulary. The student trains with train.*; a step's loss is
  `weight * T^2 * D(teacher_T || student_T) + (1 - weight) * CE(labels)`, T = `temperature`."""

  SECTION = "distill"
  RESUME = FREE

  teacher: str = field("", 'the teacher\'s workdir (its newest checkpoint, or teacher_step); "": no distillation')
  teacher_step: int = field(-1, "the teacher's checkpoint step; -1: its newest", Check(lambda v: v >= -1, ">= -1"))
  teacher_dtype: str = field("float32", "the teacher's compute dtype", one_of("float32", "bfloat16"))
  mode: str = field(
    "online",
    "online (teacher in the step) | cache (top-k log-probs from `manifold distill cache`) | on_policy (the "
    "student samples, the teacher scores: GKD with lambda = 1)",
    one_of("online", "cache", "on_policy"),
  )
  divergence: str = field("forward_kl", "D (manifold/distill/losses.py): " + " | ".join(DIVERGENCES),
                          one_of(*DIVERGENCES))  # fmt: skip
  jsd_beta: float = field(0.5, "beta of jsd: M = beta teacher + (1 - beta) student", OPEN_UNIT)
  temperature: float = field(1.0, "T: both distributions are softmax(logits / T)", POSITIVE_FLOAT)
  weight: float = field(0.5, "w: the divergence's share of the loss (1 - w: cross-entropy on the labels)", UNIT)
  top_k: int = field(32, "cache: teacher log-probs kept per token (the rest of the mass is one bucket)", POSITIVE)
  cache: str = field("", "cache: the top-k cache's URL or folder (file://, gs://, s3://, or a path)")
  prompt_tokens: int = field(32, "on_policy and generate: prompt tokens (the start of a data window)", POSITIVE)
  max_new_tokens: int = field(64, "on_policy and generate: tokens sampled after the prompt", POSITIVE)
  sample_temperature: float = field(1.0, "on_policy and generate: sampling temperature", POSITIVE_FLOAT)
  prompts: int = field(512, "generate: prompts (data windows, or the rl.task's problems)", POSITIVE)
  samples_per_prompt: int = field(4, "generate: N completions sampled per prompt", POSITIVE)
  prompt_source: str = field(
    "data",
    "generate: data (window starts of the training split) | task (rl.task's problems, kept if verified)",
    one_of("data", "task"),
  )
  min_new_tokens: int = field(8, "generate: completions shorter than this are dropped", NONNEGATIVE)
  dedup: bool = field(True, "generate: drop a completion whose text was already kept")
  generate_batch: int = field(256, "generate: rows sampled together", POSITIVE)

  def check(self) -> None:
    require(
      self.mode != "on_policy" or self.weight == 1,
      f"distill.weight={self.weight}: must be 1 with distill.mode=on_policy (the student's own samples have no "
      "labels); set distill.weight=1",
    )


@dataclasses.dataclass(frozen=True)
class ProvenanceConfig(Section):
  """Checkpoint lineage and the contribution ledger (manifold/provenance): on for every run."""

  SECTION = "provenance"
  RESUME = FREE

  enabled: bool = field(
    True, "sign a manifest for every checkpoint and keep ledger.jsonl (manifold verify checks them)"
  )
  key: str = field(
    "",
    'the Ed25519 key file a train run signs with; "": <workdir>/run.key (store islands and RL learners sign '
    "with their store identity: island.key, learner.key)",
  )


SECTIONS: dict[str, type[Section]] = {
  "model": ModelConfig,
  "data": DataConfig,
  "train": TrainConfig,
  "eval": EvalConfig,
  "mesh": MeshConfig,
  "sample": SampleConfig,
  "islands": IslandsConfig,
  "rl": RLConfig,
  "distill": DistillConfig,
  "provenance": ProvenanceConfig,
}

# Fields that were renamed: using the old name is an error that names the new one.
RENAMED = {
  "model.kernels": "model.mhc_impl (auto | pallas | xla; 'reference' is now 'xla')",
  "model.grouped_matmul": "model.grouped_matmul_impl",
}


class Config:
  """A validated config: one frozen section object per entry of `SECTIONS` (cfg.model, cfg.train, ...)."""

  def __init__(self, sections: dict[str, Section]):
    self.__dict__.update(sections)
    self.sections = sections

  def __repr__(self) -> str:
    return f"Config({self.sections!r})"


def base_config() -> ml_collections.ConfigDict:
  """Every field any run reads, with its default (from the section dataclasses)."""
  return ml_collections.ConfigDict({name: section().to_dict() for name, section in SECTIONS.items()})


def schedule(steps: int, *, validations: int = 6, checkpoints: int = 3) -> dict[str, int]:
  """The experiments' short-run schedule as `train` fields: `steps`, a warm-up of a tenth of
  them, about `validations` validations and `checkpoints` checkpoints."""
  return dict(
    steps=steps,
    warmup_steps=max(1, steps // 10),
    eval_every=max(1, steps // validations),
    checkpoint_every=max(1, steps // checkpoints),
  )


def validate(cfg: ml_collections.ConfigDict | dict) -> Config:
  """The typed, validated config; raises `ConfigError` naming the first invalid field,
  its value and what is allowed (or the new name of a renamed field)."""
  unknown = [key for key in cfg if key not in SECTIONS]
  require(not unknown, f"{', '.join(unknown)}: unknown config section; known: {', '.join(SECTIONS)}")
  sections = {name: section.from_mapping(cfg.get(name, {}), RENAMED) for name, section in SECTIONS.items()}
  m, t = sections["model"], sections["train"]
  require(m.mtp_depth < t.seq_len, f"model.mtp_depth={m.mtp_depth}: must be < train.seq_len={t.seq_len}")
  require(t.seq_len <= m.max_seq_len, f"train.seq_len={t.seq_len}: must be <= model.max_seq_len={m.max_seq_len}")
  i = sections["islands"]
  require(
    m.n_layers % i.fragments == 0,
    f"islands.fragments={i.fragments}: must divide model.n_layers={m.n_layers} (each fragment is a group of layers)",
  )
  island = sections["mesh"].island
  require(
    island == 1 or i.store == "",
    f"mesh.island={island}: islands inside one job and islands.store={i.store!r} (islands as separate jobs) "
    "exclude each other; set one",
  )
  require(
    island == 1 or t.batch_size % island == 0,
    f"train.batch_size={t.batch_size}: must split over the mesh.island={island} islands",
  )
  d = sections["distill"]
  if d.teacher:
    _check_distillation(d, m, t, island, i)
  return Config(sections)


def _check_distillation(d: DistillConfig, m: ModelConfig, t: TrainConfig, island: int, i: IslandsConfig) -> None:
  """The rules between distill.* and the other sections (only when distill.teacher is set)."""
  require(
    island == 1 and not i.store,
    f"distill.teacher={d.teacher!r}: distillation runs in one island; drop mesh.island / islands.store",
  )
  require(
    not t.document_mask,
    f"train.document_mask=True: the teacher of distill.teacher={d.teacher!r} reads whole windows; "
    "set train.document_mask=False for distillation",
  )
  require(
    d.mode != "on_policy" or d.prompt_tokens + d.max_new_tokens <= m.max_seq_len,
    f"distill.max_new_tokens={d.max_new_tokens}: distill.prompt_tokens + distill.max_new_tokens must be <= "
    f"model.max_seq_len={m.max_seq_len}",
  )
  require(
    d.prompt_tokens <= t.seq_len,
    f"distill.prompt_tokens={d.prompt_tokens}: must be <= train.seq_len={t.seq_len} (prompts start data windows)",
  )


def model_config(cfg: ml_collections.ConfigDict) -> ModelConfig:
  """The validated `ModelConfig` of a whole config."""
  return validate(cfg).model


def parse_arg(arg: str | None, **defaults: Any) -> ml_collections.ConfigDict:
  """Parses a variant string `"tiny"` or `"size=tiny,steps=100"` against typed defaults.

  A bare first item sets the first default's key. Values take the type of their default.
  """
  out = ml_collections.ConfigDict(defaults)
  if not arg:
    return out
  keys = list(defaults)
  for i, item in enumerate(arg.split(",")):
    key, sep, value = item.partition("=")
    if not sep:
      if i != 0:
        raise ConfigError(f"config argument {item!r}: only the first item may omit 'key='")
      key, value = keys[0], item
    if key not in defaults:
      raise ConfigError(f"config argument {key!r}: unknown; known: {', '.join(keys)}")
    kind = type(defaults[key])
    try:
      out[key] = (value.lower() in ("1", "true", "yes")) if kind is bool else kind(value)
    except ValueError:
      raise ConfigError(f"config argument {key}={value!r}: expected {kind.__name__}") from None
  return out


def load_config(spec: str, overrides: Sequence[str] = ()) -> ml_collections.ConfigDict:
  """Loads `experiments/x.py[:arg]` and applies `--config.a.b=v` overrides, then validates."""
  path = spec.split(":", 1)[0]
  if not os.path.isfile(path):
    raise ConfigError(f"--config {spec}: no such file {path!r}; pass e.g. experiments/quickstart.py[:variant]")
  cfg = _parse_flags(spec, ())
  for override in overrides:
    dotted = override.removeprefix("--config.").split("=", 1)[0]
    if dotted in RENAMED:
      raise ConfigError(f"{dotted}: renamed; use {RENAMED[dotted]}")
    _get(cfg, dotted, hint=f"unknown field in {override!r}; see {path} for the fields")
  if overrides:
    cfg = _parse_flags(spec, overrides)
  validate(cfg)
  return cfg


def experiment_module(path: str):
  """The experiment file at `path` as a module: its get_sweep() for a sweep, or a definition
  another experiment file shares (say `os.path.join(os.path.dirname(__file__), name)`)."""
  spec = importlib.util.spec_from_file_location(os.path.splitext(os.path.basename(path))[0], path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


def _parse_flags(spec: str, overrides: Sequence[str]) -> ml_collections.ConfigDict:
  argv = ["manifold", f"--config={spec}", *overrides]
  values = flags.FlagValues()
  try:
    config_flags.DEFINE_config_file("config", flag_values=values, lock_config=True, sys_argv=argv)
    values(argv)
    cfg = values.config
    cfg.get("model")  # the flag defers loading errors to the first access
    return cfg
  except ConfigError:
    raise
  except Exception as e:  # noqa: BLE001 -- errors raised by user config code or the flag parser
    message = str(e.__cause__ or e).strip()
    if "Traceback" in message:  # an exception raised inside the config file's get_config
      message = message.splitlines()[-1].split(": ", 1)[-1]
    raise ConfigError(f"--config {spec}: {_one_line(message)}") from None


def config_from_json(text: str) -> ml_collections.ConfigDict:
  """Rebuilds a config saved with `cfg.to_json()` (as written into every run directory)."""
  cfg = base_config()
  cfg.update(ml_collections.ConfigDict(json.loads(text)))
  validate(cfg)
  return cfg


def _one_line(message: str) -> str:
  return " ".join(message.split())


def _get(
  cfg: ml_collections.ConfigDict, dotted: str, hint: str = "missing; build configs from manifold.config.base_config()"
) -> Any:
  node = cfg
  for part in dotted.split("."):
    if not isinstance(node, ml_collections.ConfigDict) or part not in node:
      raise ConfigError(f"{dotted}: {hint}")
    node = node[part]
  return node
