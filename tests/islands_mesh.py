"""Run as a script: DiLoCo islands inside one job vs the islands run one after another, and
where their collectives go.

  XLA_FLAGS=--xla_force_host_platform_device_count=8 python tests/islands_mesh.py cpu WORKDIR
  python tests/islands_mesh.py aot WORKDIR    # needs libtpu (`make libtpu`); no TPU

`cpu` (8 simulated devices) prints one JSON object: for each island mesh, the largest
absolute difference between the in-job islands (`manifold.islands.mesh`: the vmapped train
step, the outer sync, the loop's `InJobIslands` hook; the streaming run checkpointed,
restored and continued midway) and a reference that trains each island in turn on one
device with the plain train step and applies `manifold.islands.diloco`'s functions on the
host; the collectives of the compiled inner step and outer sync whose replica groups join
devices of different islands; and the bytes those collectives move per island beside the
bytes `InJobIslands` logs. `aot` compiles the inner step and the outer sync (DiLoCo at 32
bits, Streaming DiLoCo at int4) for two v5e slices (libtpu's multislice topology
description, one island per slice) and lists the collectives whose replica groups join
the two slices.
"""

from __future__ import annotations

import dataclasses
import json
import re
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np

from manifold.config import base_config, validate
from manifold.islands import diloco
from manifold.islands.mesh import (
  InJobIslands,
  island_batch_sharding,
  island_step,
  make_island_spec,
  make_island_train_step,
  make_outer_sync,
)
from manifold.parallel.mesh import check_fits, island_devices, make_mesh
from manifold.train.checkpoint import Checkpointer
from manifold.train.optimizer import make_optimizer
from manifold.train.state import make_state_spec
from manifold.train.step import make_train_step

VOCAB, ROWS, SEQ = 257, 4, 16  # the byte tokenizer's ids; ROWS per island: the batch is ROWS x islands
DILOCO = dict(inner_steps=3)  # 6 steps: two rounds of 3 inner steps and an outer step
STREAMING = dict(
  inner_steps=4, fragments=2, overlap_steps=1, mix_alpha=0.5, bits=4, quant_block=32, error_feedback=True
)
RUNS = {  # name -> (mesh, islands section, steps taken)
  "island2_data4": (dict(island=2, data=4), DILOCO, 6),
  "island4_fsdp2": (dict(island=4, data=1, fsdp=2), DILOCO, 6),
  "island2_data4_streaming_int4": (dict(island=2, data=4), STREAMING, 8),
}
RESUME_AT = 4  # the streaming run is checkpointed here (fragment 0 sent, landing at 5), restored and continued


def config(mesh: dict, islands: dict):
  c = base_config()
  c.model.update(
    vocab_size=VOCAB, d_model=32, n_layers=2, n_heads=4, n_kv_heads=2, head_dim=8, d_ff=64, max_seq_len=SEQ
  )
  # the same train.steps (the learning-rate schedule's length) and rows per island in every
  # run: one reference step program for all
  batch = ROWS * mesh.get("island", 1)
  c.train.update(steps=8, warmup_steps=1, batch_size=batch, seq_len=SEQ, learning_rate=1e-2, log_every=4)
  c.mesh.update(**mesh)
  c.islands.update(outer_learning_rate=0.7, outer_momentum=0.9, **islands)
  return c


def batches(cfg, steps: int) -> list[np.ndarray]:
  rng = np.random.default_rng(0)
  return [rng.integers(0, VOCAB, (cfg.train.batch_size, SEQ + 1), dtype=np.int32) for _ in range(steps)]


def one_device(cfg):
  """(spec, jitted train step) of the plain, single-device run."""
  one = dict(island=1, data=1, fsdp=1, expert=1, tensor=1, dcn=dict(data=1, fsdp=1, expert=1, tensor=1))
  mesh, typed = make_mesh(one, jax.devices()[:1]), validate(cfg)
  tx = make_optimizer(typed.train)
  spec = make_state_spec(typed.model, tx, mesh)
  return spec, make_train_step(spec, tx, mesh, jnp.ones(VOCAB), typed.train)


