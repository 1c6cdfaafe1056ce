"""`manifold eval --tasks`: EleutherAI's lm-eval harness scoring a run's model through `manifold serve`.

    manifold eval --workdir runs/quickstart --tasks hellaswag,piqa --limit 200
    manifold eval --workdir runs/quickstart --tasks my_task --include-path tasks/

It starts `manifold serve` for the run on a free loopback port (or uses the server at `--server`),
points lm-eval's `local-completions` model at it and stops the server afterwards. lm-eval finds
the server's tokenizer through `/tokenize` and sends token ids, split into context and continuation
as it splits them for any model; log-likelihoods come from `echo` + `logprobs` on the prompt.
`--chat` uses `local-chat-completions` (the server's chat template) instead: generation tasks only,
since a chat endpoint gives no prompt log-likelihoods. Writes `<workdir>/lm_eval/<time>/results.json`
(the command, the checkpoint step, weights, lm-eval's scores and task configs) and
`samples_<task>.jsonl` (every document with its requests, responses and per-document scores).
"""

from __future__ import annotations

import contextlib
import datetime
import json
import os
import tempfile
from typing import Callable

from manifold import files
from manifold.config import ConfigError
from manifold.train.restore import read_run_config


def _lm_eval():
  try:
    import lm_eval
  except ImportError:
    raise ConfigError("--tasks needs EleutherAI's lm-eval: pip install 'lm_eval[api]>=0.4.13'") from None
  return lm_eval


def task_manager(include_path: list[str]):
  """lm-eval's TaskManager over its own tasks and the YAML files under `include_path`."""
  from lm_eval.tasks import TaskManager

  for folder in include_path:
    if not os.path.isdir(folder):
      raise ConfigError(f"--include-path {folder}: not a folder of lm-eval task YAML files")
  return TaskManager(include_path=include_path or None, verbosity="ERROR")


def run_tasks(
  workdir: str,
  tasks: list[str],
  *,
  include_path: list[str] = (),
  num_fewshot: int | None = None,
  limit: float | None = None,
  chat: bool = False,
  server: str | None = None,
  api_key: str | None = None,
  concurrency: int = 4,
  serve_flags: list[str] = (),
  env: dict | None = None,
  command: str = "",
  say: Callable[[str], None] = print,
) -> str:
  """Scores the run in `workdir` on lm-eval `tasks`; returns the folder the results went to.

  `server`: the base URL of a running `manifold serve` (None: start one with `serve_flags`, e.g.
  ["--quantize", "int8"], in `env`); `api_key`: its key (None: $MANIFOLD_API_KEY, if set);
  `concurrency`: requests in flight (and the started server's slots); `command`: recorded with the scores.
  """
  from manifold.serve.server import API_KEY_ENV

  lm_eval = _lm_eval()
  api_key = api_key or os.environ.get(API_KEY_ENV) or None  # a server started here requires it too
  if concurrency < 1:
    raise ConfigError(f"--concurrency {concurrency}: must be at least 1")
  if server and serve_flags:
    raise ConfigError("--server: the running server's weights are used; --quantize, --dtype and --step apply "
                      "only to a server `manifold eval` starts")  # fmt: skip
  if limit is not None and limit <= 0:
    raise ConfigError(f"--limit {limit}: must be positive (a count of documents, or a fraction below 1)")
  read_run_config(workdir)  # a run is there: its results go beside it
  manager = task_manager(list(include_path))
  unknown = [t for t in tasks if not manager.match_tasks([t])]
  if unknown:
    raise ConfigError(f"--tasks: unknown lm-eval task {unknown[0]!r}; `lm-eval ls tasks` lists them, "
                      "--include-path adds folders of task YAML files")  # fmt: skip
  stamp = datetime.datetime.now(datetime.timezone.utc).strftime("%Y%m%d-%H%M%S")
  out, n = files.path(workdir) / "lm_eval" / stamp, 1
  while out.exists():  # an earlier evaluation in the same second keeps its folder
    out, n = out.parent / f"{stamp}-{n}", n + 1
  flags = ["--slots", str(concurrency), "--max-queue", str(4 * concurrency), *serve_flags]
  started = contextlib.nullcontext((server, None)) if server else _started(workdir, out, flags, env)
  with started as (url, _), _bearer(api_key):
    url = url.rstrip("/")
    info = _server_info(url, api_key)
    say(f"lm-eval: {', '.join(tasks)} on {info['model']} (step {info['step']}, weights {info['quantize']}) at {url}")
    endpoint = "/v1/chat/completions" if chat else "/v1/completions"
    model_args = {
      "base_url": url + endpoint,
      "model": info["model"],
      "tokenizer_backend": None if chat else "remote",
      "max_length": info["max_len"],
      "num_concurrent": concurrency,
      "max_retries": 1,
      "timeout": 600,
    }
    if api_key and not chat:
      model_args["auth_token"] = api_key  # the remote tokenizer's header (requests read $OPENAI_API_KEY)
    results = lm_eval.simple_evaluate(
      model="local-chat-completions" if chat else "local-completions",
      model_args=model_args,
      tasks=tasks,
      num_fewshot=num_fewshot,
      limit=limit,
      task_manager=manager,
      apply_chat_template=chat,
      log_samples=True,
      verbosity="WARNING",
    )
  samples = results.pop("samples")
  record = {
    "command": command,
    "workdir": workdir,
    "step": info["step"],
    "quantize": info["quantize"],
    "endpoint": endpoint,
    "lm_eval": results,
  }
  from lm_eval.utils import make_table

  _write(out / "results.json", [record], indent=1)
  for task, docs in samples.items():
    _write(out / f"samples_{task}.jsonl", docs)
  say(make_table(results))
  say(f"results: {out}")
  return os.fspath(out)


