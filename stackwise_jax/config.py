"""The config surface of design §2: defaults, loading (.py or YAML), overrides and validation."""
import ast
from collections.abc import Sequence
import functools
import importlib.util
import math
import os
import sys
import traceback
from typing import Any

from absl import flags
import ml_collections
from ml_collections.config_flags import tuple_parser
import yaml

from stackwise_jax import upstream, yaml_io
from stackwise_jax.errors import ConfigError
# The tables that own allowed names, next to their implementations. None of these modules may
# import config, or anything under progressive/ (tests/test_imports.py).
from stackwise_jax.data import tokenizer
from stackwise_jax.data.sources import SOURCES
from stackwise_jax.growth import NEW_STACK_INITS, NOT_COPYING
from stackwise_jax.model.lora import RANK_PATTERNS
from stackwise_jax.model.stack import COMPUTE_DTYPES
from stackwise_jax.objectives import OBJECTIVES
from stackwise_jax.quant import BY_PRECISION, FORMATS, QLORA_TRUNK


def default_config() -> ml_collections.ConfigDict:
  """Every field a run depends on, with its default. configs/*.py start from this."""
  c = ml_collections.ConfigDict()

  c.model = ml_collections.ConfigDict()
  c.model.vocab_size = 260          # 256 bytes + PAD, MASK, BOS, EOS (see data/tokenizer.py)
  c.model.d_model = 128
  c.model.n_heads = 4
  c.model.n_kv_heads = 4            # == n_heads for "mha"; a divisor of n_heads for "gqa"
  c.model.d_ff = 384
  c.model.max_seq_len = 256
  c.model.dropout = 0.0
  c.model.tie_embeddings = True
  c.model.rope_theta = 10000.0
  c.model.norm_eps = 1e-6
  c.model.attention = "mha"         # "mha" | "gqa"
  c.model.n_blocks_per_stack = 1

  c.training = ml_collections.ConfigDict()
  c.training.batch_size = 16
  c.training.seq_len = 128
  c.training.lr = 3e-3
  c.training.weight_decay = 0.01
  c.training.warmup_steps = 20
  c.training.grad_clip = 1.0
  c.training.steps_per_stack = 100
  c.training.seed = 0
  c.training.eval_every = 50        # 0 = only at the end of each stage
  c.training.eval_batches = 4
  c.training.log_every = 10
  c.training.checkpoint_every = 0   # 0 = only at the end of each stage
  c.training.keep_checkpoints = 3   # the latest N are kept, and the end of every stage
  # Checkpoints are copied off the devices, then written by orbax on a background thread while
  # training goes on (False: each save blocks until it is on disk).
  c.training.async_checkpointing = True
  c.training.workdir = ""           # the CLI's --workdir sets it
  # A step whose loss or gradients are NaN/Inf is never applied. "stop": the run stops there
  # (exit status 3); "skip": training goes on, until max_skipped_steps in a row were skipped.
  c.training.nonfinite = "stop"
  c.training.max_skipped_steps = 10
  # "fresh": every stage draws new batches. "pool" (the original StackWise's way): every stage
  # trains epochs_per_stack epochs over the same steps_per_stack batches, and a frozen trunk's
  # cached activations are extended by the stacks a stage adds instead of recomputed.
  c.training.data_reuse = "fresh"
  c.training.epochs_per_stack = 1
  # An optional last stage after the progressive ones: the whole rack trains end to end for
  # final_stage_steps steps at peak lr final_stage_lr (int4 kernels still train only adapters).
  c.training.final_stage = False
  c.training.final_stage_steps = 100
  c.training.final_stage_lr = 1e-4
  # XLA's persistent compilation cache ("" or "off": none); $STACKWISE_COMPILATION_CACHE wins.
  c.training.compilation_cache_dir = "~/.cache/stackwise-jax/xla"
  # While a stage trains, the next stage's steps and trunk forward compile on a background thread
  # (progressive/ahead.py), so the next stage starts with them compiled. Results are the same.
  # None: on where steps run on a GPU or TPU (the host idles while the device trains), off on a
  # CPU (there the compile takes the cores the step uses: the job was slower, BUILD_NOTES *job*).
  c.training.compile_ahead = None

  p = c.training.progressive = ml_collections.ConfigDict()
  p.enabled = True                  # False: one stage training all target_stacks end to end
  p.max_stacks = 4
  p.target_stacks = 3
  p.building_mode = "append"        # "append" | "prepend"
  # Once a trunk exists: "frozen" (cached where it can be), "qlora" (int4 kernels, adapters
  # train), or "train": it trains with the new stacks, at trunk_lr_scale times their lr schedule.
  p.trunk_strategy = "frozen"       # "frozen" | "qlora" | "train"
  p.trunk_lr_scale = 1.0
  p.new_stack_precision = "full"    # "full" | "bfloat16" | "half" | "nvfp4" | "qlora"
  # How a new stack starts: its own random init, a copy of the trained stack next to it, a copy
  # by progressive stacking (stack j copies j - 2^floor(log2 j); several a stage: the trained rack
  # repeated), a copy of the trained rack's middle, or as the identity (zeroed residual writes).
  # One of growth.NEW_STACK_INITS.
  p.new_stack_init = "random"       # "random" | "copy_last" | "stack" | "midas" | "identity"
  # Stacks each stage adds: stage k adds entry k, the last entry every later stage (an int n in
  # YAML or on the command line is (n,)); the last stage adds only what target_stacks needs.
  # (1, 3): one stack, then three more at once (G_stack's growth factor 4). `stage_sizes`.
  p.stacks_per_stage = (1,)
  # A Hugging Face Llama directory whose layers become the first stacks (the trunk new stacks grow
  # on); model sizes and the tokenizer then come from it (stackwise_jax/hf/llama.py). "": none.
  p.init_from = ""
  # Once a trunk exists: "auto" freezes the token/time embedding (it feeds the frozen trunk) and
  # trains the head side (final norm, untied head) in append mode only (under trunk_strategy="train"
  # both sides train); "trainable" | "frozen": all.
  p.embedding_training = "auto"
  p.cache_activations = True
  p.cache_max_bytes = 2 * 1024**3   # host memory for the cache; beyond it, it spills to disk
  # Cache kept on the accelerators before host memory; None: a quarter of their memory on a
  # GPU/TPU, none on a CPU (caching.device_budget).
  p.cache_device_bytes = None
  p.training_objective = "clm"      # "mlm" | "clm" | "custom"
  p.mask_token_id = None            # None: the tokenizer's mask id (bytes: 257)
  p.mlm_min_ratio = 0.15            # mask ratio at the lowest noise level
  p.time_interpretation = "depth"   # "input" | "depth"
  p.num_time_steps = 16
  p.time_embedding_dim = 64
  p.time_encoding_type = "sinusoidal"   # "sinusoidal" | "learned"
  p.stack_time_mapping = "linear"   # "linear" | "exponential" | "custom"
  p.time_per_stack = 4
  # A name registered with progressive.masking.register_time_mapping or, from Python only (it
  # cannot be saved), a callable (stack level, max_stacks, num_time_steps) -> time step.
  p.custom_time_mapping = ml_collections.FieldReference("", field_type=object)
  # Dual LoRA (design §6). Stack LoRA: adapters on every stack's attention/FFN kernels.
  p.qlora_enabled = False
  p.qlora_rank = 8
  p.qlora_alpha = 16.0
  p.qlora_strategy = "simplified"   # "simplified" | "progressive" | "variable"
  p.qlora_rank_pattern = "constant"   # "constant" | "increasing" | "decreasing" | "linear"
  p.qlora_alpha_pattern = "constant"
  p.qlora_configs = ml_collections.ConfigDict()   # {stack_idx: {rank, alpha}} for "variable"
  # Progressive QLoRA: a smaller adapter set on every trunk stack once a stack is added on top.
  p.progressive_qlora = False
  p.progressive_qlora_rank = 4
  p.progressive_qlora_alpha = 8.0
  p.quant_block_size = 64           # int4 block (values per scale) along the contraction axis

  c.data = ml_collections.ConfigDict()
  c.data.source = "builtin"         # one of data/sources.py SOURCES
  c.data.paths = ()                 # files or globs; one directory for hf_disk and array_record
  c.data.text_field = "text"        # the documents' field (jsonl, parquet, hf_disk)
  c.data.skip_bad_records = False   # count and skip a bad jsonl line instead of stopping
  c.data.tokenizer = "bytes"        # "bytes" | "bpe:N" | a tokenizer.json | a SentencePiece .model
  c.data.val_fraction = 0.05
  c.data.shuffle_seed = 0
  c.data.num_workers = 0
  # "concat": documents concatenated and cut into records (attention crosses documents, as in
  # nanoGPT); "documents": records carry segment ids, attention and loss stay within a document.
  c.data.packing = "concat"
  # Several sources sampled by weight (data/mixture.py): a list of dicts, each with `source`,
  # `paths`, `weight` and optionally `text_field`; () = data.source alone. mixture_by_stage: per
  # stage a list of weights, one per mixture entry (the last row holds for later stages); () =
  # the entries' own weights for every stage.
  c.data.mixture = ()
  c.data.mixture_by_stage = ()

  # Weights & Biases, beside TensorBoard (stackwise_jax/metrics.py; the `wandb` extra).
  c.logging = ml_collections.ConfigDict()
  c.logging.wandb = False
  c.logging.wandb_project = "stackwise-jax"
  c.logging.wandb_entity = ""
  c.logging.wandb_run_name = ""     # "": the workdir's name
  c.logging.wandb_tags = ()
  c.logging.wandb_notes = ""
  c.logging.wandb_mode = "online"   # "online" | "offline" | "disabled"

  # Device mesh (design §11, stackwise_jax/sharding.py): data × fsdp = the devices; -1 = the rest.
  c.mesh = ml_collections.ConfigDict()
  c.mesh.data = -1                 # batches split, params replicated
  c.mesh.fsdp = 1                  # batches split, params and optimizer state split too
  return c


