"""Ahead-of-time compilation of the full training step for a TPU slice this machine does
not have: devices come from libtpu's topology description (`jax[tpu]` installed, no TPU
needed), and XLA's memory analysis says whether the step fits each chip's HBM.

libtpu is found on the import path or under `<venv>/libtpu` (`make libtpu` puts it there,
off the default path, so that CPU-only runs do not probe for TPUs). Slice names follow
Cloud TPU: `v5p-128` counts TensorCores (2 per v4 / v5p chip, so 64
chips), `v5litepod-16` / `v6e-16` count chips; `v5p:4x4x4` names the chip grid directly.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import math
import os
import sys

import jax
import jax.numpy as jnp

from manifold.config import ConfigError, model_config

# generation -> (libtpu name, TensorCores per chip in slice names, HBM GiB per chip, chip grids by chip count)
_GRIDS_3D = {
  4: "2x2x1", 8: "2x2x2", 16: "2x2x4", 32: "2x4x4", 64: "4x4x4", 128: "4x4x8", 256: "4x8x8",
  512: "8x8x8", 1024: "8x8x16", 2048: "8x16x16", 4096: "16x16x16",
}  # fmt: skip
_GRIDS_2D = {1: "1x1", 4: "2x2", 8: "2x4", 16: "4x4", 32: "4x8", 64: "8x8", 128: "8x16", 256: "16x16"}
GENERATIONS = {
  "v4": ("v4", 2, 32, _GRIDS_3D),
  "v5p": ("v5p", 2, 95, _GRIDS_3D),
  "v5litepod": ("v5e", 1, 16, _GRIDS_2D),
  "v5e": ("v5e", 1, 16, _GRIDS_2D),
  "v6e": ("v6e", 1, 32, _GRIDS_2D),
}


@dataclasses.dataclass(frozen=True)
class Slice:
  """One TPU slice, or `count` of them joined by DCN (multislice)."""

  name: str  # as given, e.g. v5p-128 or 2xv5p-32
  topology: str  # libtpu's name of one slice, e.g. v5p:4x4x4
  chips: int  # in all slices
  hbm_bytes: int  # per chip
  count: int = 1
  one: str = ""  # the name of one of the slices (2xv5p-32 -> v5p-32); the name itself when count is 1


def parse_slice(name: str) -> Slice:
  """`v5p-128` or `v5p:4x4x4`, or `<N>x` before either for N slices over DCN -> Slice; a clear
  error for anything else."""
  count, many, one = name.partition("x")
  if many and count.isdigit() and not one[:1].isdigit():
    if int(count) < 1:
      raise ConfigError(f"--topology {name!r}: {count} slices; use at least 1, e.g. 2xv5p-32")
    single = parse_slice(one)
    return dataclasses.replace(single, name=name, chips=single.chips * int(count), count=int(count), one=one)
  known = ", ".join(GENERATIONS)
  if ":" in name:
    generation, grid = name.split(":", 1)
    chips = math.prod(int(s) for s in grid.split("x")) if all(s.isdigit() for s in grid.split("x")) else 0
  else:
    generation, _, count = name.rpartition("-")
    if generation not in GENERATIONS or not count.isdigit():
      raise ConfigError(f"--topology {name!r}: expected <generation>-<size> like v5p-128 ({known})")
    cores_per_chip, grids = GENERATIONS[generation][1], GENERATIONS[generation][3]
    chips = int(count) // cores_per_chip
    if chips not in grids:
      sizes = ", ".join(f"{generation}-{c * cores_per_chip}" for c in grids)
      raise ConfigError(f"--topology {name!r}: not a slice size; known: {sizes}")
    grid = grids[chips]
  if generation not in GENERATIONS or chips < 1:
    raise ConfigError(f"--topology {name!r}: expected e.g. v5p-128 or v5p:4x4x4 ({known})")
  libtpu_name, _, hbm_gib, _ = GENERATIONS[generation]
  return Slice(name, f"{libtpu_name}:{grid}", chips, hbm_gib * 2**30, one=name)


def _find_libtpu(tpu_slice: Slice) -> None:
  # No TPU here: describe a one-host slice so libtpu does not query this machine's TPU
  # metadata (and warn), and let a second process (a test beside a compile) load it too.
  for key, value in (
    ("TPU_SKIP_MDS_QUERY", "1"),
    ("TPU_ACCELERATOR_TYPE", tpu_slice.one if "-" in tpu_slice.one else "v5p-8"),
    ("TPU_WORKER_HOSTNAMES", "localhost"),
    ("TPU_WORKER_ID", "0"),
    ("ALLOW_MULTIPLE_LIBTPU_LOAD", "1"),
  ):
    os.environ.setdefault(key, value)
  local = os.path.join(sys.prefix, "libtpu")
  if importlib.util.find_spec("libtpu") is None and os.path.isdir(local):
    sys.path.insert(0, local)


def slice_devices(tpu_slice: Slice, num_slices: int = 1) -> list:
  """The slice's devices from libtpu's topology description (one per chip on v5p); with
  `num_slices > 1`, those of that many such slices joined by DCN (multislice: each device's
  `slice_index` says which)."""
  _find_libtpu(tpu_slice)
  try:
    from jax.experimental import topologies

    slices = {"num_slices": num_slices} if num_slices > 1 else {}
    return list(topologies.get_topology_desc(platform="tpu", topology_name=tpu_slice.topology, **slices).devices)
  except Exception as e:  # noqa: BLE001 -- a missing libtpu surfaces as a backend error
    raise ConfigError(
      f"--topology {tpu_slice.name}: libtpu could not describe {tpu_slice.topology} ({str(e).splitlines()[0][:120]}); "
      "install it with `make libtpu` (or pip install 'jax[tpu]')"
    ) from None


@dataclasses.dataclass(frozen=True)
class CompileReport:
  """Per-chip bytes from XLA's memory analysis of the compiled step and its FLOP estimate."""

  slice: Slice
  mesh: dict[str, int]
  argument_bytes: int  # train state + batch resident on the chip
  output_bytes: int
  alias_bytes: int  # outputs that reuse donated argument buffers
  temp_bytes: int  # activations, gradients and scratch
  code_bytes: int
  flops: float  # XLA's estimate for one chip's program

  @property
  def total_bytes(self) -> int:
    return self.argument_bytes + self.output_bytes - self.alias_bytes + self.temp_bytes + self.code_bytes

  @property
  def fits(self) -> bool:
    return self.total_bytes <= self.slice.hbm_bytes


