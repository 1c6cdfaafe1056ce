"""Corpus files: resolving `data.sources`, reading documents, and the by-file train/val split."""

import dataclasses
import glob
import hashlib
import json
import os
import sysconfig

from manifold.data.errors import DataError

_STDLIB_EXCLUDED_DIRS = frozenset({"test", "tests", "idle_test", "site-packages", "__pycache__"})
_GLOB_CHARS = "*?["


@dataclasses.dataclass(frozen=True)
class SourceFile:
  """A corpus file: absolute `path`, and the stable relative `name` that decides its split."""

  path: str
  name: str


def _by_name(f: SourceFile) -> tuple[str, str]:
  return f.name, f.path


def stdlib_files() -> list[SourceFile]:
  """Every `*.py` file of this interpreter's standard library, minus test suites; sorted by name."""
  root = sysconfig.get_paths()["stdlib"]
  files = []
  for directory, subdirs, filenames in os.walk(root):
    subdirs[:] = [d for d in subdirs if d not in _STDLIB_EXCLUDED_DIRS]
    for filename in filenames:
      if filename.endswith(".py"):
        path = os.path.join(directory, filename)
        files.append(SourceFile(path, os.path.relpath(path, root)))
  return sorted(files, key=_by_name)


def _expand(pattern: str) -> list[SourceFile]:
  """Files matched by one path or glob; a glob's names are relative to its non-glob prefix."""
  pattern = os.path.expanduser(pattern)
  magic = [i for i in map(pattern.find, _GLOB_CHARS) if i >= 0]
  paths = [p for p in glob.glob(pattern, recursive=True) if os.path.isfile(p)]
  if not magic:
    return [SourceFile(os.path.abspath(p), os.path.basename(p)) for p in paths]
  base = os.path.abspath(os.path.dirname(pattern[: min(magic)]) or ".")
  return [SourceFile(os.path.abspath(p), os.path.relpath(os.path.abspath(p), base)) for p in paths]


def absolute_sources(spec: str) -> str:
  """`data.sources` with every path and glob made absolute (`~` expanded); "stdlib" stays."""
  if spec.strip() == "stdlib":
    return spec
  return ",".join(os.path.abspath(os.path.expanduser(p.strip())) for p in spec.split(",") if p.strip())


def resolve_sources(spec: str) -> list[SourceFile]:
  """Files named by `data.sources`: "stdlib", or comma-separated paths and globs (`**`, `~`).
  A binary file (one holding a NUL byte) is refused, by name."""
  if spec.strip() == "stdlib":
    files = stdlib_files()
  else:
    by_path: dict[str, SourceFile] = {}
    for pattern in filter(None, (p.strip() for p in spec.split(","))):
      matches = _expand(pattern)
      if not matches:
        raise DataError(f"data.sources: {pattern!r} matches no files; fix the path or glob")
      for f in matches:
        by_path.setdefault(f.path, f)
    if not by_path:
      raise DataError(f"data.sources: {spec!r} names no files; give 'stdlib' or paths/globs separated by commas")
    files = sorted(by_path.values(), key=_by_name)
  binary = [f.path for f in files if _has_nul(f.path)]
  if binary:
    shown = ", ".join(binary[:3]) + (f" and {len(binary) - 3} more" if len(binary) > 3 else "")
    raise DataError(
      f"data.sources: {len(binary)} binary file(s) (NUL bytes): {shown}; drop them from data.sources or narrow the glob"
    )
  return files


def _has_nul(path: str, chunk: int = 1 << 20) -> bool:
  with open(path, "rb") as fh:
    while block := fh.read(chunk):
      if b"\0" in block:
        return True
  return False


def read_documents(f: SourceFile, jsonl_field: str) -> list[str]:
  """Non-empty documents of `f`: the whole file, or for `.jsonl` the `jsonl_field` of each line."""
  with open(f.path, "rb") as fh:
    raw = fh.read()
  try:
    text = raw.decode("utf-8")
  except UnicodeDecodeError as e:
    raise DataError(
      f"{f.path}: not valid UTF-8 (byte {e.start}); convert it to UTF-8 or drop it from data.sources"
    ) from None
  if not f.path.endswith(".jsonl"):
    return [text] if text else []
  documents = []
  for line_number, line in enumerate(text.split("\n"), start=1):
    if not line.strip():
      continue
    try:
      record = json.loads(line)
    except json.JSONDecodeError:
      raise DataError(f"{f.path}:{line_number}: not a JSON object; each .jsonl line must hold one") from None
    document = record.get(jsonl_field) if isinstance(record, dict) else None
    if not isinstance(document, str):
      raise DataError(
        f"{f.path}:{line_number}: no string field {jsonl_field!r}; set data.jsonl_field to the key that holds the text"
      )
    if document:
      documents.append(document)
  return documents


def _split_score(f: SourceFile) -> float:
  """Uniform in [0, 1), a pure function of the file's name."""
  return int(hashlib.sha256(f.name.encode("utf-8")).hexdigest()[:8], 16) / 2**32


def split_files(files: list[SourceFile], val_fraction: float) -> tuple[list[SourceFile], list[SourceFile]]:
  """(train, val) by file: val iff `_split_score < val_fraction`, adjusted so neither is empty."""
  if not 0.0 <= val_fraction <= 1.0:
    raise DataError(f"data.val_fraction={val_fraction} must lie in [0, 1]")
  if len(files) < 2:
    raise DataError(
      f"data.sources: the train/val split is by file, so at least two files are needed (got {len(files)}); "
      "add files or split the corpus into several"
    )
  ranked = sorted(files, key=_split_score)
  num_val = sum(_split_score(f) < val_fraction for f in files)
  num_val = min(max(num_val, 1), len(files) - 1)
  return sorted(ranked[num_val:], key=_by_name), sorted(ranked[:num_val], key=_by_name)
