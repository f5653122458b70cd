"""The original StackWise's YAML files (PyTorch, MIT; schema: its src/config/base.py) as our config.

`ORIGINAL` has a row for every key of the original's schema, by dotted path. A row is our field's
path (the value is copied), `IGNORED` (accepted and named in the one warning line `apply` prints),
or a rule, a function of (key, value, conversion), for a key that sets several fields, depends on
another key, or has values we do not implement (those raise ConfigError: exit 2 from the CLI).
Values we run differently but close enough to train, such as a mask schedule that tops out below
1.0, are named in the same warning line. A key with no row is an unknown field, as in our schema.
README.md's "Coming from the original StackWise" is this table in words, with the reasons.

When two of the original's keys set one of our fields, the training block's key wins over its
fallback in the model/data block (`_fallback` rows); two that both win must agree.
"""
from collections.abc import Callable
import functools
import sys
from typing import Any

from ml_collections import ConfigDict

from stackwise_jax.data.tokenizer import PAD_ID
from stackwise_jax.errors import ConfigError
from stackwise_jax.objectives import OBJECTIVES
from stackwise_jax.yaml_io import apply_mapping, coerce

IGNORED = None


class _Conversion:
  """One file's conversion: the file's leaves in, our fields and the notes for the warning out."""

  def __init__(self, leaves: dict[str, Any], ours: ConfigDict):
    self.leaves = leaves            # the original's key path -> value, as in the file
    self.fields = {}                # our field path -> (value, the original's key that set it)
    self.fallbacks = {}             # the same, for fields no winning key sets
    self.ignored = []               # the original's keys with no equivalent here
    self.not_reproduced = []        # "key=value (what we do instead)"
    self.ours = ours                # our defaults (config.default_config())

  def get(self, key: str) -> Any:
    """The file's value of the original's `key`, else the original's default."""
    return self.leaves.get(key, _ORIGINAL_DEFAULTS.get(key))

  def set(self, path: str, value: Any, key: str, fallback: bool = False) -> None:
    """Our field `path` takes `value` (typed as our default) from the original's `key`."""
    default = functools.reduce(getattr, path.split("."), self.ours)
    if not isinstance(default, ConfigDict):   # qlora_configs, a free mapping, has no type
      value = coerce(key, value, default)
    target = self.fallbacks if fallback else self.fields
    if path in target and target[path][0] != value:
      other_value, other_key = target[path]
      raise ConfigError(f"{key}={value!r} and {other_key}={other_value!r}: both set our {path}; "
                        "allowed: agreeing values, or only one of the two keys")
    target[path] = (value, key)

  def value(self, path: str) -> Any:
    """Our field's value as the file sets it, else our default."""
    for target in (self.fields, self.fallbacks):
      if path in target:
        return target[path][0]
    return functools.reduce(getattr, path.split("."), self.ours)


Rule = Callable[[str, Any, _Conversion], None]


def _fallback(path: str) -> Rule:
  """Sets our `path` unless a winning key sets it."""
  def rule(key, value, conv):
    conv.set(path, value, key, fallback=True)
  return rule


def _one_of(*allowed: Any, why: str = "") -> Rule:
  """Accepts `allowed` values (what we do anyway); any other value is not implemented here."""
  def rule(key, value, conv):
    if value not in allowed:
      raise ConfigError(f"{key}={value!r}: not implemented here{why}; allowed: "
                        f"{', '.join(map(repr, allowed))}")
  return rule


def _approximated(ours: Any, instead: str) -> Rule:
  """A value other than `ours` is named in the warning: we train with `instead`."""
  def rule(key, value, conv):
    if value != ours:
      conv.not_reproduced.append(f"{key}={value!r} ({instead})")
  return rule


def _unless_null(path: str) -> Rule:
  """null: the original takes the value from its tokenizer; ours keeps our default."""
  def rule(key, value, conv):
    if value is not None:
      conv.set(path, value, key)
  return rule


def _custom_attention(rule: Rule) -> Rule:
  """The original reads attention_custom only when attention_preset is 'custom'."""
  def used_if_custom(key, value, conv):
    if conv.get("model.attention_preset") == "custom":
      rule(key, value, conv)
    else:
      conv.ignored.append(key)
  return used_if_custom


