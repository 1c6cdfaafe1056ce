"""Writing files so that a reader never sees half of one: write beside, then rename over."""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from typing import Iterator


@contextlib.contextmanager
def atomic_path(path: str, *, directory: bool = False) -> Iterator[str]:
  """A fresh temporary path beside `path` (a folder with `directory=True`) to write into;
  it replaces `path` in one rename when the block succeeds and is removed when it fails.
  Safe when several processes write the same path (each has its own temporary)."""
  parent = os.path.dirname(os.path.abspath(path))
  os.makedirs(parent, exist_ok=True)
  prefix = f".{os.path.basename(path)}.tmp-"
  tmp = tempfile.mkdtemp(prefix=prefix, dir=parent) if directory else _fresh_file(prefix, parent)
  try:
    yield tmp
    os.replace(tmp, path)
  finally:
    if os.path.isdir(tmp):
      shutil.rmtree(tmp, ignore_errors=True)
    elif os.path.exists(tmp):
      os.remove(tmp)


def _fresh_file(prefix: str, parent: str) -> str:
  fd, tmp = tempfile.mkstemp(prefix=prefix, dir=parent)
  os.close(fd)
  return tmp


def write_atomic(path: str, text: str) -> None:
  """Writes `text` (UTF-8) to `path` all at once."""
  with atomic_path(path) as tmp, open(tmp, "w", encoding="utf-8") as f:
    f.write(text)
