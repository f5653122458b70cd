"""Time steps and training examples (design §7); what each objective does is its row in
stackwise_jax/objectives.py.

Time steps are ints 0..N-1 (N = `num_time_steps`): 0 is the lowest noise, N-1 the highest. Every
random draw is a pure function of (seed, example id, time step) or (seed, salt, example id), so a
cached activation and a recomputed one see the same corrupted input, whatever batch or row the
example lands in.

Pure, jit-compatible functions come first; `TimeStepMasking` binds them to a config.
"""
from collections.abc import Callable

import jax
import jax.numpy as jnp

from stackwise_jax.errors import ConfigError
from stackwise_jax.data import tokenizer
from stackwise_jax.data.packing import document_segments
from stackwise_jax.objectives import OBJECTIVES, mask_ratio

TimeMapping = Callable[[int, int, int], int]   # (stack_idx, max_stacks, num_time_steps) -> time step
_TIME_MAPPINGS: dict[str, TimeMapping] = {}


def register_time_mapping(name: str):
  """Decorator registering `fn(stack_idx, max_stacks, num_time_steps) -> int` under `name`.

  Select it with `training.progressive.stack_time_mapping="custom"` and
  `training.progressive.custom_time_mapping=name`. `stack_idx` is the stack's level (0 = nearest the
  LM head). The result is clipped to [0, num_time_steps - 1]. Registering a name again replaces the
  earlier function (so re-running a notebook cell or reloading a module works).
  """
  def register(fn: TimeMapping) -> TimeMapping:
    _TIME_MAPPINGS[name] = fn
    return fn
  return register


def combined_masks(*masks) -> jax.Array:
  """The loss mask after all rules: the float32 product of `masks` (bool/int/float, broadcastable)."""
  if not masks:
    raise ValueError("combined_masks needs at least one mask")
  out = jnp.asarray(masks[0], jnp.float32)
  for m in masks[1:]:
    out = out * jnp.asarray(m, jnp.float32)
  return out


TIME_STREAM = 0x7157    # any constants; see sample_time_steps
STACK_STREAM = 0x57AC


def sample_time_steps(example_ids, *, seed: int, salt: int, num_time_steps: int,
                      stream: int = TIME_STREAM) -> jax.Array:
  """Time as input: int32 [B], t = floor(u * N) with u ~ U[0, 1) per example.

  u comes from fold_in(fold_in(fold_in(key(seed), stream), salt), example_id): fixed for a
  fixed (seed, salt, id), so the trainer (salt = stage index) and evaluation (a fixed salt) can
  redraw the same steps. The stream keeps these keys apart from the mask keys
  fold_in(fold_in(key(seed), id), t), which would otherwise coincide for salt == id, and from
  other per-example draws (STACK_STREAM: which new stack an example trains).
  """
  base = jax.random.fold_in(jax.random.fold_in(jax.random.key(seed), stream), salt)
  u = jax.vmap(lambda i: jax.random.uniform(jax.random.fold_in(base, i)))(
      jnp.asarray(example_ids, jnp.int32))
  # min() guards float rounding of u * N up to N.
  return jnp.minimum(jnp.floor(u * num_time_steps).astype(jnp.int32), num_time_steps - 1)