def _write(path, objects: list, indent: int | None = None) -> None:
  from lm_eval.utils import handle_non_serializable

  dump = lambda obj: json.dumps(obj, default=handle_non_serializable, indent=indent, ensure_ascii=False)  # noqa: E731
  files.write_atomic(path, "".join(dump(obj) + "\n" for obj in objects))


@contextlib.contextmanager
def _started(workdir: str, out, flags: list[str], env: dict | None):
  """The server for `workdir`, its log in `out` (in a local temporary folder for a bucket's run)."""
  from manifold.serve.server import running_server

  logs = tempfile.mkdtemp(prefix="manifold-serve-") if files.is_remote(out) else os.fspath(out)
  os.makedirs(logs, exist_ok=True)
  with running_server(workdir, os.path.join(logs, "serve.log"), flags=flags, env=env) as started:
    yield started


@contextlib.contextmanager
def _bearer(api_key: str | None):
  """$OPENAI_API_KEY (which lm-eval's API models send) set to `api_key` for the duration."""
  before = os.environ.get("OPENAI_API_KEY")
  if api_key:
    os.environ["OPENAI_API_KEY"] = api_key
  try:
    yield
  finally:
    if before is None:
      os.environ.pop("OPENAI_API_KEY", None)
    else:
      os.environ["OPENAI_API_KEY"] = before


def _server_info(url: str, api_key: str | None) -> dict:
  """{model, step, quantize, max_len} of the server at `url`; one line if it cannot be asked."""
  import httpx

  headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
  try:
    health = httpx.get(f"{url}/health", timeout=10).json()
    models = httpx.get(f"{url}/v1/models", headers=headers, timeout=10)
    models.raise_for_status()
  except (httpx.HTTPError, ValueError) as e:
    raise ConfigError(f"--server {url}: not a reachable `manifold serve` ({e}); check the URL and --api-key") from None
  model = models.json()["data"][0]
  return {"model": model["id"], "max_len": model["max_model_len"], "step": health.get("step"),
          "quantize": health.get("quantize")}  # fmt: skip