def initial_state(cfg):
  """A train state to start from, on the host (the same for every run here): parameters
  drawn with numpy (norm scales around 1), which spares compiling the random init."""
  typed, rng = validate(cfg), np.random.default_rng(1)
  abstract = one_device(cfg)[0].abstract

  def draw(path, x):
    scale = "scale" in jax.tree_util.keystr(path)
    return (scale + 0.05 * rng.standard_normal(x.shape)).astype(np.float32)

  params = jax.tree_util.tree_map_with_path(draw, abstract.params)
  opt_state = make_optimizer(typed.train).init(params)
  state = abstract.replace(step=np.zeros((), np.int32), params=params, extra={}, opt_state=opt_state)
  return jax.tree.map(np.array, state)


def island_programs(cfg, devices, inner_step: bool = True):
  """(mesh, spec, the inner step (unless not `inner_step`) and the outer sync compiled for
  `devices`, their HLO)."""
  typed = validate(cfg)
  mesh = make_mesh(cfg.mesh, devices)
  check_fits(typed, mesh)
  tx = make_optimizer(typed.train)
  spec = make_island_spec(typed.model, tx, mesh, typed.islands, typed.mesh.island)
  batch = jax.ShapeDtypeStruct((typed.train.batch_size, SEQ + 1), jnp.int32, sharding=island_batch_sharding(mesh))
  step = make_island_train_step(spec, tx, mesh, jnp.ones(VOCAB), typed.train)
  step = step.lower(spec.abstract.inner, batch).compile() if inner_step else None
  sync = make_outer_sync(spec, mesh, typed.islands)
  compiled = lambda fns: [f.lower(spec.abstract).compile() for f in fns]  # noqa: E731
  sync = dataclasses.replace(sync, send=compiled(sync.send), land=compiled(sync.land))
  hlo = {"inner_step": step.as_text()} if inner_step else {}
  hlo.update({f"sync_{p}": send.as_text() for p, send in enumerate(sync.send)})
  hlo.update({f"land_{p}": land.as_text() for p, land in enumerate(sync.land)})
  return mesh, spec, step, sync, hlo


def islands_run(cfg, start, steps: int, workdir: str, resume_at: int | None = None):
  """The in-job islands on this machine's 8 devices from the train state `start` (spread to
  every island), run with the very programs whose HLO is inspected: (final state on the
  host, the hook's metrics rows, losses, HLO, mesh, sync). With `resume_at`, the state is
  checkpointed after that step, restored, and continued with a fresh hook (as a resumed
  run does)."""
  typed = validate(cfg)
  mesh, spec, step, sync, hlo = island_programs(cfg, jax.devices())
  hooks = InJobIslands(sync, typed.islands, typed.train, spec.islands)
  state, rows, losses = spec.spread(start), [], []
  train = island_step(step)
  for t, batch in enumerate(batches(cfg, steps), start=1):
    state, metrics = train(state, jax.device_put(batch, island_batch_sharding(mesh)))
    losses.append(float(metrics["loss"]))
    state, values = hooks.after_step(state, t)
    rows.append(values)
    if t == resume_at:
      checkpointer = Checkpointer(workdir, keep=1)
      checkpointer.save(t, state, {"step": t})
      checkpointer.wait()
      state, _ = checkpointer.restore(t, spec.abstract)
      checkpointer.close()
      hooks = InJobIslands(sync, typed.islands, typed.train, spec.islands, start=t)
  return jax.device_get(state), rows, losses, hlo, mesh, sync


