"""ProgressiveRackBuilder (design §3): grows the rack and sets trainability labels (design §4)."""
import dataclasses

import jax
import jax.numpy as jnp

from stackwise_jax.config import default_config, resolve_init_from, validate, with_fields
from stackwise_jax.errors import ConfigError
from stackwise_jax.growth import NEW_STACK_INITS, NOT_COPYING
from stackwise_jax.model import EmbedHead, Rack, StackSpec, init_module
from stackwise_jax.model.lora import LoraSetting, is_adapter_path, stack_lora_setting
from stackwise_jax.quant import BY_PRECISION, is_stored_leaf
from stackwise_jax.trees import plain_keys
from stackwise_jax.model.rack import init_stack
from stackwise_jax.progressive.masking import TimeStepMasking

# Leaf labels for optax.multi_transform. TRUNK: a trunk stack's leaf that trains with the new
# stacks (trunk_strategy="train"), at the lr scaled by trunk_lr_scale. A leaf trains unless FROZEN.
TRAINABLE, FROZEN, TRUNK = "trainable", "frozen", "trunk"
# A stack's mode: all leaves trainable (TRAINABLE, or TRUNK: labelled so), all frozen, or only its
# adapters trainable.
ADAPTERS_ONLY = "adapters_only"
# Init streams: 0 is the embedding/head, stack i uses i + 1.
_EMBED_STREAM = 0
# Params of EmbedHead on the head side; the rest (token and time embedding) feed the first stack.
HEAD_SIDE = ("final_norm", "head")