def compile_train_step(cfg, tpu_slice: Slice) -> CompileReport:
  """AOT-compiles `cfg`'s training step (forward, backward, AdamW update) for the slice."""
  from manifold.parallel import sharding
  from manifold.parallel.mesh import check_fits, islands_of, make_mesh
  from manifold.train.optimizer import make_optimizer
  from manifold.train.state import make_state_spec
  from manifold.train.step import make_train_step

  mesh = make_mesh(cfg.mesh, slice_devices(tpu_slice, tpu_slice.count))
  check_fits(cfg, mesh)
  model_cfg, tx = model_config(cfg), make_optimizer(cfg.train)
  token_bytes, shape = jnp.ones(model_cfg.vocab_size, jnp.float32), (cfg.train.batch_size, cfg.train.seq_len + 1)
  separator = 0 if cfg.train.document_mask else None  # which id ends a document does not change the program
  if islands_of(cfg.mesh) > 1:  # the islands' inner step (manifold.islands.mesh), islands inside the slice
    from manifold.config import validate
    from manifold.islands import mesh as island_mesh

    islands = islands_of(cfg.mesh)
    spec = island_mesh.make_island_spec(model_cfg, tx, mesh, validate(cfg).islands, islands)
    step = island_mesh.make_island_train_step(spec, tx, mesh, token_bytes, cfg.train, separator)
    batch = jax.ShapeDtypeStruct(shape, jnp.int32, sharding=island_mesh.island_batch_sharding(mesh))
    compiled = step.lower(spec.abstract.inner, batch).compile()
  else:
    spec = make_state_spec(model_cfg, tx, mesh)
    step = make_train_step(spec, tx, mesh, token_bytes, cfg.train, separator)
    batch = jax.ShapeDtypeStruct(shape, jnp.int32, sharding=sharding.batch_sharding(mesh))
    compiled = step.lower(spec.abstract, batch).compile()
  memory = compiled.memory_analysis()
  cost = compiled.cost_analysis()
  cost = cost[0] if isinstance(cost, list) else cost
  return CompileReport(
    slice=tpu_slice,
    mesh=dict(mesh.shape),
    argument_bytes=memory.argument_size_in_bytes,
    output_bytes=memory.output_size_in_bytes,
    alias_bytes=memory.alias_size_in_bytes,
    temp_bytes=memory.temp_size_in_bytes,
    code_bytes=memory.generated_code_size_in_bytes,
    flops=float(cost.get("flops", 0.0)),
  )


