"""`manifold` command line: train, eval, generate, sweep, convert, params, compile, launch, islands, tokenizer, rl."""

from __future__ import annotations

import argparse
import functools
import json
import operator
import os
import shlex
import sys
import time

from manifold import files
from manifold.config import SECTIONS, ConfigError, EvalConfig, SampleConfig, load_config, model_config
from manifold.data import DataError
from manifold.launch import SOURCE_ROOT
from manifold.results import write_results
from manifold.schema import Section, require

GPU_MEMORY_FRACTION = "0.9"  # of each GPU's memory JAX may use (XLA_PYTHON_CLIENT_MEM_FRACTION)


class _Parser(argparse.ArgumentParser):
  """Usage mistakes are one `manifold: error:` line too, pointing to the command's --help."""

  def error(self, message: str):
    self.exit(2, f"manifold: error: {message}; see `{self.prog} --help`\n")


def _config_args(parser: argparse.ArgumentParser) -> None:
  parser.add_argument("--config", required=True, help="experiments/<name>.py[:variant]")


def _fields_help() -> str:
  """Every config field with its default and one-line doc, from the section dataclasses."""
  rows = []
  for name, section in SECTIONS.items():
    defaults = section().to_dict()
    for field, doc in section.docs().items():
      default = functools.reduce(operator.getitem, field.split("."), defaults)
      rows.append((name, f"--config.{name}.{field}={default!r}", doc))
  width = max(len(flag) for _, flag, _ in rows)
  lines = ["config fields, with the defaults an experiment starts from (manifold/config.py, manifold/model/config.py):"]
  for name in SECTIONS:
    lines += [f"  {name}:"] + [f"    {flag:<{width}}  {doc}" for section, flag, doc in rows if section == name]
  return "\n".join(lines)


def _check_output(flag: str, path: str, *, directory: bool = True) -> None:
  """Refuses an output path before any work: a URL of a store other than gs:// (orbax cannot
  checkpoint there), a file where a directory goes (or the reverse), a path under a file, or one
  whose nearest existing directory is not writable (checked on local paths only)."""
  if not path:
    raise ConfigError(f"{flag}: empty; pass a path")
  if files.is_remote(path):
    _check_remote(flag, path)
    return
  if os.path.exists(path) and os.path.isdir(path) != directory:
    kind, wanted = ("file", "a directory (it is created if missing)") if directory else ("directory", "a file path")
    raise ConfigError(f"{flag} {path}: is a {kind}; pass {wanted}")
  existing = path if os.path.isdir(path) else os.path.dirname(os.path.abspath(path))
  while not os.path.exists(existing):
    existing = os.path.dirname(existing)
  if not os.path.isdir(existing):
    raise ConfigError(f"{flag} {path}: {existing} is a file, so nothing can be created under it; pass another path")
  if not os.access(existing, os.W_OK | os.X_OK):
    raise ConfigError(f"{flag} {path}: {existing} is not writable; pass a path you can write to")


def _check_remote(flag: str, path: str) -> None:
  if not path.startswith(files.REMOTE):
    raise ConfigError(
      f"{flag} {path}: orbax checkpoints support local paths and gs:// only; "
      "use a gs:// bucket, or a local path (a mounted bucket works as one)"
    )


def _check_run_dir(workdir: str) -> None:
  if files.is_remote(workdir):
    _check_remote("--workdir", workdir)
  if files.path(workdir).is_file():
    raise ConfigError(f"--workdir {workdir}: is a file; pass the directory of a run")


def _checked_flags(section: type[Section], args: argparse.Namespace, names: tuple[str, ...]) -> dict:
  """The flags among `names` that were given; each is the field of `section` with its name and
  passes that field's check, or is one ConfigError naming the flag."""
  given = {name: getattr(args, name) for name in names if getattr(args, name) is not None}
  for name, value in given.items():
    try:
      section.from_mapping({name: value})
    except ConfigError as e:
      raise ConfigError(f"--{name.replace('_', '-')}: {e}") from None
  return given


def _split_overrides(argv: list[str]) -> tuple[list[str], list[str]]:
  """Separates `--config.a.b=v` (or `--config.a.b v`) overrides from the other arguments."""
  rest, overrides, i = [], [], 0
  while i < len(argv):
    arg = argv[i]
    if arg.startswith("--config."):
      if "=" not in arg and i + 1 < len(argv):
        arg, i = f"{arg}={argv[i + 1]}", i + 1
      overrides.append(arg)
    else:
      rest.append(arg)
    i += 1
  return rest, overrides


def _sample_text(run_model, tokenizer, s, *, max_new_tokens: int) -> str:
  """A continuation of `s.prompt` drawn with the sampling settings of `s` (a `sample` section),
  up to the first end-of-text."""
  import jax

  from manifold.inference.engine import sample

  prompt_ids = tokenizer.encode(s.prompt)
  out = sample(
    run_model,
    [prompt_ids],
    max_new_tokens=max_new_tokens,
    key=jax.random.key(s.seed),
    temperature=s.temperature,
    top_k=s.top_k,
    top_p=s.top_p,
    eos_id=tokenizer.eos_id,
  )
  return _continuation(tokenizer, s.prompt, out.tokens[0].tolist()[: int(out.lengths[0])])


def _continuation(tokenizer, prompt: str, new_tokens) -> str:
  """The prompt followed by the decoded new tokens, up to the first end-of-text."""
  new = [int(t) for t in new_tokens]
  if tokenizer.eos_id in new:
    new = new[: new.index(tokenizer.eos_id)]
  return prompt + tokenizer.decode(new)


def _island_overrides(args: argparse.Namespace) -> list[str]:
  """`--islands.store URL --islands.id K` as config overrides (the config check then holds K to
  [0, islands.count))."""
  out = []
  if args.islands_store is not None:
    out.append(f"--config.islands.store={args.islands_store}")
  if args.islands_id is not None:
    if args.islands_id < 0:
      raise ConfigError(f"--islands.id {args.islands_id}: must be an integer in [0, islands.count)")
    out.append(f"--config.islands.id={args.islands_id}")
  return out


