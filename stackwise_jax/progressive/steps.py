"""A stage as data (StagePlan), its optimizer, and the pure train/eval/prefix steps.

The forward of a stage is split at the end of the *frozen prefix*: the longest run of frozen
stacks next to the embedding. The prefix is computed outside `jax.value_and_grad` (from the
activation cache, or streamed inside the step), so no backward pass ever runs through it.
Everything after it is differentiated with respect to the trainable leaves only (int4 kernels
cannot be differentiated, frozen ones need not be); frozen leaves get zero updates from
`optax.multi_transform`.
"""
import dataclasses
import functools

from flax.training.dynamic_scale import DynamicScale
import jax
import jax.numpy as jnp
import optax

from stackwise_jax.model import Rack
from stackwise_jax.model.layers import Segments
from stackwise_jax.progressive.builder import FROZEN, TRAINABLE, TRUNK
from stackwise_jax.sharding import step_compiler_options, use_mesh


@dataclasses.dataclass(frozen=True)
class StagePlan:
  """What differs between stages: which stacks run where, and how activations are obtained."""
  prefix: tuple[str, ...]      # leading frozen stacks, run without gradients
  body: tuple[str, ...]        # the rest, differentiated
  cached: bool                 # prefix outputs come from the activation cache
  loss_scaling: bool           # an fp16 stack trains: dynamic loss scaling

  @property
  def activation_mode(self) -> str:
    return "cached" if self.cached else "streamed"


def plan_stage(rack: Rack, frozen: set[str], cache_activations: bool) -> StagePlan:
  """The plan of a stage whose frozen stacks are `frozen`."""
  prefix = []
  for name in rack.order:
    if name not in frozen:
      break
    prefix.append(name)
  body = rack.order[len(prefix):]
  loss_scaling = any(s.compute_dtype == jnp.float16 and s.name not in frozen for s in rack.specs)
  return StagePlan(prefix=tuple(prefix), body=body,
                   cached=cache_activations and bool(prefix), loss_scaling=loss_scaling)


# optax.apply_if_finite gives up and applies a non-finite update after this many in a row; the
# trainer stops a run long before (training.nonfinite, training.max_skipped_steps).
_NEVER_APPLY_NONFINITE = 2**30


@dataclasses.dataclass(frozen=True)
class StepView:
  """What a cached stage's step sees: the embedding/head and the stacks after the frozen prefix,
  under positional keys (`new_0`, ...) instead of their names. Stages whose new stacks have the
  same shape then hand the step pytrees of one structure, and share one compiled step; the
  frozen trunk is never an argument. `names`: view key -> the rack's stack name."""
  names: dict

  @classmethod
  def of(cls, plan: StagePlan) -> "StepView":
    return cls({f"new_{i}": name for i, name in enumerate(plan.body)})

  def take(self, tree):
    """The view of a params-shaped tree (params or labels)."""
    return {"embed_head": tree["embed_head"],
            "stacks": {key: tree["stacks"][name] for key, name in self.names.items()}}

  def put(self, params, view_params):
    """`params` with the view's leaves replaced by `view_params`."""
    stacks = dict(params["stacks"])
    stacks.update({name: view_params["stacks"][key] for key, name in self.names.items()})
    return {"embed_head": view_params["embed_head"], "stacks": stacks}

  def rack(self, rack: Rack) -> Rack:
    graphdefs = {"embed_head": rack.graphdefs["embed_head"],
                 **{key: rack.graphdefs[name] for key, name in self.names.items()}}
    return Rack(rack.config, (), graphdefs, self.take(rack.params))

  def plan(self, plan: StagePlan) -> StagePlan:
    keys = tuple(self.names)
    return dataclasses.replace(plan, prefix=(), body=keys)