def reference_run(cfg, start, steps: int):
  """Each island in turn on one device with the plain train step, from the train state
  `start`; the outer steps with `diloco`'s functions, fragment by fragment (each fragment
  its own outer-optimizer state): (final global parameters, [each island's parameters])."""
  typed = validate(cfg)
  ic, m = typed.islands, typed.mesh.island
  step = one_device(cfg)[1]
  islands = [start] * m  # host arrays: the step donates its input
  global_params = start.params
  layer_fragment = diloco.fragment_of_layers(typed.model.n_layers, ic.fragments, ic.fragment_pattern)
  lf = diloco.partition(global_params, layer_fragment, ic.fragments)
  outer_tx = diloco.outer_optimizer(ic.outer_learning_rate, ic.outer_momentum)
  outer_states = [outer_tx.init(diloco.select(global_params, lf, p)) for p in range(ic.fragments)]
  residuals = [[None] * len(lf) for _ in range(m)]
  for t, batch in enumerate(batches(cfg, steps), start=1):
    islands = [jax.tree.map(np.array, step(s, batch[i * ROWS : (i + 1) * ROWS])[0]) for i, s in enumerate(islands)]
    if ic.overlap_steps and t > ic.overlap_steps:
      for p in diloco.fragments_due(t - ic.overlap_steps, ic.inner_steps, ic.fragments):
        outer = diloco.select(global_params, lf, p)
        mixed = [
          [np.array(x) for x in diloco.mix(diloco.select(s.params, lf, p), outer, ic.mix_alpha)] for s in islands
        ]
        islands = [s.replace(params=diloco.merge_fragment(s.params, x, lf, p)) for s, x in zip(islands, mixed)]
    for p in diloco.fragments_due(t, ic.inner_steps, ic.fragments):
      g = diloco.select(global_params, lf, p)
      if ic.bits == 32:
        delta = diloco.outer_gradient(g, [diloco.select(s.params, lf, p) for s in islands])
      else:
        sent = []
        for i, s in enumerate(islands):
          island_delta = diloco.outer_gradient(g, [diloco.select(s.params, lf, p)])
          carried = [r for r, f in zip(residuals[i], lf) if f == p]
          codes, new_r = diloco.quantize_tree_with_feedback(
            island_delta, None if carried[0] is None else carried, ic.bits, ic.quant_block
          )
          if ic.error_feedback:
            fresh = iter(new_r)
            residuals[i] = [next(fresh) if f == p else r for r, f in zip(residuals[i], lf)]
          sent.append(diloco.dequantize_tree(codes, island_delta))
        delta = [sum(d[j] for d in sent) / m for j in range(len(g))]
      new_g, outer_states[p] = diloco.outer_step(outer_tx, g, outer_states[p], delta)
      new_g = [np.array(x) for x in new_g]  # host copies: the islands' steps donate their inputs
      global_params = diloco.merge_fragment(global_params, new_g, lf, p)
      if not ic.overlap_steps:
        islands = [s.replace(params=diloco.merge_fragment(s.params, new_g, lf, p)) for s in islands]
  return jax.device_get(global_params), [jax.device_get(s.params) for s in islands]


def max_diff(a, b) -> float:
  pairs = zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True)
  return float(max(np.max(np.abs(np.asarray(x) - np.asarray(y))) for x, y in pairs))


def entries_off(a, b, tol: float = 1e-5) -> int:
  """How many entries of `a` differ from `b`'s by more than `tol`."""
  pairs = zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True)
  return int(sum(np.sum(np.abs(np.asarray(x) - np.asarray(y)) > tol) for x, y in pairs))


# ---------------------------------------------------------------------------------------
# Collectives in compiled HLO


COLLECTIVE = re.compile(
  r"=\s*(.*?)\s+(all-reduce|all-gather|reduce-scatter|all-to-all|collective-permute|ragged-all-to-all)(-start)?\("
)
DTYPE_BYTES = {"f32": 4, "s32": 4, "u32": 4, "bf16": 2, "f16": 2, "s8": 1, "u8": 1, "pred": 1}