def cmd_train(args, overrides) -> int:
  cfg = load_config(args.config, [*overrides, *_island_overrides(args)])
  _check_output("--workdir", args.workdir)
  from manifold.train.loop import train  # heavy imports after the config is known to be good
  from manifold.train.run import default_cache_dir

  cache_dir = cfg.data.cache_dir or default_cache_dir()
  if files.is_remote(cache_dir):
    raise ConfigError(f"--config.data.cache_dir={cache_dir}: the token cache is local; pass a local folder")
  _check_output("--config.data.cache_dir", cache_dir)

  result = train(cfg, args.workdir, progress=not args.no_progress)
  print(result.summary())
  if result.interrupted_by is not None or cfg.sample.max_new_tokens == 0:
    return result.exit_code
  s = cfg.sample
  prompt_tokens = len(result.data.tokenizer.encode(s.prompt))
  if prompt_tokens >= cfg.model.max_seq_len:
    print(
      f"no sample: sample.prompt's {prompt_tokens} tokens fill model.max_seq_len={cfg.model.max_seq_len}; "
      "shorten sample.prompt",
      file=sys.stderr,
    )
    return 0
  max_new = min(s.max_new_tokens, cfg.model.max_seq_len - prompt_tokens)
  model = result.spec.merge(result.state.params, result.state.extra)
  text = _sample_text(model, result.data.tokenizer, s, max_new_tokens=max_new)
  print(f"--- sample (temperature {s.temperature}, top_p {s.top_p}) ---\n{text}\n---")
  return 0


def cmd_eval(args, overrides) -> int:
  from manifold.data import eval_batches
  from manifold.inference.quantize import check_weights
  from manifold.parallel.mesh import make_mesh
  from manifold.train.restore import load_trained
  from manifold.train.run import document_separator, evaluate, token_byte_table
  from manifold.train.step import make_eval_step

  check_weights(args.quantize, args.dtype)  # before the checkpoint loads
  _check_run_dir(args.workdir)
  if args.tasks:
    return _eval_tasks(args)
  num_batches = _checked_flags(EvalConfig, args, ("num_batches",)).get("num_batches")
  run = load_trained(args.workdir, args.step, data=not args.sources)
  cfg = run.cfg
  data = run.data
  if args.sources:  # e.g. a student trained on a teacher's samples, scored on the original held-out files
    from manifold.train.run import load_run_data

    other = cfg.copy_and_resolve_references()
    other.data.sources = args.sources
    data = load_run_data(other)
  mesh = make_mesh(cfg.mesh)
  spec, state = run.spec, run.state
  if args.quantize != "none" or args.dtype:  # the model as `manifold serve` would run it
    spec, state = _inference_state(run, mesh, args.quantize, args.dtype)
  batches = eval_batches(
    data.val,
    batch_size=cfg.eval.batch_size,
    seq_len=cfg.train.seq_len,
    num_batches=num_batches or cfg.eval.num_batches,
  )
  eval_step = make_eval_step(spec, mesh, token_byte_table(data, cfg.model.vocab_size), document_separator(cfg, data))
  result = evaluate(eval_step, state, batches, mesh)
  print(
    f"step {run.step}: val_loss {result['val_loss']:.4f}  val_bits_per_byte {result['val_bits_per_byte']:.4f}  "
    f"({len(batches)} batches x {cfg.eval.batch_size} x {cfg.train.seq_len} tokens)"
  )
  return 0


def _eval_tasks(args) -> int:
  """`manifold eval --tasks`: lm-eval through `manifold serve` (manifold.serve.harness)."""
  from manifold.serve.harness import run_tasks

  if args.sources or args.num_batches is not None:
    raise ConfigError("--tasks scores lm-eval tasks; --sources and --num-batches are for validation bits per byte")
  tasks = [t for t in args.tasks.split(",") if t]
  serve_flags = ["--quantize", args.quantize] if args.quantize != "none" else []
  serve_flags += ["--dtype", args.dtype] if args.dtype else []
  serve_flags += ["--step", str(args.step)] if args.step is not None else []
  run_tasks(args.workdir, tasks, include_path=args.include_path, num_fewshot=args.num_fewshot, limit=args.limit,
            chat=args.chat, server=args.server, api_key=args.api_key, concurrency=args.concurrency,
            serve_flags=serve_flags, command=shlex.join(["manifold", *args.argv]))  # fmt: skip
  return 0


def _inference_state(run, mesh, quantize: str, dtype: str | None):
  """(spec, state) of `run`'s model with its weights in `quantize`, computing in `dtype`, replicated over `mesh`."""
  import dataclasses

  import jax
  from flax import nnx

  from manifold.inference.quantize import for_inference
  from manifold.parallel import sharding

  graphdef, params, extra = nnx.split(for_inference(run.model, quantize, dtype), nnx.Param, ...)
  params, extra = nnx.to_pure_dict(params), nnx.to_pure_dict(extra)
  everywhere = lambda tree: jax.tree.map(lambda _: sharding.replicated(mesh), tree)  # noqa: E731
  shardings = run.spec.shardings.replace(params=everywhere(params), extra=everywhere(extra))
  return dataclasses.replace(run.spec, graphdef=graphdef, shardings=shardings), run.state.replace(
    params=params, extra=extra
  )


def cmd_generate(args, overrides) -> int:
  from manifold.train.restore import load_trained

  flags = ("prompt", "max_new_tokens", "temperature", "top_k", "top_p", "seed")
  given = _checked_flags(SampleConfig, args, flags)  # before the run loads: a bad flag fails at once
  _check_run_dir(args.workdir)
  run = load_trained(args.workdir, args.step)
  s = SampleConfig.from_mapping({**run.cfg.sample.to_dict(), **given})
  prompt_tokens, limit = len(run.data.tokenizer.encode(s.prompt)), run.cfg.model.max_seq_len
  if prompt_tokens + s.max_new_tokens > limit:
    raise ConfigError(
      f"the prompt ({prompt_tokens} tokens) + max_new_tokens ({s.max_new_tokens}) exceeds model.max_seq_len={limit}; "
      "shorten --prompt or lower --max-new-tokens"
    )
  if args.speculative and not run.cfg.model.mtp_depth:
    raise ConfigError("--speculative: the MTP modules draft, and this run has model.mtp_depth=0; drop --speculative")
  print("compiling the decoder (first call)...", file=sys.stderr, flush=True)
  if args.speculative:
    text, accepted, proposed = _speculative_text(run, s)
  else:
    text = _sample_text(run.model, run.data.tokenizer, s, max_new_tokens=s.max_new_tokens)
  print(text)
  if args.speculative:
    rate = accepted / proposed if proposed else 0.0
    print(f"--- speculative (greedy, MTP drafts): accepted {accepted}/{proposed} drafts ({rate:.0%})", file=sys.stderr)
  return 0


def cmd_serve(args, overrides) -> int:
  from manifold.serve.server import serve

  _check_run_dir(args.workdir)
  serve(
    args.workdir,
    host=args.host,
    port=args.port,
    step=args.step,
    slots=args.slots,
    max_queue=args.max_queue,
    quantize=args.quantize,
    dtype=args.dtype,
    api_key=args.api_key,
    cors_origins=tuple(args.cors_origin),
    model_name=args.model_name,
  )
  return 0


