"""Specification of the config surface (design §2): loading .py and YAML, overrides, validation."""
import math
import pathlib
import re
import textwrap

from flax import nnx
import jax
import jax.numpy as jnp
import pytest

from stackwise_jax.config import BUILDING_MODES
from stackwise_jax.config import default_config
from stackwise_jax.config import load_config
from stackwise_jax.config import to_yaml
from stackwise_jax.config import validate
from stackwise_jax.errors import ConfigError
from stackwise_jax.model.lora import RANK_PATTERNS
from stackwise_jax.model.stack import COMPUTE_DTYPES
from stackwise_jax.model.stack import Stack
from stackwise_jax.objectives import OBJECTIVES

CONFIGS = pathlib.Path(__file__).parents[1] / "configs"
TINY = str(CONFIGS / "tiny.py")

# configs/tiny.py written by hand the way an upstream user would: only what differs from the
# defaults, floats in plain spelling (3e-3 has no dot, which YAML 1.1 would read as a string).
TINY_YAML = """\
model:
  d_model: 128
  n_heads: 4
  n_kv_heads: 4
  d_ff: 384
  max_seq_len: 128
  n_blocks_per_stack: 1
training:
  batch_size: 16
  seq_len: 128
  lr: 3e-3
  warmup_steps: 20
  steps_per_stack: 250
  eval_every: 50
  eval_batches: 4
  log_every: 10
  progressive:
    max_stacks: 4
    target_stacks: 3
    new_stack_init: identity
"""


def _write(tmp_path, text, name="config.yaml"):
  path = tmp_path / name
  path.write_text(textwrap.dedent(text))
  return str(path)


def _tiny_with(**changes):
  """configs/tiny.py with `changes` ({"model__d_model": 130}) applied, not yet validated."""
  config = load_config(TINY)
  for key, value in changes.items():
    *groups, field = key.split("__")
    node = config
    for group in groups:
      node = node[group]
    node[field] = value
  return config


# --- Shipped configs. ---


@pytest.mark.parametrize("name", sorted(p.name for p in CONFIGS.glob("*.py")))
def test_shipped_configs_load_and_validate(name):
  config = load_config(str(CONFIGS / name))
  assert validate(config) is config
  assert config.training.seq_len <= config.model.max_seq_len


def test_gpu_config_has_about_a_billion_parameters():
  config = load_config(str(CONFIGS / "gpu_1b.py"))
  m = config.model
  stack = nnx.eval_shape(lambda: Stack(m, n_blocks=m.n_blocks_per_stack, dtype=jnp.bfloat16,
                                       causal=True, time_dim=None, rngs=nnx.Rngs(0)))
  per_stack = sum(x.size for x in jax.tree.leaves(nnx.state(stack, nnx.Param)))
  total = per_stack * config.training.progressive.target_stacks + m.vocab_size * m.d_model
  assert 0.9e9 < total < 1.1e9 and m.d_model >= 2048


def test_default_config_is_valid():
  validate(default_config())


# --- YAML. ---


def test_yaml_with_tiny_values_equals_tiny_py(tmp_path):
  from_yaml = load_config(_write(tmp_path, TINY_YAML))
  assert from_yaml.to_dict() == load_config(TINY).to_dict()
  assert isinstance(from_yaml.training.lr, float)


@pytest.mark.parametrize("name", ["tiny.py", "small.py"])
def test_to_yaml_round_trips(tmp_path, name):
  config = load_config(str(CONFIGS / name), ["data.source=text", "data.paths=[a.txt, b/*.txt]"])
  reloaded = load_config(_write(tmp_path, to_yaml(config), name="dumped.yml"))
  assert reloaded.to_dict() == config.to_dict()
  assert reloaded.data.paths == ("a.txt", "b/*.txt")


def test_yaml_missing_keys_keep_defaults(tmp_path):
  config = load_config(_write(tmp_path, "model:\n  d_model: 64\n"))
  expected = default_config()
  expected.model.d_model = 64
  assert config.to_dict() == expected.to_dict()


def test_yaml_coerces_to_the_default_type(tmp_path):
  config = load_config(_write(tmp_path, """\
      training:
        lr: 1
      data:
        source: text
        paths: [a.txt, b.txt]
      """))
  assert config.training.lr == 1.0 and isinstance(config.training.lr, float)
  assert config.data.paths == ("a.txt", "b.txt")


