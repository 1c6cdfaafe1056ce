"""Times the mHC kernels against the jit-compiled reference on the local accelerator.

  PYTHONPATH=src:. python kernels/mhc/bench.py [--tokens 16384,65536] [--dims 2048,4096,7168]
  PYTHONPATH=src:. python kernels/mhc/bench.py --traffic [...]   # the byte counts only, on any machine
  PYTHONPATH=src:. python kernels/mhc/bench.py --static [...]    # sm_90 registers etc., any machine; needs `triton`
  PYTHONPATH=src:. python kernels/mhc/bench.py --sinkhorn [--tokens 16384,131072]  # the XLA Sinkhorn alone

The op is one connection's mixing without its sub-block, n = 4, bfloat16, in two forms
(`--forms`, `layer_fns`): `separate`, (h, out) = (pre-mix of x, res-mix of x + post^T y) from x
[N, n D] and y [N, D] by `pre` then `res_post`; `merged`, as the model runs a connection between
two others, out = the previous connection's res-mix of x + post^T y and h its pre-mix by this
connection, through `merge`. Forward+backward also returns dL/dx, dL/dy and the weights'
gradients from cotangents of h and out.
Bytes: `traffic` counts what the traced program reads and writes (each stream-sized array
2 n D bytes per token): every kernel's and XLA op's operands and results; `minimum` reads
every input and writes every output once. Bandwidth is kernel bytes over time, against the best
of three measured copies (`copy_bandwidths`: on an H200 a device-to-device copy is about
4.2 TB/s, XLA's `a * 2` 2.7). Times are wall-clock of the jitted layer, so they include the
host's dispatch and the gaps between its kernel launches; `benchmarks/mhc_profile.py` gives
the GPU time of each kernel (on an H100 one layer's 1.480 ms of GPU time read 1.77 ms here).
"""

from __future__ import annotations

import argparse
import collections
import functools
import itertools
import os
import re
import subprocess
import sys
import tempfile
import time
from typing import Iterator

import jax
import jax.extend.core as core
import jax.numpy as jnp

from kernels.mhc import api, calls, reference
from kernels.mhc.sinkhorn import sinkhorn
from kernels.mhc.tiles import parse_tiles
from kernels.timing import timed

N_STREAMS = 4
SETTINGS = dict(n=N_STREAMS, iters=20, kind="exp", eps=1e-6)  # one connection's, as api.Spec takes them


def copy_bandwidths() -> dict[str, float]:
  """Bytes per second (read + write) of three ways to move 2 GiB of bfloat16 through HBM: a
  device-to-device copy of the buffer (`device_put` without aliasing: the runtime's memcpy),
  XLA's `a * 2` (read + write) and `a + b` (two reads + write)."""
  a = jnp.ones((2**30,), jnp.bfloat16)
  b = a + 1
  return {
    "device-to-device copy": 2 * a.nbytes / timed(lambda a: jax.device_put(a, a.sharding, may_alias=False), a),
    "XLA a * 2": 2 * a.nbytes / timed(jax.jit(lambda a: a * 2), a),
    "XLA a + b": 3 * a.nbytes / timed(jax.jit(lambda a, b: a + b), a, b),
  }


LAYOUT_ONLY = {"reshape", "squeeze", "expand_dims", "broadcast_in_dim", "iota"}  # ops that move no bytes


def minimum_units(n: int) -> dict[str, int]:
  """Stream units a token of one connection at the least: each input read, each output written once."""
  return {"forward": 2 * n + 2, "forward+backward": 5 * n + 5}