def _speculative_text(run, s) -> tuple[str, int, int]:
  import jax.numpy as jnp

  from manifold.inference.speculative import speculative_greedy

  prompt_ids = run.data.tokenizer.encode(s.prompt)
  tokens, accepted, proposed = speculative_greedy(
    run.model, jnp.asarray(prompt_ids, jnp.int32)[None], max_new_tokens=s.max_new_tokens
  )
  return _continuation(run.data.tokenizer, s.prompt, tokens[0, len(prompt_ids) :]), accepted, proposed


def cmd_params(args, overrides) -> int:
  from manifold.model.accounting import count_params, training_flops_per_token

  cfg = load_config(args.config, overrides)
  model_cfg = model_config(cfg)
  counts = count_params(model_cfg)
  flops = training_flops_per_token(model_cfg, cfg.train.seq_len)
  print(f"total parameters      {counts['total']:>16,}")
  print(f"  embedding           {counts['embedding']:>16,}")
  print(f"  non-embedding       {counts['non_embedding']:>16,}")
  print(f"  MTP modules         {counts['mtp']:>16,}")
  print(f"main model            {counts['main']:>16,}  (total without MTP: the size papers quote)")
  print(f"active per token      {counts['active']:>16,}  (main model; unchosen routed experts excluded)")
  print(f"  without embedding   {counts['active_matmul']:>16,}  (the table is only looked up: mHC paper convention)")
  print(f"training FLOPs/token  {flops:>16,.0f}  (seq_len {cfg.train.seq_len}; forward + backward)")
  return 0


def cmd_compile(args, overrides) -> int:
  if args.results:
    _check_output("--results", args.results)
  path = args.config.split(":", 1)[0]
  if args.sweep and not os.path.isfile(path):
    raise ConfigError(f"--config {args.config}: no such file; pass an experiment file with get_sweep()")
  import jax

  jax.config.update("jax_platforms", "cpu")  # the host backend; the TPU devices come from libtpu's topology
  from manifold import aot
  from manifold.launch import slice_overrides
  from manifold.sweep import sweep_args

  configs = [f"{path}:{a}" for a in sweep_args(path)] if args.sweep else [args.config]
  slices = [aot.parse_slice(name) for name in args.topology.split(",") if name]
  rows = []
  for config in configs:
    failures, row = [], None
    for tpu_slice in slices:
      cfg = load_config(config, slice_overrides(overrides, tpu_slice.count))
      start = time.time()
      try:
        report = aot.compile_train_step(cfg, tpu_slice)
      except ConfigError as e:  # the config's mesh or batch does not divide this slice
        print(f"{config} on {tpu_slice.name}: skipped: {e}", flush=True)
        failures.append(f"{tpu_slice.name}: mesh does not divide it")
        continue
      except jax.errors.JaxRuntimeError as e:  # XLA:TPU refuses a program larger than HBM
        if "RESOURCE_EXHAUSTED" not in str(e):
          raise
        reason = str(e).split("RESOURCE_EXHAUSTED: ", 1)[-1].splitlines()[0]
        print(f"{config} on {tpu_slice.name}: does not fit: {reason}", flush=True)
        failures.append(f"{tpu_slice.name}: {reason}")
        continue
      row = aot.report_row(config, report, failures, time.time() - start, cfg)
      print(aot.describe(row), flush=True)
      if report.fits:
        break
      failures.append(f"{tpu_slice.name}: {aot.describe(row).split(': ', 1)[1]}")
    if row is None:
      raise ConfigError(f"{config}: fits none of {args.topology}; see the lines above")
    rows.append(row)
  if args.results:  # earlier rows stay, unless this run compiled the same config again
    rows = write_results(args.results, rows, aot.COLUMNS, key="config")
    print(f"wrote {args.results}/results.md and results.json ({len(rows)} rows)")
  return 0 if all(r["slice"] for r in rows) else 1


def cmd_launch(args, overrides) -> int:
  import shutil
  import subprocess

  from manifold import launch

  load_config(args.config, overrides)  # a bad config fails here, not on every host
  if args.target == "slurm":
    script = launch.slurm_script(args.nodes, args.gpus_per_node, args.config, args.workdir, overrides, args.partition)
    print(script, end="")
    commands = [["sbatch"]]
  elif args.target == "tpu":
    plan = launch.tpu_plan(args.name, args.zone, args.config, args.workdir, overrides, args.project,
                           accelerator_type=args.accelerator_type, slices=args.slices,
                           runtime_version=args.runtime_version, spot=args.spot)  # fmt: skip
    require(args.wait_minutes > 0, f"--wait-minutes {args.wait_minutes}: must be a positive integer")
    commands = plan.commands()
    print("\n".join(map(shlex.join, commands)))
    if plan.ready:
      print(f"# run the describe command until it prints ACTIVE (--run waits up to --wait-minutes {args.wait_minutes})")
  else:
    commands = launch.ssh_commands(args.hosts.split(","), args.port, args.config, args.workdir, overrides)
    print("\n".join(map(shlex.join, commands)))
  if not args.run:
    return 0
  for program in {command[0] for command in commands}:
    if shutil.which(program) is None:
      raise ConfigError(f"--run: {program} is not on PATH; install it, or run the printed commands where it is")
  if args.target == "slurm":
    return subprocess.run(commands[0], input=script, text=True).returncode
  if args.target == "tpu":  # one after the other: create, wait until ACTIVE, copy and install; then train everywhere
    if code := _run_in_turn(plan.create):
      return code
    if plan.ready and (code := _wait_until_active(plan.ready, args.wait_minutes)):
      return code
    if code := _run_in_turn(plan.setup):
      return code
    commands = plan.start
  workers = [subprocess.Popen(command) for command in commands]  # every host at once
  return max(w.wait() for w in workers)


def _run_in_turn(commands: list[list[str]]) -> int:
  """Runs each command after the last, stopping at the first that fails (its exit code; else 0)."""
  import subprocess

  for command in commands:
    if code := subprocess.run(command).returncode:
      print(f"manifold: {shlex.join(command)} exited with {code}", file=sys.stderr)
      return code
  return 0