@pytest.mark.parametrize("text, path", [
    ("training:\n  progressive:\n    foo: 1\n", "training.progressive.foo"),
    ("training:\n  lrr: 0.1\n", "training.lrr"),
    ("optimizer:\n  lr: 0.1\n", "optimizer"),
])
def test_yaml_unknown_key_names_its_full_path(tmp_path, text, path):
  with pytest.raises(ConfigError, match=rf"^{path}: unknown field") as e:
    load_config(_write(tmp_path, text))
  if path == "training.progressive.foo":
    assert "building_mode" in str(e.value)  # lists what is allowed at that level


@pytest.mark.parametrize("text, fragment", [
    ("model:\n  d_model: '128'\n", "model.d_model='128': expected an int"),
    ("model:\n  d_model: 1.5\n", "model.d_model=1.5: expected an int"),
    ("model:\n  d_model: true\n", "model.d_model=True: expected an int"),
    ("model:\n  d_model: null\n", "model.d_model=None"),
    ("training:\n  lr: fast\n", "training.lr='fast': expected a float"),
    ("training:\n  progressive:\n    enabled: 1\n",
     "training.progressive.enabled=1: expected a bool"),
    ("data:\n  paths: a.txt\n", "data.paths='a.txt': expected a list"),
    ("model:\n  attention: 3\n", "model.attention=3: expected a string"),
    ("training: 3\n", "training=3: expected a mapping"),
])
def test_yaml_wrong_type_is_config_error(tmp_path, text, fragment):
  with pytest.raises(ConfigError) as e:
    load_config(_write(tmp_path, text))
  assert fragment in str(e.value)


def test_yaml_values_are_validated(tmp_path):
  with pytest.raises(ConfigError, match=r"model\.attention='bogus'"):
    load_config(_write(tmp_path, "model:\n  attention: bogus\n"))


# --- Files. ---


def test_missing_file_names_the_path(tmp_path):
  path = str(tmp_path / "nope.py")
  with pytest.raises(ConfigError, match="nope.py"):
    load_config(path)


def test_py_without_get_config_is_config_error(tmp_path):
  path = _write(tmp_path, "x = 1\n", name="bad.py")
  with pytest.raises(ConfigError, match="get_config"):
    load_config(path)


def test_unknown_extension_is_config_error(tmp_path):
  with pytest.raises(ConfigError, match=r"\.yaml"):
    load_config(_write(tmp_path, "{}", name="config.json"))


# A mistake in the file itself is one line naming the file and where in it (exit 2 from the CLI,
# tests/test_cli.py); PyYAML's own messages span several lines and end in a caret.
@pytest.mark.parametrize("text, where", [
    ("model:\n\td_model: 64\n", r":2:1: found character '\\t' that cannot start any token "
                                 r"\(YAML indents with spaces, never tabs\)$"),
    ("model:\n  d_model: 64\n d_ff: 3\n", r":3:2: expected <block end>, but found "
                                        r"'<block mapping start>' \(while parsing a block mapping "
                                        r"at line 1\)$"),
    ("data:\n  paths: [a.txt\n", r":3:1: expected ',' or '\]', but got '<stream end>'"),
    ("model:\n  attention: \x07\n", r":2:14: unacceptable character #x0007"),
    ("model:\n  d_model: 64\n  d_model: 32\n", r":3: duplicate key 'd_model' at lines 2 and 3"),
    ("model: !!python/name:os.system\n", r":1:8: tag !!python/name:os\.system is not allowed"),
])
def test_yaml_errors_name_file_line_and_column_on_one_line(tmp_path, text, where):
  path = _write(tmp_path, text)
  with pytest.raises(ConfigError, match=re.escape(path) + where) as e:
    load_config(path)
  assert "\n" not in str(e.value)


@pytest.mark.parametrize("text, where", [
    ("def get_config(:\n  pass\n", ":1: SyntaxError: invalid syntax"),
    ("def get_config():\n  x = 1\n    return x\n", ":3: IndentationError: unexpected indent"),
    ("import os\nX = {}['k']\n", ":2: KeyError: 'k'"),
    # The deepest line of the file: the helper's, not get_config's call of it.
    ("def helper():\n  return 1 / 0\n\ndef get_config():\n  return helper()\n",
     ":2: ZeroDivisionError: division by zero"),
    # Raised in our code: the file's line that called it.
    ("from stackwise_jax.config import with_fields\n\ndef get_config():\n"
     "  return with_fields(d_modle=3)\n", ":4: ConfigError: d_modle=3: not a config field"),
])
def test_py_config_errors_name_the_file_and_its_line(tmp_path, text, where):
  path = _write(tmp_path, text, name="mine.py")
  with pytest.raises(ConfigError) as e:
    load_config(path)
  assert str(e.value).startswith(path + where) and "\n" not in str(e.value), str(e.value)