def traffic(unit: int, fn, *args) -> tuple[float, float]:
  """What `fn(*args)` reads and writes as traced, in units of `unit` bytes (one [N, D] array):
  (stream units, row units). Each Pallas kernel's and XLA op's operands and results count (ops
  inside jit / custom_vjp / shard_map followed, layout-only ops free; a GPU kernel reads each
  operand once). Stream units: ops with an array of `unit` bytes or more (the kernels, dL/dphi's
  matmul). Row units: the rest, ops on per-token rows such as [N, W] (the Sinkhorn's
  backward); counted op by op, an upper bound, since XLA fuses them."""
  streams = rows = 0
  for eqn in equations(jax.make_jaxpr(fn)(*args).jaxpr):
    if eqn.primitive.name in LAYOUT_ONLY:
      continue
    sizes = _sizes(eqn)
    if max(sizes) >= unit:
      streams += sum(sizes)
    else:
      rows += sum(sizes)
  return streams / unit, rows / unit


def _sizes(eqn: core.JaxprEqn) -> list[int]:
  """Bytes of each operand and result of `eqn` (literals free)."""
  return [v.aval.size * v.aval.dtype.itemsize for v in (*eqn.invars, *eqn.outvars) if not isinstance(v, core.Literal)]


def kernel_bytes(fn, *args) -> dict[str, int]:
  """Bytes each Pallas kernel of `fn(*args)` reads and writes as traced, by kernel name
  (`mhc_<body>_<backend>`), summed over its calls."""
  out = collections.Counter()
  for eqn in equations(jax.make_jaxpr(fn)(*args).jaxpr):
    if eqn.primitive.name == "pallas_call":
      out[eqn.params["name"]] += sum(_sizes(eqn))
  return dict(out)


def equations(jaxpr: core.Jaxpr) -> Iterator[core.JaxprEqn]:
  """`jaxpr`'s equations, with those of the jaxprs an equation calls (jit, custom_vjp,
  shard_map) in its place; a pallas_call is one equation."""
  for eqn in jaxpr.eqns:
    inner = [getattr(p, "jaxpr", p) for p in eqn.params.values() if isinstance(p, (core.Jaxpr, core.ClosedJaxpr))]
    if eqn.primitive.name == "pallas_call" or not inner:
      yield eqn
    else:
      for j in inner:
        yield from equations(j)


def max_relative_error(got, want) -> float:
  """Largest |got - want| over max |want|, across all outputs."""
  return max(
    float(jnp.max(jnp.abs(a.astype(jnp.float32) - b.astype(jnp.float32))) / (jnp.max(jnp.abs(b)) + 1e-6))
    for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(want))
  )


FORMS = ("merged", "separate")  # how the op runs a connection (layer_fns)


def layer_fns(n: int, tiles: tuple = (), implementation: str = "auto", form: str = "merged"):
  """(kernels, reference), each (x, y, phi, alpha, bias) -> (h, out). `separate`: `pre` of x, then
  `res_post` of x and y, one connection alone. `merged`: a connection as the model runs it
  between two others, `merge`: the previous connection's res_post (out = res x + post^T y, its
  coefficients `previous_rows`) fused with this one's `pre` of out. As `Streams`, x's cotangent
  there is dL/d out and out's is dL/d out of the next res_post (mixed by this connection's res);
  the reference's gradients follow the same convention."""
  settings = dict(SETTINGS, n=n)
  spec = api.Spec(**settings, implementation=implementation, tiles=tiles)
  if form == "separate":

    def kernel(x, y, phi, alpha, bias):
      h, coeff, xs = api.pre(x, phi, alpha, bias, spec)
      return h, api.res_post(xs, y, coeff, spec)

    def ref(x, y, phi, alpha, bias):
      h, _, post, res = reference.pre(x, phi, alpha, bias, **settings)
      return h, reference.res_post(x, y, post, res)

    return kernel, ref
  if form != "merged":
    raise ValueError(f"form {form!r}; use one of {', '.join(FORMS)}")

  def kernel(x, y, phi, alpha, bias):
    h, _, out = api.merge(api.Streams(x), y, previous_rows(n, x.shape[0]), phi, alpha, bias, spec)
    return h, out.x

  def ref(x, y, phi, alpha, bias):
    _, post, res = api.unpack(previous_rows(n, x.shape[0]), n)
    held = jax.lax.stop_gradient(x)
    out = (x - held) + reference.res_post(held, y, post, res)  # x's cotangent: dL/d out
    h, _, _, res_next = reference.pre(out, phi, alpha, bias, **settings)
    return h, _mixed_cotangent(out, jax.lax.stop_gradient(res_next))

  return kernel, ref