def _wait_until_active(describe: list[str], minutes: int, poll_s: float = 30.0) -> int:
  """Runs `describe` until it prints ACTIVE (0), a failed state or an error (1), or `minutes` pass (1)."""
  import subprocess

  deadline, last = time.monotonic() + 60 * minutes, None
  while True:
    done = subprocess.run(describe, capture_output=True, text=True)
    state = done.stdout.strip() if done.returncode == 0 else None
    if state is None:
      print(f"manifold: {shlex.join(describe)} exited with {done.returncode}: {done.stderr.strip()}", file=sys.stderr)
      return 1
    if state != last:
      print(f"queued resource: {state}", flush=True)
      last = state
    if state == "ACTIVE":
      return 0
    if state in ("FAILED", "SUSPENDED", "DELETING"):
      print(f"manifold: the queued resource is {state}; see `{shlex.join(describe[:-2])}`", file=sys.stderr)
      return 1
    if time.monotonic() > deadline:
      print(f"manifold: the queued resource is still {state} after {minutes} min (--wait-minutes)", file=sys.stderr)
      return 1
    time.sleep(poll_s)


def cmd_islands(args, overrides) -> int:
  from manifold.islands.local import run_islands
  from manifold.processes import parse_drill

  if args.count < 1:
    raise ConfigError(f"--count {args.count}: must be a positive integer")
  per_island = ("--config.islands.count", "--config.islands.id", "--config.islands.store")  # the launcher sets them
  overrides = [o for o in overrides if not o.startswith(per_island)]
  load_config(args.config, [*overrides, f"--config.islands.count={args.count}"])  # a bad config fails once, here
  _check_output("--workdir", args.workdir)
  kills = parse_drill("--kill", args.kill, int, "ISLAND", args.count)
  joins = parse_drill("--join", args.join, float, "ISLAND", args.count)
  return run_islands(args.config, args.workdir, args.count, overrides, store=args.store, kills=kills, joins=joins)


def cmd_sweep(args, overrides) -> int:
  from manifold.sweep import run_sweep

  if not os.path.isfile(args.config.split(":", 1)[0]):
    raise ConfigError(f"--config {args.config}: no such file; pass an experiment file with get_sweep()")
  results = args.results or args.workdir
  _check_output("--workdir", args.workdir)
  _check_output("--results", results)
  if args.workers < 1:
    raise ConfigError(f"--workers {args.workers}: must be at least 1")
  shard = parse_shard(args.shard) if args.shard else None
  if sum(map(bool, (shard, args.claims, args.workers > 1))) > 1:
    raise ConfigError("--shard, --claims and --workers: pass one (--workers gives its workers their --claims)")
  if args.tables and (shard or args.claims or args.workers > 1):
    raise ConfigError("--tables trains nothing: pass it without --shard, --claims and --workers")
  if args.claims and not os.path.isdir(args.claims):
    raise ConfigError(f"--claims {args.claims}: no such folder; pass one that every process of the sweep shares")
  if args.tables:  # trains nothing, so no SIGTERM can stop it short
    run_sweep(args.config, args.workdir, results, overrides, train_missing=False)
    code, tabulated = 0, True
  elif args.workers > 1:
    from manifold.sweep import run_sweep_workers

    code = run_sweep_workers(args.config, args.workdir, results, overrides, args.workers)
    tabulated = code == 0
  else:  # stopped by SIGTERM: None, and the run saved; exit 0 as `manifold train` does
    summaries = run_sweep(args.config, args.workdir, results, overrides, shard, claims=args.claims or None)
    code, tabulated = 0, summaries is not None and not (shard or args.claims)
  if tabulated:
    print(files.read_text(files.path(results) / "results.md"))
  return code


def parse_shard(text: str) -> tuple[int, int]:
  """'1/4' -> (1, 4); a one-line ConfigError for anything but I/K with 0 <= I < K."""
  i, sep, k = text.partition("/")
  if not (sep and i.isdigit() and k.isdigit() and int(i) < int(k)):
    raise ConfigError(f"--shard {text!r}: must be I/K with 0 <= I < K, e.g. 0/4")
  return int(i), int(k)


def cmd_convert(args, overrides) -> int:
  from manifold.interop import deepseek_v3

  if sum(map(bool, (args.from_hf, args.to_hf, args.to_gguf))) != 1:
    raise ConfigError("convert: pass exactly one of --from-hf DIR, --to-hf DIR or --to-gguf FILE")
  outputs = (("--from-hf", args.from_hf), ("--to-hf", args.to_hf), ("--to-gguf", args.to_gguf))
  for flag, path in (("--workdir", args.workdir), *outputs):
    if files.is_remote(path):
      raise ConfigError(f"{flag} {path}: convert reads and writes local folders only; copy the run or checkpoint first")
  if args.from_hf:
    hf, _ = deepseek_v3.read_hf_checkpoint(args.from_hf)  # the checkpoint's problems first, whatever --config
    deepseek_v3.model_overrides_from_hf(hf)
    _check_output("--workdir", args.workdir)
    base = load_config(args.config, overrides)
    count = deepseek_v3.import_checkpoint(args.from_hf, args.workdir, base)
    print(
      f"imported {count:,} parameters from {args.from_hf} into {args.workdir} (step 0); "
      f"next: manifold eval --workdir {args.workdir}, or train on with manifold train"
    )
  elif args.to_hf:
    _check_run_dir(args.workdir)
    _check_output("--to-hf", args.to_hf)
    count = deepseek_v3.export_checkpoint(args.workdir, args.to_hf)
    print(f"wrote {count} tensors and config.json to {args.to_hf} (DeepseekV3ForCausalLM layout)")
  else:
    from manifold.interop.gguf_export import export_gguf

    _check_run_dir(args.workdir)
    _check_output("--to-gguf", args.to_gguf, directory=False)
    count = export_gguf(args.workdir, args.to_gguf)
    print(f"wrote {count} tensors to {args.to_gguf} (llama.cpp deepseek2)")
  return 0


def cmd_tokenizer_train(args, overrides) -> int:
  from manifold.data import resolve_sources, split_files, train_bpe

  cfg = load_config(args.config, overrides)
  _check_output("--out", os.path.expanduser(args.out), directory=False)
  train_files, _ = split_files(resolve_sources(cfg.data.sources), cfg.data.val_fraction)
  tokenizer = train_bpe(train_files, args.vocab_size, args.out, jsonl_field=cfg.data.jsonl_field)
  print(
    f"wrote {args.out}: {tokenizer.vocab_size} tokens from {len(train_files)} training files; "
    f"use it with --config.data.tokenizer={args.out} --config.model.vocab_size={tokenizer.vocab_size}"
  )
  return 0