def make_training_example(batch: dict, time_steps, *, objective: str, seed: int, num_time_steps: int,
                          min_ratio: float, mask_token_id: int,
                          pad_id: int = tokenizer.PAD_ID, eos_id: int | None = None) -> dict:
  """Turns a token batch into what the train step consumes, by `objective`'s row of `OBJECTIVES`.

  Args:
    batch: {"tokens": int32 [B, T], "example_id": int32 [B], and what the objective needs, e.g.
      for "custom" "targets": int32 [B, T] plus optionally "loss_mask": [B, T]}.
    time_steps: int32 [B] (or a scalar, broadcast to [B]); only masking objectives ("mlm") use it.
    objective: a name in `OBJECTIVES`. This and the other keyword arguments are Python values
      (static under jit).
    seed, num_time_steps, min_ratio: see `objectives.mlm_mask`.
    mask_token_id: the token that replaces masked inputs (`tokenizer.special_ids(config).mask`).
    pad_id: the tokenizer's pad id; targets equal to it never count in the loss.
    eos_id: with data.packing="documents", the tokenizer's EOS id, which ends each document of a
      record (`packing.document_segments`); None (concat): a record is one sequence.

  Returns:
    {"inputs": int32 [B, T], "targets": int32 [B, T], "loss_mask": float32 [B, T],
     "time_step": int32 [B]}; with `eos_id` also "segment_ids" and "positions", int32 [B, T],
     which the model reads (attention within a segment, RoPE positions) and caches keep.
  """
  if objective not in OBJECTIVES:
    raise ConfigError(f"training.progressive.training_objective={objective!r}: allowed: "
                      + ", ".join(map(repr, OBJECTIVES)))
  check_objective_data(objective, batch)
  tokens = jnp.asarray(batch["tokens"], jnp.int32)
  time_steps = jnp.broadcast_to(jnp.asarray(time_steps, jnp.int32), (tokens.shape[0],))
  segments = {}
  if eos_id is not None:
    # Derived here, where every batch becomes an example, rather than in one data pipeline: every
    # source (grain, prepared shards, mixtures, a user's iterable) then gets the same segments.
    segments = dict(zip(("segment_ids", "positions"), document_segments(tokens, eos_id)))
  inputs, targets, rule = OBJECTIVES[objective].example(
      tokens, {**batch, **segments}, time_steps, seed=seed, num_time_steps=num_time_steps,
      min_ratio=min_ratio, mask_token_id=mask_token_id)
  return {"inputs": inputs.astype(jnp.int32), "targets": targets,
          "loss_mask": combined_masks(rule, targets != pad_id), "time_step": time_steps,
          **segments}


def check_objective_data(objective: str, batch: dict) -> None:
  """Raises ConfigError when `batch` (one batch of the run's data) lacks keys that `objective`
  needs (a custom objective takes its targets from the data)."""
  missing = [key for key in OBJECTIVES[objective].needs if key not in batch]
  if missing:
    fitting = [name for name, o in OBJECTIVES.items() if set(o.needs) <= set(batch)]
    raise ConfigError(f"training.progressive.training_objective={objective!r}: needs batches with "
                      f"{', '.join(map(repr, missing))} ([B, T] like 'tokens'), but the data's "
                      f"batches have keys {sorted(batch)}; allowed: "
                      f"{' or '.join(map(repr, fitting))} for this data, or a dataloader that "
                      f"yields {', '.join(map(repr, missing))}")


