"""A concept's names come from one table next to its implementation: data sources from
`data.sources.SOURCES`, how a new stack starts from `growth.NEW_STACK_INITS`, objectives from
`objectives.OBJECTIVES`. Config validation allows exactly a table's names, and README's tables list
exactly them, in the table's order."""
import pathlib

import pytest

from stackwise_jax.config import default_config, validate
from stackwise_jax.data.sources import SOURCES
from stackwise_jax.errors import ConfigError
from stackwise_jax.growth import NEW_STACK_INITS
from stackwise_jax.objectives import OBJECTIVES

README = pathlib.Path(__file__).resolve().parents[1] / "README.md"


def _readme_names(header: str) -> list[str]:
  """The first column of README's table whose header row starts with `header`: each cell's first
  `code` span."""
  lines = README.read_text().splitlines()
  start = next(i for i, line in enumerate(lines) if line.startswith(header))
  names = []
  for line in lines[start + 2:]:   # past the header and its |---| row
    if not line.startswith("|"):
      break
    names.append(line.split("|")[1].split("`")[1])
  return names


@pytest.mark.parametrize("header, table", [("| `data.source` |", SOURCES),
                                           ("| value | a new stack starts as |", NEW_STACK_INITS)])
def test_readme_tables_list_exactly_the_registry(header, table):
  assert _readme_names(header) == list(table)


@pytest.mark.parametrize("field, table", [("data.source", SOURCES),
                                          ("training.progressive.new_stack_init", NEW_STACK_INITS),
                                          ("training.progressive.training_objective", OBJECTIVES)])
def test_config_allows_exactly_the_registry(field, table):
  *groups, name = field.split(".")
  config = default_config()
  node = config
  for group in groups:
    node = node[group]
  node[name] = "not-a-name"
  allowed = "one of " + ", ".join(map(repr, table))
  with pytest.raises(ConfigError, match=f"^{field}='not-a-name': allowed: {allowed}$"):
    validate(config)


@pytest.mark.parametrize("source", list(SOURCES))
def test_every_data_source_validates_with_the_paths_it_takes(source):
  config = default_config()
  config.data.source = source
  config.data.paths = () if SOURCES[source].paths == "any" else ("somewhere",)
  validate(config)
  if SOURCES[source].paths == "directory":
    config.data.paths = ("one", "two")
    with pytest.raises(ConfigError, match="exactly one directory"):
      validate(config)