def previous_rows(n: int, tokens: int) -> jax.Array:
  """The previous connection's coefficient rows [tokens, W] in the `merged` op: post 1 and a
  doubly stochastic res (0.7 I + 0.3 / n), the same for every token."""
  res = 0.7 * jnp.eye(n) + 0.3 / n
  row = jnp.concatenate([jnp.full((n,), 1 / n), jnp.ones((n,)), res.reshape(-1)])
  return jnp.broadcast_to(jnp.pad(row, (0, calls.width(n) - row.size)), (tokens, calls.width(n)))


@jax.custom_vjp
def _mixed_cotangent(out, res):
  """out [N, n D] unchanged; its cotangent g becomes res^T g (res [N, n, n]), as the kernels' next
  res_post would hand it back through `Streams`."""
  return out


def _mixed_cotangent_forward(out, res):
  return out, res


def _mixed_cotangent_backward(res, g):
  n = res.shape[1]
  mixed = jnp.einsum("tkj,tkd->tjd", res, g.reshape(g.shape[0], n, -1).astype(jnp.float32))
  return mixed.reshape(g.shape).astype(g.dtype), jnp.zeros_like(res)


_mixed_cotangent.defvjp(_mixed_cotangent_forward, _mixed_cotangent_backward)


def forward_backward(fn):
  def run(x, y, phi, alpha, bias, g_h, g_out):
    outs, vjp = jax.vjp(fn, x, y, phi, alpha, bias)
    return outs, vjp((g_h, g_out))

  return jax.jit(run)


def inputs(tokens: int, d: int, n: int):
  keys = jax.random.split(jax.random.key(0), 5)
  w = 2 * n + n * n
  x = jax.random.normal(keys[0], (tokens, n * d), jnp.bfloat16)
  y = jax.random.normal(keys[1], (tokens, d), jnp.bfloat16)
  phi = 0.02 * jax.random.normal(keys[2], (n * d, w), jnp.float32)
  alpha, bias = jnp.full((3,), 0.01, jnp.float32), jnp.zeros((w,), jnp.float32)
  g_h, g_out = jax.random.normal(keys[3], (tokens, d), jnp.bfloat16), jax.random.normal(keys[4], x.shape, x.dtype)
  return (x, y, phi, alpha, bias), (g_h, g_out)


GRID = "block_tokens=8,16,32,64;chunk=64,128,256;num_warps=4,8;num_stages=1"  # --tiles' default grid


def parse_grid(text: str) -> list[tuple[tuple[str, int], ...]]:
  """'block_tokens=8,16;num_warps=4' -> every combination, each as `Spec.tiles` takes it."""
  axes = []
  for item in filter(None, (part.strip() for part in text.split(";"))):
    name, _, values = item.partition("=")
    axes.append([parse_tiles(f"{name}={v}")[0] for v in values.split(",")])
  return list(itertools.product(*axes))


