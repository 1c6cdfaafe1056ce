"""Distillation: the losses against numpy, the cache against the online path, the teacher frozen,
self-distillation at zero loss, sequence-distillation filters, and the bad inputs."""

from __future__ import annotations

import json
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from manifold import cli
from manifold.config import ConfigError, load_config
from manifold.distill import losses
from manifold.train.metrics import read_metrics


def _log_softmax(x):
  x = x - x.max(-1, keepdims=True)
  return x - np.log(np.exp(x).sum(-1, keepdims=True))


def _numpy_divergence(p_logits, q_logits, kind, beta, t):
  logp, logq = _log_softmax(p_logits / t), _log_softmax(q_logits / t)
  p, q = np.exp(logp), np.exp(logq)
  kl = lambda a, la, lb: (a * (la - lb)).sum(-1)  # noqa: E731
  if kind == "forward_kl":
    return kl(p, logp, logq)
  if kind == "reverse_kl":
    return kl(q, logq, logp)
  m = beta * p + (1 - beta) * q
  return beta * kl(p, logp, np.log(m)) + (1 - beta) * kl(q, logq, np.log(m))


def test_the_loss_equals_a_numpy_statement_for_every_divergence_and_temperature():
  rng = np.random.default_rng(0)
  teacher = rng.normal(size=(2, 5, 11)) * 3
  student = rng.normal(size=(2, 5, 11)) * 3
  labels = rng.integers(0, 11, size=(2, 5))
  mask = (rng.random((2, 5)) > 0.3).astype(np.float32)
  ce = -np.take_along_axis(_log_softmax(student), labels[..., None], -1)[..., 0]
  for kind in losses.DIVERGENCES:
    for t in (0.5, 1.0, 2.5):
      for w in (0.0, 0.3, 1.0):
        teacher_logp = jax.nn.log_softmax(jnp.asarray(teacher, jnp.float32) / t)
        loss, stats = losses.distill_loss(
          jnp.asarray(student, jnp.float32),
          jnp.asarray(labels),
          jnp.asarray(mask),
          divergence_of=lambda s: losses.divergence(teacher_logp, s, kind, 0.3),  # noqa: B023
          temperature=t,
          weight=w,
        )
        d = _numpy_divergence(teacher, student, kind, 0.3, t)
        expected = (w * t**2 * (d * mask).sum() + (1 - w) * (ce * mask).sum()) / mask.sum()
        np.testing.assert_allclose(float(loss), expected, rtol=1e-6, atol=1e-6, err_msg=f"{kind} T={t} w={w}")
        np.testing.assert_allclose(float(stats["divergence"]), (d * mask).sum(), rtol=1e-6, atol=1e-6)


def test_the_top_k_fold_is_the_divergence_of_the_coarsened_distributions():
  rng = np.random.default_rng(1)
  teacher, student = rng.normal(size=(3, 13)) * 2, rng.normal(size=(3, 13)) * 2
  ids, top_logp, log_rest = losses.top_k_teacher(jnp.asarray(teacher, jnp.float32), 4, 1.5)
  p, q = np.exp(_log_softmax(teacher / 1.5)), np.exp(_log_softmax(student / 1.5))
  top = np.argsort(-p, -1)[:, :4]

  def fold(a):  # the teacher's top 4, then the rest of the mass
    kept = np.take_along_axis(a, top, -1)
    return np.log(np.concatenate([kept, 1 - kept.sum(-1, keepdims=True)], -1))

  for kind in losses.DIVERGENCES:
    got = losses.folded_divergence(ids, top_logp, log_rest, jax.nn.log_softmax(jnp.asarray(student) / 1.5), kind)
    expected = _numpy_divergence(fold(p), fold(q), kind, 0.5, 1.0)
    np.testing.assert_allclose(np.asarray(got), expected, rtol=1e-5, atol=1e-6, err_msg=kind)
  full = losses.top_k_teacher(jnp.asarray(teacher, jnp.float32), 13, 1.0)
  assert bool(jnp.all(jnp.isneginf(full[2]))), "k = V leaves no rest"


def test_the_cache_with_k_equal_to_v_trains_like_the_online_teacher(tiny_distill):
  runs, _ = tiny_distill
  cache = json.loads((runs / "cache" / "manifest.json").read_text())
  assert cache["top_k"] == json.loads((runs / "logit" / "config.json").read_text())["model"]["vocab_size"]
  online, cached = read_metrics(runs / "logit" / "metrics.jsonl"), read_metrics(runs / "logit_cache" / "metrics.jsonl")
  keys = ("loss", "divergence", "objective", "grad_norm", "val_bits_per_byte")
  pairs = [(a[k], b[k], k) for a, b in zip(online, cached, strict=True) for k in keys if k in a]
  assert len(pairs) > 10
  for a, b, k in pairs:
    assert a == pytest.approx(b, rel=1e-5, abs=1e-5), k