def _mask_id(fallback: bool) -> Rule:
  def rule(key, value, conv):
    if value is None:   # the original takes it from its tokenizer
      return
    if isinstance(value, int) and 0 <= value < PAD_ID:   # its tokenizer's id, a byte in ours
      conv.not_reproduced.append(f"{key}={value!r} (a byte under data.tokenizer='bytes'; the mask "
                                 "id stays the tokenizer's)")
    else:
      conv.set("training.progressive.mask_token_id", value, key, fallback)
  return rule


_TOP_MASK_RATIO = "our mask ratio rises linearly to 1.0 at the last time step"


def _mask_fractions(key, value, conv):
  """A linear table is our schedule from its first value; any other table we cannot run."""
  if not (isinstance(value, list) and value
          and all(isinstance(f, (int, float)) and not isinstance(f, bool) for f in value)):
    raise ConfigError(f"{key}={value!r}: allowed: a non-empty list of mask fractions")
  n = len(value)
  linear = [value[0] + (value[-1] - value[0]) * t / max(n - 1, 1) for t in range(n)]
  if any(abs(f - g) > 1e-6 for f, g in zip(value, linear)):
    raise ConfigError(f"{key}={value!r}: not implemented here: the mask ratio at time step t of N "
                      "rises linearly, min + (1 - min) * t / (N - 1); allowed: an evenly spaced "
                      "list (or set min_mask_fraction and num_time_steps instead)")
  conv.set("training.progressive.mlm_min_ratio", value[0], f"{key}[0]")
  conv.set("training.progressive.num_time_steps", n, f"len({key})")
  if n > 1 and value[-1] != 1.0:
    conv.not_reproduced.append(f"{key} ending at {value[-1]!r} ({_TOP_MASK_RATIO})")


def _optimizer_type(key, value, conv):
  if str(value).lower() != "adamw":   # the original compares lower-cased names
    raise ConfigError(f"{key}={value!r}: not implemented here (our optimizer is optax.adamw); "
                      "allowed: 'AdamW'")


def _qlora_configs(key, value, conv):
  """{stack: {rank, alpha, dropout, lr}}: rank and alpha as our qlora_configs (missing ones from
  the global rank and alpha, as the original fills them); dropout and lr are ignored."""
  if not isinstance(value, dict):
    raise ConfigError(f"{key}={value!r}: allowed: a mapping {{stack index: {{rank, alpha}}}}")
  configs = {}
  for index, entry in value.items():
    entry = entry if isinstance(entry, dict) else {}
    unknown = set(entry) - {"rank", "alpha", "dropout", "lr"}
    if unknown or not entry:
      raise ConfigError(f"{key}.{index}={entry!r}: allowed: a mapping of rank, alpha, dropout, "
                        "lr")
    conv.ignored.extend(f"{key}.{index}.{k}" for k in ("dropout", "lr") if k in entry)
    configs[index] = {"rank": entry.get("rank", conv.value("training.progressive.qlora_rank")),
                      "alpha": entry.get("alpha", conv.value("training.progressive.qlora_alpha"))}
  conv.set("training.progressive.qlora_configs", configs, key)


def _strategy(key, value, conv):
  _one_of("progressive", "end_to_end")(key, value, conv)
  if value == "end_to_end":   # one stage training the whole rack
    conv.set("training.progressive.enabled", False, key)


def _end_to_end_scope(key, value, conv):
  if conv.get("training.strategy") != "end_to_end":   # the original reads it only then
    conv.ignored.append(key)
  elif value != "rackwise":
    raise ConfigError(f"{key}={value!r}: not implemented here (stack by stack on placeholder "
                      "activations in the original); allowed: 'rackwise' (the whole rack in one "
                      "stage), or training.strategy='progressive'")


def _use_dummy_data(key, value, conv):
  if value:
    conv.not_reproduced.append(f"{key}=True (the original's random tokens; ours: data.source, "
                               "the built-in corpus by default)")
  elif conv.get("data.dataset_path") is None:
    raise ConfigError(f"{key}=False and data.dataset_path=None: allowed: a dataset_path when "
                      "use_dummy_data is false")