def kernel_cases(tokens: int, d: int, n: int) -> dict[str, tuple]:
  """Each GPU kernel (calls.KERNELS; "pre forward" and "merge forward" without the pre-mix) with inputs
  of a layer at this shape: name -> (function of a backend, arguments)."""
  (x, y, phi, alpha, bias), (g_h, g_out) = inputs(tokens, d, n)
  w = calls.width(n)
  phi_p, affine = api.kernel_operands(x, phi, alpha, bias, n)
  settings = dict(SETTINGS, n=n)
  *_, coeff, logits, rms = calls.pre_forward(
    api._backend(api.Spec(**settings)), x, phi_p, affine, **settings, alone=True
  )
  g_z, g_coeff, g_pre = 0.01 * jax.random.normal(jax.random.key(1), (3, *coeff.shape), jnp.float32)
  coefficients = dict(n=n, nd=n * d, iters=settings["iters"], kind=settings["kind"])
  return {
    "pre forward": (lambda b, *a: calls.pre_forward(b, *a, **settings, alone=True), (x, phi_p, affine)),
    "pre mix": (lambda b, *a: calls.pre_mix(b, *a, n=n), (x, coeff)),
    "res_post forward": (lambda b, *a: calls.res_post_forward(b, *a, n=n), (x, y, coeff)),
    "res_post backward": (lambda b, *a: calls.res_post_backward(b, *a, n=n), (x, y, coeff, g_out)),
    "pre backward reduce": (lambda b, *a: calls.pre_backward_reduce(b, *a, n=n, w=w), (x, g_h)),
    "pre backward coefficients": (
      lambda b, *a: calls.pre_backward_coefficients(b, *a, **coefficients),
      (logits, g_coeff, g_pre, coeff, rms, affine),
    ),
    "pre backward streams": (
      lambda b, *a: calls.pre_backward_streams(b, *a, n=n),
      (x, g_h, phi_p, g_z, coeff, g_out),
    ),
    "merge forward": (
      lambda b, *a: calls.merge_forward(b, *a, **settings, alone=True),
      (x, y, previous_rows(n, tokens), phi_p, affine),
    ),
  }


def print_traffic(forms: list[str], tokens: str, dims: str) -> None:
  """The layer's traced stream units (and row units) a token, forward and forward+backward, in
  each form at each shape; tracing only (the GPU kernels), so it runs anywhere."""
  n = N_STREAMS
  print("| form | tokens | D | forward units | forward+backward units | bytes / minimum, forward+backward |")
  print("| --- | --- | --- | --- | --- | --- |")
  for form in forms:
    kernel = layer_fns(n, implementation="triton", form=form)[0]
    for t in (int(v) for v in tokens.split(",")):
      for d in (int(v) for v in dims.split(",")):
        (x, y, phi, alpha, bias), (g_h, g_out) = inputs(t, d, n)
        unit = t * d * x.dtype.itemsize
        f, f_rows = traffic(unit, jax.jit(kernel), x, y, phi, alpha, bias)
        b, b_rows = traffic(unit, forward_backward(kernel), x, y, phi, alpha, bias, g_h, g_out)
        over = b / minimum_units(n)["forward+backward"]
        print(f"| {form} | {t} | {d} | {f:.1f} (+{f_rows:.1f}) | {b:.1f} (+{b_rows:.1f}) | {over:.2f} |")


def triton_ir(fn, *args) -> dict[str, str]:
  """The Triton IR (text) of every Pallas Triton kernel in `fn(*args)`, lowered for CUDA on any
  machine: kernel name (`mhc_<body>_triton`) -> module. Hooks Pallas's lowering (a private JAX
  module) while `fn` is lowered."""
  from jax._src.pallas.triton import pallas_call_registration as registration

  modules, lower = {}, registration.lowering.lower_jaxpr_to_triton_module

  def capture(jaxpr, *rest, **kwargs):
    result = lower(jaxpr, *rest, **kwargs)
    modules[jaxpr.debug_info.func_name] = result.module.operation.get_asm()
    return result

  registration.lowering.lower_jaxpr_to_triton_module = capture
  try:
    jax.jit(fn).trace(*args).lower(lowering_platforms=("cuda",))
  finally:
    registration.lowering.lower_jaxpr_to_triton_module = lower
  return modules


def layer_triton_ir(n: int, primal, cotangents) -> dict[str, str]:
  """`triton_ir` of the layer's forward+backward in every form: between them, every GPU kernel."""
  modules = {}
  for form in FORMS:
    layer = layer_fns(n, implementation="triton", form=form)[0]
    modules.update(triton_ir(forward_backward(layer), *primal, *cotangents))
  return modules