def test_a_run_lists_its_caches_root_and_verify_rehashes_the_cache(tiny_distill, tmp_path):
  import tensorstore as ts

  from manifold.data.errors import DataError
  from manifold.distill.cache import check_shard, kvstore_url
  from manifold.provenance.verify import verify_run

  runs, _ = tiny_distill
  (shard,) = json.loads((runs / "logit_cache" / "data_roots.json").read_text())["shards"]
  manifest = json.loads((runs / "cache" / "manifest.json").read_text())
  assert shard["kind"] == "distill cache" and shard["root"] == manifest["root"] and shard["documents"] > 1
  assert verify_run(str(runs / "logit_cache")).data_shards == 1
  copy = tmp_path / "cache"
  shutil.copytree(runs / "cache", copy)
  logp = ts.open({"driver": "zarr", "kvstore": kvstore_url(str(copy)) + "logp/"}, open=True).result()
  logp[1, 0, 0].write(logp[1, 0, 0].read().result() - 0.5).result()  # one teacher log-prob of batch 0 changed
  with pytest.raises(DataError, match="its batches hash to root"):
    check_shard({**shard, "location": str(copy)})


def test_gradients_never_reach_the_teacher(tiny_distill):
  from manifold.distill.step import distill_objective
  from manifold.distill.teacher import load_teacher
  from manifold.parallel.mesh import make_mesh

  runs, _ = tiny_distill
  cfg = load_config("experiments/distill.py:logit,size=tiny")
  teacher = load_teacher(
    str(runs / "teacher"), step=-1, dtype="float32", student_cfg=cfg.model, tokenizer_fingerprint="byte",
    mesh=make_mesh(cfg.mesh), say=lambda _: None,
  )  # fmt: skip
  tokens = jnp.asarray(np.random.default_rng(0).integers(0, 257, size=(2, 9)), jnp.int32)
  logits = jax.random.normal(jax.random.key(0), (2, 8, cfg.model.vocab_size))

  def loss(variables, logits):
    return distill_objective(teacher, variables, cfg.distill)(logits, {"tokens": tokens})[0]

  to_teacher, to_student = jax.grad(loss, argnums=(0, 1))(teacher.variables, logits)
  assert all(float(jnp.abs(g).max()) == 0.0 for g in jax.tree.leaves(to_teacher))
  assert float(jnp.abs(to_student).max()) > 0


def test_a_student_distilled_from_itself_has_zero_loss_at_its_first_step(tiny_distill, tmp_path):
  runs, _ = tiny_distill
  student = tmp_path / "self"
  shutil.copytree(runs / "teacher", student)
  saved = json.loads((student / "config.json").read_text())
  steps = saved["train"]["steps"]
  code = cli.main([
    "distill", "--config", "experiments/distill.py:teacher,size=tiny", "--teacher", str(runs / "teacher"),
    "--workdir", str(student), "--no-progress", f"--config.train.steps={steps + 1}", "--config.train.log_every=1",
    "--config.distill.weight=1", "--config.distill.temperature=1",
    "--config.train.grad_norm_floor=0",  # zero loss, zero gradient: the collapse check would stop the run
    *(f"--config.data.{k}={saved['data'][k]}" for k in ("sources", "val_fraction", "cache_dir")),
  ])  # fmt: skip
  assert code == 0
  first = next(r for r in read_metrics(student / "metrics.jsonl") if r["step"] == steps + 1 and "divergence" in r)
  assert abs(first["divergence"]) < 1e-6 and abs(first["objective"]) < 1e-6