@pytest.mark.parametrize("text", ["", "# nothing set yet\n", "{}\n"])
def test_an_empty_yaml_config_warns_once_and_keeps_the_defaults(tmp_path, capsys, text):
  path = _write(tmp_path, text)
  assert load_config(path).to_dict() == default_config().to_dict()
  assert capsys.readouterr().err == (f"stackwise-jax: warning: {path}: empty config: every field "
                                     "keeps its default (stackwise_jax.config.default_config())\n")


def test_a_py_config_of_the_defaults_is_not_empty(tmp_path, capsys):
  load_config(_write(tmp_path, "from stackwise_jax.config import default_config\n\n"
                               "def get_config():\n  return default_config()\n", name="mine.py"))
  assert capsys.readouterr().err == ""


# --- Overrides. ---


def test_overrides_take_effect_with_the_field_type():
  config = load_config(TINY, [
      "training.lr=0.01",
      "training.steps_per_stack=7",
      "training.progressive.enabled=FALSE",
      "training.progressive.cache_activations=0",
      "training.progressive.building_mode=prepend",
      "training.grad_clip=2",
      "data.source=text",
      "data.paths=('a.txt','b/*.txt')",
  ])
  assert config.training.lr == 0.01
  assert config.training.steps_per_stack == 7
  assert config.training.progressive.enabled is False
  assert config.training.progressive.cache_activations is False
  assert config.training.progressive.building_mode == "prepend"
  assert config.training.grad_clip == 2.0 and isinstance(config.training.grad_clip, float)
  assert config.data.paths == ("a.txt", "b/*.txt")


@pytest.mark.parametrize("text, expected", [
    ("[a.txt]", ("a.txt",)),
    ("['a.txt', 'b c.txt']", ("a.txt", "b c.txt")),
    ("a.txt", ("a.txt",)),
    ("corpus/*.txt", ("corpus/*.txt",)),
    ("()", ()),
    ("", ()),
])
def test_tuple_override_forms(text, expected):
  config = load_config(TINY, [f"data.paths={text}"])
  assert config.data.paths == expected


def test_bool_override_accepts_true_and_1():
  assert load_config(TINY, ["model.tie_embeddings=false", "model.tie_embeddings=True"]
                     ).model.tie_embeddings is True
  assert load_config(TINY, ["model.tie_embeddings=0", "model.tie_embeddings=1"]
                     ).model.tie_embeddings is True


@pytest.mark.parametrize("override, path", [
    ("training.lrr=0.1", "training.lrr"),
    ("training.progressive.foo=1", "training.progressive.foo"),
    ("nosuch.lr=1", "nosuch"),
    ("training.lr.x=1", "training.lr"),
])
def test_unknown_override_path_is_config_error(override, path):
  with pytest.raises(ConfigError) as e:
    load_config(TINY, [override])
  assert path in str(e.value)


@pytest.mark.parametrize("override, fragment", [
    ("model.d_model=abc", "model.d_model='abc': expected an int"),
    ("model.d_model=1.5", "model.d_model='1.5': expected an int"),
    ("training.lr=fast", "training.lr='fast': expected a float"),
    ("training.progressive.enabled=maybe", "training.progressive.enabled='maybe': expected a bool"),
    ("data.paths=[a, b", "data.paths='[a, b': expected a list"),
    ("training=1", "training='1': training is a group of fields"),
    ("training.lr", "path.to.field=value"),
])
def test_bad_override_value_is_config_error(override, fragment):
  with pytest.raises(ConfigError) as e:
    load_config(TINY, [override])
  assert fragment in str(e.value)


def test_overrides_are_validated():
  with pytest.raises(ConfigError, match=r"model\.d_model=130"):
    load_config(TINY, ["model.d_model=130"])


# --- Validation: every bad value names its field path and the value. ---