def compile_sm90(module: str, num_warps: int, num_stages: int) -> dict[str, int]:
  """Compiles Triton IR text for sm_90 with the `triton` package (its passes, its ptxas), with no
  GPU: registers a thread, layout conversions in the GPU IR (each a round trip through shared
  memory), barriers and instructions in the SASS."""
  here = os.path.dirname(os.path.abspath(__file__))  # run as a script, its folder's triton.py would shadow the package
  sys.path[:] = [p for p in sys.path if os.path.abspath(p or os.curdir) != here]
  try:
    import triton
    from triton._C.libtriton import ir
    from triton.backends.compiler import GPUTarget
    from triton.compiler.compiler import Language, make_backend
  except ImportError:
    raise SystemExit("--static compiles with the `triton` package: pip install triton") from None
  target = GPUTarget("cuda", 90, 32)
  backend = make_backend(target)
  options = backend.parse_options({"num_warps": num_warps, "num_stages": num_stages})
  context = ir.context()
  ir.load_dialects(context)
  backend.load_dialects(context)
  with tempfile.TemporaryDirectory() as tmp:
    path = os.path.join(tmp, "kernel.ttir")
    with open(path, "w") as f:
      f.write(module)
    compiled = ir.parse_mlir_module(path, context)
    compiled.context = context
    stages, metadata, text = {}, {"hash": "", "target": target, **options.__dict__}, {}
    backend.add_stages(stages, options, Language.TRITON)
    for name, stage in stages.items():
      compiled = stage(compiled, metadata)
      text[name] = compiled if isinstance(compiled, (str, bytes)) else str(compiled)  # later stages mutate it
    with open(path + ".cubin", "wb") as f:
      f.write(text["cubin"])
    tools = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")
    usage = subprocess.run([tools, "--dump-resource-usage", path + ".cubin"], capture_output=True, text=True).stdout
    sass = subprocess.run([tools, "--dump-sass", path + ".cubin"], capture_output=True, text=True).stdout
  return {
    "registers": int(re.search(r"REG:(\d+)", usage).group(1)),
    "conversions": text["ttgir"].count("ttg.convert_layout"),
    "barriers": len(re.findall(r"\sBAR\b", sass)),
    "instructions": len(re.findall(r"/\*[0-9a-f]{4}\*/", sass)),
  }