def test_generate_filters_by_length_duplicates_and_the_verifier(tiny_distill, tmp_path):
  from manifold.distill.generate import generate
  from manifold.distill.teacher import load_teacher
  from manifold.parallel.mesh import make_mesh
  from manifold.train.run import load_run_data

  runs, _ = tiny_distill
  saved = json.loads((runs / "teacher" / "config.json").read_text())
  data_flags = [f"--config.data.{k}={saved['data'][k]}" for k in ("sources", "val_fraction", "cache_dir")]
  cfg = load_config(
    "experiments/distill.py:sequence,size=tiny",
    [*data_flags, "--config.distill.prompts=8", "--config.distill.samples_per_prompt=3",
     "--config.distill.sample_temperature=1e-4", "--config.distill.max_new_tokens=8"],
  )  # fmt: skip
  data = load_run_data(cfg)
  teacher = load_teacher(
    str(runs / "teacher"), step=-1, dtype="bfloat16", student_cfg=cfg.model,
    tokenizer_fingerprint=data.tokenizer.fingerprint, mesh=make_mesh(cfg.mesh), say=lambda _: None,
  )  # fmt: skip
  report = generate(cfg, teacher, data, str(tmp_path / "gen"), file_count=2, say=lambda _: None, progress=False)
  assert report.kept == 8 and report.dropped["duplicate"] == 16, "near-greedy samples of a prompt repeat"
  lines = [json.loads(line) for f in report.files for line in open(f)]
  assert len(lines) == 8 and all(doc["text"] == doc["prompt"] + doc["completion"] for doc in lines)
  cfg.distill.update(min_new_tokens=9)
  with pytest.raises(ConfigError, match="every completion was dropped"):
    generate(cfg, teacher, data, str(tmp_path / "none"), file_count=2, say=lambda _: None, progress=False)
  cfg.distill.update(min_new_tokens=0, prompt_source="task", prompts=4)
  cfg.rl.update(task="arithmetic", difficulty="digits=3,ops=2")
  with pytest.raises(ConfigError, match="every completion was dropped"):  # an untrained teacher solves none
    generate(cfg, teacher, data, str(tmp_path / "task"), file_count=2, say=lambda _: None, progress=False)


def test_bad_inputs_are_one_line_errors(tiny_distill, tmp_path, capsys):
  runs, _ = tiny_distill
  saved = json.loads((runs / "teacher" / "config.json").read_text())
  data_flags = [f"--config.data.{k}={saved['data'][k]}" for k in ("sources", "val_fraction", "cache_dir")]
  empty = tmp_path / "no-checkpoint"
  empty.mkdir()
  shutil.copy(runs / "teacher" / "config.json", empty / "config.json")
  cache = f"--config.distill.cache={runs / 'cache'}"
  cases = {
    "no config.json": ["--teacher", str(tmp_path)],
    "no checkpoint": ["--teacher", str(empty)],
    "model.vocab_size=320, the student 300": ["--teacher", str(runs / "teacher"), "--config.model.vocab_size=300"],
    "distill.temperature=0": ["--teacher", str(runs / "teacher"), "--config.distill.temperature=0"],
    "distill.weight=1.5": ["--teacher", str(runs / "teacher"), "--config.distill.weight=1.5"],
    "built for other data": ["--teacher", str(runs / "teacher"), cache, "--config.train.seed=7"],
    "another teacher or setting": ["--teacher", str(runs / "teacher"), cache, "--config.distill.temperature=2"],
  }
  for i, (expected, flags) in enumerate(cases.items()):
    variant = "logit_cache" if cache in flags else "logit"
    argv = ["distill", "--config", f"experiments/distill.py:{variant},size=tiny", "--workdir", str(tmp_path / f"s{i}")]
    assert cli.main([*argv, "--no-progress", *data_flags, *flags]) == 2, expected
    err = capsys.readouterr().err.strip()
    assert expected in err and len(err.splitlines()) == 1, err
    assert not (tmp_path / f"s{i}" / "config.json").exists(), "nothing is written before the checks pass"
  from manifold.distill.teacher import load_teacher
  from manifold.parallel.mesh import make_mesh

  cfg = load_config("experiments/distill.py:logit,size=tiny")
  with pytest.raises(ConfigError, match="tokenizer"):
    load_teacher(
      str(runs / "teacher"), step=-1, dtype="float32", student_cfg=cfg.model, tokenizer_fingerprint="0" * 64,
      mesh=make_mesh(cfg.mesh), say=lambda _: None,
    )  # fmt: skip


def test_a_teacher_imported_from_hugging_face_scores_like_the_imported_run(tmp_path):
  from manifold.config import config_from_json, model_config
  from manifold.data import load_tokenizer
  from manifold.distill.teacher import load_teacher
  from manifold.parallel.mesh import make_mesh
  from manifold.train.restore import load_trained

  workdir = tmp_path / "imported"
  fixture = "tests/fixtures/deepseek_v3_tiny"
  assert cli.main(["convert", "--from-hf", fixture, "--workdir", str(workdir)]) == 0
  cfg = config_from_json((workdir / "config.json").read_text())
  teacher = load_teacher(
    str(workdir), step=-1, dtype="float32", student_cfg=model_config(cfg),
    tokenizer_fingerprint=load_tokenizer(cfg.data.tokenizer).fingerprint, mesh=make_mesh(cfg.mesh),
    say=lambda _: None,
  )  # fmt: skip
  tokens = jnp.asarray(np.random.default_rng(0).integers(0, cfg.model.vocab_size, size=(2, 7)), jnp.int32)
  expected, _ = load_trained(str(workdir), data=False).model(tokens)
  np.testing.assert_allclose(np.asarray(teacher.logits(teacher.variables, tokens)), np.asarray(expected), atol=1e-6)
