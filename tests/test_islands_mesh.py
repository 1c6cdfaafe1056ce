"""DiLoCo islands inside one job (`mesh.island`, manifold.islands.mesh).

The equivalence, collective and loop checks run once, in a subprocess with 8 simulated CPU
devices (tests/islands_mesh.py cpu); the multislice compile in another with libtpu's
topology description (tests/islands_mesh.py aot).
"""

from __future__ import annotations

import json
import os
import pathlib
import subprocess
import sys

import pytest

from manifold.config import ConfigError, base_config, validate

from .conftest import made_once, xla_flags

SCRIPT = pathlib.Path(__file__).with_name("islands_mesh.py")


def _script(mode: str, workdir, devices: int | None) -> dict:
  env = {**os.environ, "JAX_PLATFORMS": "cpu"}
  if devices:
    env["XLA_FLAGS"] = xla_flags(devices)
  proc = subprocess.run(
    [sys.executable, str(SCRIPT), mode, str(workdir)], env=env, capture_output=True, text=True, timeout=900
  )
  assert proc.returncode == 0, proc.stderr[-3000:]
  return json.loads(proc.stdout.strip().splitlines()[-1])


@pytest.fixture(scope="module")
def report(tmp_path_factory):
  """The cpu script's report, made once a session (xdist may spread this file's tests over workers)."""

  def make(root):
    (root / "report.json").write_text(json.dumps(_script("cpu", root, devices=8)))

  return json.loads((made_once(tmp_path_factory, "islands_mesh", make) / "report.json").read_text())


@pytest.mark.parametrize("run", ["island2_data4", "island4_fsdp2"])
def test_islands_equal_the_islands_run_one_after_another(report, run):
  """2 islands x 4 devices (data 4) and 4 x 2 (fsdp 2): two rounds of 3 inner AdamW steps
  and an outer Nesterov step equal each island trained in turn on one device with the plain
  train step, then `diloco.outer_gradient` / `outer_step` on the host; float32, 1e-5."""
  r = report[run]
  assert r["moved_from_start"] > 1e-2  # the run did train
  assert r["global_params"] < 1e-5 and r["island_params"] < 1e-5, r


