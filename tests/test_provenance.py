"""Data roots: sorted Merkle trees prove presence and absence, and a run's roots prove what it trained on."""

from __future__ import annotations

import base64
import hashlib
import json
import shutil
import subprocess
import sys

import pytest

from manifold import cli
from manifold.provenance import ledger, lineage, merkle
from tests.conftest import REPO, child_env


def test_every_leaf_and_every_gap_of_trees_of_many_sizes_has_a_proof_and_a_forged_one_fails():
  for size in range(1, 18):
    leaves = [merkle.leaf_hash(f"doc {size} {i}".encode()) for i in range(size)]
    tree = merkle.Tree(leaves)
    for leaf in leaves:
      present, proofs = tree.prove(leaf)
      assert present and merkle.check(leaf, True, proofs, tree.root)
      assert not merkle.check(leaf, False, proofs, tree.root)
    for i in range(40):  # leaves not in the tree: below, between and above its leaves
      other = merkle.leaf_hash(f"absent {size} {i}".encode())
      present, proofs = tree.prove(other)
      assert not present and merkle.check(other, False, proofs, tree.root)
      assert not merkle.check(other, True, proofs, tree.root)
    if size > 1:
      proof = tree.inclusion(0)
      moved = merkle.Inclusion(proof.leaf, 1, proof.size, proof.siblings)  # claims another position
      assert not merkle.check(proof.leaf, True, [moved], tree.root)
      flipped = merkle.Inclusion(proof.leaf, 0, proof.size, (bytes(32),) + proof.siblings[1:])
      assert not merkle.check(proof.leaf, True, [flipped], tree.root)


def test_a_run_proves_its_training_documents_in_and_others_out(trained_workdir, tmp_path, capsys):
  roots = json.loads((trained_workdir / "data_roots.json").read_text())  # written by every run
  assert roots["format"] == "manifold-data-roots/1" and all(f["documents"] == 1 for f in roots["files"])
  train = next(f for f in roots["files"] if f["split"] == "train")
  val = next(f for f in roots["files"] if f["split"] == "val")
  outsider = tmp_path / "outsider.py"
  outsider.write_text("print('never trained on')\n")
  for document, present in ((train["path"], True), (val["path"], False), (str(outsider), False)):
    proof_path = tmp_path / "proof.json"
    assert (
      cli.main(["provenance", "prove", str(trained_workdir), "--document", document, "--out", str(proof_path)]) == 0
    )
    proof = json.loads(proof_path.read_text())
    assert proof["present"] is present and proof["root"] == roots["train_root"]
    assert cli.main(["provenance", "verify", str(proof_path), "--document", document]) == 0
    assert capsys.readouterr().out.startswith("valid: ")
    assert (
      cli.main(["provenance", "verify", str(proof_path), "--document", str(outsider if present else train["path"])])
      == 1
    )
    assert "another document" in capsys.readouterr().out
    proof["present"] = not present  # a lie about the same path
    proof_path.write_text(json.dumps(proof))
    assert cli.main(["provenance", "verify", str(proof_path)]) == 1
    assert capsys.readouterr().out.startswith("invalid: ")


def test_an_edited_roots_file_is_refused_when_proving(trained_workdir, tmp_path, capsys):
  import shutil

  copy = tmp_path / "run"
  shutil.copytree(trained_workdir, copy)
  roots = json.loads((copy / "data_roots.json").read_text())
  roots["train_root"] = hashlib.sha256(b"forged").hexdigest()
  (copy / "data_roots.json").write_text(json.dumps(roots))
  document = next(f["path"] for f in roots["files"] if f["split"] == "train")
  assert cli.main(["provenance", "prove", str(copy), "--document", document]) == 2
  assert "was edited" in capsys.readouterr().err


def test_keys_new_writes_a_private_key_only_its_owner_reads_and_never_overwrites_one(tmp_path, capsys):
  import os
  import stat

  from manifold.store.signing import Identity, verify

  key = tmp_path / "keys" / "me.pem"
  assert cli.main(["keys", "new", "--out", str(key)]) == 0
  out = capsys.readouterr().out
  assert stat.S_IMODE(os.stat(key).st_mode) == 0o600 and "PRIVATE" not in out
  public = (tmp_path / "keys" / "me.pem.pub").read_text().strip()
  assert public in out and verify(public, Identity.load_or_create(key).sign(b"x"), b"x")
  before = key.read_bytes()
  assert cli.main(["keys", "new", "--out", str(key)]) == 2
  assert "never overwrites" in capsys.readouterr().err and key.read_bytes() == before


# -- checkpoint lineage, the ledger and `manifold verify` --------------------------------------