def _dataset_path(key, value, conv):
  if conv.get("data.use_dummy_data") or value is None:   # the original reads it only then
    conv.ignored.append(key)
  else:
    conv.set("data.source", "text", key)
    conv.set("data.paths", [value], key)


_ATTENTION_PRESETS = {"bert_style": "bidirectional", "efficient_gqa": "bidirectional",
                      "gpt_style": "causal", "custom": None}   # None: attention_custom decides

_P = "training.progressive."

# Every key of the original's schema, in its order: our field, IGNORED, or a rule.
ORIGINAL: dict[str, str | Rule | None] = {
    "model.vocab_size": _unless_null("model.vocab_size"),
    "model.d_model": "model.d_model",
    "model.n_heads": "model.n_heads",
    "model.n_kv_heads": "model.n_kv_heads",     # fewer than n_heads: model.attention='gqa'
    "model.d_ff": "model.d_ff",
    "model.architecture.n_stacks": _fallback(_P + "target_stacks"),
    "model.architecture.blocks_per_stack": "model.n_blocks_per_stack",
    # Checked against the objective, whose attention is causal for clm only (see _derive).
    "model.attention_preset": _one_of(*_ATTENTION_PRESETS),
    "model.attention_custom.attention_type": _custom_attention(_one_of("mha")),
    "model.attention_custom.attention_mode": _custom_attention(_one_of("bidirectional", "causal")),
    "model.attention_custom.mla_rq": IGNORED,    # these three only shape mla / kernel attention,
    "model.attention_custom.mla_rkv": IGNORED,   # which attention_type / kernel_type refuse
    "model.attention_custom.kernel_dim": IGNORED,
    "model.attention_custom.kernel_type": _custom_attention(_one_of(
        "linear", why=" ('linear' is plain scaled dot-product attention)")),
    "model.dropout": "model.dropout",
    "model.tie_embeddings": "model.tie_embeddings",
    "model.freeze_up_proj": _approximated(False, "our SwiGLU up-projection trains"),
    "model.use_rope": _one_of(True, why=" (positions are always RoPE)"),
    "model.rope_theta": "model.rope_theta",
    "model.mask_fraction_min": _fallback(_P + "mlm_min_ratio"),
    "model.mask_fraction_max": _approximated(1.0, _TOP_MASK_RATIO),
    "model.special_mask_id": _mask_id(fallback=True),
    "model.tokenizer_embedding.family": IGNORED,             # we tokenize bytes (data.tokenizer)
    "model.tokenizer_embedding.embedding_option": IGNORED,
    "model.tokenizer_embedding.freeze_embeddings": IGNORED,   # no pretrained embedding to keep
    "model.tokenizer_embedding.adapter_hidden_dim": IGNORED,

    "training.batch_size": "training.batch_size",
    "training.seq_len": "training.seq_len",
    "training.max_steps": "training.steps_per_stack",
    "training.optimizer.optimizer_type": _optimizer_type,
    "training.optimizer.lr": "training.lr",
    "training.optimizer.weight_decay": "training.weight_decay",
    "training.optimizer.betas": _approximated([0.9, 0.999], "ours: optax.adamw's 0.9, 0.999"),
    "training.optimizer.eps": _approximated(1e-8, "ours: optax.adamw's 1e-8"),
    "training.optimizer.momentum": IGNORED,     # SGD only
    "training.optimizer.dampening": IGNORED,
    "training.optimizer.nesterov": IGNORED,
    "training.optimizer.custom_params": _one_of({}, why=" (extra torch optimizer arguments)"),
    "training.optimizer.use_groups": _one_of(False, why=" (one AdamW setting for every param)"),
    "training.optimizer.groups": IGNORED,       # read only with use_groups
    "training.device": IGNORED,
    "training.gradient_checkpointing": IGNORED,
    "training.cache_dir": IGNORED,              # our activation cache spills to WORKDIR/cache
    "training.cache_mode": IGNORED,
    "training.save_stacks": IGNORED,            # our checkpoints hold the whole run
    "training.save_rack": IGNORED,
    "training.min_mask_fraction": _P + "mlm_min_ratio",
    "training.max_mask_fraction": _approximated(1.0, _TOP_MASK_RATIO),
    "training.mask_schedule_type": _one_of("linear"),
    "training.mask_token_id": _mask_id(fallback=False),
    "training.epochs_per_stack": "training.epochs_per_stack",
    "training.joint_tuning_steps": IGNORED,
    "training.fine_tune_mode": IGNORED,
    "training.strategy": _strategy,
    "training.end_to_end_scope": _end_to_end_scope,
    "training.run_id": IGNORED,
    "training.qlora.enabled": _P + "qlora_enabled",
    "training.qlora.rank": _P + "qlora_rank",
    "training.qlora.alpha": _P + "qlora_alpha",
    "training.qlora.dropout": IGNORED,
    "training.qlora.lr": IGNORED,               # one learning rate: training.lr
    "training.qlora.progressive_enabled": _P + "progressive_qlora",
    "training.qlora.progressive_rank": _P + "progressive_qlora_rank",
    "training.qlora.progressive_alpha": _P + "progressive_qlora_alpha",
    "training.qlora.strategy": _P + "qlora_strategy",
    "training.qlora.rank_pattern": _P + "qlora_rank_pattern",
    "training.qlora.alpha_pattern": _P + "qlora_alpha_pattern",
    "training.qlora.configs": _qlora_configs,
    "training.qlora.mixed_precision": IGNORED,
    "training.current_block_lr": IGNORED,       # the original's trainer uses optimizer.lr
    "training.quantization_enabled": IGNORED,
    "training.quantization_type": IGNORED,
    "training.time_step_masking": IGNORED,      # both of its masking classes are our one schedule
    "training.num_time_steps": _P + "num_time_steps",
    "training.time_step_mask_fractions": _mask_fractions,
    "training.log_interval": "training.log_every",
    "training.save_interval": "training.checkpoint_every",
    "training.checkpoint_dir": "training.workdir",   # the CLI's --workdir replaces it
    "training.use_wandb": "logging.wandb",   # W&B needs the wandb extra
    **{f"training.wandb_{k}": _unless_null(f"logging.wandb_{k}")   # null: ours ("" or ())
       for k in ("project", "entity", "run_name", "tags", "notes")},
    # The progressive block uses our names; training.strategy wins over its `enabled`.
    "training.progressive.enabled": _fallback(_P + "enabled"),
    **{_P + k: _P + k for k in ("max_stacks", "target_stacks", "building_mode", "trunk_strategy",
                                "new_stack_precision", "cache_activations",
                                "time_interpretation", "training_objective")},

    "data.dataset_path": _dataset_path,
    "data.use_dummy_data": _use_dummy_data,
    "data.num_samples": IGNORED,                # the size of the original's random data set
    "data.tokenizer_path": _unless_null("data.tokenizer"),   # a tokenizer.json or .model
    "data.max_length": _fallback("training.seq_len"),
    "data.padding": IGNORED,                    # we pack documents: no padding
    "data.num_workers": "data.num_workers",
    "data.pin_memory": IGNORED,
    "data.shuffle": _approximated(True, "we always shuffle, by data.shuffle_seed"),
}

