"""YAML in, typed config fields out: the safe YAML reader (its duplicate keys, one-line errors)
and a parsed mapping copied onto a ConfigDict, each value coerced to its default's type.

Its own module because config.py (our YAML, overrides, validation) and upstream.py (the original
StackWise's YAML, which config.py hands over to) both need it: neither imports the other for it.
"""
import re
from typing import Any

import ml_collections
import yaml

from stackwise_jax.errors import ConfigError


# --- Reading YAML. ---


class _Loader(yaml.SafeLoader):
  """SafeLoader that also reads `3e-4` as a float (PyYAML's YAML 1.1 needs `3.0e-4`), records a
  key given twice in one mapping in `duplicates` (PyYAML keeps the last one silently;
  `config.from_yaml` decides), and refuses any tag it has no constructor for, such as
  `!!python/object:...` (it never builds Python objects)."""

  def __init__(self, stream):
    super().__init__(stream)
    self.duplicates = []   # (key, line of the earlier one, line of the later one), 1-based

  def construct_mapping(self, node, deep=False):
    lines = {}
    for key_node, _ in node.value:
      if isinstance(key_node, yaml.ScalarNode) and key_node.tag != "tag:yaml.org,2002:merge":
        key, line = self.construct_object(key_node), key_node.start_mark.line + 1
        if key in lines:
          self.duplicates.append((key, lines[key], line))
        lines[key] = line
    return super().construct_mapping(node, deep)

  def construct_undefined(self, node):
    tag = node.tag.replace("tag:yaml.org,2002:", "!!", 1)
    raise yaml.constructor.ConstructorError(
        None, None, f"tag {tag} is not allowed: configs are read safely, without Python objects; "
        "write the plain mapping without the tag", node.start_mark)


_Loader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"^[-+]?[0-9][0-9_]*(\.[0-9_]*)?[eE][-+]?[0-9]+$"),
    list("-+0123456789"))
_Loader.add_constructor(None, _Loader.construct_undefined)   # unknown tags


def read_yaml(text: str) -> tuple[Any, list]:
  """(the parsed value, its duplicate keys as `_Loader.duplicates`); yaml.YAMLError if it
  does not parse."""
  loader = _Loader(text)
  try:
    return loader.get_single_data(), loader.duplicates
  finally:
    loader.dispose()


def yaml_value(text: str) -> Any:
  """A YAML value given on the command line; a key given twice in it is a yaml.YAMLError."""
  value, duplicates = read_yaml(text)
  if duplicates:
    raise yaml.YAMLError(duplicate_message(*duplicates[0]))
  return value


def duplicate_message(key, first: int, second: int) -> str:
  return (f"duplicate key {key!r} at lines {first} and {second} (YAML would keep only the last); "
          "allowed: each key once per mapping")


def yaml_error(source: str, text: str, error: yaml.YAMLError) -> ConfigError:
  """`source:LINE:COL: problem` on one line (PyYAML's own message spans several lines, with a
  caret under the spot)."""
  mark, problem = getattr(error, "problem_mark", None), getattr(error, "problem", None)
  if isinstance(error, yaml.reader.ReaderError):   # a character YAML does not allow
    mark = yaml.Mark(source, error.position, text.count("\n", 0, error.position),
                     error.position - text.rfind("\n", 0, error.position) - 1, None, None)
    problem = (f"unacceptable character #x{error.character:04x}: {error.reason}"
               if isinstance(error.character, int) else error.reason)
  if mark is None or not problem:
    return ConfigError(f"{source}: not valid YAML: {' '.join(str(error).split())}")
  if "'\\t'" in problem:
    problem += " (YAML indents with spaces, never tabs)"
  context = getattr(error, "context", None)
  if context and getattr(error, "context_mark", None) is not None:
    problem += f" ({context} at line {error.context_mark.line + 1})"
  return ConfigError(f"{source}:{mark.line + 1}:{mark.column + 1}: {' '.join(problem.split())}")


# --- A parsed mapping onto a ConfigDict, typed as its defaults. ---

# Fields whose value is a mapping with free keys (not a group of named fields).
MAPPINGS = ("training.progressive.qlora_configs",)
# Lists of ints where a plain int n means (n,), as it does on the command line.
INT_LISTS = ("training.progressive.stacks_per_stage",)


def apply_mapping(node: ml_collections.ConfigDict, data: Any, prefix: str) -> None:
  """Copies a nested YAML mapping onto `node`, coercing each value to its default's type."""
  if not isinstance(data, dict):
    raise ConfigError(f"{prefix or '<top level>'}={data!r}: expected a mapping of fields; "
                      f"allowed keys: {', '.join(node.keys())}")
  for key, value in data.items():
    path = join_path(prefix, key)
    check_known(node, key, path, prefix)
    current = node[key]
    if path in MAPPINGS:
      node[key] = as_mapping(path, value)
    elif isinstance(current, ml_collections.ConfigDict):
      apply_mapping(current, value, path)
    else:
      node[key] = coerce(path, value, current)


def as_mapping(path: str, value: Any) -> ml_collections.ConfigDict:
  if not isinstance(value, (dict, ml_collections.ConfigDict)):
    raise ConfigError(f"{path}={value!r}: expected a mapping, e.g. {{0: {{rank: 8, alpha: 16}}}}")
  return ml_collections.ConfigDict(dict(value))


def coerce(path: str, value: Any, default: Any) -> Any:
  """Returns `value` as the type of `default`; ConfigError naming the path if it cannot be."""
  if value is None:
    if default is None:
      return None
    raise ConfigError(f"{path}=None: null is not allowed here; expected {type_name(default)}")
  if default is None:
    return value
  if path in INT_LISTS and type_ok(value, 1):
    value = (value,)
  if not type_ok(value, default):
    expected = "an int or a list of ints, e.g. [1, 3]" if path in INT_LISTS else type_name(default)
    raise ConfigError(f"{path}={value!r}: expected {expected}")
  if isinstance(default, float):
    return float(value)
  if isinstance(default, tuple):
    return tuple(value)
  return value


def type_ok(value: Any, default: Any) -> bool:
  """Whether `value` may fill a field whose default is `default`; ints fill floats, lists tuples."""
  if default is None:
    return True
  if isinstance(default, bool):
    return isinstance(value, bool)
  if isinstance(default, int):
    return isinstance(value, int) and not isinstance(value, bool)
  if isinstance(default, float):
    return isinstance(value, (int, float)) and not isinstance(value, bool)
  if isinstance(default, tuple):
    return isinstance(value, (tuple, list))
  return isinstance(value, type(default))


def type_name(default: Any) -> str:
  if isinstance(default, bool):
    return "a bool (true/false)"
  if isinstance(default, tuple):
    return "a list, e.g. [a.txt, b/*.txt]"
  names = {int: "an int", float: "a float", str: "a string"}
  return names.get(type(default), type(default).__name__)


def check_known(node: ml_collections.ConfigDict, key: Any, path: str, prefix: str) -> None:
  if key not in node:
    raise ConfigError(f"{path}: unknown field; allowed in {prefix or 'the top level'}: "
                      f"{', '.join(node.keys())}")


def join_path(prefix: str, key: Any) -> str:
  return f"{prefix}.{key}" if prefix else str(key)