_ENUM_PATHS = [
    "model.attention",
    "training.progressive.building_mode",
    "training.progressive.trunk_strategy",
    "training.progressive.new_stack_precision",
    "training.progressive.embedding_training",
    "training.progressive.training_objective",
    "training.progressive.time_interpretation",
    "training.progressive.time_encoding_type",
    "training.progressive.stack_time_mapping",
    "training.progressive.qlora_strategy",
    "training.progressive.qlora_rank_pattern",
    "training.progressive.qlora_alpha_pattern",
    "data.source",
    "data.tokenizer",
]
_POSITIVE_PATHS = [
    "model.vocab_size", "model.d_model", "model.n_heads", "model.n_kv_heads", "model.d_ff",
    "model.max_seq_len", "model.n_blocks_per_stack", "training.batch_size", "training.seq_len",
    "training.steps_per_stack", "training.eval_batches", "training.log_every",
    "training.progressive.max_stacks", "training.progressive.target_stacks",
    "training.progressive.num_time_steps", "training.progressive.time_embedding_dim",
    "training.progressive.qlora_rank", "training.progressive.progressive_qlora_rank",
    "training.progressive.quant_block_size",
]
_NON_NEGATIVE_PATHS = [
    "training.warmup_steps", "training.eval_every", "training.checkpoint_every", "training.seed",
    "training.progressive.time_per_stack", "training.progressive.cache_max_bytes",
    "data.num_workers", "data.shuffle_seed",
]


def _case(path, value, **other_changes):
  changes = {path.replace(".", "__"): value, **other_changes}
  return pytest.param(changes, path, value, id=f"{path}={value!r}")


_INVALID = [
    *[_case(p, "bogus") for p in _ENUM_PATHS],
    *[_case(p, 0) for p in _POSITIVE_PATHS],
    *[_case(p, -1) for p in _NON_NEGATIVE_PATHS],
    _case("training.steps_per_stack", -5),
    _case("model.d_model", 130),                       # not divisible by n_heads=4
    _case("model.d_model", 12),                        # head dim 3: RoPE needs it even
    _case("model.n_kv_heads", 2),                      # mha needs n_kv_heads == n_heads
    _case("model.n_kv_heads", 3, model__attention="gqa"),   # gqa needs a divisor of n_heads
    _case("training.progressive.target_stacks", 5),    # > max_stacks=4
    _case("training.seq_len", 256),                    # > max_seq_len=128
    _case("training.lr", 0.0),
    _case("training.lr", -1e-3),
    _case("training.lr", math.inf),
    _case("training.weight_decay", -0.1),
    _case("training.grad_clip", -1.0),
    _case("model.dropout", 1.0),
    _case("model.dropout", -0.1),
    _case("training.compile_ahead", "yes"),
    _case("model.rope_theta", 0.0),
    _case("model.norm_eps", 0.0),
    _case("training.progressive.mlm_min_ratio", 1.5),
    _case("data.val_fraction", 0.0),
    _case("data.val_fraction", 1.0),
    _case("training.progressive.mask_token_id", 260),  # == vocab_size
    _case("training.progressive.mask_token_id", -1),
    _case("training.progressive.custom_time_mapping", "",
          training__progressive__stack_time_mapping="custom"),
    _case("training.progressive.time_embedding_dim", 33,
          training__progressive__time_interpretation="input"),   # sinusoidal needs an even dim
    _case("training.progressive.qlora_rank", -4),
    _case("training.progressive.qlora_alpha", 0.0),
    _case("training.progressive.progressive_qlora_alpha", -1.0),
    _case("training.progressive.trunk_strategy", "qlora"),   # no adapters would train
    _case("training.progressive.quant_block_size", 48, training__progressive__trunk_strategy="qlora",
          training__progressive__progressive_qlora=True),     # 48 does not divide d_model=128
    _case("training.progressive.qlora_configs", {0: {"alpha": 1.0, "rank": 0}}),
    _case("training.progressive.qlora_configs", {0: {"rank": 2}}),
    _case("training.progressive.qlora_configs", {"x": {"alpha": 1.0, "rank": 2}}),
    _case("training.progressive.qlora_configs", {0: {"alpha": 1.0, "rank": 2}},
          training__progressive__qlora_strategy="variable",
          training__progressive__qlora_enabled=True),       # no entry for stacks 1, 2
    _case("data.paths", (), data__source="text"),
    _case("data.paths", ("",), data__source="text"),
]