def make_optimizer(training_config, labels, total_steps: int,
                   lr: float | None = None) -> optax.GradientTransformation:
  """AdamW with warm-up + cosine to peak `lr` (default: training.lr) for trainable leaves; the
  same with the schedule times training.progressive.trunk_lr_scale for TRUNK leaves (a trunk
  that trains); set_to_zero (no state) for frozen ones. Gradients are clipped by their global
  norm over every leaf that trains (training.grad_clip). An update whose gradients are not
  finite is dropped whole (optax.apply_if_finite), so params never take a NaN or Inf."""
  t = training_config
  lr = t.lr if lr is None else lr
  schedule = optax.warmup_cosine_decay_schedule(
      init_value=0.0, peak_value=lr, warmup_steps=min(t.warmup_steps, max(total_steps - 1, 0)),
      decay_steps=max(total_steps, 1), end_value=lr * 0.1)
  # Decay matrices only; norm scales stay undecayed.
  decay_mask = lambda params: jax.tree.map(lambda x: x.ndim >= 2, params)
  adamw = lambda schedule: optax.adamw(schedule, weight_decay=t.weight_decay, mask=decay_mask)

  def clipped(tx, trains=None):
    """`tx` after clipping the gradients' global norm (over the leaves `trains` marks)."""
    if t.grad_clip <= 0:
      return tx
    clip = optax.clip_by_global_norm(t.grad_clip)
    return optax.chain(clip if trains is None else optax.masked(clip, trains), tx)

  if TRUNK in jax.tree.leaves(labels):
    # Two branches train: one clip over both, as an end-to-end step clips (masked: frozen leaves
    # may be int4).
    scale = t.progressive.trunk_lr_scale
    by_label = clipped(optax.multi_transform(
        {TRAINABLE: adamw(schedule), TRUNK: adamw(lambda step: scale * schedule(step)),
         FROZEN: optax.set_to_zero()}, labels), jax.tree.map(lambda l: l != FROZEN, labels))
  else:   # one branch trains: clipped inside it, the optimizer state layout runs have saved
    by_label = optax.multi_transform(
        {TRAINABLE: clipped(adamw(schedule)), FROZEN: optax.set_to_zero()}, labels)
  return optax.apply_if_finite(by_label, _NEVER_APPLY_NONFINITE)


def masked_cross_entropy(logits, targets, loss_mask):
  """Mean token cross entropy over positions where loss_mask is 1. logits: [B, T, V] fp32."""
  losses = optax.softmax_cross_entropy_with_integer_labels(logits, targets)
  return jnp.sum(losses * loss_mask) / jnp.maximum(jnp.sum(loss_mask), 1.0)


def prefix_activations(rack: Rack, names, params, example):
  """Embedding then the named (frozen) stacks: [B, T, d_model] fp32."""
  h, time_emb = rack.embed(params, example["inputs"], example["time_step"])
  return rack.apply_stacks(params, names, h, time_emb, segments=Segments.of(example))


def split_by_label(params, labels):
  """-> (trainable, frozen): two trees shaped like `params`, each with None where the other holds
  the leaf. Every label but FROZEN trains."""
  pick = lambda trains: jax.tree.map(lambda x, l: x if (l != FROZEN) == trains else None,
                                     params, labels)
  return pick(True), pick(False)


def join(trainable, frozen):
  """Inverse of `split_by_label`."""
  return jax.tree.map(lambda t, f: f if t is None else t, trainable, frozen,
                      is_leaf=lambda x: x is None)


def init_train_state(params, tx, plan: StagePlan, dropout_seed: int = 0) -> dict:
  """{"params", "opt_state", "step", "dropout_seed"[, "dyn_scale"]}: dropout keys are
  fold_in(key(dropout_seed), step), so the seed is data and stages can share one step."""
  state = {"params": params, "opt_state": tx.init(params), "step": jnp.zeros((), jnp.int32),
           "dropout_seed": jnp.asarray(dropout_seed, jnp.int32)}
  if plan.loss_scaling:
    state["dyn_scale"] = DynamicScale()
  return state


