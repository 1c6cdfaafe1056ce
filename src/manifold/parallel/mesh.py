"""Builds the device mesh from `config.mesh`.

`mesh.{data,fsdp,expert,tensor}` size each axis within a slice (ICI: the fast
interconnect of one TPU slice or one GPU node); `mesh.dcn.{...}` multiply an axis
across slices or nodes (DCN: the data-centre network). Each mesh axis is then
`ici * dcn` devices long, with the DCN factor outermost so only that axis's
collectives cross the slow network. Put `data` (or `fsdp`) on DCN, never `tensor`.

`mesh.island = M > 1` (DiLoCo islands inside one job, `manifold.islands.mesh`) adds an
outermost `island` axis of M groups of devices; the other axes then size one island
(`-1` takes the rest of an island's devices). With several slices / nodes the island
axis is the one that crosses them: `mesh.island = number of slices` puts one island on
each slice, everything inside an island on ICI. With `mesh.island = 1` the mesh has no
island axis and is exactly as before.
"""

from __future__ import annotations

import math
from typing import Sequence

import jax
from jax.experimental import mesh_utils
from jax.sharding import AxisType, Mesh

from manifold.config import ConfigError
from manifold.parallel.sharding import BATCH_AXES

MESH_AXES = ("data", "fsdp", "expert", "tensor")
ISLAND = "island"  # the outermost axis of an islands mesh (mesh.island > 1)


def islands_of(mesh_cfg) -> int:
  """`mesh.island` (1 where the mapping has none, e.g. a hand-built dict)."""
  return int(mesh_cfg.get(ISLAND, 1) or 1)


def dcn_shape(mesh_cfg) -> tuple[int, ...]:
  """Per-axis factors across slices / nodes (all 1 for a single slice)."""
  return tuple(int(mesh_cfg["dcn"][a]) for a in MESH_AXES)


def mesh_shape(mesh_cfg, num_devices: int) -> tuple[int, ...]:
  """The per-slice (ICI) axis sizes, resolving the one `-1` (if any) so that they times
  the DCN factors multiply to `num_devices`."""
  dcn = math.prod(dcn_shape(mesh_cfg))
  if num_devices % dcn:
    raise ConfigError(f"mesh.dcn: factors multiply to {dcn}, which does not divide the {num_devices} devices")
  per_slice = num_devices // dcn
  sizes = [int(mesh_cfg[a]) for a in MESH_AXES]
  fixed = math.prod(s for s in sizes if s != -1)
  if -1 in sizes:
    if per_slice % fixed:
      raise ConfigError(
        f"mesh: fixed axes multiply to {fixed}, which does not divide the {per_slice} devices of a slice"
      )
    sizes[sizes.index(-1)] = per_slice // fixed
  if math.prod(sizes) != per_slice:
    spec = ", ".join(f"mesh.{a}={s}" for a, s in zip(MESH_AXES, sizes))
    raise ConfigError(
      f"mesh: {spec} multiply to {math.prod(sizes)} but a slice has {per_slice} devices "
      f"({num_devices} devices / mesh.dcn {dcn}); set one axis to -1"
    )
  return tuple(sizes)


def make_mesh(mesh_cfg, devices: Sequence[jax.Device] | None = None) -> Mesh:
  """A mesh with axes (data, fsdp, expert, tensor) over `devices` (default: all), with
  `island` in front when `mesh.island > 1` (`make_island_mesh`).

  Several slices (TPU multislice) or processes (GPU nodes) with `mesh.dcn` factors get
  a hybrid mesh: devices of one slice (or of one process, where all share a slice)
  stay together along the ICI part of each axis.
  """
  devices = list(devices) if devices is not None else jax.devices()
  if islands_of(mesh_cfg) > 1:
    return make_island_mesh(mesh_cfg, devices)
  ici, dcn = mesh_shape(mesh_cfg, len(devices)), dcn_shape(mesh_cfg)
  axis_types = (AxisType.Auto,) * len(MESH_AXES)
  if math.prod(dcn) == 1:
    return jax.make_mesh(ici, MESH_AXES, axis_types=axis_types, devices=devices)
  slices = {getattr(d, "slice_index", 0) for d in devices}
  grid = mesh_utils.create_hybrid_device_mesh(ici, dcn, devices, process_is_granule=len(slices) == 1)
  return Mesh(grid, MESH_AXES, axis_types=axis_types)