# The original's defaults for the keys other keys depend on.
_ORIGINAL_DEFAULTS = {"model.attention_preset": "bert_style", "training.strategy": "progressive",
                      "data.use_dummy_data": True}

# Groups of keys (model, model.architecture, ...): every proper prefix of a key.
_GROUPS = {key.rsplit(".", i)[0] for key in ORIGINAL for i in range(1, key.count(".") + 1)}


def is_original(data: Any, ours: ConfigDict) -> bool:
  """Whether parsed YAML `data` is in the original's schema: it has a key `ours` (our defaults,
  `config.default_config()`) does not."""
  def ours_has(path):
    try:
      functools.reduce(lambda node, k: node[k], path.split("."), ours)
      return True
    except (KeyError, TypeError):
      return False

  return any((p in ORIGINAL or p in _GROUPS) and not ours_has(p) for p in _paths(data, ""))


def _paths(data: Any, prefix: str):
  if isinstance(data, dict):
    for key, value in data.items():
      path = f"{prefix}.{key}" if prefix else str(key)
      yield path
      yield from _paths(value, path)


def apply(data: dict, config, source: str) -> None:
  """Writes the original's YAML `data` onto `config` (our defaults, `config.default_config()`),
  not validated; prints the ignored keys and the values we run differently as one line on stderr.

  Raises:
    ConfigError: an unknown key, a value we do not implement, two keys that disagree.
  """
  conv = _Conversion(_leaves(data, ""), config)
  for key, rule in ORIGINAL.items():
    if key not in conv.leaves:
      continue
    value = conv.leaves[key]
    if rule is IGNORED:
      conv.ignored.append(key)
    elif isinstance(rule, str):
      conv.set(rule, value, key)
    else:
      rule(key, value, conv)
  _derive(conv)
  nested = {}
  for path, (value, _) in {**conv.fallbacks, **conv.fields}.items():
    *groups, name = path.split(".")
    functools.reduce(lambda node, group: node.setdefault(group, {}), groups, nested)[name] = value
  apply_mapping(config, nested, prefix="")
  notes = []
  if conv.ignored:
    notes.append(f"ignored, the original's keys with no equivalent here: {', '.join(conv.ignored)}")
  if conv.not_reproduced:
    notes.append(f"run differently: {'; '.join(conv.not_reproduced)}")
  if notes:
    print(f"stackwise-jax: {source}: " + " | ".join(notes), file=sys.stderr)