def print_static(tokens: int, d: int) -> None:
  """Each GPU kernel of the layer's forward+backward at its tile, compiled for sm_90 here:
  registers, programs an SM holds by registers (65,536 a SM), conversions, barriers."""
  n = N_STREAMS
  primal, cotangents = inputs(tokens, d, n)
  backend = api._backend(api.Spec(**SETTINGS, implementation="triton"))
  modules = layer_triton_ir(n, primal, cotangents)
  print("| kernel | warps | registers | programs / SM | layout conversions | barriers | SASS instructions |")
  print("| --- | --- | --- | --- | --- | --- | --- |")
  for kernel in calls.KERNELS:
    params = backend.tile(kernel).compiler_params
    got = compile_sm90(modules[f"mhc_{kernel}_triton"], params.num_warps, params.num_stages)
    programs = min(65536 // (got["registers"] * 32 * params.num_warps), 64 // params.num_warps)
    print(
      f"| {kernel} | {params.num_warps} | {got['registers']} | {programs} | {got['conversions']} | "
      f"{got['barriers']} | {got['instructions']} |"
    )


def sinkhorn_costs(tokens: int, kind: str, iters: int = SETTINGS["iters"]) -> dict[str, float]:
  """`sinkhorn`'s forward+backward on [tokens, n, n] float32 logits (the XLA path; the kernels'
  backward pass runs `iterate_backward` instead): lines of StableHLO, seconds to compile, median
  ms to run."""
  k1, k2 = jax.random.split(jax.random.key(0))
  logits = 3.0 * jax.random.normal(k1, (tokens, N_STREAMS, N_STREAMS))
  weights = jax.random.normal(k2, (N_STREAMS, N_STREAMS))
  fn = jax.jit(jax.value_and_grad(lambda a: jnp.sum(sinkhorn(a, iters, kind) * weights)))
  start = time.perf_counter()
  lowered = fn.lower(logits)
  compiled = lowered.compile()
  seconds = time.perf_counter() - start
  return {"lines": lowered.as_text().count("\n"), "compile_s": seconds, "ms": 1e3 * timed(compiled, logits)}


def print_sinkhorn(tokens: str) -> None:
  settings = f"n = {N_STREAMS}, t_max = {SETTINGS['iters']}, float32"
  print(f"device: {jax.devices()[0].device_kind}; jax {jax.__version__}; {settings}\n")
  print("| Sinkhorn | tokens | StableHLO lines | compile s | forward+backward ms |\n| --- | --- | --- | --- | --- |")
  for kind in ("exp", "softmax_eps"):
    for count in (int(t) for t in tokens.split(",")):
      got = sinkhorn_costs(count, kind)
      print(f"| {kind} | {count} | {got['lines']} | {got['compile_s']:.2f} | {got['ms']:.3f} |", flush=True)


def sweep_tiles(tokens: int, d: int, grid: str, only: str = "") -> None:
  """Milliseconds of each kernel and of the whole layer's forward+backward for every tile
  setting of `grid`, with each setting's largest relative error against the reference (the
  layer) or against the default tiles' result (a kernel); then the best settings of each.
  `only`: a comma list of the runs to time ("layer" or kernel names), all if empty."""
  n = N_STREAMS
  primal, cotangents = inputs(tokens, d, n)
  cases = kernel_cases(tokens, d, n)
  chosen = set(filter(None, (name.strip() for name in only.split(",")))) or {"layer", *cases}
  if unknown := chosen - {"layer", *cases}:
    raise SystemExit(f"--only: unknown run(s) {sorted(unknown)}; use layer, {', '.join(cases)}")
  cases = {name: case for name, case in cases.items() if name in chosen}
  want = forward_backward(layer_fns(n)[1])(*primal, *cotangents) if "layer" in chosen else None
  default = api._backend(api.Spec(**SETTINGS))
  kernel_want = {name: jax.jit(functools.partial(fn, default))(*args) for name, (fn, args) in cases.items()}
  results = collections.defaultdict(list)  # "layer" or a kernel -> [(ms, err, tiles)]
  for tiles in [(), *parse_grid(grid)]:  # () first: the backend's defaults
    backend = api._backend(api.Spec(**SETTINGS, tiles=tiles))
    runs = (
      {"layer": (forward_backward(layer_fns(n, tiles)[0]), (*primal, *cotangents), want)} if "layer" in chosen else {}
    )
    runs.update({k: (jax.jit(functools.partial(fn, backend)), a, kernel_want[k]) for k, (fn, a) in cases.items()})
    line = []
    for name, (run, args, expected) in runs.items():
      try:
        ms = 1e3 * timed(run, *args, repeats=10)
      except Exception as e:  # noqa: BLE001 -- a tile the compiler rejects is reported and skipped
        line.append(f"{name}: failed ({str(e).splitlines()[0][:80]})")
        continue
      err = max_relative_error(run(*args), expected)
      results[name].append((ms, err, tiles))
      line.append(f"{name} {ms:.3f}")
    print(", ".join(f"{k}={v}" for k, v in tiles) or "defaults", "|", "; ".join(line), flush=True)
  print("\n| op | tiles | ms | max rel. err | at the defaults ms |\n| --- | --- | --- | --- | --- |")
  for name, rows in results.items():
    at_default = next((f"{ms:.3f}" for ms, _, tiles in rows if not tiles), "failed")
    for ms, err, tiles in sorted(rows)[:3]:
      setting = ",".join(f"{k}={v}" for k, v in tiles) or "defaults"
      print(f"| {name} | {setting} | {ms:.3f} | {err:.1e} | {at_default} |")


def main() -> None:
  parser = argparse.ArgumentParser()
  parser.add_argument("--tokens", default="16384,65536")
  parser.add_argument("--dims", default="2048,4096,7168")
  parser.add_argument(
    "--tiles", action="store_true", help="time each kernel and the layer over tile settings at the first shape"
  )
  parser.add_argument("--grid", default=GRID, help="the tile settings --tiles times: name=v1,v2;name=...")
  parser.add_argument("--only", default="", help="--tiles times only these runs: layer and/or kernel names, comma list")
  parser.add_argument(
    "--traffic", action="store_true", help="only the traced byte counts (no timing; any machine, the GPU kernels)"
  )
  parser.add_argument(
    "--static", action="store_true", help="the GPU kernels compiled for sm_90 here, at the first shape (needs triton)"
  )
  parser.add_argument(
    "--sinkhorn", action="store_true", help="only the XLA Sinkhorn's fwd+bwd at each --tokens: HLO, compile, run"
  )
  parser.add_argument(
    "--forms", default=",".join(FORMS), help="the connection's forms to time or count (layer_fns), comma list"
  )
  args = parser.parse_args()
  forms = args.forms.split(",")
  if unknown := set(forms) - set(FORMS):
    raise SystemExit(f"--forms: unknown {sorted(unknown)}; use {', '.join(FORMS)}")
  first = int(args.tokens.split(",")[0]), int(args.dims.split(",")[0])  # the shape --tiles and --static use
  if args.tiles:
    return sweep_tiles(*first, args.grid, args.only)
  if args.static:
    return print_static(*first)
  if args.sinkhorn:
    return print_sinkhorn(args.tokens)
  if args.traffic:
    return print_traffic(forms, args.tokens, args.dims)
  n, s = N_STREAMS, 2  # bfloat16
  bandwidths = copy_bandwidths()
  bandwidth = max(bandwidths.values())  # the baseline: the best the memory was seen to do
  moves = ", ".join(f"{name} {value / 1e12:.2f}" for name, value in bandwidths.items())
  print(
    f"device: {jax.devices()[0].device_kind}; jax {jax.__version__}; TB/s: {moves}; baseline {bandwidth / 1e12:.2f}"
  )
  rows = []
  for form, tokens, d in itertools.product(forms, map(int, args.tokens.split(",")), map(int, args.dims.split(","))):
    kernel, ref = layer_fns(n, form=form)
    (x, y, phi, alpha, bias), (g_h, g_out) = inputs(tokens, d, n)
    cases = {
      "forward": (jax.jit(kernel), jax.jit(ref), (x, y, phi, alpha, bias)),
      "forward+backward": (forward_backward(kernel), forward_backward(ref), (x, y, phi, alpha, bias, g_h, g_out)),
    }
    for name, (kernel_fn, ref_fn, fn_args) in cases.items():
      t_kernel = timed(kernel_fn, *fn_args)
      unit = d * s * tokens  # one [N, D] array's bytes
      units, row_units = traffic(unit, kernel_fn, *fn_args)
      try:
        t_ref, err = timed(ref_fn, *fn_args), max_relative_error(kernel_fn(*fn_args), ref_fn(*fn_args))
      except jax.errors.JaxRuntimeError as e:  # the float32 reference can exhaust device memory
        if "RESOURCE_EXHAUSTED" not in str(e):
          raise
        t_ref, err = float("nan"), float("nan")
      share = units * unit / t_kernel / bandwidth
      row = (form, tokens, d, name, t_ref * 1e3, t_kernel * 1e3, share, units, row_units)
      rows.append((*row, units / minimum_units(n)[name], err))
      print(rows[-1], flush=True)
  print(
    "\n| form | tokens | D | pass | reference ms | kernels ms | speed-up | HBM bandwidth (of baseline) "
    "| stream units (+ row units) | bytes / minimum | max rel. err |"
  )
  print("| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |")
  for form, tokens, d, name, t_ref, t_k, share, units, row_units, over, err in rows:
    ref, speedup = ("out of memory", "-") if t_ref != t_ref else (f"{t_ref:.3f}", f"{t_ref / t_k:.2f}x")
    print(
      f"| {form} | {tokens} | {d} | {name} | {ref} | {t_k:.3f} | {speedup} | {share:.0%} | {units:.1f} (+{row_units:.1f}) "
      f"| {over:.2f} | {err:.1e} |"
    )


if __name__ == "__main__":
  main()