# --- Loading: a .py with get_config(), or an upstream-style YAML; then CLI-style overrides. ---


def load_config(path: str, overrides: Sequence[str] = ()) -> ml_collections.ConfigDict:
  """Loads a config file, applies overrides and validates the result.

  Args:
    path: a `.py` file defining `get_config()`, or a `.yaml`/`.yml` file nested like design §2
      or in the original StackWise's schema (stackwise_jax/upstream.py); fields it leaves out
      keep their `default_config()` values.
    overrides: `"path.to.field=value"` strings (the CLI's `--config.` prefix already stripped); each
      value is parsed according to the type of the field it replaces.

  Returns:
    The validated ConfigDict.

  Raises:
    ConfigError: missing file, unknown field, unparsable or disallowed value.
  """
  if not os.path.isfile(path):
    raise ConfigError(f"{path}: config file not found")
  if path.endswith(".py"):
    config = _load_py(path)
  elif path.endswith((".yaml", ".yml")):
    config = _load_yaml(path)
  else:
    raise ConfigError(f"{path}: unknown config file type; allowed: .py, .yaml, .yml")
  for override in overrides:
    _apply_override(config, override)
  validate(config)
  overridden = {override.split("=", 1)[0].strip() for override in overrides}
  return validate(resolve_init_from(config, overridden))