def cmd_distill(args, overrides) -> int:
  given = [f"--config.distill.teacher={args.teacher}"] if args.teacher else []
  if args.action == "cache" and args.out:
    given.append(f"--config.distill.cache={args.out}")
  cfg = load_config(args.config, [*overrides, *given])
  if not cfg.distill.teacher:
    raise ConfigError("--teacher: pass the teacher's workdir (a `manifold train` run or a `manifold convert` import)")
  if args.action is None:
    if not args.workdir:
      raise ConfigError("--workdir: pass the student's run directory")
    train_args = argparse.Namespace(**vars(args), islands_store=None, islands_id=None)
    return cmd_train(train_args, [*overrides, *given])
  from manifold.distill.teacher import load_teacher
  from manifold.parallel.mesh import make_mesh
  from manifold.train.run import load_run_data, with_absolute_paths

  cfg = with_absolute_paths(cfg)
  if args.action == "generate":
    if not args.out:
      raise ConfigError("--out: pass the folder for the generated .jsonl files")
    _check_output("--out", args.out)
    if args.files < 2:
      raise ConfigError(f"--files {args.files}: need at least 2 (manifold train holds files out for validation)")
  elif not cfg.distill.cache:
    raise ConfigError("--out: pass the cache's folder or URL (or set distill.cache)")
  data = load_run_data(cfg)
  mesh = make_mesh(cfg.mesh)
  teacher = load_teacher(
    cfg.distill.teacher,
    step=cfg.distill.teacher_step,
    dtype=cfg.distill.teacher_dtype,
    student_cfg=model_config(cfg),
    tokenizer_fingerprint=data.tokenizer.fingerprint,
    mesh=mesh,
    say=_say,
  )
  if args.action == "cache":
    from manifold.distill.cache import build_cache

    build_cache(cfg, teacher, data, mesh, say=_say, progress=not args.no_progress)
    return 0
  from manifold.distill.generate import generate

  report = generate(cfg, teacher, data, args.out, file_count=args.files, say=_say, progress=not args.no_progress)
  print(
    f"train on them: manifold train --config {args.config} --workdir DIR --config.data.sources='{args.out}/*.jsonl'"
    if report.kept
    else ""
  )
  return 0


def cmd_provenance(args, overrides) -> int:
  from manifold.provenance import data_roots

  if args.provenance_command == "prove":
    _check_run_dir(args.workdir)
    proof = data_roots.prove(args.workdir, data_roots.read_document(args.document))
    text = json.dumps(proof, indent=1)
    if args.out:
      _check_output("--out", args.out, directory=False)
      files.write_atomic(args.out, text)
    else:
      print(text)
    where = "in" if proof["present"] else "NOT in"
    signed = f"checkpoint {proof['checkpoint']['step']}" if proof["checkpoint"] else "data_roots.json"
    print(
      f"{args.document} is {where} the training data of {args.workdir} ({signed}, root {proof['root'][:16]}...)",
      file=sys.stderr,
    )
    return 0
  text = files.read_text(args.proof)
  if text is None:
    raise ConfigError(f"{args.proof}: no such proof file; write one with `manifold provenance prove`")
  document = data_roots.read_document(args.document) if args.document else None
  ok, why = data_roots.verify(json.loads(text), document)
  print(("valid: " if ok else "invalid: ") + why)
  return 0 if ok else 1


def cmd_verify(args, overrides) -> int:
  from manifold.provenance.verify import BrokenLink, verify_run

  _check_run_dir(args.workdir)
  try:
    summary = verify_run(args.workdir, args.trust)
  except BrokenLink as e:
    print(f"BROKEN: {e}")
    return 1
  print(f"verified {args.workdir}")
  for line in summary.lines():
    print(f"  {line}")
  return 0


def cmd_ledger(args, overrides) -> int:
  from manifold.provenance import ledger, report

  _check_run_dir(args.workdir)
  try:
    chains = {"run": ledger.read(args.workdir)}
    if args.store:
      from manifold.store import Store, StoreError

      try:
        chains.update(ledger.read_store(Store.open(args.store)))
      except StoreError as e:
        raise ConfigError(f"--store {args.store}: {e}") from None
  except ledger.LedgerError as e:
    print(f"BROKEN: {e}")
    return 1
  entries = {ledger.entry_hash(e): e for c in chains.values() for e in c.entries}  # the run's own mirror counts once
  rows = ledger.totals(entries.values())
  if not rows:
    print(f"{args.workdir}: no contributions in the ledger ({sum(len(c.entries) for c in chains.values())} entries)")
    return 0
  print(report.table(rows))
  out = args.png or str(files.path(args.workdir) / "ledger.png")
  _check_output("--png", out, directory=False)
  report.plot(rows, out)
  print(f"wrote {out}")
  return 0


def cmd_keys_new(args, overrides) -> int:
  from manifold.store.signing import Identity, IdentityError

  path = os.path.abspath(os.path.expanduser(args.out))
  if os.path.lexists(path):
    raise ConfigError(f"--out {path}: exists; `keys new` never overwrites a key, pass a new path")
  try:
    identity = Identity.load_or_create(path)
  except IdentityError as e:
    raise ConfigError(str(e)) from None
  files.write_atomic(path + ".pub", identity.public_key + "\n")
  print(f"private key: {path} (mode 0600; keep it secret)\npublic key:  {path}.pub = {identity.public_key}")
  return 0


def _say(text: str) -> None:
  print(text, flush=True)


def _rl_overrides(args: argparse.Namespace) -> list[str]:
  """`--store URL`, `--init-from DIR` and `--id K` as overrides of rl.store, rl.init_from and rl.worker."""
  out = []
  if getattr(args, "store", None):
    out.append(f"--config.rl.store={args.store}")
  if getattr(args, "init_from", None):
    path = args.init_from if files.is_remote(args.init_from) else os.path.abspath(args.init_from)
    out.append(f"--config.rl.init_from={path}")
  if getattr(args, "id", None) is not None:
    if args.id < 0:
      raise ConfigError(f"--id {args.id}: must be an integer >= 0")
    out.append(f"--config.rl.worker={args.id}")
  return out


def cmd_rl_learner(args, overrides) -> int:
  cfg = load_config(args.config, [*overrides, *_rl_overrides(args)])
  _check_output("--workdir", args.workdir)
  if not cfg.rl.store:
    raise ConfigError("--store: pass the store URL the workers share (file:///shared/dir, gs://..., s3://...)")
  from manifold.rl.learner import Learner  # heavy imports after the config is known to be good

  return Learner(cfg, args.workdir, say=_say).run()


def cmd_rl_worker(args, overrides) -> int:
  cfg = load_config(args.config, [*overrides, *_rl_overrides(args)])
  _check_output("--workdir", args.workdir)
  if not cfg.rl.store:
    raise ConfigError("--store: pass the learner's store URL (file:///shared/dir, gs://..., s3://...)")
  from manifold.rl.worker import Worker

  return Worker(cfg, args.workdir, say=_say).run()


