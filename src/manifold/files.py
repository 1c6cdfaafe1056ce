"""The one path layer: every file a run reads or writes goes through here, on local disk or
in a `gs://` bucket (`etils.epath`, as orbax uses). Writes are whole: a reader never sees half
of a file (locally: write beside, then rename over; in a bucket: one upload)."""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from typing import Iterator

from etils import epath

REMOTE = ("gs://",)  # the object stores orbax can write array checkpoints to


def is_remote(p: str | os.PathLike) -> bool:
  """Whether `p` is a URL (`scheme://...`) rather than a local path."""
  return "://" in os.fspath(p)


def path(p: str | os.PathLike) -> epath.Path:
  """`p` as an `epath.Path`: a URL as it is, a local path absolute with `~` expanded."""
  p = os.fspath(p)
  return epath.Path(p if is_remote(p) else os.path.abspath(os.path.expanduser(p)))


def read_text(p: str | os.PathLike) -> str | None:
  """The UTF-8 text of file `p`, or None if there is none."""
  p = path(p)
  return p.read_text(encoding="utf-8") if p.exists() else None


@contextlib.contextmanager
def atomic_path(p: str | os.PathLike, *, directory: bool = False) -> Iterator[str]:
  """A fresh local temporary path (a folder with `directory=True`) to write into; when the
  block succeeds it replaces `p` in one rename (a local `p`), or is uploaded to `p` (in a
  bucket, where each file is one upload); it is removed either way. Safe when several
  processes write the same path (each has its own temporary)."""
  target = path(p)
  remote = is_remote(p)
  parent = tempfile.gettempdir() if remote else os.fspath(target.parent)
  os.makedirs(parent, exist_ok=True)
  prefix = f".{target.name}.tmp-"
  tmp = tempfile.mkdtemp(prefix=prefix, dir=parent) if directory else _fresh_file(prefix, parent)
  try:
    yield tmp
    if remote:
      _upload(tmp, target)
    else:
      os.replace(tmp, target)
  finally:
    if os.path.isdir(tmp):
      shutil.rmtree(tmp, ignore_errors=True)
    elif os.path.exists(tmp):
      os.remove(tmp)


def _fresh_file(prefix: str, parent: str) -> str:
  fd, tmp = tempfile.mkstemp(prefix=prefix, dir=parent)
  os.close(fd)
  return tmp


def _upload(local: str, target: epath.Path) -> None:
  if not os.path.isdir(local):
    target.write_bytes(epath.Path(local).read_bytes())
    return
  for root, _, names in os.walk(local):
    for name in names:
      _upload(os.path.join(root, name), target / os.path.relpath(os.path.join(root, name), local))


def write_atomic(p: str | os.PathLike, content: str | bytes) -> None:
  """Writes `content` (text as UTF-8) to `p` all at once."""
  data = content.encode("utf-8") if isinstance(content, str) else content
  if is_remote(p):
    path(p).write_bytes(data)  # one upload: whole or not at all
    return
  with atomic_path(p) as tmp, open(tmp, "wb") as f:
    f.write(data)


def append_text(p: str | os.PathLike, text: str) -> None:
  """Appends `text` to file `p` (in a bucket, which cannot append: rewrites it whole)."""
  if is_remote(p):
    write_atomic(p, (read_text(p) or "") + text)
    return
  with open(path(p), "a", encoding="utf-8") as f:
    f.write(text)


def upload_tree(local: str, p: str | os.PathLike) -> None:
  """Copies every file under the local folder `local` to the same relative path under `p`."""
  _upload(local, path(p))


def move(src: str | os.PathLike, dst: str | os.PathLike) -> None:
  """Moves file or folder `src` to `dst` (created with its parents); in a bucket, object by object."""
  if not is_remote(src):
    os.makedirs(os.path.dirname(path(dst)), exist_ok=True)
    shutil.move(path(src), path(dst))
    return
  import fsspec

  fs, source = fsspec.core.url_to_fs(os.fspath(src))
  fs.mv(source, fsspec.core.url_to_fs(os.fspath(dst))[1], recursive=True)
