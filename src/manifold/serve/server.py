"""`manifold serve`: load a run's checkpoint for inference and serve it over HTTP on this machine.

    manifold serve --workdir runs/quickstart [--host 127.0.0.1] [--port 8000] [--quantize int8]

The model, prompts and completions stay in this process: it binds to loopback unless `--host`
says otherwise, reads nothing from the network, and logs no request content. `--api-key` (or
$MANIFOLD_API_KEY) requires `Authorization: Bearer <key>`; CORS is off unless `--cors-origin`
names the origins a browser page may call from.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import socket
import subprocess
import sys
import time
from typing import Callable, Iterator, Sequence

import jax
import numpy as np
from flax import nnx

from manifold import files
from manifold.config import ConfigError
from manifold.data import check_manifest
from manifold.data.tokenizer import load_tokenizer
from manifold.inference.quantize import check_weights, for_inference, parameter_bytes, quantize_model
from manifold.inference.slots import SlotDecoder
from manifold.model import Transformer
from manifold.serve.batcher import Batcher

API_KEY_ENV = "MANIFOLD_API_KEY"
TOP_LOGPROBS = 20  # the most `logprobs` / `top_logprobs` a request may ask for


class ServerError(RuntimeError):
  """A server child process that exited or did not come up; one line naming its log."""


@dataclasses.dataclass
class Loaded:
  model: Transformer
  tokenizer: object
  step: int
  name: str
  quantized: dict[str, int]


def load_model(
  workdir: str, *, step: int | None = None, quantize: str = "none", dtype: str | None = None, say=print
) -> Loaded:
  """The run's model at checkpoint `step` (newest: None) with its tokenizer, its matmul weights in
  `quantize` ("none" | "bfloat16" | "int8" | "int4"), computing in `dtype` (None: the run's)."""
  from manifold.train.restore import load_trained

  check_weights(quantize, dtype)  # before the checkpoint loads
  run = load_trained(workdir, step, data=False, say=say)
  tokenizer = load_tokenizer(run.cfg.data.tokenizer)
  check_manifest(files.path(workdir) / "manifest.json", tokenizer)
  model = run.model
  if len(jax.devices()) > 1:  # one device decodes: gather a state sharded over the run's mesh
    nnx.update(model, jax.device_put(nnx.state(model), jax.devices()[0]))
  model = for_inference(model, "none", dtype)
  counts = quantize_model(model, quantize)
  name = files.path(workdir).name
  return Loaded(model, tokenizer, run.step, name, counts)


def serve(
  workdir: str,
  *,
  host: str = "127.0.0.1",
  port: int = 8000,
  step: int | None = None,
  slots: int = 16,
  max_queue: int = 64,
  quantize: str = "none",
  dtype: str | None = None,
  api_key: str | None = None,
  cors_origins: tuple[str, ...] = (),
  model_name: str | None = None,
  say: Callable[[str], None] = print,
) -> None:
  """Loads the model, compiles its decoding step, and serves until interrupted."""
  import uvicorn

  from manifold.serve.api import make_app

  for name, value, ok in (("--slots", slots, slots >= 1), ("--max-queue", max_queue, max_queue >= 1),
                          ("--port", port, 0 <= port < 65536)):  # fmt: skip
    if not ok:
      raise ConfigError(f"{name} {value}: out of range")
  api_key = api_key or os.environ.get(API_KEY_ENV) or None
  began = time.perf_counter()
  loaded = load_model(workdir, step=step, quantize=quantize, dtype=dtype, say=say)
  decoder = SlotDecoder(loaded.model, slots, top_logprobs=TOP_LOGPROBS)
  batcher = Batcher(decoder, loaded.tokenizer, max_queue=max_queue, say=say)
  warm_up(decoder)
  q = loaded.quantized
  weights = (
    f", matmul weights {q['bytes_before'] / 1e6:.1f} -> {q['bytes_after'] / 1e6:.1f} MB ({quantize})"
    if q["quantized"]
    else ""
  )
  say(f"loaded {workdir} step {loaded.step}{weights}; compiled in {time.perf_counter() - began:.1f} s")
  app = make_app(
    batcher.start(),
    loaded.tokenizer,
    model_name=model_name or loaded.name,
    max_len=decoder.max_len,
    max_n=slots,
    api_key=api_key,
    cors_origins=cors_origins,
    info={"step": loaded.step, "quantize": quantize, "parameter_bytes": parameter_bytes(loaded.model)},
  )
  if host not in ("127.0.0.1", "localhost", "::1") and api_key is None:
    say(f"warning: serving on {host} without --api-key: anyone who can reach this port can use the model")
  say(f"serving {model_name or loaded.name} on http://{host}:{port}/v1 ({slots} slots, queue {max_queue})")
  sys.stdout.flush()
  try:
    uvicorn.run(app, host=host, port=port, log_level="warning", access_log=False)
  finally:
    batcher.close()


def warm_up(decoder: SlotDecoder) -> None:
  """Compiles the decoding step and the smallest prefill before the first request (twice: the
  cache the first calls return carries the mesh's sharding, which the next calls compile for)."""
  key, n = jax.random.key(0), decoder.slots
  for _ in range(2):
    decoder.admit(0, [0], key=key, temperature=0.0, top_p=1.0)
    jax.block_until_ready(
      decoder.step(np.zeros((3, n), np.int32), np.ones((2, n), np.float32), jax.random.split(key, n))
    )


def free_port() -> int:
  """A TCP port on loopback that nothing listens on now."""
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


@contextlib.contextmanager
def running_server(
  workdir: str, log_path: str, *, flags: Sequence[str] = (), env: dict | None = None, timeout_s: float = 600
) -> Iterator[tuple[str, subprocess.Popen]]:
  """`manifold serve --workdir workdir *flags` in a child process on a free loopback port, its
  output in `log_path`: yields (base URL, process) once `/health` answers; always stopped (SIGTERM,
  then SIGKILL after 30 s). Raises ServerError naming the log if it exits or does not come up."""
  import httpx

  port = free_port()
  command = [sys.executable, "-m", "manifold.cli", "serve", "--workdir", workdir, "--port", str(port), *flags]
  with open(log_path, "w") as log:
    proc = subprocess.Popen(command, env=env, stdout=log, stderr=subprocess.STDOUT)
  url = f"http://127.0.0.1:{port}"
  try:
    deadline = time.monotonic() + timeout_s
    while True:
      if proc.poll() is not None:
        raise ServerError(f"the server exited ({proc.returncode}) before it served; see {log_path}")
      try:
        if httpx.get(f"{url}/health", timeout=2).status_code == 200:
          break
      except httpx.TransportError:
        pass
      if time.monotonic() > deadline:
        raise ServerError(f"the server did not come up in {timeout_s:.0f} s; see {log_path}")
      time.sleep(0.5)
    yield url, proc
  finally:
    proc.terminate()
    try:
      proc.wait(timeout=30)
    except subprocess.TimeoutExpired:
      proc.kill()
      proc.wait()