def cmd_rl_local(args, overrides) -> int:
  from manifold.processes import parse_drill
  from manifold.rl.local import run_local

  if args.workers < 1:
    raise ConfigError(f"--workers {args.workers}: must be a positive integer")
  kills = parse_drill("--kill", args.kill, int, "WORKER", args.workers)
  joins = parse_drill("--join", args.join, int, "WORKER")
  late = sorted(set(joins) & set(range(args.workers)) - set(kills))
  if late:
    raise ConfigError(
      f"--join {late[0]}@...: worker {late[0]} already runs from the start; join a new id or --kill it first"
    )
  per_process = ("--config.rl.store", "--config.rl.worker")  # the launcher sets them
  overrides = [o for o in overrides if not o.startswith(per_process)]
  overrides = [*overrides, *_rl_overrides(argparse.Namespace(init_from=args.init_from))]
  load_config(args.config, overrides)  # a bad config fails once, here, not in every process
  _check_output("--workdir", args.workdir)
  return run_local(args.config, args.workdir, args.workers, overrides, store=args.store, kills=kills, joins=joins)


def cmd_rl_corpus(args, overrides) -> int:
  from manifold.config import task_settings
  from manifold.rl.tasks import get_task, write_sft_corpus

  cfg = load_config(args.config, overrides)
  _check_output("--out", args.out)
  if args.count < args.files or args.files < 2:
    raise ConfigError(f"--count {args.count} --files {args.files}: need at least 2 files and a document per file")
  task = get_task(cfg.rl.task, **task_settings(cfg.rl.difficulty))
  os.makedirs(args.out, exist_ok=True)
  per_file = args.count // args.files
  for i in range(args.files):
    write_sft_corpus(task, os.path.join(args.out, f"sft-{i:02d}.jsonl"), per_file, seed=cfg.train.seed * 1000 + i)
  print(
    f"wrote {per_file * args.files} {task.name} documents (train split) in {args.files} files to {args.out}; warm up "
    f"with: manifold train --config {args.config} --workdir DIR --config.data.sources='{args.out}/*.jsonl'"
  )
  return 0


