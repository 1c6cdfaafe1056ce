"""Every notebook runs top to bottom against real (tiny) runs: a plain / mhc sweep and its mhc run, a
two-island run for the islands notebook, a `manifold rl local` run for the GRPO and provenance
notebooks, the tiny distillation table for the distillation notebook, and the sweep's results
(over seeds) standing in for each of the paper-ablation studies."""

from __future__ import annotations

import pathlib

import nbformat
import pytest
from nbclient import NotebookClient

NOTEBOOKS = sorted((pathlib.Path(__file__).parents[1] / "notebooks").glob("*.ipynb"))


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.name)
def test_notebook_executes(path, tiny_sweep, request, monkeypatch, tmp_path):
  results, mhc_run = tiny_sweep
  if path.name == "islands.ipynb":
    monkeypatch.setenv("MANIFOLD_ISLANDS_RUN", str(request.getfixturevalue("tiny_islands")))
  if path.name == "distill.ipynb":
    monkeypatch.setenv("MANIFOLD_DISTILL_RESULTS", str(request.getfixturevalue("tiny_distill")[1]))
  if path.name == "grpo.ipynb":
    monkeypatch.setenv("MANIFOLD_GRPO_RUN", str(request.getfixturevalue("tiny_grpo")[0]))
  if path.name == "paper_ablations.ipynb":  # every study's folder: the tiny sweep's results
    studies = tmp_path / "ablations"
    studies.mkdir()
    for study in ("hc_components", "depth_stress", "mhc_scaling"):
      for scale in ("", "_gpu"):
        (studies / f"{study}{scale}").symlink_to(results, target_is_directory=True)
    monkeypatch.setenv("MANIFOLD_ABLATIONS", str(studies))
  if path.name == "provenance.ipynb":  # the learner's ledger credits its workers' rollouts
    monkeypatch.setenv("MANIFOLD_PROVENANCE_RUN", str(request.getfixturevalue("tiny_grpo")[0] / "learner"))
  monkeypatch.setenv("MANIFOLD_RESULTS", str(results))
  monkeypatch.setenv("MANIFOLD_WORKDIR", str(mhc_run))
  notebook = nbformat.read(path, as_version=4)
  NotebookClient(
    notebook, timeout=300, kernel_name="python3", resources={"metadata": {"path": str(path.parent)}}
  ).execute()
  outputs = [o for cell in notebook.cells if cell.cell_type == "code" for o in cell.outputs]
  assert not [o for o in outputs if o.output_type == "error"]
  assert any(o.output_type == "display_data" and "image/png" in o.data for o in outputs), "the plots rendered"


def test_the_notebooks_folder_is_not_empty():
  assert NOTEBOOKS, "notebooks/*.ipynb not found"