def test_streaming_int4_overlap_and_error_feedback_equal_the_reference_across_a_resume(report):
  """P = 2 strided fragments synced at staggered steps, tau = 1 (mixed with alpha 0.5), int4
  outer gradients with error feedback, checkpointed and restored between a fragment's send
  and its landing: equal to the same `diloco` functions applied island by island."""
  r = report["island2_data4_streaming_int4"]
  assert r["moved_from_start"] > 1e-2
  assert r["island_params"] < 1e-5, r
  # The outer gradient is rounded to int4 codes: an island's delta that lies on a rounding tie to
  # within float32 noise (the mesh reduces in another order than one device) may take the next
  # code. Such flips stay rare and one code step small; every other entry agrees to 1e-5.
  assert r["global_entries_off"] <= max(2, r["entries"] // 1000) and r["global_params"] < 1e-2, r
  synced = [i + 1 for i, row in enumerate(r["rows"]) if row.get("islands/fragments_synced")]
  assert synced == [2, 4, 6, 8]  # fragment 1 at t = 2, 6 (offset H / P), fragment 0 at t = 4, 8


def test_only_the_outer_sync_crosses_islands(report):
  """In the compiled programs, the collectives whose replica groups join islands: none in the
  inner step (nor in a landing), one all-reduce in a 32-bit sync, one all-gather of bytes
  (the int4 codes and the scales) in a quantised one."""
  for run in ("island2_data4", "island4_fsdp2"):
    crossing = report[run]["crossing_islands"]
    assert crossing["inner_step"] == [] and len(crossing["sync_0"]) == 1, crossing
    assert crossing["sync_0"][0].startswith("all-reduce f32["), crossing
  crossing = report["island2_data4_streaming_int4"]["crossing_islands"]
  assert crossing["inner_step"] == crossing["land_0"] == crossing["land_1"] == []
  for p in (0, 1):
    assert len(crossing[f"sync_{p}"]) == 1 and crossing[f"sync_{p}"][0].startswith("all-gather u8["), crossing


def test_logged_bytes_are_what_the_collectives_move(report):
  """`islands/bytes_*` per sync equal the bytes the compiled sync's cross-island collectives
  move per island; totals accumulate (and continue across the resume); the data-parallel
  figure is a float32 ring all-reduce of every parameter at every step."""
  for run, r in report.items():
    if run == "loop":
      continue
    assert r["counted_bytes_per_sync"] == r["hlo_bytes_per_sync"], run
    sent = [row["islands/bytes_sent"] for row in r["rows"] if row]
    assert sum(sent) == [row for row in r["rows"] if row][-1]["islands/bytes_sent_cumulative"], run
    last = [row for row in r["rows"] if row][-1]
    assert last["islands/dp_allreduce_bytes_cumulative"] == len(r["rows"]) * r["dp_bytes_per_step"]
    assert last["islands/bytes_received_cumulative"] == last["islands/bytes_sent_cumulative"]
  diloco = report["island2_data4"]["counted_bytes_per_sync"][0]
  streaming = sum(report["island2_data4_streaming_int4"]["counted_bytes_per_sync"])
  assert diloco / streaming > 6  # int4 codes + a float32 scale per 32 values, against float32


def test_train_loop_with_islands_resumes_exactly_and_logs_bytes(report):
  """`manifold.train.loop.train` with mesh.island = 2: evaluation on the global model, the
  outer syncs at t = 3, 6, bytes in metrics.jsonl; resumed from its step-4 checkpoint it
  ends bit for bit where the uninterrupted run did; `load_trained` reads the global model."""
  loop = report["loop"]
  assert loop["resumed_from"] == 4 and loop["resumed_vs_whole"] == 0.0
  assert loop["loaded_step"] == 8 and loop["loaded_vs_whole"] == 0.0
  assert loop["val_steps"] == [0, 4, 8] and loop["sync_steps"] == [3, 6] and loop["loss_logged"]
  last, resumed = loop["last_bytes_row"], loop["resumed_last_bytes_row"]
  assert last["islands/bytes_sent_cumulative"] == 2 * report["island2_data4"]["counted_bytes_per_sync"][0]
  assert last["islands/dp_allreduce_bytes_cumulative"] == 8 * last["islands/dp_allreduce_bytes"]
  assert {k: v for k, v in resumed.items() if k.startswith("islands/")} == {
    k: v for k, v in last.items() if k.startswith("islands/")
  }


def _libtpu_available() -> bool:
  import importlib.util

  return importlib.util.find_spec("libtpu") is not None or os.path.isdir(os.path.join(sys.prefix, "libtpu"))


@pytest.mark.skipif(not _libtpu_available(), reason="libtpu is not installed: run `make libtpu`")
def test_on_two_tpu_slices_only_the_outer_sync_crosses_dcn(tmp_path):
  """Compiled for two v5e:2x2 slices (libtpu's multislice topology, no TPU needed), one island
  per slice: XLA lowers a collective between slices to transfers for the DCN runtime. The
  inner step has none (its collectives stay inside a slice); the 32-bit outer sync has one,
  an all-reduce of float32; the int4 sync one, of bytes (the exchange of the codes and
  scales, which this XLA lowers as an all-reduce of the islands' rows); a landing none."""
  r = _script("aot", tmp_path, devices=None)
  assert r["devices"] == 8 and r["island_slices"] == [[0], [1]]
  diloco, streaming = r["diloco_32bit"], r["streaming_int4"]
  assert diloco["inner_step"]["dcn"] == [] and diloco["inner_step"]["ici_max_id"] == 3
  assert len(diloco["sync_0"]["dcn"]) == 1 and diloco["sync_0"]["dcn"][0].startswith("ALL_REDUCE f32["), diloco
  for p in (0, 1):
    (transfer,) = streaming[f"sync_{p}"]["dcn"]
    assert transfer.split(" ")[1].startswith("u8["), transfer
    assert streaming[f"land_{p}"]["dcn"] == []


# ---------------------------------------------------------------------------------------
# On one device


def _cfg(**mesh):
  c = base_config()
  c.mesh.update(**mesh)
  return c


def test_config_checks_islands_in_one_job():
  validate(_cfg(island=2))
  with pytest.raises(ConfigError, match="exclude each other"):
    c = _cfg(island=2)
    c.islands.update(store="file:///tmp/store", count=2, id=0)
    validate(c)
  with pytest.raises(ConfigError, match="must split over the mesh.island=3 islands"):
    validate(_cfg(island=3))  # train.batch_size 32
  with pytest.raises(ConfigError, match="islands.fragments=3: must divide model.n_layers"):
    c = _cfg(island=2)
    c.islands.update(fragments=3, inner_steps=300)
    validate(c)


def test_one_island_is_the_mesh_as_before():
  from manifold.parallel.mesh import MESH_AXES, make_mesh

  assert make_mesh(_cfg(island=1).mesh).axis_names == MESH_AXES
  with pytest.raises(ConfigError, match="mesh.island=3: does not divide the"):
    make_mesh(_cfg(island=3).mesh)  # 1 device, or 8 simulated ones


class _FakeSync:
  def __init__(self):
    self.calls = []
    self.send = [lambda s, p=p: self.calls.append(("send", p)) or s for p in range(2)]
    self.land = [lambda s, p=p: self.calls.append(("land", p)) or s for p in range(2)]
    self.bytes_per_sync = [10, 20]
    self.params = 100


def test_in_job_islands_schedule_and_byte_totals_across_a_restart():
  """H = 4, P = 2, tau = 1: fragment 0 sends at 4, 8 and lands at 5; fragment 1 sends at 2, 6
  and lands at 3, 7; a hook restarted at step 5 reports the same totals."""
  from manifold.islands.mesh import InJobIslands

  cfg = validate(base_config())
  islands = cfg.islands.__class__(inner_steps=4, fragments=2, overlap_steps=1)
  train = cfg.train.__class__(steps=8, log_every=100, warmup_steps=0)
  sync = _FakeSync()
  hook = InJobIslands(sync, islands, train, islands=2)
  rows = {t: hook.after_step("state", t)[1] for t in range(1, 9)}
  assert sync.calls == [
    ("send", 1), ("land", 1), ("send", 0), ("land", 0), ("send", 1), ("land", 1), ("send", 0)
  ]  # fmt: skip
  assert [t for t, row in rows.items() if row] == [2, 4, 6, 8]
  assert (
    rows[8]["islands/bytes_sent_cumulative"] == 60 and rows[8]["islands/dp_allreduce_bytes_cumulative"] == 8 * 4 * 100
  )  # 2 (M - 1) / M float32 values per step
  restarted = InJobIslands(_FakeSync(), islands, train, islands=2, start=5)
  assert [restarted.after_step("state", t)[1]["islands/bytes_sent_cumulative"] for t in (6, 8)] == [50, 60]