def _mesh_groups(text: str) -> list[list[int]]:
  """`mesh['axis_0'=4,'axis_1'=2][, device_ids=(...)] {'axis_1'}` (the devices as a grid,
  in the order `device_ids` gives, default 0, 1, ...; one group for each point of the axes
  not named) -> the replica groups it stands for."""
  dims, order_text, named = re.fullmatch(
    r"mesh\[([^\]]*)\](?:,\s*device_ids=\(((?:[^()]|\([^()]*\))*)\))?\s*\{([^}]*)\}", text
  ).groups()
  axes = [(a.strip("' "), int(n)) for a, n in (d.split("=") for d in dims.split(","))]
  grouped = {a.strip("' ") for a in named.split(",") if a.strip()}
  count = int(np.prod([n for _, n in axes]))
  if order_text is None:
    ids = np.arange(count)
  elif "<=" in order_text or order_text.startswith("["):
    ids = np.asarray(_iota_groups(f"[{count}]<=" + order_text if "<=" not in order_text else order_text)).reshape(-1)
  else:
    ids = np.asarray([int(i) for i in order_text.split(",")])
  ids = ids.reshape([n for _, n in axes])
  order = [i for i, (a, _) in enumerate(axes) if a not in grouped] + [
    i for i, (a, _) in enumerate(axes) if a in grouped
  ]
  return ids.transpose(order).reshape(-1, int(np.prod([n for a, n in axes if a in grouped]))).tolist()


def _iota_groups(text: str) -> list[list[int]]:
  """`[a,b]<=[d0,d1,...]T(perm)` -> the replica groups it stands for."""
  shape, dims, perm = re.fullmatch(r"\[([\d,]+)\]<=\[([\d,]+)\](?:T\(([\d,]+)\))?", text).groups()
  ids = np.arange(np.prod([int(d) for d in dims.split(",")])).reshape([int(d) for d in dims.split(",")])
  if perm:
    ids = ids.transpose([int(p) for p in perm.split(",")])
  return ids.reshape([int(s) for s in shape.split(",")]).tolist()


def collectives(hlo: str) -> list[tuple[str, list[list[int]], str]]:
  """(op, groups of device-assignment positions ([] for all devices), the instruction's
  result type) for every collective instruction of a compiled module."""
  out = []
  for line in hlo.splitlines():
    match = COLLECTIVE.search(line)
    if not match:
      continue
    result_type, op, _ = match.groups()
    if op == "collective-permute":
      pairs = re.search(r"source_target_pairs=(\{[{}\d, ]*\})", line).group(1)
      groups = [list(map(int, p)) for p in re.findall(r"\{(\d+),(\d+)\}", pairs)]
    elif (
      on_mesh := re.search(
        r"replica_groups=(mesh\[[^\]]*\](?:,\s*device_ids=\((?:[^()]|\([^()]*\))*\))?\s*\{[^}]*\})", line
      )
    ) is not None:
      groups = _mesh_groups(on_mesh.group(1))
    elif (iota := re.search(r"replica_groups=(\[[\d,]+\]<=\[[\d,]+\](?:T\([\d,]+\))?)", line)) is not None:
      groups = _iota_groups(iota.group(1))
    elif (listed := re.search(r"replica_groups=\{((?:\{[\d,]*\},?)*)\}", line)) is not None:
      groups = [list(map(int, g.split(","))) for g in re.findall(r"\{([\d,]+)\}", listed.group(1))]
    else:
      raise ValueError(f"replica groups not understood: {line.strip()[:300]}")
    out.append((op, groups, result_type))
  return out


def joining(hlo: str, mesh, part_of) -> list[tuple[str, list[list[int]], str]]:
  """The collectives of `hlo` whose groups join devices of different parts (`part_of`:
  device -> part; groups index the mesh's devices in order)."""
  devices = list(mesh.devices.flat)
  return [
    (op, groups, result_type)
    for op, groups, result_type in collectives(hlo)
    if any(len({part_of(devices[i]) for i in group}) > 1 for group in groups or [range(len(devices))])
  ]


def crossing(hlo: str, mesh, part_of) -> list[str]:
  """`joining`, as 'op result-type' lines."""
  return [f"{op} {result_type}" for op, _, result_type in joining(hlo, mesh, part_of)]


