"""Weight-only quantisation of a model's matmul weights, at load time: int8 or int4 values with
float32 scales per output channel, dequantised inside each matmul's program (or the weights cast
to bfloat16).

A quantised weight is a `QuantizedWeight` in place of the parameter's array. Layers read weights as
`self.w[...].astype(compute_dtype)`; on a `QuantizedWeight` that is `values * scale` in the compute
dtype, so no layer changes and only the int values and the scales stay resident. The scale of a
weight is its largest magnitude over the first axis that is not the expert axis (the contraction
axis of every matmul weight here: `d_model` of wq / wkv_a / w_gate / w_up / head, the rank of
wkv_b, the heads of wo, the hidden width of w_down), divided by the largest integer (127 or 7):
symmetric round-to-nearest, the same scheme as llama.cpp's Q8_0 / Q4_0 up to the block size.

Embedding tables, norms, routers, biases and the residual-stream parameters stay in float: they
are small, and a router's or mixing matrix's error is not averaged out by a matmul.

(qwix's PTQ provider would be the library for this, but its quantised weight does not support the
`.astype` that every layer here applies before its einsum: qwix 0.1.8 raises `Unsupported type`.)
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
from flax import nnx

from manifold.model import Transformer

MODES = ("none", "bfloat16", "int8", "int4")
QUANTIZED = frozenset(
  {"wq", "wq_a", "wq_b", "wk", "wv", "wkv_a", "wkv_b", "wo", "w_gate", "w_up", "w_down", "head", "proj"}
)
_LEVELS = {"int8": (jnp.int8, 127), "int4": (jnp.int4, 7)}


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class QuantizedWeight:
  """A weight stored as `values` (int8 or int4, the weight's shape) x `scale` (float32, broadcast
  over the reduced axis)."""

  values: jax.Array
  scale: jax.Array

  def __getitem__(self, index):
    if index is not Ellipsis:
      raise TypeError("a quantised weight is read whole: w[...]")
    return self

  @property
  def shape(self) -> tuple[int, ...]:
    return self.values.shape

  @property
  def ndim(self) -> int:
    return self.values.ndim

  def astype(self, dtype) -> jax.Array:
    """The dequantised weight in `dtype`."""
    return self.values.astype(dtype) * self.scale.astype(dtype)

  @property
  def nbytes(self) -> int:
    return int(self.values.size * jnp.iinfo(self.values.dtype).bits // 8 + self.scale.nbytes)


def quantize_array(w: jax.Array, mode: str, axis: int) -> QuantizedWeight:
  """`w` rounded to `mode`'s integers with one float32 scale per slice along `axis`."""
  dtype, top = _LEVELS[mode]
  w32 = w.astype(jnp.float32)
  scale = jnp.max(jnp.abs(w32), axis=axis, keepdims=True) / top
  scale = jnp.where(scale > 0, scale, 1.0)
  values = jnp.clip(jnp.round(w32 / scale), -top - (mode == "int4"), top).astype(dtype)
  return QuantizedWeight(values, scale)


def check_weights(quantize: str, dtype: str | None) -> None:
  """`ConfigError` naming the flag unless `quantize` is one of MODES and `dtype` None, float32 or bfloat16."""
  from manifold.config import ConfigError

  if quantize not in MODES:
    raise ConfigError(f"--quantize {quantize}: must be one of {', '.join(MODES)}")
  if dtype not in (None, "float32", "bfloat16"):
    raise ConfigError(f"--dtype {dtype}: must be float32 or bfloat16")


def quantize_model(model: nnx.Module, mode: str) -> dict[str, int]:
  """Stores `model`'s matmul weights in `mode`, in place: "bfloat16" casts them, "int8" / "int4"
  replace them by `QuantizedWeight`s, "none" leaves them; returns {"quantized": weights changed,
  "bytes_before", "bytes_after"} of those weights."""
  check_weights(mode, None)
  counts = {"quantized": 0, "bytes_before": 0, "bytes_after": 0}
  if mode == "none":
    return counts
  for path, param in nnx.iter_graph(model):
    if not isinstance(param, nnx.Param) or not path or path[-1] not in QUANTIZED:
      continue
    w = param.get_value()
    if mode == "bfloat16":
      q = w.astype(jnp.bfloat16)
    else:
      names = param.get_metadata().get("out_sharding") or ()
      q = quantize_array(w, mode, axis=1 if names[:1] == ("expert",) else 0)
    counts["quantized"] += 1
    counts["bytes_before"] += int(w.nbytes)
    counts["bytes_after"] += int(q.nbytes)
    param.set_value(q)
  return counts


def parameter_bytes(model: nnx.Module) -> int:
  """Bytes of `model`'s parameters as stored (int4 at half a byte)."""
  return sum(int(p.get_value().nbytes) for _, p in nnx.iter_graph(model) if isinstance(p, nnx.Param))


def for_inference(model: Transformer, quantize: str = "none", dtype: str | None = None) -> Transformer:
  """`model` computing in `dtype` (None: its own) with its matmul weights stored in `quantize`
  (a new model when the dtype changes; the weights are quantised in place)."""
  if dtype is not None and dtype != model.cfg.dtype:
    cfg = dataclasses.replace(model.cfg, dtype=dtype)
    graphdef, _ = nnx.split(nnx.eval_shape(lambda: Transformer(cfg, rngs=nnx.Rngs(0))))
    model = nnx.merge(graphdef, nnx.state(model))
  quantize_model(model, quantize)
  return model