def resolve_init_from(config: ml_collections.ConfigDict,
                      overridden=()) -> ml_collections.ConfigDict:
  """`config` itself, or with `training.progressive.init_from` set a copy whose model sizes and
  tokenizer are the pretrained directory's (`hf.llama.resolve_init_from`; `overridden`: field
  paths the user set, which must agree). Idempotent."""
  if not config.training.progressive.init_from:
    return config
  from stackwise_jax.hf.llama import resolve_init_from as resolve
  return resolve(config, overridden)


def with_fields(config: ml_collections.ConfigDict | None = None,
                **fields) -> ml_collections.ConfigDict:
  """A validated copy of `config` (default: `default_config()`) with fields set by their own
  names, the original StackWise's keyword style: `with_fields(d_model=256, n_heads=8)` sets
  model.d_model and model.n_heads. Each name must be the last part of exactly one field's path."""
  config = (default_config() if config is None else config).copy_and_resolve_references()
  by_name = {}
  for path in _field_paths(config):
    by_name.setdefault(path.rsplit(".", 1)[-1], []).append(path)
  nested = {}
  for name, value in fields.items():
    paths = by_name.get(name, [])
    if len(paths) != 1:
      raise ConfigError(f"{name}={value!r}: " + (
          f"names several fields ({', '.join(paths)}); set it on the config" if paths else
          "not a config field; allowed: the last part of a field's path, e.g. d_model, "
          "n_heads, vocab_size, max_stacks, seq_len"))
    *groups, leaf = paths[0].split(".")
    node = nested
    for group in groups:
      node = node.setdefault(group, {})
    node[leaf] = value
  yaml_io.apply_mapping(config, nested, "")
  return validate(config)


def _field_paths(node: ml_collections.ConfigDict, prefix: str = ""):
  """Dotted paths of every field (a mapping field such as qlora_configs counts as one)."""
  for key, value in node.items():
    path = yaml_io.join_path(prefix, key)
    if isinstance(value, ml_collections.ConfigDict) and path not in yaml_io.MAPPINGS:
      yield from _field_paths(value, path)
    else:
      yield path


