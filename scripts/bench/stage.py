"""One stage's train step: built the trainer's way (`build_stage`), timed (`time_stage`), and its
row of a table (`stage_row`)."""
import dataclasses
import functools
import statistics
from typing import Any, Callable

import jax
from jax.sharding import NamedSharding

from stackwise_jax.data import make_dataloader
from stackwise_jax.progressive import ProgressiveRackBuilder
from stackwise_jax.progressive.steps import (init_train_state, make_optimizer,
                                             make_train_step, plan_stage, prefix_activations)
from stackwise_jax.progressive.stages import grow
from stackwise_jax.sharding import batch_spec, global_batch, make_mesh, replicated, tree_shardings

from bench.common import median_ms, spread, time_calls
from bench.flops import check_flops, model_flops, xla_flops


@dataclasses.dataclass
class Stage:
  """Stage k's jitted train step on a real batch, with its FLOP counts."""
  config: Any
  number: int             # the stage (1-based)
  rack: Any
  labels: Any
  plan: Any
  step: Callable          # jitted (state, example) -> (state, loss); donates `state`
  lowered: Any            # step.lower(state, example)
  state: dict
  example: dict
  flops: float            # model FLOPs per step
  xla_flops: float | None   # XLA's count (`lowered.cost_analysis()`; None on XLA:GPU)
  prefix: Callable | None   # jitted cache build (params, example) -> h; cached stages only
  prefix_flops: float     # forward FLOPs of one batch through the frozen prefix

  @property
  def tokens(self) -> int:
    return self.config.training.batch_size * self.config.training.seq_len


def build_stage(config, k: int) -> Stage:
  """Grows a rack to k stacks the way the trainer does (one stack a stage, or all k in one stage
  with progressive training off) and builds the train step of its last stage."""
  builder = ProgressiveRackBuilder(config)
  new_specs, frozen, stage = grow(builder, k, last_done=False)
  t, mesh = config.training, make_mesh(config)
  rack, labels = builder.build_rack(), builder.labels()
  plan = plan_stage(rack, frozen, t.progressive.cache_activations)
  tx = make_optimizer(t, labels, t.steps_per_stack)
  state = init_train_state(rack.params, tx, plan)
  shardings = tree_shardings(mesh, state, rack.axes())
  state = jax.device_put(state, shardings)
  batch = global_batch(mesh, next(make_dataloader(config).train_iter()))
  example = builder.masking.generate_masks_for_stack(batch, stack_idx=new_specs[-1].index, salt=stage)
  prefix = None
  if plan.cached:   # as the trainer feeds it: from the cache, split over the batch
    prefix = jax.jit(functools.partial(prefix_activations, rack, plan.prefix))
    h = prefix(state["params"], example)
    example = {**example, "h": jax.device_put(h, NamedSharding(mesh, batch_spec()))}
  step = make_train_step(rack, plan, tx, labels,
                         shardings=(shardings, replicated(mesh)))
  # XLA's count of the step as traced (before optimization: compiling here would compile twice,
  # and an AOT-compiled step refuses the int4 layouts its own outputs have).
  lowered = step.lower(state, example)
  flops, prefix_flops = model_flops(config, rack, labels, plan, mesh.shape["fsdp"] > 1)
  xla = xla_flops(lowered)
  check_flops(f"stage {stage} ({k} stacks, {plan.activation_mode})", flops, xla)
  return Stage(config, stage, rack, labels, plan, step, lowered, state, example, flops, xla,
               prefix, prefix_flops)


def time_stage(stage: Stage, steps: int) -> tuple[list[float], list[float]]:
  """-> (train step times, cache build times per batch: [] unless cached), in seconds. The cache
  build runs first: the steps donate the params it reads."""
  cache = []
  if stage.prefix is not None:
    cache = time_calls(lambda: stage.prefix(stage.rack.params, stage.example).block_until_ready(),
                       steps)
  state = stage.state

  def one_step():
    nonlocal state
    state, metrics = stage.step(state, stage.example)
    jax.block_until_ready((state, metrics))

  return time_calls(one_step, steps), cache


def stage_row(stage: Stage, steps, cache) -> dict:
  step_s = statistics.median(steps)
  return {"activation_mode": stage.plan.activation_mode, "step_ms": 1000 * step_s,
          "spread": spread(steps), "cache_build_ms": median_ms(cache) if cache else None,
          "tokens_per_s": stage.tokens / step_s, "model_gflop": stage.flops / 1e9,
          "xla_gflop": stage.xla_flops and stage.xla_flops / 1e9,
          "gflop_per_s": stage.flops / step_s / 1e9}