def build_parser() -> argparse.ArgumentParser:
  parser = _Parser(prog="manifold", description=__doc__)
  sub = parser.add_subparsers(dest="command", required=True)

  p = sub.add_parser(
    "train",
    help="train (or resume) a run; overrides: --config.a.b=value",
    epilog=_fields_help(),
    formatter_class=argparse.RawDescriptionHelpFormatter,
  )
  _config_args(p)
  p.add_argument("--workdir", required=True)
  p.add_argument("--no-progress", action="store_true", help="no progress bar")
  p.add_argument(
    "--islands.store", dest="islands_store", default=None, help="this run is one island; the store URL islands share"
  )
  p.add_argument(
    "--islands.id", dest="islands_id", type=int, default=None, help="this island's id in [0, islands.count)"
  )
  p.set_defaults(fn=cmd_train)

  p = sub.add_parser("eval", help="validation loss and bits per byte of a checkpoint")
  p.add_argument("--workdir", required=True)
  p.add_argument("--step", type=int, default=None, help="checkpoint step (default: newest)")
  p.add_argument("--num-batches", type=int, default=None, help="default: eval.num_batches")
  p.add_argument(
    "--sources", default="", help="validate on these data.sources' held-out files instead (the run's tokenizer)"
  )
  p.add_argument("--quantize", default="none", help="matmul weights as `manifold serve` stores them: none | bfloat16 | "
                 "int8 | int4")  # fmt: skip
  p.add_argument("--dtype", default=None, help="compute dtype: float32 | bfloat16 (default: the run's)")
  p.add_argument("--tasks", default="", help="lm-eval tasks, comma-separated, scored through `manifold serve` "
                 "instead of bits per byte (needs lm_eval[api])")  # fmt: skip
  p.add_argument("--include-path", action="append", default=[], help="--tasks: a folder of lm-eval task YAML files")
  p.add_argument("--num-fewshot", type=int, default=None, help="--tasks: examples in each prompt (default: the task's)")
  p.add_argument("--limit", type=float, default=None, help="--tasks: documents per task (below 1: a fraction)")
  p.add_argument("--chat", action="store_true", help="--tasks: through /v1/chat/completions (generation tasks)")
  p.add_argument("--concurrency", type=int, default=4, help="--tasks: requests in flight (the server's slots)")
  p.add_argument("--server", default=None, help="--tasks: a running `manifold serve` URL instead of starting one")
  p.add_argument("--api-key", default=None, help="--tasks: the --server's key (or $MANIFOLD_API_KEY)")
  p.set_defaults(fn=cmd_eval)

  p = sub.add_parser("generate", help="sample a continuation with the KV cache")
  p.add_argument("--workdir", required=True)
  p.add_argument("--prompt", required=True)
  p.add_argument("--step", type=int, default=None)
  p.add_argument("--max-new-tokens", type=int, default=None, help="default: sample.max_new_tokens")
  p.add_argument("--temperature", type=float, default=None, help="0 is greedy")
  p.add_argument("--top-k", type=int, default=None, help="0 disables")
  p.add_argument("--top-p", type=float, default=None, help="1 disables")
  p.add_argument("--seed", type=int, default=None, help="default: sample.seed")
  p.add_argument(
    "--speculative", action="store_true", help="greedy, drafting with the MTP modules; prints the acceptance rate"
  )
  p.set_defaults(fn=cmd_generate)

  p = sub.add_parser("serve", help="an OpenAI-compatible HTTP server for a run's model, on this machine")
  p.add_argument("--workdir", required=True)
  p.add_argument("--step", type=int, default=None, help="checkpoint step (default: newest)")
  p.add_argument("--host", default="127.0.0.1", help="address to bind (default: loopback only)")
  p.add_argument("--port", type=int, default=8000)
  p.add_argument("--slots", type=int, default=16, help="requests decoded together (rows of the KV cache)")
  p.add_argument("--max-queue", type=int, default=64, help="completions that may wait for a slot; beyond: HTTP 429")
  p.add_argument("--quantize", default="none", help="matmul weights: none | bfloat16 | int8 | int4")
  p.add_argument("--dtype", default=None, help="compute dtype: float32 | bfloat16 (default: the run's)")
  p.add_argument("--api-key", default=None, help="require `Authorization: Bearer KEY` (or $MANIFOLD_API_KEY)")
  p.add_argument("--cors-origin", action="append", default=[], help="allow browser calls from this origin")
  p.add_argument("--model-name", default=None, help="the model id clients name (default: the workdir's name)")
  p.set_defaults(fn=cmd_serve)

  p = sub.add_parser("sweep", help="train every variant in the config's get_sweep(), then tabulate and plot")
  p.add_argument(
    "--config", required=True, help="experiments/<name>.py (with get_sweep()); :args go before every variant's"
  )
  p.add_argument("--workdir", required=True, help="one run directory per variant goes under it")
  p.add_argument("--results", default="", help="where results.md / results.json / curves.png go (default: --workdir)")
  p.add_argument("--workers", type=int, default=1, help="variants that train at once, each in its own process")
  p.add_argument("--shard", default="", help="I/K: train only every K-th variant from the I-th, no tables")
  p.add_argument(
    "--claims",
    default="",
    help="a folder the processes of one sweep share (local or NFS): train each unfinished variant no other "
    "has claimed there, first seeds first, then the longest; no tables (what --workers gives each worker)",
  )
  p.add_argument("--tables", action="store_true", help="train nothing: the tables from the runs finished so far")
  p.set_defaults(fn=cmd_sweep)

  p = sub.add_parser("convert", help="import / export Hugging Face DeepSeek-V3 checkpoints; export GGUF")
  p.add_argument("--from-hf", default="", help="HF checkpoint folder (config.json + *.safetensors) to import")
  p.add_argument("--to-hf", default="", help="folder to write the run's newest checkpoint to, in HF layout")
  p.add_argument(
    "--to-gguf", default="", help="GGUF file to write the run's newest checkpoint to (llama.cpp deepseek2)"
  )
  p.add_argument("--workdir", required=True)
  p.add_argument(
    "--config",
    default=str(SOURCE_ROOT / "experiments" / "quickstart.py"),
    help="--from-hf: data/train/sample settings (default: this checkout's experiments/quickstart.py)",
  )
  p.set_defaults(fn=cmd_convert)

  p = sub.add_parser("params", help="parameter counts and training FLOPs per token")
  _config_args(p)
  p.set_defaults(fn=cmd_params)

  p = sub.add_parser("compile", help="AOT-compile the training step for a TPU slice; per-chip memory vs HBM")
  p.add_argument("--config", required=True, help="experiments/<name>.py[:variant] (with --sweep: its get_sweep())")
  p.add_argument(
    "--topology",
    required=True,
    help="TPU slice(s), e.g. v5p-128, v5p:4x4x4, or 2xv5p-32 for two over DCN (mesh.dcn.data=2 unless set); "
    "a comma list stops at the first fit",
  )
  p.add_argument("--sweep", action="store_true", help="every variant of the config's get_sweep()")
  p.add_argument("--results", default="", help="folder for results.md / results.json")
  p.set_defaults(fn=cmd_compile)

  p = sub.add_parser("launch", help="print (or --run) the commands that start a multi-host training job")
  lsub = p.add_subparsers(dest="target", required=True)
  for target, help_text in (
    ("tpu", "a Cloud TPU VM slice through gcloud (all workers)"),
    ("slurm", "an sbatch script for a SLURM GPU cluster, one process per node"),
    ("ssh", "one ssh command per GPU node, without a scheduler"),
  ):
    t = lsub.add_parser(target, help=help_text)
    _config_args(t)
    t.add_argument("--workdir", required=True, help="shared by every host (a bucket or network disk)")
    t.add_argument("--run", action="store_true", help="run the commands instead of only printing them")
    t.set_defaults(fn=cmd_launch)
    if target == "tpu":
      t.add_argument("--name", required=True, help="the TPU VM slice's name (several slices: name-0, name-1, ...)")
      t.add_argument("--zone", required=True)
      t.add_argument("--project", default="")
      t.add_argument("--accelerator-type", default="", help="create the slices first, e.g. v5p-128 (a queued resource)")
      t.add_argument("--slices", type=int, default=1, help="slices over DCN (multislice: sets mesh.dcn.data)")
      t.add_argument("--runtime-version", default="", help="TPU VM runtime (default: the accelerator's)")
      t.add_argument("--spot", action="store_true", help="spot capacity for the queued resource")
      t.add_argument("--wait-minutes", type=int, default=120, help="--run: how long to wait for the slices to be up")
    elif target == "slurm":
      t.add_argument("--nodes", type=int, required=True)
      t.add_argument("--gpus-per-node", type=int, default=8)
      t.add_argument("--partition", default="")
    else:
      t.add_argument("--hosts", required=True, help="comma-separated; the first coordinates")
      t.add_argument("--port", type=int, default=8476, help="the coordinator's port on the first host")

  p = sub.add_parser("islands", help="start M islands of an independent-jobs run on this machine (one train each)")
  _config_args(p)
  p.add_argument("--workdir", required=True, help="island k trains in <workdir>/island-<k>")
  p.add_argument("--count", type=int, required=True, help="M: islands to start (sets islands.count)")
  p.add_argument("--store", default="", help="the store URL (default: file://<workdir>/store)")
  p.add_argument("--kill", action="append", default=[], metavar="ISLAND@STEP", help="SIGKILL an island at a step")
  p.add_argument(
    "--join", action="append", default=[], metavar="ISLAND@SECONDS",
    help="start an island late; after --kill, restart it this long after the kill",
  )  # fmt: skip
  p.set_defaults(fn=cmd_islands)

  p = sub.add_parser("rl", help="GRPO post-training: a learner and rollout workers meeting through a store")
  rsub = p.add_subparsers(dest="rl_command", required=True)
  r = rsub.add_parser("learner", help="train the policy on the workers' rollouts; publish each version")
  _config_args(r)
  r.add_argument("--workdir", required=True, help="the learner's checkpoints, metrics and key")
  r.add_argument("--store", default="", help="the store URL workers share (file://, gs://, s3://); sets rl.store")
  r.add_argument("--init-from", default="", help="workdir of a `manifold train` run (SFT warm-up); sets rl.init_from")
  r.set_defaults(fn=cmd_rl_learner)
  r = rsub.add_parser("worker", help="sample and score rollouts with the learner's newest policy")
  _config_args(r)
  r.add_argument("--workdir", required=True, help="the worker's key, log and rollouts.jsonl")
  r.add_argument("--store", default="", help="the learner's store URL; sets rl.store")
  r.add_argument("--id", type=int, required=True, help="this worker's id (sets rl.worker)")
  r.set_defaults(fn=cmd_rl_worker)
  r = rsub.add_parser("local", help="a learner and N workers on this machine, each its own process")
  _config_args(r)
  r.add_argument("--workdir", required=True, help="learner/ and worker-<k>/ go under it")
  r.add_argument("--workers", type=int, required=True, help="N: workers to start")
  r.add_argument("--store", default="", help="the store URL (default: file://<workdir>/store)")
  r.add_argument("--init-from", default="", help="workdir of a `manifold train` run (SFT warm-up); sets rl.init_from")
  r.add_argument(
    "--kill", action="append", default=[], metavar="WORKER@STEP", help="SIGKILL a worker at a learner step"
  )
  r.add_argument(
    "--join", action="append", default=[], metavar="WORKER@STEP",
    help="start a worker (a new id, or one --kill stopped) once the learner reaches a step",
  )  # fmt: skip
  r.set_defaults(fn=cmd_rl_local)
  r = rsub.add_parser("corpus", help="write the task's SFT warm-up corpus (.jsonl files) for `manifold train`")
  _config_args(r)
  r.add_argument("--out", required=True, help="folder for sft-NN.jsonl")
  r.add_argument("--count", type=int, default=20000, help="documents in all")
  r.add_argument("--files", type=int, default=10, help="files (manifold train holds files out for validation)")
  r.set_defaults(fn=cmd_rl_corpus)

  p = sub.add_parser(
    "distill",
    help="train a student toward a teacher (`distill` section); `cache`: the teacher's top-k log-probs; "
    "`generate`: the teacher's samples as .jsonl data",
  )
  p.add_argument("action", nargs="?", choices=("cache", "generate"), help="omit to train the student")
  _config_args(p)
  p.add_argument("--teacher", default="", help="the teacher's workdir; sets distill.teacher")
  p.add_argument("--workdir", default="", help="the student's run directory (training)")
  p.add_argument("--out", default="", help="cache: its folder or URL (sets distill.cache); generate: the .jsonl folder")
  p.add_argument("--files", type=int, default=10, help="generate: .jsonl files to spread the documents over")
  p.add_argument("--no-progress", action="store_true", help="no progress bar")
  p.set_defaults(fn=cmd_distill)

  p = sub.add_parser("provenance", help="prove that a document was (or was not) in a run's training data; verify")
  psub = p.add_subparsers(dest="provenance_command", required=True)
  r = psub.add_parser("prove", help="the Merkle proof for a document against the run's data_roots.json")
  r.add_argument("workdir")
  r.add_argument("--document", required=True, help="a file holding the document's text")
  r.add_argument("--out", default="", help="write the proof here (default: stdout)")
  r.set_defaults(fn=cmd_provenance)
  r = psub.add_parser("verify", help="check a proof (exit 0 valid, 1 not)")
  r.add_argument("proof")
  r.add_argument("--document", default="", help="also check that the proof is about this document")
  r.set_defaults(fn=cmd_provenance)

  p = sub.add_parser(
    "verify", help="re-hash a run's checkpoints and files; check its signatures, manifest chain, ledger"
  )
  p.add_argument("workdir")
  p.add_argument("--trust", action="append", default=[], help="a trusted public key (.pub file or hex); repeatable")
  p.set_defaults(fn=cmd_verify)

  p = sub.add_parser("ledger", help="per-contributor credit from a run's verified contribution ledger (table + PNG)")
  p.add_argument("workdir")
  p.add_argument("--store", default="", help="also read every judge's ledger mirrored in this store")
  p.add_argument("--png", default="", help="where to write the chart (default <workdir>/ledger.png)")
  p.set_defaults(fn=cmd_ledger)

  p = sub.add_parser("keys", help="Ed25519 identities that sign what islands, learners and workers publish")
  ksub = p.add_subparsers(dest="keys_command", required=True)
  r = ksub.add_parser("new", help="write a new key pair: the private key (mode 0600) and <out>.pub")
  r.add_argument("--out", required=True, help="path of the private key file (must not exist)")
  r.set_defaults(fn=cmd_keys_new)

  p = sub.add_parser("tokenizer", help="tokenizer tools")
  tsub = p.add_subparsers(dest="tokenizer_command", required=True)
  t = tsub.add_parser("train", help="train a byte-level BPE on the config's training files")
  _config_args(t)
  t.add_argument("--vocab-size", type=int, required=True)
  t.add_argument("--out", required=True, help="path of the tokenizer.json to write")
  t.set_defaults(fn=cmd_tokenizer_train)
  return parser


