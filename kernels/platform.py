"""Which platform a computation is for, the one question every `api.py` asks to resolve `auto`."""

from __future__ import annotations

import jax


def platform() -> str:
  """The ambient mesh's device platform (an ahead-of-time compile for a TPU slice on a CPU
  machine), else the default backend's: "cpu", "gpu" or "tpu"."""
  mesh = jax.sharding.get_abstract_mesh()
  name = jax.default_backend() if mesh.empty else mesh.abstract_device.platform
  return {"cuda": "gpu", "rocm": "gpu"}.get(name, name)  # a device's own platform names the GPU's maker