def payload_per_island(hlo: str, mesh, island_of) -> int:
  """Bytes of what each island puts on the island axis, from the collectives of `hlo` that
  join islands: every device's piece (an all-reduce's operand, its share of an all-gather's
  result) times the devices, over the islands."""
  total, devices = 0, mesh.devices.size
  for op, groups, result_type in joining(hlo, mesh, island_of):
    assert op in ("all-reduce", "all-gather"), op
    size = sum(
      DTYPE_BYTES[dtype] * int(np.prod([int(d) for d in dims.split(",") if d]))
      for dtype, dims in re.findall(r"(\w+)\[([\d,]*)\]", result_type)
    )
    total += devices * (size if op == "all-reduce" else size // len(groups[0] if groups else range(devices)))
  return total // mesh.shape["island"]


def island_part(mesh):
  """device -> the index of its island."""
  island_of = {d: i for i, ids in enumerate(island_devices(mesh)) for d in ids}
  return lambda device: island_of[device.id]


def cpu_report(workdir: str) -> dict:
  assert jax.device_count() == 8, "run with XLA_FLAGS=--xla_force_host_platform_device_count=8"
  report, start = {}, initial_state(config(*RUNS["island2_data4"][:2]))
  for name, (mesh_axes, islands, steps) in RUNS.items():
    cfg = config(mesh_axes, islands)
    started = time.perf_counter()
    resume_at = RESUME_AT if "streaming" in name else None
    state, rows, losses, hlo, mesh, sync = islands_run(cfg, start, steps, f"{workdir}/{name}", resume_at)
    middle = time.perf_counter()
    ref_global, ref_islands = reference_run(cfg, start, steps)
    print(f"{name}: islands {middle - started:.1f} s, reference {time.perf_counter() - middle:.1f} s", file=sys.stderr)
    part_of = island_part(mesh)

    m, bits = mesh.shape["island"], validate(cfg).islands.bits
    payloads = [payload_per_island(hlo[f"sync_{p}"], mesh, part_of) for p in range(len(sync.send))]
    own = [jax.tree.map(lambda x, i=i: x[i], state.inner.params) for i in range(m)]
    report[name] = {
      "global_params": max_diff(state.params, ref_global),
      "global_entries_off": entries_off(state.params, ref_global),
      "entries": int(sum(np.size(x) for x in jax.tree.leaves(ref_global))),
      "island_params": max(max_diff(own[i], ref_islands[i]) for i in range(m)),
      "moved_from_start": max_diff(state.params, start.params),
      "rows": rows,
      "losses": losses,
      "counted_bytes_per_sync": sync.bytes_per_sync,
      "hlo_bytes_per_sync": [
        int(diloco.allreduce_bytes(b // 4, m, 1)) if bits == 32 else (m - 1) * b for b in payloads
      ],
      "dp_bytes_per_step": diloco.allreduce_bytes(sync.params, m, 1),
      "crossing_islands": {k: crossing(text, mesh, part_of) for k, text in hlo.items()},
    }
  return report


DCN_SEND = re.compile(r"= \(([^ ]+), u32\[\], token\[\]\) send\(.*_xla_megascale_transfer_type=\"(\w+)\"")


def dcn_transfers(hlo: str) -> list[str]:
  """A TPU multislice program's transfers between slices: XLA lowers a collective whose
  groups span slices to send / recv pairs for the DCN ("megascale") runtime, tagged with the
  collective they implement; as 'ALL_REDUCE f32[...]' (what one device sends)."""
  return [f"{kind} {shape.split('{')[0]}" for shape, kind in DCN_SEND.findall(hlo)]


def loop_report(workdir: str) -> dict:
  """`manifold.train.loop.train` with `mesh.island = 2` (DiLoCo, 3 inner steps) on a few
  standard-library files for 8 steps (checkpoints at 4 and 8), then the same run resumed
  from its step-4 checkpoint; and `load_trained` on the first run."""
  import os
  import shutil

  from manifold.data import stdlib_files
  from manifold.train.loop import train
  from manifold.train.metrics import read_metrics
  from manifold.train.restore import load_trained

  os.makedirs(f"{workdir}/corpus")
  for i, f in enumerate([f for f in stdlib_files() if 2_000 < os.path.getsize(f.path) < 20_000][:6]):
    shutil.copy(f.path, f"{workdir}/corpus/m{i}.py")
  cfg = config(dict(island=2, data=4), DILOCO)
  cfg.data.update(sources=f"{workdir}/corpus/*.py", val_fraction=0.3, cache_dir=f"{workdir}/cache")
  cfg.train.update(checkpoint_every=4, eval_every=4, log_every=2)
  cfg.eval.update(batch_size=8, num_batches=1)
  cfg.sample.max_new_tokens = 0
  whole = train(cfg, f"{workdir}/whole", progress=False)
  shutil.copytree(f"{workdir}/whole", f"{workdir}/resumed")
  shutil.rmtree(f"{workdir}/resumed/checkpoints/8")
  resumed = train(cfg, f"{workdir}/resumed", progress=False)
  loaded = load_trained(f"{workdir}/whole", data=False)
  rows = read_metrics(f"{workdir}/whole/metrics.jsonl")
  last = [r for r in rows if "islands/bytes_sent_cumulative" in r][-1]
  return {
    "resumed_from": resumed.start,
    "resumed_vs_whole": max_diff(jax.device_get(resumed.state), jax.device_get(whole.state)),
    "loaded_vs_whole": max_diff(jax.device_get(loaded.state.params), jax.device_get(whole.state.params)),
    "loaded_step": loaded.step,
    "val_steps": [r["step"] for r in rows if "val_loss" in r],
    "sync_steps": [r["step"] for r in rows if r.get("islands/bytes_sent", 0) > 0],
    "last_bytes_row": last,
    "resumed_last_bytes_row": [
      r for r in read_metrics(f"{workdir}/resumed/metrics.jsonl") if "islands/bytes_sent_cumulative" in r
    ][-1],
    "loss_logged": all(isinstance(r["loss"], float) for r in rows if "loss" in r),
  }


def aot_report() -> dict:
  """Two v5e:2x2 slices (4 chips each, DCN between them), one island per slice, data 4
  inside: for each compiled program, its transfers between the slices, and its collectives
  inside a slice (whose replica groups, in a multislice program, number one slice's devices)."""
  from manifold.aot import parse_slice, slice_devices

  devices = slice_devices(parse_slice("v5e:2x2"), num_slices=2)
  report = {"devices": len(devices), "slices": sorted({d.slice_index for d in devices})}
  for name, islands in (("diloco_32bit", dict(DILOCO, inner_steps=4)), ("streaming_int4", STREAMING)):
    # the inner step is the same program in both (it does not see the islands section)
    mesh, *_, hlo = island_programs(config(dict(island=2, data=-1), islands), devices, name == "diloco_32bit")
    report["island_slices"] = [sorted({d.slice_index for d in mesh.devices[i].flat}) for i in range(2)]
    report[name] = {
      k: {
        "dcn": dcn_transfers(text),
        "ici_groups": sorted({len(g) for _, groups, _ in collectives(text) for g in groups or [[]]}),
        "ici_max_id": max([i for _, groups, _ in collectives(text) for g in groups for i in g], default=-1),
      }
      for k, text in hlo.items()
    }
  return report


def main() -> None:
  mode, workdir = sys.argv[1], sys.argv[2]
  if mode == "cpu":  # the runs share their equal programs (a TPU compile-only client cannot load them)
    jax.config.update("jax_compilation_cache_dir", f"{workdir}/jax_cache")
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0)
  if mode == "cpu":
    report = cpu_report(workdir)
    started = time.perf_counter()
    report["loop"] = loop_report(f"{workdir}/loop")
    print(f"loop: {time.perf_counter() - started:.1f} s", file=sys.stderr)
  else:
    report = aot_report()
  print(json.dumps(report))


if __name__ == "__main__":
  main()