def _main_rl(args, overrides) -> int:
  """`manifold rl ...`: kept apart from `main` so that a worker's start-up imports no training code."""
  from manifold.rl.protocol import RLError
  from manifold.store import StoreError

  try:
    return args.fn(args, overrides)
  except (ConfigError, DataError) as e:
    print(f"manifold: error: {e}", file=sys.stderr)
    return 2
  except (RLError, StoreError) as e:
    print(f"manifold: rl: {' '.join(str(e).split())}", file=sys.stderr)
    return 1
  except KeyboardInterrupt:
    print("manifold: interrupted", file=sys.stderr)
    return 130


def main(argv: list[str] | None = None) -> int:
  argv = sys.argv[1:] if argv is None else argv
  # JAX reserves 75% of a GPU's memory unless told otherwise; a training process owns its GPU.
  os.environ.setdefault("XLA_PYTHON_CLIENT_MEM_FRACTION", GPU_MEMORY_FRACTION)
  rest, overrides = _split_overrides(argv)
  args = build_parser().parse_args(rest)
  args.argv = list(argv)  # for results that record the command that made them
  if args.command == "rl":
    return _main_rl(args, overrides)
  from manifold.islands.store_sync import IslandsError
  from manifold.serve.server import ServerError
  from manifold.train.loop import TrainingDiverged

  if overrides and args.command not in (
    "train", "params", "tokenizer", "sweep", "convert", "compile", "launch", "islands", "distill"
  ):  # fmt: skip
    build_parser().error(f"{args.command} takes no --config.* overrides (it reads the run's config.json)")
  try:
    if args.command in ("train", "eval", "generate", "convert", "sweep", "distill"):
      from manifold.parallel.distributed import initialize_from_env

      initialize_from_env()
    return args.fn(args, overrides)
  except (ConfigError, DataError) as e:
    print(f"manifold: error: {e}", file=sys.stderr)
    return 2
  except TrainingDiverged as e:
    print(f"manifold: training diverged: {e}", file=sys.stderr)
    return 1
  except IslandsError as e:
    print(f"manifold: islands: {e}", file=sys.stderr)
    return 1
  except ServerError as e:
    print(f"manifold: serve: {e}", file=sys.stderr)
    return 1
  except KeyboardInterrupt:
    print("manifold: interrupted", file=sys.stderr)
    return 130


if __name__ == "__main__":
  sys.exit(main())
