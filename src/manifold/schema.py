"""How a config section is declared: a frozen dataclass whose fields carry their default,
a one-line doc and a check, validated on construction.

    @dataclasses.dataclass(frozen=True)
    class TrainConfig(Section):
      SECTION = "train"
      steps: int = field(1000, "optimizer steps", POSITIVE)

      def check(self):  # cross-field rules, after every field passed its own
        require(self.warmup_steps < self.steps, ...)

Types come from the annotations (`int`, `float`, `bool`, `str` or a nested `Section`):
a value of another type is refused (a bool is no number; an int is a fine float). Every
failure is one `ConfigError` line that names the field, the value and what is allowed.

Each field also says whether a resumed run may change it (`resume=FREE`, or a `Resume`
rule such as "clipping stays on or off"); the section's `RESUME` is the default, `FIXED`
unless the section says otherwise. `differences` lists the fields two sections disagree on.
"""

from __future__ import annotations

import dataclasses
import math
import typing
from typing import Any, Callable, ClassVar, Mapping


class ConfigError(ValueError):
  """A configuration value is invalid; the message names the field and the fix."""


@dataclasses.dataclass(frozen=True)
class Check:
  """A per-field rule: `ok(value)` must hold; `allowed` completes 'must be ...'."""

  ok: Callable[[Any], bool]
  allowed: str


@dataclasses.dataclass(frozen=True)
class Resume:
  """Whether a resumed run may change a field: only if `key(saved) == key(new)`; `why` says
  what must stay (empty when the field may not change at all)."""

  key: Callable[[Any], Any]
  why: str = ""


FIXED = Resume(lambda v: v)  # a resumed run must keep the value
FREE = Resume(lambda v: None)  # a resumed run may change it (recorded in the run's config history)


def field(default: Any, doc: str, check: Check | None = None, *, resume: Resume | None = None) -> Any:
  """A section field: its default, its one-line doc, (optionally) its check, and whether a
  resumed run may change it (default: the section's `RESUME`)."""
  metadata = {"doc": doc, "check": check, "resume": resume}
  if dataclasses.is_dataclass(default):
    return dataclasses.field(default_factory=lambda: default, metadata=metadata)
  return dataclasses.field(default=default, metadata=metadata)


def require(ok: bool, message: str) -> None:
  if not ok:
    raise ConfigError(message)


def one_of(*allowed: str) -> Check:
  return Check(lambda v: v in allowed, "one of " + ", ".join(repr(a) for a in allowed))


def floats(text: str) -> list[float] | None:
  """'0.8,0.9' -> [0.8, 0.9]; None where an item is not a number."""
  try:
    return [float(item) for item in text.split(",") if item.strip()]
  except ValueError:
    return None


POSITIVE = Check(lambda v: v > 0, "a positive integer")
NONNEGATIVE = Check(lambda v: v >= 0, "an integer >= 0")
POSITIVE_FLOAT = Check(lambda v: math.isfinite(v) and v > 0, "a finite number > 0")
NONNEGATIVE_FLOAT = Check(lambda v: math.isfinite(v) and v >= 0, "a finite number >= 0")
UNIT = Check(lambda v: 0 <= v <= 1, "a number in [0, 1]")
OPEN_UNIT = Check(lambda v: 0 < v < 1, "a number in (0, 1)")
NONEMPTY = Check(lambda v: v != "", "a non-empty string")
EVEN = Check(lambda v: v > 0 and v % 2 == 0, "a positive even integer (RoPE rotates pairs)")

_TYPE_NAMES = {int: "an integer", float: "a number", bool: "true or false", str: "a string"}


def _matches(value: Any, kind: type) -> bool:
  if kind is float:
    return isinstance(value, (int, float)) and not isinstance(value, bool)
  if kind is int:
    return isinstance(value, int) and not isinstance(value, bool)
  return isinstance(value, kind)


class Section:
  """Base of every config section: checks each field, then `check()` for cross-field rules."""

  SECTION: ClassVar[str]  # the dotted name in the ConfigDict, e.g. "model" or "mesh.dcn"
  RESUME: ClassVar[Resume] = FIXED  # the resume rule of fields that declare none

  def __post_init__(self):
    kinds = typing.get_type_hints(type(self))
    for f in dataclasses.fields(self):
      value, kind = getattr(self, f.name), kinds[f.name]
      name = f"{self.SECTION}.{f.name}"
      if isinstance(kind, type) and issubclass(kind, Section):
        require(isinstance(value, kind), f"{name}: must be a {kind.__name__}")
        continue
      check = f.metadata.get("check")
      allowed = check.allowed if check else _TYPE_NAMES[kind]
      require(_matches(value, kind) and (check is None or check.ok(value)), f"{name}={value!r}: must be {allowed}")
      if kind is float:
        object.__setattr__(self, f.name, float(value))
    self.check()

  def check(self) -> None:
    """Cross-field rules of this section; raises ConfigError."""

  @classmethod
  def from_mapping(cls, values: Mapping[str, Any], renamed: Mapping[str, str] | None = None) -> Section:
    """Builds and validates from a mapping of field values (a ConfigDict section or JSON);
    missing fields take their defaults, unknown ones are refused (renamed ones name the new name)."""
    require(hasattr(values, "keys"), f"{cls.SECTION}={values!r}: must be a mapping of {cls.SECTION}'s fields")
    kinds = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    kwargs = {}
    for key, value in dict(values).items():
      dotted = f"{cls.SECTION}.{key}"
      if renamed and dotted in renamed:
        raise ConfigError(f"{dotted}: renamed; use {renamed[dotted]}")
      require(key in names, f"{dotted}: unknown field; see manifold/config.py for the fields")
      kind = kinds[key]
      if isinstance(kind, type) and issubclass(kind, Section):
        value = kind.from_mapping(value, renamed)
      kwargs[key] = value
    return cls(**kwargs)

  def to_dict(self) -> dict[str, Any]:
    return dataclasses.asdict(self)

  @classmethod
  def docs(cls) -> dict[str, str]:
    """Field name -> its one-line doc (nested sections as 'dcn.data')."""
    out = {}
    kinds = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
      kind = kinds[f.name]
      if isinstance(kind, type) and issubclass(kind, Section):
        out.update({f"{f.name}.{k}": v for k, v in kind.docs().items()})
      else:
        out[f.name] = f.metadata.get("doc", "")
    return out


def differences(saved: Section, new: Section) -> list[tuple[str, Any, Any, Resume]]:
  """(dotted name, saved value, new value, resume rule) of every field where `new` differs
  from `saved` (nested sections field by field)."""
  out = []
  kinds = typing.get_type_hints(type(new))
  for f in dataclasses.fields(new):
    old, value = getattr(saved, f.name), getattr(new, f.name)
    if isinstance(kinds[f.name], type) and issubclass(kinds[f.name], Section):
      out += differences(old, value)
    elif old != value:
      out.append((f"{new.SECTION}.{f.name}", old, value, f.metadata.get("resume") or new.RESUME))
  return out


def first_difference(theirs: Mapping[str, Any], mine: Mapping[str, Any]) -> tuple[str, Any, Any] | None:
  """(field, their value, mine) of the first dotted field where two flattened configs disagree
  (a field one of them lacks reads "<unset>"), else None."""
  for name in list(mine) + [n for n in theirs if n not in mine]:
    if theirs.get(name, "<unset>") != mine.get(name, "<unset>"):
      return name, theirs.get(name, "<unset>"), mine.get(name, "<unset>")
  return None