def to_yaml(config: ml_collections.ConfigDict) -> str:
  """Returns `config` as YAML nested like design §2; `load_config` reads it back unchanged.
  ConfigError for a field holding a callable (`check_saveable`)."""
  check_saveable(config)

  def plain(x):
    # safe_dump has no tag for tuples; lists load back as tuples through the default's type.
    if isinstance(x, dict):
      return {k: plain(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
      return [plain(v) for v in x]
    return x

  return yaml.safe_dump(plain(config.to_dict()), sort_keys=False, default_flow_style=False)


def check_saveable(config: ml_collections.ConfigDict) -> None:
  """ConfigError if a field holds a callable: a config or checkpoint cannot store one."""
  for path in _CALLABLES:
    value = functools.reduce(getattr, path.split("."), config)
    if callable(value):
      raise ConfigError(f"{path}={value!r}: a callable cannot be saved in a config or checkpoint; "
                        "allowed when saving: a name registered with "
                        "@stackwise_jax.progressive.masking.register_time_mapping(name)")


def _load_py(path: str) -> ml_collections.ConfigDict:
  # A fresh, unregistered module per load: two configs named config.py must not shadow each other.
  name = "_stackwise_config_" + os.path.splitext(os.path.basename(path))[0]
  spec = importlib.util.spec_from_file_location(name, path)
  module = importlib.util.module_from_spec(spec)
  try:
    spec.loader.exec_module(module)
  except Exception as e:   # the user's code: a syntax error, or its module body raised
    raise _error_in_file(path, e) from e
  get_config = getattr(module, "get_config", None)
  if not callable(get_config):
    raise ConfigError(f"{path}: a .py config must define get_config() returning a ConfigDict")
  try:
    config = get_config()
  except Exception as e:
    raise _error_in_file(path, e) from e
  if not isinstance(config, ml_collections.ConfigDict):
    raise ConfigError(
        f"{path}: get_config() returned {type(config).__name__}; allowed: a ConfigDict")
  return config


def _error_in_file(path: str, error: Exception) -> Exception:
  """`error`, raised while running config file `path`, as a one-line ConfigError
  `path:LINE: Type: message`; LINE is where the file failed (a SyntaxError's own line, else the
  deepest traceback frame in the file). An error with no frame in the file did not come from the
  user's code (e.g. the file is unreadable): it is returned as it is."""
  here = os.path.abspath(path)
  if isinstance(error, SyntaxError) and error.filename and os.path.abspath(error.filename) == here:
    line, message = error.lineno, error.msg
  else:
    frames = [f for f in traceback.extract_tb(error.__traceback__)
              if os.path.abspath(f.filename) == here]
    if not frames:
      return error
    line, message = frames[-1].lineno, str(error)
  text = " ".join(f"{type(error).__name__}: {message}".split())   # one line
  return ConfigError(f"{path}:{line}: {text}" if line else f"{path}: {text}")


def _load_yaml(path: str) -> ml_collections.ConfigDict:
  try:
    with open(path, encoding="utf-8") as f:
      text = f.read()
  except UnicodeDecodeError as e:
    raise ConfigError(f"{path}: not a UTF-8 text file ({e.reason} at byte {e.start})") from None
  return from_yaml(text, path)


def from_yaml(text: str, source: str = "<yaml>") -> ml_collections.ConfigDict:
  """Parses YAML nested like design §2 (`to_yaml`'s output), or in the original StackWise's
  schema (stackwise_jax/upstream.py), onto `default_config()`; not validated. `source` names the
  text in errors and in the warnings it prints on stderr: an empty file, and a duplicate key in
  the original's format (kept last, as the original's PyYAML does; ours refuses one)."""
  try:
    data, duplicates = yaml_io.read_yaml(text)
  except yaml.YAMLError as e:
    raise yaml_io.yaml_error(source, text, e) from None
  config = default_config()
  if data is None or data == {}:
    print(f"stackwise-jax: warning: {source}: empty config: every field keeps its default "
          "(stackwise_jax.config.default_config())", file=sys.stderr)
    data = {}
  original = upstream.is_original(data, config)
  if duplicates and not original:
    key, first, second = duplicates[0]
    raise ConfigError(f"{source}:{second}: {yaml_io.duplicate_message(key, first, second)}")
  if duplicates:   # the original's own config.yaml has `progressive:` twice under training
    kept = "; ".join(f"{key!r} at lines {first} and {second}" for key, first, second in duplicates)
    print(f"stackwise-jax: warning: {source}: duplicate key {kept}: the last one is used, as the "
          "original StackWise (PyYAML) uses it", file=sys.stderr)
  if original:
    upstream.apply(data, config, source)
  else:
    yaml_io.apply_mapping(config, data, prefix="")
  return config


# Fields that may hold a callable instead of their default's type (Python API only).
_CALLABLES = ("training.progressive.custom_time_mapping",)


def _apply_override(config: ml_collections.ConfigDict, override: str) -> None:
  path, sep, text = override.partition("=")
  path = path.strip()
  if not sep or not path:
    raise ConfigError(f"{override!r}: an override must look like path.to.field=value")
  node, prefix = config, ""
  keys = path.split(".")
  for key in keys[:-1]:
    yaml_io.check_known(node, key, yaml_io.join_path(prefix, key), prefix)
    node, prefix = node[key], yaml_io.join_path(prefix, key)
    if not isinstance(node, ml_collections.ConfigDict):
      raise ConfigError(f"{path}={text!r}: {prefix} is a field, not a group of fields")
  key = keys[-1]
  yaml_io.check_known(node, key, path, prefix)
  current = node[key]
  if path in yaml_io.MAPPINGS:
    try:
      node[key] = yaml_io.as_mapping(path, yaml_io.yaml_value(text) if text.strip() else {})
    except yaml.YAMLError as e:
      raise ConfigError(f"{path}={text!r}: expected a mapping, e.g. "
                        f"'{{0: {{rank: 8, alpha: 16}}}}' ({e})") from None
    return
  if isinstance(current, ml_collections.ConfigDict):
    raise ConfigError(f"{path}={text!r}: {path} is a group of fields; override its fields one "
                      f"by one: {', '.join(yaml_io.join_path(path, k) for k in current.keys())}")
  node[key] = yaml_io.coerce(path, _parse_text(path, text, current), current)


def _parse_text(path: str, text: str, default: Any) -> Any:
  """Parses a command-line value as `default`'s type with absl's parsers, as config_flags does."""
  try:
    if isinstance(default, bool):
      return flags.BooleanParser().parse(text)
    if isinstance(default, int):
      return flags.IntegerParser().parse(text)
    if isinstance(default, float):
      return flags.FloatParser().parse(text)
    if isinstance(default, str):
      return text
    if isinstance(default, tuple):
      return _parse_tuple(text)
    return yaml_io.yaml_value(text)   # A field whose default is None: any YAML literal.
  except (ValueError, yaml.YAMLError) as e:
    raise ConfigError(f"{path}={text!r}: expected {yaml_io.type_name(default)} ({e})") from None


def _parse_tuple(text: str) -> tuple[Any, ...]:
  """`"('a.txt', 'b/*.txt')"`, `"[a.txt, b/*.txt]"`, `"a.txt"` or `""` -> a tuple."""
  stripped = text.strip()
  if not stripped:
    return ()
  if stripped.startswith("["):
    try:
      return tuple(ast.literal_eval(stripped))
    except (ValueError, SyntaxError):
      # Unquoted YAML flow list, e.g. [a.txt, b/*.txt]; literal_eval rejects it.
      value = yaml_io.yaml_value(stripped)
      if isinstance(value, list):
        return tuple(value)
      raise ValueError("not a list") from None
  return tuple_parser.TupleParser().parse(stripped)


# --- Validation: one flat table of checks. ---

# How records are packed from documents (data/packing.py).
PACKINGS = ("concat", "documents")
MIXTURE_KEYS = ("source", "paths", "weight", "text_field")

# Building modes: progressive/builder.py grows the rack by them (it imports config, hence here).
BUILDING_MODES = ("append", "prepend")

# The allowed names of each choice field.
_CHOICES = {
    "model.attention": ("mha", "gqa"),
    "training.nonfinite": ("stop", "skip"),
    "training.data_reuse": ("fresh", "pool"),
    "training.progressive.building_mode": BUILDING_MODES,
    "training.progressive.trunk_strategy": ("frozen", "qlora", "train"),
    "training.progressive.new_stack_precision": tuple(COMPUTE_DTYPES),
    "training.progressive.qlora_strategy": ("simplified", "progressive", "variable"),
    "training.progressive.qlora_rank_pattern": RANK_PATTERNS,
    "training.progressive.qlora_alpha_pattern": RANK_PATTERNS,
    "training.progressive.embedding_training": ("auto", "trainable", "frozen"),
    "training.progressive.new_stack_init": tuple(NEW_STACK_INITS),
    "training.progressive.training_objective": tuple(OBJECTIVES),
    "training.progressive.time_interpretation": ("input", "depth"),
    "training.progressive.time_encoding_type": ("sinusoidal", "learned"),
    "training.progressive.stack_time_mapping": ("linear", "exponential", "custom"),
    "data.source": tuple(SOURCES),
    "data.packing": PACKINGS,
    "logging.wandb_mode": ("online", "offline", "disabled"),
}

_POSITIVE = (
    "model.vocab_size", "model.d_model", "model.n_heads", "model.n_kv_heads", "model.d_ff",
    "model.max_seq_len", "model.n_blocks_per_stack",
    "training.batch_size", "training.seq_len", "training.eval_batches", "training.log_every",
    "training.progressive.max_stacks", "training.progressive.target_stacks",
    "training.progressive.num_time_steps", "training.progressive.time_embedding_dim",
    "training.progressive.qlora_rank", "training.progressive.progressive_qlora_rank",
    "training.progressive.quant_block_size", "training.keep_checkpoints",
    "training.max_skipped_steps", "training.epochs_per_stack", "training.final_stage_steps",
)

_NON_NEGATIVE = (
    "training.warmup_steps", "training.eval_every", "training.checkpoint_every", "training.seed",
    "training.progressive.time_per_stack", "training.progressive.cache_max_bytes",
    "data.shuffle_seed", "data.num_workers",
)

# Rows of (field path, ok(value, config), what is allowed). The text is formatted with `c=config`.
# Rows run in order and the first failure is raised, so a row may rely on earlier ones (n_heads > 0
# is checked before d_model % n_heads). Types were checked before any row runs.
_CHECKS = [
    *[(p, lambda v, c, a=a: v in a, "one of " + ", ".join(map(repr, a)))
      for p, a in _CHOICES.items()],
    *[(p, lambda v, c: v > 0, "a positive int") for p in _POSITIVE],
    *[(p, lambda v, c: v >= 0, "an int >= 0") for p in _NON_NEGATIVE],
    ("training.steps_per_stack", lambda v, c: v > 0,
     "a positive number of steps per stage (zero or negative steps train nothing)"),
    ("model.d_model", lambda v, c: v % c.model.n_heads == 0,
     "a multiple of model.n_heads ({c.model.n_heads})"),
    ("model.d_model", lambda v, c: (v // c.model.n_heads) % 2 == 0,
     "a multiple of 2 * model.n_heads ({c.model.n_heads}): RoPE needs an even head dim"),
    ("model.n_kv_heads", lambda v, c: c.model.attention != "mha" or v == c.model.n_heads,
     "equal to model.n_heads ({c.model.n_heads}) when model.attention='mha' (use 'gqa' for fewer)"),
    ("model.n_kv_heads", lambda v, c: c.model.n_heads % v == 0,
     "a divisor of model.n_heads ({c.model.n_heads})"),
    ("training.progressive.target_stacks", lambda v, c: v <= c.training.progressive.max_stacks,
     "at most training.progressive.max_stacks ({c.training.progressive.max_stacks})"),
    ("training.progressive.stacks_per_stage",
     lambda v, c: len(v) > 0 and all(yaml_io.type_ok(n, 1) and n > 0 for n in v),
     "a positive int, or a non-empty list of positive ints, e.g. [1, 3] (stage k adds entry k, "
     "the last entry every later stage)"),
    ("training.progressive.stacks_per_stage",
     lambda v, c: sum(v) <= c.training.progressive.max_stacks,
     "entries summing to at most training.progressive.max_stacks "
     "({c.training.progressive.max_stacks}): the rack holds no more stacks"),
    # = no more entries than len(stage_sizes(c)): the stages that grow an empty rack.
    ("training.progressive.stacks_per_stage",
     lambda v, c: sum(v[:-1]) < c.training.progressive.target_stacks,
     "no more entries than the stages that grow the rack to training.progressive.target_stacks "
     "({c.training.progressive.target_stacks}): the entries before the last must sum to less "
     "than target_stacks, or the last is never used"),
    ("training.seq_len", lambda v, c: v <= c.model.max_seq_len,
     "at most model.max_seq_len ({c.model.max_seq_len})"),
    ("training.seq_len",
     lambda v, c: v >= 2 or not OBJECTIVES[c.training.progressive.training_objective].causal,
     "at least 2 when training.progressive.training_objective="
     "{c.training.progressive.training_objective!r} (causal): the last position has no target, so "
     "a 1-token sequence has nothing to learn"),
    ("training.epochs_per_stack", lambda v, c: v == 1 or c.training.data_reuse == "pool",
     "1 when training.data_reuse='fresh' (fresh batches are never repeated); use 'pool' to "
     "train several epochs over one pool"),
    ("training.lr", lambda v, c: 0 < v < math.inf, "a finite float > 0"),
    ("training.final_stage_lr", lambda v, c: 0 < v < math.inf, "a finite float > 0"),
    ("training.weight_decay", lambda v, c: 0 <= v < math.inf, "a finite float >= 0"),
    ("training.grad_clip", lambda v, c: 0 <= v < math.inf, "a finite float >= 0 (0 = no clipping)"),
    ("model.dropout", lambda v, c: 0 <= v < 1, "a float in [0, 1)"),
    ("model.rope_theta", lambda v, c: 0 < v < math.inf, "a finite float > 0"),
    ("model.norm_eps", lambda v, c: 0 < v < math.inf, "a finite float > 0"),
    ("training.progressive.mlm_min_ratio", lambda v, c: 0 <= v <= 1, "a float in [0, 1]"),
    ("data.val_fraction", lambda v, c: 0 < v < 1, "a float in (0, 1)"),
    ("data.mixture", lambda v, c: all(_mixture_entry_ok(e) for e in v),
     "a list of {{source: one of " + ", ".join(map(repr, SOURCES)) + ", paths: a list of files "
     "or globs, weight: a finite float >= 0, text_field (optional): a string}}"),
    ("data.mixture", lambda v, c: not v or sum(e["weight"] for e in v) > 0,
     "weights that are not all zero: at least one source must be sampled"),
    ("data.mixture_by_stage", lambda v, c: not v or c.data.mixture,
     "() unless data.mixture lists the sources whose weights it gives"),
    ("data.mixture_by_stage",
     lambda v, c: all(_weights_ok(row, len(c.data.mixture)) for row in v),
     "rows of one weight per data.mixture entry, each a finite float >= 0, not all zero"),
    ("data.mixture_by_stage", lambda v, c: not v or c.training.data_reuse != "pool",
     "() when training.data_reuse='pool': every stage trains on the one pool drawn at the start "
     "(at the entries' own weights)"),
    ("training.compile_ahead", lambda v, c: v is None or isinstance(v, bool),
     "None (on for a GPU or TPU, off on a CPU), True or False"),
    ("training.progressive.cache_device_bytes",
     lambda v, c: v is None or (yaml_io.type_ok(v, 1) and v >= 0),
     "None (a quarter of a GPU's or TPU's memory, none on a CPU) or an int >= 0"),
    ("training.progressive.mask_token_id",
     lambda v, c: v is None or (yaml_io.type_ok(v, 1) and 0 <= v < c.model.vocab_size),
     "None (the tokenizer's mask id) or an int in [0, model.vocab_size) = "
     "[0, {c.model.vocab_size})"),
    ("data.tokenizer", lambda v, c: tokenizer.is_valid_name(v),
     "'bytes', 'bpe:N' (N >= 260), or the path of an existing tokenizer.json or SentencePiece "
     ".model file"),
    ("data.tokenizer", lambda v, c: not c.data.mixture or tokenizer.kind(v) != "bpe",
     "'bytes' or a tokenizer file when data.mixture lists sources (they share one tokenizer, "
     "and a 'bpe:N' is trained on one source's texts: train it in a run of one source and pass "
     "its WORKDIR/tokenizer.json)"),
    ("training.progressive.custom_time_mapping",
     lambda v, c: c.training.progressive.stack_time_mapping != "custom" or bool(v),
     "a registered time-mapping name, or a callable (stack level, max_stacks, num_time_steps) -> "
     "time step, when training.progressive.stack_time_mapping='custom'"),
    ("training.progressive.time_embedding_dim",
     lambda v, c: v % 2 == 0 or c.training.progressive.time_interpretation != "input"
     or c.training.progressive.time_encoding_type != "sinusoidal",
     "an even int when training.progressive.time_encoding_type='sinusoidal' and "
     "time_interpretation='input' (half sines, half cosines)"),
    ("training.progressive.qlora_alpha", lambda v, c: 0 < v < math.inf, "a finite float > 0"),
    ("training.progressive.progressive_qlora_alpha", lambda v, c: 0 < v < math.inf,
     "a finite float > 0"),
    ("training.progressive.qlora_configs", lambda v, c: all(_lora_entry_ok(k, e) for k, e in v.items()),
     "a mapping {{stack index (an int >= 0): {{rank: an int > 0, alpha: a float > 0}}}}"),
    ("training.progressive.qlora_configs",
     lambda v, c: (c.training.progressive.qlora_strategy != "variable" or not _uses_stack_lora(c)
                   or set(range(c.training.progressive.target_stacks)) <= set(v.keys())),
     "an entry for every stack index 0..target_stacks-1 "
     "({c.training.progressive.target_stacks} stacks) when qlora_strategy='variable'"),
    ("training.progressive.trunk_strategy",
     lambda v, c: v != "qlora" or c.training.progressive.qlora_enabled
     or c.training.progressive.progressive_qlora,
     "'frozen' unless the trunk has adapters to train: 'qlora' needs "
     "training.progressive.qlora_enabled or training.progressive.progressive_qlora"),
    ("training.progressive.trunk_strategy",
     lambda v, c: v != "train" or c.training.progressive.new_stack_precision != "qlora",
     "'frozen' or 'qlora' when training.progressive.new_stack_precision='qlora': its stacks' "
     "kernels are int4 and cannot train, so a trunk of them cannot train ('train')"),
    ("training.progressive.trunk_lr_scale", lambda v, c: 0 < v < math.inf, "a finite float > 0"),
    ("training.progressive.qlora_enabled",
     lambda v, c: not v or not any(f.quantize for f in _stored_formats(c)),
     "False when training.progressive.new_stack_precision="
     "{c.training.progressive.new_stack_precision!r}: qwix's stack LoRA intercepts the kernel "
     "such a stack quantizes itself (progressive_qlora adapters do work)"),
    # A stored format's blocks run along the kernels' input axes (quant.FORMATS).
    *[(f"training.progressive.{f.block}" if isinstance(f.block, str) else "model.d_ff",
       lambda v, c, f=f: f not in _stored_formats(c) or f.block_error(c, f.precision) is None,
       f"a divisor of model.d_model ({{c.model.d_model}}) and model.d_ff ({{c.model.d_ff}}): "
       f"{f.name} blocks run along the kernels' input axis" if isinstance(f.block, str) else
       f"a multiple of {f.block}, as model.d_model ({{c.model.d_model}}), when "
       f"training.progressive.new_stack_precision={f.precision!r} (the {f.name} block)")
      for f in FORMATS.values()],
    ("training.progressive.new_stack_init", lambda v, c: _copied_stacks_are_float(c),
     " or ".join(map(repr, NOT_COPYING))
     + " with new_stack_precision={c.training.progressive.new_stack_precision!r}"
     " and trunk_strategy={c.training.progressive.trunk_strategy!r}: a copy needs a float source, "
     "and these store the stacks it would copy quantized (copy_last copies the stack trained "
     "last, before it becomes trunk; stack also copies older trunk stacks)"),
    ("data.paths", lambda v, c: all(isinstance(p, str) and p for p in v),
     "a list of non-empty file paths or globs"),
    *[(p, lambda v, c: v == -1 or v > 0, "a positive int, or -1 for the remaining devices")
      for p in ("mesh.data", "mesh.fsdp")],
    ("data.paths", lambda v, c: SOURCES[c.data.source].paths == "any" or len(v) > 0,
     "at least one path when data.source={c.data.source!r}"),
    ("data.paths", lambda v, c: SOURCES[c.data.source].paths != "directory" or len(v) == 1,
     "exactly one directory when data.source={c.data.source!r}"),
    ("data.text_field", lambda v, c: bool(v), "a non-empty field name"),
]


def _mixture_entry_ok(entry) -> bool:
  if not isinstance(entry, (dict, ml_collections.ConfigDict)):
    return False
  entry = dict(entry)
  return (set(entry) <= set(MIXTURE_KEYS) and {"source", "weight"} <= set(entry)
          and entry["source"] in SOURCES
          and isinstance(entry.get("paths", ()), (list, tuple))
          and all(isinstance(p, str) for p in entry.get("paths", ()))
          and isinstance(entry.get("text_field", ""), str)
          and _weights_ok([entry["weight"]], 1, allow_zero=True))


def _weights_ok(row, n: int, allow_zero: bool = False) -> bool:
  return (isinstance(row, (list, tuple)) and len(row) == n
          and all(isinstance(w, (int, float)) and not isinstance(w, bool) and 0 <= w < math.inf
                  for w in row)
          and (allow_zero or sum(row) > 0))


def _lora_entry_ok(key: Any, entry: Any) -> bool:
  return (isinstance(key, int) and not isinstance(key, bool) and key >= 0
          and isinstance(entry, (dict, ml_collections.ConfigDict))
          and set(entry.keys()) == {"rank", "alpha"}
          and yaml_io.type_ok(entry["rank"], 1) and entry["rank"] > 0
          and yaml_io.type_ok(entry["alpha"], 1.0) and 0 < entry["alpha"] < math.inf)


def _uses_stack_lora(c) -> bool:
  p = c.training.progressive
  return p.qlora_enabled or p.new_stack_precision == "qlora"


def _copied_stacks_are_float(c) -> bool:
  """Whether the stacks new_stack_init copies are float when copied: a "qlora" stack is int4 from
  its creation; a trunk stack is int4 (qlora trunk) or packed (nvfp4) once it is trunk."""
  p = c.training.progressive
  init = NEW_STACK_INITS[p.new_stack_init]
  if init.source is None:
    return True
  if p.new_stack_precision == "qlora":
    return False
  return not init.copies_trunk or (p.trunk_strategy != "qlora" and p.new_stack_precision != "nvfp4")


def _stored_formats(c) -> list:
  """The formats the config's stacks store kernels in: their precision's, and int4 for a float
  trunk under trunk_strategy='qlora' (a qlora trunk of nvfp4 stacks keeps its kernels in NVFP4)."""
  p = c.training.progressive
  own = BY_PRECISION.get(p.new_stack_precision)
  trunk = QLORA_TRUNK if p.trunk_strategy == "qlora" and not (own and own.quantize) else None
  return [f for f in (own, trunk) if f is not None]


def stage_steps(config, final: bool = False) -> int:
  """Train steps of one stage: steps_per_stack, times epochs_per_stack over a pool; the final
  stage's (`final`): final_stage_steps."""
  if final:
    return config.training.final_stage_steps
  return config.training.steps_per_stack * config.training.epochs_per_stack


def stage_sizes(config, built: int = 0, target: int | None = None) -> list[int]:
  """How many stacks each stage that grows the rack adds (`training.progressive.stacks_per_stage`),
  from a rack of `built` stacks (an imported trunk's) to `target` (default target_stacks): stage k
  adds entry k, the last entry every later stage, and the last stage only what is left to reach
  `target`. [] when the rack has `target` stacks already."""
  entries = config.training.progressive.stacks_per_stage
  target = config.training.progressive.target_stacks if target is None else target
  sizes = []
  while built < target:
    sizes.append(min(entries[min(len(sizes), len(entries) - 1)], target - built))
    built += sizes[-1]
  return sizes


def validate(config: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
  """Checks every field of `config`; returns it unchanged.

  Raises:
    ConfigError: `"{field path}={value!r}: {what is allowed}"` for the first bad field: an unknown
      or missing field, a wrong type, or a value outside its allowed set or range.
  """
  _check_schema(config, default_config(), prefix="")
  for path, ok, allowed in _CHECKS:
    value = functools.reduce(getattr, path.split("."), config)
    if not ok(value, config):
      shown = value.to_dict() if isinstance(value, ml_collections.ConfigDict) else value
      raise ConfigError(f"{path}={shown!r}: allowed: {allowed.format(c=config)}")
  return config


def _check_schema(node: Any, schema: ml_collections.ConfigDict, prefix: str) -> None:
  """Same fields as `default_config()`, each of its default's type (catches .py config typos)."""
  if not isinstance(node, ml_collections.ConfigDict):
    raise ConfigError(f"{prefix}={node!r}: expected a group of fields: {', '.join(schema.keys())}")
  for key in node.keys():
    yaml_io.check_known(schema, key, yaml_io.join_path(prefix, key), prefix)
  for key in schema.keys():
    path = yaml_io.join_path(prefix, key)
    if key not in node:
      raise ConfigError(f"{path}: missing; every field of default_config() is required")
    if path in yaml_io.MAPPINGS:
      if not isinstance(node[key], (dict, ml_collections.ConfigDict)):
        raise ConfigError(f"{path}={node[key]!r}: expected a mapping")
    elif isinstance(schema[key], ml_collections.ConfigDict):
      _check_schema(node[key], schema[key], path)
    elif path in _CALLABLES and callable(node[key]):
      continue
    elif not yaml_io.type_ok(node[key], schema[key]):
      raise ConfigError(f"{path}={node[key]!r}: expected {yaml_io.type_name(schema[key])}")