def make_train_step(rack: Rack, plan: StagePlan, tx, labels, shardings=None):
  """(state, example) -> (state, {"loss", "finite"}). `finite` is False when the step diverged:
  its loss or gradients are NaN or Inf (with fp16 loss scaling, only its loss: overflowing
  gradients are routine there and the scale backs off); such an update is never applied.
  `example` holds inputs/targets/loss_mask/time_step, for a cached stage `h`: the prefix
  output [B, T, d_model], where new stacks train together at their own time steps
  `active` (`TimeStepMasking.stage_example`), and with data.packing="documents"
  segment_ids/positions (`layers.Segments`). `shardings`: (the state's
  NamedShardings, a replicated one) from sharding.py; the state keeps its shardings from step to
  step, the example's follow it. The step is traced under their mesh: each block gathers its
  params when it runs (sharding.gathered_call), never the whole model at once."""

  def loss_fn(params, h, example, dropout_key):
    if h is None:
      h, time_emb = rack.embed(params, example["inputs"], example["time_step"])
    else:   # the embedding only feeds the body through the (gradient-free) prefix
      time_emb = rack.time_embedding(params, example["time_step"])
    h = rack.apply_stacks(params, plan.body, h, time_emb, dropout_key, example.get("active"),
                          Segments.of(example))
    return masked_cross_entropy(rack.logits(params, h), example["targets"], example["loss_mask"])

  def step(state, example):
    params = state["params"]
    if plan.cached:
      h = example["h"]
    elif plan.prefix:
      h = prefix_activations(rack, plan.prefix, params, example)
    else:
      h = None
    dropout_key = jax.random.fold_in(jax.random.key(state["dropout_seed"]), state["step"])
    trainable, frozen = split_by_label(params, labels)
    grad_fn = lambda trainable: loss_fn(join(trainable, frozen), h, example, dropout_key)
    if plan.loss_scaling:
      dyn_scale, _, loss, grads = state["dyn_scale"].value_and_grad(grad_fn)(trainable)
    else:
      loss, grads = jax.value_and_grad(grad_fn)(trainable)
    grads = join(grads, jax.tree.map(jnp.zeros_like, frozen))   # set_to_zero ignores these
    updates, opt_state = tx.update(grads, state["opt_state"], params)   # non-finite: dropped
    new_state = {**state, "params": optax.apply_updates(params, updates),
                 "opt_state": opt_state, "step": state["step"] + 1}
    finite = jnp.isfinite(loss)
    if plan.loss_scaling:
      new_state["dyn_scale"] = dyn_scale
    else:
      finite &= opt_state.last_finite
    return new_state, {"loss": loss, "finite": finite}

  step.__name__ = "train_step"   # as jax names it in compile logs
  if shardings is None:
    return jax.jit(step, donate_argnums=0)
  state_shardings, loss_sharding = shardings

  @functools.wraps(step)
  def traced_under_mesh(state, example):
    with use_mesh(loss_sharding.mesh):
      return step(state, example)

  return jax.jit(traced_under_mesh, in_shardings=(state_shardings, None),
                 out_shardings=(state_shardings, loss_sharding), donate_argnums=0,
                 compiler_options=step_compiler_options(loss_sharding.mesh))


def make_eval_step(rack: Rack, plan: StagePlan | None = None):
  """(params, example) -> (sum of token losses, number of loss tokens, correct predictions).
  With a cached `plan` the example's `h` (the prefix output) goes through `plan.body`."""

  def step(params, example):
    segments = Segments.of(example)
    if plan is not None and plan.cached:
      h = rack.apply_stacks(params, plan.body, example["h"],
                            rack.time_embedding(params, example["time_step"]), segments=segments)
      logits = rack.logits(params, h)
    else:
      logits = rack(params, example["inputs"], example["time_step"], segments=segments)
    mask = example["loss_mask"]
    losses = optax.softmax_cross_entropy_with_integer_labels(logits, example["targets"])
    correct = (jnp.argmax(logits, -1) == example["targets"]) * mask
    return jnp.sum(losses * mask), jnp.sum(mask), jnp.sum(correct)

  return jax.jit(step)