class TimeStepMasking:
  """The functions above bound to `config.training.progressive` and `config.training.seed`.

  A stack's level counts from the head: level 0 is nearest the LM head (lowest noise). In prepend
  mode the k-th stack built sits at level k; in append mode at level target_stacks - 1 - k (the first
  stack built ends up nearest the embedding). Both modes thus put high noise near the embedding.
  """

  def __init__(self, config):
    p = config.training.progressive
    self.objective = p.training_objective
    self.building_mode = p.building_mode
    self.time_interpretation = p.time_interpretation
    self.num_time_steps = p.num_time_steps
    self.min_ratio = p.mlm_min_ratio
    special = tokenizer.special_ids(config)
    self.mask_token_id, self.pad_id = special.mask, special.pad
    self.eos_id = special.eos if config.data.packing == "documents" else None
    self.stack_time_mapping = p.stack_time_mapping
    self.time_per_stack = p.time_per_stack
    self.max_stacks = p.max_stacks
    self.target_stacks = p.target_stacks
    self.seed = config.training.seed
    self._custom = None
    if self.stack_time_mapping == "custom":
      # Fail at construction, not at the first stage boundary hours later.
      mapping = p.custom_time_mapping   # a registered name, or (Python API) the function itself
      if not callable(mapping) and mapping not in _TIME_MAPPINGS:
        raise ConfigError(
            f"training.progressive.custom_time_mapping={mapping!r}: not a registered time "
            f"mapping; registered: {sorted(_TIME_MAPPINGS) or 'none'} (register one with "
            "@stackwise_jax.progressive.masking.register_time_mapping(name), or set the function "
            "itself)")
      self._custom = mapping if callable(mapping) else _TIME_MAPPINGS[mapping]

  def level_of_stack(self, stack_idx: int) -> int:
    """A stack's building index (0 = first built) -> its level (0 = nearest the head)."""
    if stack_idx < 0:
      raise ValueError(f"stack_idx={stack_idx}: must be >= 0")
    if self.building_mode == "prepend":
      return stack_idx
    # Append stacks built past target_stacks sit nearest the head, i.e. at level 0.
    return max(self.target_stacks - 1 - stack_idx, 0)

  def get_time_step_for_stack(self, stack_idx: int) -> int:
    """Time as depth: a stack's building index, in this config's building mode -> its time step
    in [0, num_time_steps - 1]."""
    return self.time_step_at_level(self.level_of_stack(stack_idx))

  def time_step_at_level(self, level: int) -> int:
    """Time as depth: the time step of the stack at `level` (0 = nearest the head)."""
    if self.stack_time_mapping == "linear":
      step = level * self.time_per_stack
    elif self.stack_time_mapping == "exponential":
      step = self.time_per_stack * (2**level - 1)   # 0, tps, 3 tps, 7 tps, ...
    elif self.stack_time_mapping == "custom":
      step = self._custom(level, self.max_stacks, self.num_time_steps)
    else:
      raise ConfigError(f"training.progressive.stack_time_mapping={self.stack_time_mapping!r}: "
                        "allowed: 'linear', 'exponential', 'custom'")
    return int(min(max(round(step), 0), self.num_time_steps - 1))

  def sample_time_steps(self, example_ids, salt: int) -> jax.Array:
    """Time as input: int32 [B] steps, fixed for fixed (seed, salt, example ids)."""
    return sample_time_steps(example_ids, seed=self.seed, salt=salt, num_time_steps=self.num_time_steps)

  def time_steps_for_batch(self, batch, stack_idx: int, salt: int) -> jax.Array:
    """int32 [B]: the stack's step for every example (depth), or one sampled step per example
    (input)."""
    depth = self.time_interpretation == "depth"
    return self.time_steps_at(batch, self.get_time_step_for_stack(stack_idx) if depth else None,
                              salt)

  def time_steps_at(self, batch, time_step: int | None, salt: int) -> jax.Array:
    """int32 [B]: `time_step` (a StackSpec's, time as depth) for every example; None (time as
    input): one sampled step per example."""
    if time_step is None:
      return self.sample_time_steps(batch["example_id"], salt)
    return jnp.full((batch["tokens"].shape[0],), time_step, jnp.int32)

  def example(self, batch, time_steps) -> dict:
    """`make_training_example` with this config's objective, seed and masking settings."""
    return make_training_example(
        batch, time_steps, objective=self.objective, seed=self.seed,
        num_time_steps=self.num_time_steps, min_ratio=self.min_ratio,
        mask_token_id=self.mask_token_id, pad_id=self.pad_id, eos_id=self.eos_id)

  def stage_example(self, batch, new_specs, body_specs, salt: int) -> dict:
    """The training example of the stage that trains `new_specs` (StackSpecs), whose step runs
    `body_specs` (forward order) after the frozen prefix.

    Time as depth with several new stacks trained together, for an objective that masks (where a
    time step means something): each example trains one of them, drawn uniformly from its id. It
    is masked at that stack's time step, and the new stacks built after that one are skipped for
    it (`"active"`: bool [B, len(body_specs)]), so it meets the rack that stack would have trained
    on in a stage of its own; each new stack keeps its own time step. Otherwise every example is
    masked at the last new stack's step (depth) or at a sampled step (input), and every stack
    runs: an objective that masks nothing (clm) trains the whole rack on every example."""
    depth = self.time_interpretation == "depth"
    if not depth or len(new_specs) == 1 or not OBJECTIVES[self.objective].masks:
      return self.example(batch, self.time_steps_at(
          batch, new_specs[-1].time_step if depth else None, salt))
    choice = sample_time_steps(batch["example_id"], seed=self.seed, salt=salt,
                               num_time_steps=len(new_specs), stream=STACK_STREAM)
    time_steps = jnp.asarray([s.time_step for s in new_specs], jnp.int32)[choice]
    built = jnp.asarray([s.index for s in new_specs], jnp.int32)[choice]
    new = {s.name for s in new_specs}
    # A trained stack always runs (-1); a new one once the example's stack was built after it.
    built_at = jnp.asarray([s.index if s.name in new else -1 for s in body_specs], jnp.int32)
    return {**self.example(batch, time_steps), "active": built_at[None, :] <= built[:, None]}

  def generate_masks_for_stack(self, batch, stack_idx: int, salt: int = 0) -> dict:
    """The training example of the stage that trains stack `stack_idx` (its building index):
    time steps, masks, targets and loss mask."""
    return self.example(batch, self.time_steps_for_batch(batch, stack_idx, salt))

  def mask_ratio_for_stack(self, stack_idx: int) -> float:
    """The stack's MLM mask ratio (time as depth); the expected ratio over t (time as input); 0.0
    for objectives that mask nothing (clm, custom)."""
    depth = self.time_interpretation == "depth"
    return self.mask_ratio_at(self.get_time_step_for_stack(stack_idx) if depth else None)

  def mask_ratio_at(self, time_step: int | None) -> float:
    """The MLM mask ratio at `time_step`; with None (time as input) the expected ratio over t;
    0.0 for objectives that mask nothing (clm, custom)."""
    if not OBJECTIVES[self.objective].masks:
      return 0.0
    if time_step is None:
      # Mean of mask_ratio over t uniform on 0..N-1 (mean t / (N-1) is 1/2).
      return self.min_ratio + (1.0 - self.min_ratio) * (0.5 if self.num_time_steps > 1 else 0.0)
    return float(mask_ratio(time_step, self.num_time_steps, self.min_ratio))