def _copy(run, tmp_path):
  out = tmp_path / "run"
  shutil.copytree(run, out)
  return out


def _verify(workdir, capsys, *extra) -> tuple[int, str]:
  capsys.readouterr()
  code = cli.main(["verify", str(workdir), *extra])
  return code, capsys.readouterr().out


def _largest_file(folder):
  return max((p for p in folder.rglob("*") if p.is_file()), key=lambda p: p.stat().st_size)


def _flip_byte(path):
  data = bytearray(path.read_bytes())
  data[len(data) // 2] ^= 0x01
  path.write_bytes(bytes(data))


def _resign_middle_manifest(run):
  from manifold.provenance import attestation
  from manifold.store import Identity

  path = next((run / lineage.MANIFESTS).glob("00000015.*.json"))
  envelope = json.loads(path.read_text())
  statement = json.loads(base64.b64decode(envelope["payload"]))
  resigned, _ = attestation.sign(statement, Identity.generate())
  path.write_text(json.dumps(resigned))


def _edit_ledger_line(run):
  lines = (run / "ledger.jsonl").read_text().splitlines()
  entry = json.loads(lines[1])
  entry["tokens"] = 10**9
  lines[1] = json.dumps(entry, sort_keys=True, separators=(",", ":"))
  (run / "ledger.jsonl").write_text("\n".join(lines) + "\n")


def _replace_config(run):
  config = json.loads((run / "config.json").read_text())
  config["train"]["learning_rate"] = 1.0
  (run / "config.json").write_text(json.dumps(config, indent=2))


TAMPERING = {
  "flip a parameter byte": (
    lambda run: _flip_byte(_largest_file(run / "checkpoints" / "15" / "state")),
    "checkpoint 15",
  ),
  "delete a middle checkpoint": (lambda run: shutil.rmtree(run / "checkpoints" / "15"), "checkpoint 15"),
  "delete a middle manifest": (
    lambda run: next((run / lineage.MANIFESTS).glob("00000015.*")).unlink(),
    "checkpoint 15",
  ),
  "edit a ledger line": (_edit_ledger_line, "ledger.jsonl line 2"),
  "re-sign with another key": (_resign_middle_manifest, "checkpoint 15"),
  "replace the config": (_replace_config, "config.json"),
}


def test_a_run_verifies_and_its_ledger_pins_every_manifest(trained_workdir, capsys):
  code, out = _verify(trained_workdir, capsys)
  assert code == 0, out
  assert "3 re-hashed (files and tensors), 1 retired by keep-N" in out and "manifests: 4 signed" in out
  chain = lineage.Lineage.read_all(str(trained_workdir))
  assert [m.step for m in chain] == [5, 10, 15, 20]
  assert chain[0].body["parent"] is None and chain[0].body["origin"] == {"kind": "init", "seed": 0}
  assert [m.body["parent"]["manifest"] for m in chain[1:]] == [m.hash for m in chain[:-1]]
  entries = ledger.read(str(trained_workdir)).entries
  assert [e["object"] for e in entries if e["kind"] == "checkpoint"] == [m.hash for m in chain]
  assert (trained_workdir / "run.key").stat().st_mode & 0o777 == 0o600


@pytest.mark.parametrize("tampering", list(TAMPERING))
def test_verify_names_the_first_broken_link(trained_workdir, tmp_path, capsys, tampering):
  change, named = TAMPERING[tampering]
  run = _copy(trained_workdir, tmp_path)
  change(run)
  code, out = _verify(run, capsys)
  assert code == 1 and out.startswith("BROKEN: ") and named in out, out


def test_manifest_tensor_hashes_are_the_same_saved_from_one_device_or_eight(trained_workdir, tmp_path, compile_cache):
  out = tmp_path / "resharded"
  out.mkdir()
  proc = subprocess.run(
    [sys.executable, str(REPO / "tests" / "resharded_save.py"), str(trained_workdir), "15", str(out)],
    env=child_env(compile_cache, devices=8),
    capture_output=True,
    text=True,
    timeout=300,
  )
  assert proc.returncode == 0, proc.stderr[-3000:]
  assert json.loads(proc.stdout.splitlines()[-1])["split"] > 0  # parameters really were split over 8 devices
  (one,) = [m for m in lineage.Lineage.read_all(str(trained_workdir)) if m.step == 15]
  (eight,) = lineage.Lineage.read_all(str(out))
  assert eight.body["tensors"] == one.body["tensors"]
  assert eight.body["optimizer_digest"] == one.body["optimizer_digest"]


def test_the_ledger_survives_a_torn_line_mirrors_to_the_store_and_credits_accepted_work(tmp_path, capsys):
  from manifold.store import Identity, Store

  judge, alice, bob = Identity.generate(), Identity.generate(), Identity.generate()
  store = Store.open(f"file://{tmp_path / 'store'}")
  book = ledger.Ledger.open(str(tmp_path / "run"), judge, store=store, fingerprint="ab")
  book.record("rollout", contributor=alice.public_key, object_hash="1" * 64, tokens=100, flops=1e9)
  book.record("rollout", contributor=bob.public_key, object_hash="2" * 64, tokens=300, flops=3e9)
  book.record("rollout", contributor=bob.public_key, object_hash="3" * 64, tokens=50, verdict="rejected", reason="x")
  book.close()
  with open(tmp_path / "run" / "ledger.jsonl", "a") as f:
    f.write('{"seq":3,"prev"')  # a crash mid-write
  book = ledger.Ledger.open(str(tmp_path / "run"), judge, say=lambda _: None)
  assert book.seq == 3 and (tmp_path / "run" / "ledger.jsonl.torn").exists()
  book.close()
  local = ledger.read(str(tmp_path / "run"))
  (mirrored,) = ledger.read_store(store).values()
  assert mirrored.entries == local.entries and mirrored.head == local.head
  rows = ledger.totals(local.entries)
  assert rows[alice.public_key] == {"accepted": 1, "rejected": 0, "tokens": 100, "flops": 1e9}
  assert rows[bob.public_key] == {"accepted": 1, "rejected": 1, "tokens": 300, "flops": 3e9}
  (tmp_path / "run" / "config.json").write_text("{}")
  capsys.readouterr()
  assert cli.main(["ledger", str(tmp_path / "run")]) == 0
  out = capsys.readouterr().out
  assert "75.0%" in out and "25.0%" in out and (tmp_path / "run" / "ledger.png").stat().st_size > 0


def test_a_learner_proves_its_accepted_prompts_in_and_held_out_prompts_out(tiny_grpo, tmp_path, capsys):
  """Each accepted rollout batch's prompts and rollouts are data shards: the ledger holds their roots,
  the manifests list them, `prove` shows a worker's drawn prompt in and a held-out one out, and an
  edited leaves file breaks `verify`."""
  from manifold.config import config_from_json, task_settings, validate
  from manifold.provenance.verify import BrokenLink, verify_run
  from manifold.rl.rollout import seed_of
  from manifold.rl.tasks import get_task

  learner = tiny_grpo[0] / "learner"
  entries = ledger.read(str(learner)).entries
  accepted = [e for e in entries if e["kind"] == "rollout" and e["verdict"] == "accepted"]
  assert accepted and all(set(e["detail"]["data"]) == {"prompts", "rollouts"} for e in accepted)
  manifests = lineage.Lineage.read_all(str(learner))
  newest, to = manifests[-1], manifests[-1].body["contributions"]["to"]
  listed = [s["root"] for m in manifests for s in m.body["data"]["shards"]]
  assert sorted(listed) == sorted(r["root"] for e in accepted if e["seq"] < to for r in e["detail"]["data"].values())
  c = validate(config_from_json((learner / "config.json").read_text()))
  task = get_task(c.rl.task, **task_settings(c.rl.difficulty))
  d = next(e["detail"] for e in accepted if e["seq"] < to)
  drawn = task.prompts("train", seed_of(c.train.seed, d["worker"], d["version"], d["seq"]), c.rl.prompts_per_step)
  held_out = task.prompts("heldout", 0, 1)[0].prompt
  document, proof_path = tmp_path / "document.txt", tmp_path / "proof.json"
  for text, present in ((drawn[0].prompt, True), (held_out, False)):
    document.write_text(text)
    assert cli.main(["provenance", "prove", str(learner), "--document", str(document), "--out", str(proof_path)]) == 0
    proof = json.loads(proof_path.read_text())
    assert proof["present"] is present and proof["root"] == newest.body["data"]["train_root"]
    assert proof["checkpoint"] == {"step": newest.step, "manifest": newest.hash}
    assert cli.main(["provenance", "verify", str(proof_path), "--document", str(document)]) == 0
  assert verify_run(str(learner)).data_shards == 2 * len(accepted)
  copy = tmp_path / "learner"
  shutil.copytree(learner, copy)
  leaves = copy / "provenance" / "leaves" / f"{d['data']['rollouts']['root']}.bin"
  leaves.write_bytes(leaves.read_bytes()[:-32])  # one rollout dropped from the record
  with pytest.raises(BrokenLink, match="does not hash to its root"):
    verify_run(str(copy))
