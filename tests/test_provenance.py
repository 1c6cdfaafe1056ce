"""Data roots: sorted Merkle trees prove presence and absence, and a run's roots prove what it trained on."""

from __future__ import annotations

import hashlib
import json

from manifold import cli
from manifold.provenance import merkle


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