def _granules(devices: Sequence[jax.Device]) -> tuple[int, bool]:
  """(how many slices, or processes where all devices share one slice; whether processes
  are the granules)."""
  slices = {getattr(d, "slice_index", 0) for d in devices}
  if len(slices) > 1:
    return len(slices), False
  return len({d.process_index for d in devices}), True


def make_island_mesh(mesh_cfg, devices: Sequence[jax.Device]) -> Mesh:
  """Axes (island, data, fsdp, expert, tensor): `mesh.island` groups of devices, each
  sized by the other axes. On one slice / node the island axis is ICI like the others;
  across G slices (or processes) it is the DCN axis: it spans the G / prod(mesh.dcn)
  granules left after the other axes' DCN factors, so that no collective of one island
  leaves its own slices."""
  islands = islands_of(mesh_cfg)
  if len(devices) % islands:
    raise ConfigError(f"mesh.island={islands}: does not divide the {len(devices)} devices")
  ici, dcn = mesh_shape(mesh_cfg, len(devices) // islands), dcn_shape(mesh_cfg)
  names, axis_types = (ISLAND, *MESH_AXES), (AxisType.Auto,) * (1 + len(MESH_AXES))
  granules, process_is_granule = _granules(devices)
  if granules == 1:
    if math.prod(dcn) != 1:
      raise ConfigError(f"mesh.dcn: factors {dcn} need several slices / nodes; these devices are one")
    return jax.make_mesh((islands, *ici), names, axis_types=axis_types, devices=devices)
  if granules % math.prod(dcn) or islands % (granules // math.prod(dcn)):
    raise ConfigError(
      f"mesh.island={islands}: the island axis spans the {granules} slices / nodes left by mesh.dcn "
      f"{dcn}, {granules // max(1, math.prod(dcn))} of them; make mesh.island a multiple of that"
    )
  dcn_islands = granules // math.prod(dcn)
  grid = mesh_utils.create_hybrid_device_mesh(
    (islands // dcn_islands, *ici), (dcn_islands, *dcn), devices, process_is_granule=process_is_granule
  )
  return Mesh(grid, names, axis_types=axis_types)


def island_devices(mesh: Mesh) -> list[set[int]]:
  """The ids of each island's devices (one set for a mesh without an island axis)."""
  if ISLAND not in mesh.shape:
    return [{d.id for d in mesh.devices.flat}]
  grid = mesh.devices.swapaxes(0, mesh.axis_names.index(ISLAND))
  return [{d.id for d in grid[i].flat} for i in range(grid.shape[0])]


def check_fits(cfg, mesh: Mesh) -> None:
  """Raises `ConfigError` unless each microbatch splits evenly over the batch axes
  (data x fsdp x expert) and the routed experts over `expert`."""
  batch_ways = math.prod(mesh.shape[a] for a in BATCH_AXES)
  islands = mesh.shape.get(ISLAND, 1)
  microbatch = cfg.train.batch_size // islands // cfg.train.microbatches
  if cfg.train.batch_size % islands or microbatch % batch_ways:
    per_island = f" per island (of {islands})" if islands > 1 else ""
    raise ConfigError(
      f"train.batch_size={cfg.train.batch_size}: each of the {cfg.train.microbatches} microbatch(es){per_island} must "
      f"split over data x fsdp x expert = {batch_ways} devices; use a multiple of "
      f"{islands * batch_ways * cfg.train.microbatches}"
    )
  if cfg.model.ffn == "moe" and cfg.model.n_routed_experts % mesh.shape["expert"]:
    raise ConfigError(
      f"model.n_routed_experts={cfg.model.n_routed_experts}: must be divisible by the expert axis "
      f"({mesh.shape['expert']} devices); change mesh.expert"
    )