@pytest.mark.parametrize("path,names", [
    ("training.progressive.training_objective", tuple(OBJECTIVES)),
    ("training.progressive.new_stack_precision", tuple(COMPUTE_DTYPES)),
    ("training.progressive.qlora_rank_pattern", RANK_PATTERNS),
    ("training.progressive.qlora_alpha_pattern", RANK_PATTERNS),
    ("training.progressive.building_mode", BUILDING_MODES)])
def test_allowed_names_are_those_of_the_table_that_owns_them(path, names):
  key = path.replace(".", "__")
  with pytest.raises(ConfigError) as e:
    validate(_tiny_with(**{key: "bogus"}))
  assert str(e.value) == f"{path}='bogus': allowed: one of {', '.join(map(repr, names))}"
  for name in names:
    validate(_tiny_with(**{key: name}))


@pytest.mark.parametrize("changes, path, value", _INVALID)
def test_invalid_value_names_path_and_value(changes, path, value):
  config = _tiny_with(**changes)
  with pytest.raises(ConfigError) as e:
    validate(config)
  assert f"{path}={value!r}" in str(e.value)
  assert "allowed" in str(e.value)


@pytest.mark.parametrize("changes", [
    {"training__grad_clip": 0.0},
    {"training__progressive__enabled": False},
    {"training__progressive__trunk_strategy": "qlora", "training__progressive__progressive_qlora": True},
    {"training__progressive__qlora_strategy": "variable", "training__progressive__qlora_enabled": True,
     "training__progressive__target_stacks": 2,
     "training__progressive__qlora_configs": {0: {"rank": 1, "alpha": 2}, 1: {"rank": 4, "alpha": 0.5}}},
    {"model__attention": "gqa", "model__n_heads": 8, "model__n_kv_heads": 2},
    {"training__progressive__target_stacks": 4},
    {"training__steps_per_stack": 1, "training__warmup_steps": 0, "training__eval_every": 0},
    {"training__progressive__stack_time_mapping": "custom",
     "training__progressive__custom_time_mapping": "my_mapping"},
    {"data__source": "text", "data__paths": ("corpus/*.txt",)},
    {"model__dropout": 0.0, "training__progressive__mlm_min_ratio": 1.0},
    {"training__progressive__time_embedding_dim": 33, "training__progressive__time_interpretation":
     "input", "training__progressive__time_encoding_type": "learned"},
    {"training__progressive__time_embedding_dim": 33},   # time as depth: no time embedding
    {"training__compile_ahead": True}, {"training__compile_ahead": False},
])
def test_edge_values_are_accepted(changes):
  validate(_tiny_with(**changes))


def test_validate_rejects_unknown_field_in_py_config():
  config = load_config(TINY)
  config.training.learning_rate = 0.1  # a typo a .py config could make; ConfigDict accepts it
  with pytest.raises(ConfigError, match=r"^training\.learning_rate: unknown field"):
    validate(config)


def test_validate_rejects_missing_field():
  config = load_config(TINY)
  del config.model["norm_eps"]
  with pytest.raises(ConfigError, match=r"^model\.norm_eps: missing"):
    validate(config)


def test_validate_rejects_wrong_type():
  config = load_config(TINY)
  config.model.d_model = None  # ConfigDict lets None into any field
  with pytest.raises(ConfigError, match=r"^model\.d_model=None: expected an int"):
    validate(config)


def test_qlora_configs_from_yaml_py_and_override_agree(tmp_path):
  yaml_path = tmp_path / "c.yaml"
  yaml_path.write_text("training:\n  progressive:\n    qlora_strategy: variable\n"
                       "    qlora_enabled: true\n    target_stacks: 2\n"
                       "    qlora_configs: {0: {rank: 2, alpha: 4}, 1: {rank: 8, alpha: 16.0}}\n")
  from_yaml = load_config(str(yaml_path))
  from_override = load_config(str(yaml_path), [
      "training.progressive.qlora_configs={0: {rank: 2, alpha: 4}, 1: {rank: 8, alpha: 16.0}}"])
  entries = from_yaml.training.progressive.qlora_configs
  assert entries[1]["rank"] == 8 and entries[0]["alpha"] == 4
  assert from_override.training.progressive.qlora_configs.to_dict() == entries.to_dict()
  round_trip = tmp_path / "round.yaml"
  round_trip.write_text(to_yaml(from_yaml))
  assert load_config(str(round_trip)) == from_yaml
  with pytest.raises(ConfigError, match=r"qlora_configs=\[1, 2\]: expected a mapping"):
    load_config(str(yaml_path), ["training.progressive.qlora_configs=[1, 2]"])