def check_time_steps_kept(specs: list[dict], run_config, config, source: str) -> None:
  """Raises ConfigError when going on with `config` would move a stack of a run (`specs`, its
  checkpoint's stack specs as JSON; `run_config`, the config it was trained with) to another
  time step. With time as depth a stack's time step is its level in the rack of target_stacks:
  in append mode the first stacks sit farthest from the head, so a larger target_stacks gives
  them higher time steps than they trained at (a custom mapping may also read max_stacks).
  Only a change between the two configs counts, so a stack with no time step of its own (a
  pretrained one) never does."""
  if config.training.progressive.time_interpretation != "depth":
    return
  before, after = TimeStepMasking(run_config), TimeStepMasking(config)
  built = [s for s in specs if s.get("time_step") is not None]
  moved = [s for s in built if before.get_time_step_for_stack(s["index"])
           != after.get_time_step_for_stack(s["index"])]
  was, now = run_config.training.progressive, config.training.progressive
  # The resumable fields (checkpoint.RESUMABLE_CHANGES) a time step reads, and whether it does.
  reads = {"target_stacks": now.building_mode == "append",
           "max_stacks": now.stack_time_mapping == "custom"}
  changed = [f for f, read in reads.items() if read and now[f] != was[f]]
  if not moved or not changed:   # other changes: checkpoint.check_compatible names them
    return
  prepend = (" (in building_mode='prepend' a rack grows without moving its trained stacks)"
             if now.building_mode == "append" else "")
  raise ConfigError(
      f"{', '.join(f'training.progressive.{f}={now[f]}' for f in changed)}: {source} holds "
      f"stacks trained at time steps {[s['time_step'] for s in built]}; with "
      f"time_interpretation='depth' and building_mode={now.building_mode!r} their time steps "
      f"follow {' and '.join(changed)}, and this config would move them to "
      f"{[after.get_time_step_for_stack(s['index']) for s in built]}; allowed: "
      f"{', '.join(f'{f}={was[f]}' for f in changed)} to go on, or a new run: --fresh or another "
      f"--workdir{prepend}")