def _leaves(data: Any, prefix: str) -> dict[str, Any]:
  """The file's keys by dotted path, down to the rows of ORIGINAL; unknown keys raise."""
  if not isinstance(data, dict):
    raise ConfigError(f"{prefix}={data!r}: expected a mapping of fields; allowed keys: "
                      f"{', '.join(_children(prefix))}")
  leaves = {}
  for key, value in data.items():
    path = f"{prefix}.{key}" if prefix else str(key)
    if path in ORIGINAL:
      leaves[path] = value
    elif path in _GROUPS:
      leaves.update(_leaves(value, path))
    else:
      raise ConfigError(f"{path}: unknown field; allowed in {prefix or 'the top level'}: "
                        f"{', '.join(_children(prefix))}")
  return leaves


def _children(prefix: str) -> list[str]:
  start = f"{prefix}." if prefix else ""
  return list(dict.fromkeys(k[len(start):].split(".")[0] for k in ORIGINAL if k.startswith(start)))


def _derive(conv: _Conversion) -> None:
  """The fields that follow from several of the original's keys at once."""
  # The original's trainer runs every stage over its one data set: our pool.
  conv.set("training.data_reuse", "pool", "the original's training loop")
  if _P + "training_objective" not in conv.fields:
    conv.set(_P + "training_objective", "mlm", "the original's default")
  objective = conv.value(_P + "training_objective")
  preset = conv.get("model.attention_preset")
  mode = _ATTENTION_PRESETS[preset] or conv.get("model.attention_custom.attention_mode")
  if mode and objective in OBJECTIVES and (mode == "causal") != OBJECTIVES[objective].causal:
    raise ConfigError(
        f"model.attention_preset={preset!r} ({mode} attention) with {_P}training_objective="
        f"{objective!r}: attention here is causal exactly for clm; allowed: gpt_style (or custom "
        "with attention_mode causal) with clm, the other presets with mlm or custom")
  if conv.value("model.n_kv_heads") < conv.value("model.n_heads"):
    conv.set("model.attention", "gqa", "model.n_kv_heads < model.n_heads")
  if _P + "max_stacks" not in conv.fields:   # room for target_stacks (the original's max: 12)
    conv.set(_P + "max_stacks", max(conv.value(_P + "target_stacks"),
                                    conv.ours.training.progressive.max_stacks), "target_stacks")
  # The original has no length limit (RoPE); ours must hold its longest sequence.
  lengths = [t["training.seq_len"][0] for t in (conv.fields, conv.fallbacks)
             if "training.seq_len" in t]
  if lengths:
    conv.set("model.max_seq_len", max(lengths), "the sequence lengths")