class ProgressiveRackBuilder:
  """Holds the growing rack: stack specs in forward order, their params, and a label per stack.

  Params are plain nested dicts: `{"embed_head": {...}, "stacks": {"stack_0": {...}, ...}}`.
  Adding a stack never touches existing params; each stack's init depends only on (seed, index).
  """

  def __init__(self, config=None, building_mode: str | None = None,
               default_precision: str | None = None, **fields):
    """`building_mode` and `default_precision` (default: the config's) are checked as
    training.progressive.building_mode and new_stack_precision. `fields` set config fields by
    their own names on `config` (default: `default_config()`), as the original StackWise's
    `ProgressiveRackBuilder(vocab_size=..., d_model=..., n_heads=...)` does (`config.with_fields`)."""
    if config is None or fields:
      config = with_fields(config, **fields)
    config = resolve_init_from(config)   # a pretrained trunk's sizes and tokenizer
    # The config is the one source of truth for the time-step mapping: it takes building_mode.
    config = _with_progressive(config, building_mode=building_mode)
    _with_progressive(config, new_stack_precision=default_precision)
    self.building_mode = config.training.progressive.building_mode
    self.default_precision = default_precision or config.training.progressive.new_stack_precision
    self.config = config
    self.masking = TimeStepMasking(config)
    self.specs: list[StackSpec] = []           # forward order: embedding side first
    self.trained: set[str] = set()             # stacks that finished at least one stage
    self.init_sources: dict[str, str | None] = {}   # stack -> the stack it started as a copy of
    graphdef, params = init_module(lambda rngs: EmbedHead(config, rngs=rngs), config.training.seed,
                                   _EMBED_STREAM)
    self._graphdefs = {"embed_head": graphdef}
    self.params = {"embed_head": params, "stacks": {}}
    self._labels = {"input_side": TRAINABLE, "head_side": TRAINABLE}
    if config.training.progressive.init_from:
      self._import_pretrained(config.training.progressive.init_from)

  @classmethod
  def from_pretrained(cls, directory: str, config=None, **kwargs) -> "ProgressiveRackBuilder":
    """A builder whose first stacks are the layers of the Hugging Face Llama in `directory`
    (`model.n_blocks_per_stack` layers a stack), trained already: the trunk the next stage grows
    on. `config` (default: `default_config()`) takes the directory's model sizes and tokenizer
    (`training.progressive.init_from`); train it with `ProgressiveTrainer(builder.config)`."""
    config = (default_config() if config is None else config).copy_and_resolve_references()
    config.training.progressive.init_from = directory
    return cls(config, **kwargs)

  def _import_pretrained(self, directory: str) -> None:
    """Adds the pretrained layers as trained stacks, and takes its embedding, final norm and
    head (hf/llama.py)."""
    from stackwise_jax.hf.llama import read_weights
    embed_head, stacks = read_weights(directory, self.config)
    for key, tree in embed_head.items():
      self.params["embed_head"][key] = jax.tree.map(jnp.asarray, tree)
    for blocks in stacks:
      spec = self._new_stack(len(blocks), None, "append",
                             start={"blocks": dict(enumerate(blocks))})
      self.specs.append(spec)
      self.trained.add(spec.name)
      self.init_sources[spec.name] = directory
    self._place_time_steps()

  # --- growing ---------------------------------------------------------------------------------
  def append_stack(self, n_blocks: int | None = None, precision: str | None = None) -> StackSpec:
    """Adds a stack after the existing ones (nearest the head)."""
    return self._add("append", n_blocks, precision)

  def prepend_stack(self, n_blocks: int | None = None, precision: str | None = None) -> StackSpec:
    """Adds a stack before the existing ones (nearest the embedding)."""
    return self._add("prepend", n_blocks, precision)

  def add_stack(self, n_blocks: int | None = None, precision: str | None = None) -> StackSpec:
    """Adds a stack where this builder's building mode puts it."""
    return self._add(self.building_mode, n_blocks, precision)

  def add_stacks(self, count: int, n_blocks: int | None = None,
                 precision: str | None = None) -> list[StackSpec]:
    """Adds `count` stacks where this builder's building mode puts them, as one stage's new stacks
    (`training.progressive.stacks_per_stage`): a copying `new_stack_init` chooses their sources
    together (`stack`: the trained rack repeated; `midas`: its middle block). Returns their specs
    in building order."""
    return [self._add(self.building_mode, n_blocks, precision, count) for _ in range(count)]

  def _add(self, where: str, n_blocks, precision, count: int = 1) -> StackSpec:
    """Adds one of a stage's `count` new stacks at `where` ("append" | "prepend")."""
    spec = self._new_stack(n_blocks, precision, where, count=count)
    self.specs.insert(len(self.specs) if where == "append" else 0, spec)
    self._place_time_steps()
    return self.specs[-1 if where == "append" else 0]

  def _new_stack(self, n_blocks, precision, where: str, start=None, count: int = 1) -> StackSpec:
    """A new stack's spec, its params set (from `start`, float params as plain dicts, or by
    `new_stack_init` as one of a stage's `count` new stacks) and its label."""
    p, m = self.config.training.progressive, self.config.model
    if len(self.specs) >= p.max_stacks:
      raise ValueError(f"training.progressive.max_stacks={p.max_stacks}: the rack already has "
                       f"{len(self.specs)} stacks; raise max_stacks to add more")
    n_blocks = m.n_blocks_per_stack if n_blocks is None else n_blocks
    precision = precision or self.default_precision
    if not isinstance(n_blocks, int) or n_blocks <= 0:
      raise ValueError(f"n_blocks={n_blocks!r}: must be a positive int")
    _with_progressive(self.config, new_stack_precision=precision)   # checked as the config's
    fmt = BY_PRECISION.get(precision)
    index = len(self.specs)
    # A stack qwix stores from its creation (qlora: int4) trains only adapters, so it always has
    # its stack LoRA.
    quantized = fmt is not None and fmt.qwix_rule is not None
    lora = stack_lora_setting(p, index) if p.qlora_enabled or quantized else None
    spec = StackSpec(index=index, n_blocks=n_blocks, precision=precision,
                     lora=lora, quantized=quantized)
    if p.progressive_qlora:   # design §6: the trunk gets its progressive adapters
      progressive = LoraSetting(p.progressive_qlora_rank, float(p.progressive_qlora_alpha))
      for trunk in self.specs:
        if trunk.progressive_lora is None:
          self._respec(trunk, progressive_lora=progressive)
    self._set_stack(spec, self._start(spec, where, count) if start is None else start)
    self._labels[spec.name] = ADAPTERS_ONLY if spec.quantized else TRAINABLE
    return spec

  def _start(self, spec: StackSpec, where: str, count: int = 1):
    """The float params a new stack (one of its stage's `count`) starts from by
    `training.progressive.new_stack_init` (its row of `growth.NEW_STACK_INITS`; None: its own
    random init), fed to `init_stack` as its previous params. Records the copied stack in
    `init_sources`."""
    how = self.config.training.progressive.new_stack_init
    init = NEW_STACK_INITS[how]
    trained = [s for s in self.specs if s.name in self.trained]
    source = init.source(trained, spec.index, where, count) if init.source and trained else None
    self.init_sources[spec.name] = source and source.name
    if source and (source.quantized or source.packed or source.n_blocks != spec.n_blocks):
      raise ConfigError(
          f"training.progressive.new_stack_init={how!r}: {spec.name} would start as a copy of "
          f"{source.name} ({source.n_blocks} blocks, precision {source.precision}"
          f"{', stored ' + source.format.name if source.quantized or source.packed else ''}); "
          f"allowed: a float source of {spec.n_blocks} blocks, or new_stack_init="
          + " or ".join(map(repr, NOT_COPYING)))
    return init.start(self.config, spec, source and self.params["stacks"][source.name])

  def _set_stack(self, spec: StackSpec, old_params=None) -> None:
    error = spec.format and spec.format.block_error(self.config, spec.precision)
    if error:
      raise ValueError(error)
    self._graphdefs[spec.name], self.params["stacks"][spec.name] = init_stack(
        self.config, spec, old_params)

  def _place_time_steps(self) -> None:
    """Time as depth: each untrained stack gets the time step of its position from the embedding
    in the rack of target_stacks (the stacks still to come added in this builder's mode): highest
    noise nearest the embedding, whichever of append/prepend put it there. A trained stack keeps
    the step it trained at."""
    if self.config.training.progressive.time_interpretation != "depth":
      return
    n = len(self.specs)
    target = max(self.config.training.progressive.target_stacks, n)
    to_come_in_front = target - n if self.building_mode == "prepend" else 0
    for position, spec in enumerate(self.specs):
      if spec.name not in self.trained:
        level = target - 1 - to_come_in_front - position   # 0 = nearest the head
        self.specs[position] = dataclasses.replace(
            spec, time_step=self.masking.time_step_at_level(level))

  def _respec(self, spec: StackSpec, **changes) -> StackSpec:
    """Rebuilds an existing stack under a changed spec, keeping its params (see `init_stack`)."""
    new = dataclasses.replace(spec, **changes)
    self._set_stack(new, self.params["stacks"][spec.name])
    self.specs[self.specs.index(spec)] = new
    return new

  # --- trainability ----------------------------------------------------------------------------
  def freeze_trunk(self, indices=None) -> dict:
    """Freezes every leaf of the stacks with the given building indices (default: all trained
    stacks), adapters included. Frozen base weights are stored in the compute dtype (a bf16/fp16
    stack drops its fp32 master copy; an nvfp4 stack's kernels are packed). Returns the labels
    pytree."""
    for spec in self._select(indices):
      spec = self._pack(spec)
      self._labels[spec.name] = FROZEN
      self._cast_base(spec, spec.compute_dtype)
    return self.labels()

  def freeze_all_but_qlora(self, indices=None) -> dict:
    """Leaves exactly the adapters (stack LoRA, progressive) of the given stacks (default: all
    trained stacks) trainable. Their attention/FFN kernels become int4 first (design §5, trunk
    under `trunk_strategy="qlora"`), computing in bf16; an nvfp4 stack's kernels are packed
    NVFP4 instead. Returns the labels pytree."""
    for spec in self._select(indices):
      spec = self._pack(spec)
      if not (spec.quantized or spec.packed):
        spec = self._respec(spec, quantized=True)
      self._labels[spec.name] = ADAPTERS_ONLY
      self._cast_base(spec, spec.compute_dtype)
    return self.labels()

  def unfreeze_all(self, indices=None) -> dict:
    """Lets the stacks with the given building indices (default: all) train what their precision
    can (the final stage): a stack with int4 kernels its adapters only; any other stack every
    leaf, its frozen bf16/fp16 base weights back as fp32 masters and packed nvfp4 kernels
    dequantized into fp32 masters (fake-quantized again while they train). Returns the labels
    pytree."""
    for spec in self.specs if indices is None else self._select(indices):
      if spec.quantized:   # int4 kernels cannot train
        self._labels[spec.name] = ADAPTERS_ONLY
        continue
      self._train_whole(spec, TRAINABLE)
    return self.labels()

  def train_trunk(self, indices=None) -> dict:
    """Lets every leaf of the given stacks (default: all trained stacks) train with the new ones,
    labelled TRUNK (`trunk_strategy="train"`: `make_optimizer` scales their lr by
    `trunk_lr_scale`): fp32 masters, as `unfreeze_all` makes them (packed nvfp4 kernels unpacked
    and fake-quantized again). A stack with int4 kernels cannot train them: a ValueError.
    Returns the labels pytree."""
    specs = self._select(indices)
    int4 = [s.name for s in specs if s.quantized]
    if int4:
      raise ValueError(f"{', '.join(int4)}: int4 (qlora) kernels cannot train; a trunk that "
                       "trains (trunk_strategy='train') needs float or nvfp4 stacks")
    for spec in specs:
      self._train_whole(spec, TRUNK)
    return self.labels()

  def _train_whole(self, spec: StackSpec, label: str) -> None:
    """Every leaf of a float or nvfp4 stack trains under `label`: packed kernels dequantized and
    frozen bf16/fp16 base weights cast back into fp32 masters."""
    spec = self._unpack(spec)
    self._labels[spec.name] = label
    self._cast_base(spec, jnp.float32)

  def _pack(self, spec: StackSpec) -> StackSpec:
    """A stack whose layers quantize their own kernels (nvfp4) stores them packed once it stops
    training (other stacks: unchanged)."""
    if spec.format and spec.format.quantize and not spec.packed:
      return self._respec(spec, packed=True)
    return spec

  def _unpack(self, spec: StackSpec) -> StackSpec:
    """Inverse of `_pack`: a packed stack's kernels dequantized into fp32 masters that train."""
    if not spec.packed:
      return spec
    fmt = spec.format

    def unpack(tree: dict) -> dict:
      if set(fmt.leaves) <= tree.keys():   # a kernel's layer
        rest = {k: v for k, v in tree.items() if k not in fmt.leaves}
        return {**rest, "kernel": fmt.dequantize({k: tree[k] for k in fmt.leaves}, jnp.float32)}
      return {k: unpack(v) if isinstance(v, dict) else v for k, v in tree.items()}

    self.params["stacks"][spec.name] = unpack(self.params["stacks"][spec.name])
    return self._respec(spec, packed=False)   # init_stack carries the dequantized kernels over

  def _cast_base(self, spec: StackSpec, dtype) -> None:
    """Casts the float base leaves (not adapters, not stored formats' leaves) to `dtype`: the
    stack's compute dtype once frozen, fp32 (master weights) to train again."""
    cast = lambda path, x: (x if is_adapter_path(path) or _is_stored(path) or not jnp.issubdtype(
        x.dtype, jnp.floating) else x.astype(dtype))
    self.params["stacks"][spec.name] = jax.tree_util.tree_map_with_path(
        cast, self.params["stacks"][spec.name])

  def set_embedding_trainable(self, *, input_side: bool, head_side: bool) -> None:
    """Input side: token/time embedding (a tied head shares the token table). Head side: final
    norm and an untied head."""
    self._labels["input_side"] = TRAINABLE if input_side else FROZEN
    self._labels["head_side"] = TRAINABLE if head_side else FROZEN

  def _select(self, indices):
    if indices is None:
      return [s for s in self.specs if s.name in self.trained]
    by_index = {s.index: s for s in self.specs}
    missing = [i for i in indices if i not in by_index]
    if missing:
      raise ValueError(f"stack indices {missing} do not exist; the rack has {sorted(by_index)}")
    return [by_index[i] for i in indices]

  def labels(self) -> dict:
    """A label (TRAINABLE / TRUNK / FROZEN) per params leaf, same structure as `params`.

    Integer leaves and stored kernels' leaves (int4, packed nvfp4) are always FROZEN; in an
    ADAPTERS_ONLY stack only adapter leaves train; a TRUNK stack's other leaves are TRUNK.
    """
    label_tree = lambda tree, label: jax.tree.map(lambda _: label, tree)
    side = lambda key: self._labels["head_side" if key in HEAD_SIDE else "input_side"]

    def stack_label(mode, path, x):
      if mode == FROZEN or not jnp.issubdtype(x.dtype, jnp.floating) or _is_stored(path):
        return FROZEN
      if mode in (TRAINABLE, TRUNK):
        return mode
      return TRAINABLE if is_adapter_path(path) else FROZEN

    return {"embed_head": {key: label_tree(tree, side(key))
                           for key, tree in self.params["embed_head"].items()},
            "stacks": {name: jax.tree_util.tree_map_with_path(
                           lambda path, x, mode=self._labels[name]: stack_label(mode, path, x), tree)
                       for name, tree in self.params["stacks"].items()}}

  def is_frozen(self, name: str) -> bool:
    """Whether every leaf of stack `name` is frozen (it can then run outside the gradient)."""
    return self._labels[name] == FROZEN

  # --- snapshots -------------------------------------------------------------------------------
  def build_rack(self) -> Rack:
    return Rack(config=self.config, specs=tuple(self.specs), graphdefs=dict(self._graphdefs),
                params={"embed_head": self.params["embed_head"], "stacks": dict(self.params["stacks"])})

  def update_params(self, params: dict) -> None:
    """Takes trained params back (same structure as `params`)."""
    if jax.tree.structure(params) != jax.tree.structure(self.params):
      raise ValueError("update_params: params do not match the rack's structure")
    self.params = params


def _is_stored(path) -> bool:
  """Whether a params leaf is part of a stored kernel (float scales included: not trainable)."""
  return is_stored_leaf(plain_keys(path))


def _with_progressive(config, **fields):
  """`config` validated, with the given training.progressive fields replaced in a copy (a field
  given as None or "" keeps the config's value; with no change, `config` itself)."""
  fields = {k: v for k, v in fields.items() if v and v != config.training.progressive[k]}
  if fields:
    config = config.copy_and_resolve_references()
    config.training.progressive.update(fields)
  return validate(config)