def _gib(n: int) -> str:
  return f"{n / 2**30:.1f}"


def model_flops_per_chip(cfg, chips: int) -> float:
  """Analytic training FLOPs of one step per chip (manifold.model.accounting), for
  comparison with XLA's estimate, which counts a loop body (each microbatch) once."""
  from manifold.model.accounting import training_flops_per_token

  per_token = training_flops_per_token(model_config(cfg), cfg.train.seq_len)
  return per_token * cfg.train.batch_size * cfg.train.seq_len / chips


def report_row(config: str, report: CompileReport, failures: list[str], compile_s: float, cfg) -> dict:
  """One results row: where it fits, the smaller slices that did not (and why), the mesh,
  per-chip bytes and the FLOP counts."""
  return {
    "config": config,
    "slice": report.slice.name if report.fits else None,
    "compiled_on": report.slice.name,
    "smaller_slices": list(failures),
    "chips": report.slice.chips,
    "mesh": " x ".join(f"{a} {s}" for a, s in report.mesh.items() if s > 1) or "1 device",
    "argument_bytes": report.argument_bytes,
    "temp_bytes": report.temp_bytes,
    "total_bytes": report.total_bytes,
    "hbm_bytes": report.slice.hbm_bytes,
    "xla_flops_per_chip": report.flops,
    "model_flops_per_chip": model_flops_per_chip(cfg, report.slice.chips),
    "compile_s": round(compile_s, 1),
  }


def describe(row: dict) -> str:
  """One line for the terminal."""
  fits = "fits" if row["slice"] else "does not fit"
  return (
    f"{row['config']} on {row['compiled_on']} ({row['chips']} chips; mesh {row['mesh']}): per chip arguments "
    f"{_gib(row['argument_bytes'])} GiB + temporaries {_gib(row['temp_bytes'])} GiB = {_gib(row['total_bytes'])} "
    f"GiB of {_gib(row['hbm_bytes'])} GiB HBM -> {fits}; TFLOP per chip per step: model "
    f"{row['model_flops_per_chip'] / 1e12:,.1f}, XLA's estimate {row['xla_flops_per_chip'] / 1e12:,.1f}; "
    f"compiled in {row['compile_s']:.0f} s"
  )


def _fits(r: dict) -> str:
  fits = r["slice"] or f"not {r['compiled_on']}"
  if r["smaller_slices"]:
    fits += " (" + "; ".join(f.split(":")[0] + ": no" for f in r["smaller_slices"]) + ")"
  return fits


# The compile table (experiments/results/compile): one row per config.
COLUMNS = [
  ("config", lambda r: r["config"]),
  ("smallest slice that fits", _fits),
  ("mesh", lambda r: r["mesh"]),
  ("arguments GiB", lambda r: _gib(r["argument_bytes"])),
  ("temporaries GiB", lambda r: _gib(r["temp_bytes"])),
  ("total GiB / HBM GiB", lambda r: f"{_gib(r['total_bytes'])} / {_gib(r['hbm_bytes'])}"),
  (
    "TFLOP per chip per step: model / XLA estimate",
    lambda r: f"{r['model_flops_per_chip'] / 1e12:,.0f} / {r['xla_flops_per_chip'] / 1e12:,.0f}",
  ),
]
