"""ProgressiveTrainer (design §3): one stage per new stack.

A stage is set up as a value (`Stage`: rack, labels, plan, optimizer, state, compiled steps), then
trained by one loop, then summarised. A cached stage's step sees only what trains (the new stack
and the embedding/head) and the cached trunk activations, never the trunk: stages whose new stack
has the same shape share one compiled step. Where the time goes is recorded per stage
(`seconds_by_phase`).
"""
import contextlib
import dataclasses
import math
import os
import signal
import sys
import threading
import time

from absl import logging
import jax
from jax.experimental import multihost_utils
from jax.sharding import NamedSharding
import numpy as np
from tqdm.auto import tqdm

from stackwise_jax import xla_cache
from stackwise_jax.checkpoint import RunCheckpoints, check_compatible, latest_meta, restore_into
from stackwise_jax.config import from_yaml, resolve_init_from, stage_steps, validate
from stackwise_jax.errors import ConfigError
from stackwise_jax.data.iterable import as_dataloader
from stackwise_jax.progressive.evaluate import (eval_example, evaluate_by_source, evaluate_with,
                                                loss_bytes, token_bytes_of)
from stackwise_jax.model.lora import is_adapter_path
from stackwise_jax.objectives import OBJECTIVES
from stackwise_jax.progressive import ahead, caching
from stackwise_jax.progressive.builder import HEAD_SIDE, FROZEN, ProgressiveRackBuilder
from stackwise_jax.progressive.feed import Prefetcher
from stackwise_jax.progressive.guard import DivergenceGuard
from stackwise_jax.progressive.masking import check_objective_data, check_time_steps_kept
from stackwise_jax.progressive.stages import (is_final, next_stage_shapes, restore_checkpoint,
                                              set_labels, stack_specs, stage_specs)
from stackwise_jax.report import PHASES
from stackwise_jax.progressive.steps import (StepView, init_train_state, make_eval_step,
                                             make_optimizer, make_train_step, plan_stage)
from stackwise_jax.trees import leaf_bytes, plain_keys
from stackwise_jax.sharding import (batch_spec, global_batch, local_batch, make_mesh, replicated,
                                    tree_shardings)

POOL_SALT = 0         # pool mode: an example's masks are the same at every stage and epoch


class PhaseClock:
  """Seconds per phase of a stage (PHASES); `with clock("eval"): ...` adds to one."""

  def __init__(self):
    self.seconds = dict.fromkeys(PHASES, 0.0)

  @contextlib.contextmanager
  def __call__(self, phase: str):
    start = time.perf_counter()
    try:
      yield
    finally:
      self.seconds[phase] += time.perf_counter() - start


@dataclasses.dataclass(frozen=True)
class StageContext:
  """What a stage is once its labels are set: the values its set-up, examples, loop and summary
  all read."""
  number: int                  # 1-based
  new_specs: list              # the stacks it adds (none: the final stage)
  final: bool                  # the final stage: the whole rack trains end to end
  rack: object                 # the whole rack (params as at the stage's start)
  labels: dict                 # of the whole rack
  plan: object                 # StagePlan

  @property
  def trains(self) -> list:
    """The stacks whose examples it trains: the new ones, or every stack in the final stage."""
    return list(self.rack.specs) if self.final else self.new_specs


@dataclasses.dataclass
class Stage:
  """One stage, set up: what it is (`context`), how it trains, and from which examples."""
  context: StageContext
  view: StepView | None        # what a cached step sees; None: the whole rack
  state: dict                  # the step's train state (params of the view, optimizer state, ...)
  train_step: object
  eval_step: object
  steps: int                   # train steps in the stage
  example_at: object           # step index -> the step's example, on the device
  prefetch: bool               # examples come by index (cache or pool): made ahead on a thread
  eval_examples: list          # its held-out examples (with their trunk activations if cached)
  resume: object               # the mid-stage checkpoint it goes on from, or None
  data_start: dict             # the data iterator's state at its start (a cached stage resumes there)
  clock: PhaseClock            # its seconds by phase

  def full_params(self, builder_params):
    """The whole rack's params with the stage's current state in them."""
    return self.state["params"] if self.view is None else self.view.put(builder_params,
                                                                      self.state["params"])


@dataclasses.dataclass
class LoopOutcome:
  """What a stage's loop leaves: its losses, eval curve [[step, loss], ...], the last
  evaluation's bits per byte, the steps skipped as non-finite, and the step it started from."""
  losses: list
  eval_curve: list
  bits_per_byte: float | None
  skipped: int
  start: int


class ProgressiveTrainer:
  """Trains a rack stage by stage. `results` holds one dict per stage (see `_result`)."""

  def __init__(self, config, *, progress: bool = True, log=None,
               checkpoints: RunCheckpoints | None = None, devices=None, metrics=None):
    """`checkpoints`: where the run saves (`training.checkpoint_every` steps, the end of every
    stage, SIGINT/SIGTERM) and, if they hold a checkpoint, where it resumes from (design §9).
    `devices`: those the mesh spans (default: all; design §11, sharding.py). `metrics`: where
    losses go as they come (`metrics.TensorBoard`). After each stage, `state` holds its final
    train state (params of what the step saw, optimizer state) as placed on the mesh."""
    self.config = validate(resolve_init_from(config))   # as the builder resolves it
    self.progress = progress
    self.log = log or (lambda msg: print(msg, file=sys.stderr, flush=True))
    self.checkpoints, self.metrics = checkpoints, metrics
    self.mesh = make_mesh(self.config, devices)
    self.state = None
    self.results = {"stages": [], "final_eval_loss": None, "final_eval_bits_per_byte": None}
    self._told = set()          # reasons already logged once
    self._stop_signal = None    # set by SIGINT/SIGTERM: save, then stop
    self._compiled = {}         # step functions by what they compute, shared by equal stages
    self._preparers = {}        # jitted example preparers likewise (`_preparer`)
    self._pool = None           # data_reuse="pool": the batches every stage trains on
    self._train_cache = None    # (prefix stack names, ActivationCache) kept for the next stage
    self._eval_cache = None     # (prefix stack names, [h per eval batch])
    self._token_bytes = None    # UTF-8 bytes per token id, for bits per byte (None: not known)
    self._eval_bytes = None     # bytes the eval examples' loss tokens stand for (None: not known)
    # The next stage's programs (compile_ahead); a failure is told once a run.
    self._ahead = ahead.CompileAhead(lambda message: self._tell("compile ahead", message))
    self._batch_shapes = None   # a global batch as the data gives it, abstract (compile_ahead)

  def train_progressively(self, rack_builder: ProgressiveRackBuilder, dataloader,
                          target_stacks: int | None = None) -> dict:
    """Grows `rack_builder` to `target_stacks`, training each new stack in its own stage.

    Stacks already in the builder that were never trained are trained together in the first
    stage. `dataloader` has `train_iter()` (yielding {"tokens": [B, T], "example_id": [B]}) and
    `eval_batches(n)`, or is any re-iterable of batch dicts (data/iterable.py: a list, a torch
    DataLoader, a generator function; the original StackWise's keys too).
    """
    p = self.config.training.progressive
    # Process-wide: set when a run starts (the CLI sets it first thing), not when it is configured.
    xla_cache.enable(self.config)
    dataloader = as_dataloader(dataloader, self.config)
    target = p.target_stacks if target_stacks is None else target_stacks
    if not len(rack_builder.specs) <= target <= p.max_stacks:
      raise ValueError(f"target_stacks={target}: must be between the rack's current "
                       f"{len(rack_builder.specs)} stacks and training.progressive.max_stacks="
                       f"{p.max_stacks}")
    for reason, message in setting_warnings(self.config, dataloader):
      self._tell(reason, f"warning: {message}")
    eval_batches = dataloader.eval_batches(self.config.training.eval_batches)
    check_objective_data(p.training_objective, eval_batches[0])
    self._token_bytes = token_bytes_of(dataloader, self.config)
    # The same held-out examples (masks and time steps included) at every stage.
    eval_examples = [eval_example(rack_builder.masking, global_batch(self.mesh, b))
                     for b in eval_batches]
    self._eval_bytes = loss_bytes(eval_examples, self._token_bytes)   # the same at every eval
    self._batch_shapes = ahead.abstract(global_batch(self.mesh, eval_batches[0]))
    data = dataloader.train_iter()
    if self.config.training.data_reuse == "pool":   # drawn from the start, resumed or not
      pool_iter = dataloader.train_iter()
      self._pool = [next(pool_iter) for _ in range(self.config.training.steps_per_stack)]
    try:
      with _saving_on_signals(self, enabled=self.checkpoints is not None):
        for new, resume in self._stage_plan(rack_builder, target, data):
          stage = len(self.results["stages"]) + 1
          self._run_stage(rack_builder, new, stage, target, data, eval_examples, resume)
        if hasattr(dataloader, "eval_batches_by_source"):   # a mixture (data/mixture.py)
          by_source = self.results["final_eval_by_source"] = evaluate_by_source(
              rack_builder.build_rack(), rack_builder.masking, dataloader,
              self.config.training.eval_batches, self._token_bytes,
              lambda b: global_batch(self.mesh, b))
          last_step = sum(s["steps"] for s in self.results["stages"])
          for name, figures in by_source.items():
            for key in ("loss", "bits_per_byte"):
              if figures.get(key) is not None:
                self._metric(f"eval_by_source/{name}/{key}", figures[key], last_step)
    finally:
      self._ahead.wait()
      self._drop_caches()
      self._wait_for_checkpoints()   # stopped or failed too: what was saved still reaches disk
    return self.results

  def _wait_for_checkpoints(self) -> None:
    """Returns once the run's checkpoints are on disk (written in the background while later
    stages train); the wait is the last stage's checkpoint time."""
    if self.checkpoints is None:
      return
    start = time.perf_counter()
    self.checkpoints.wait()
    if self.results["stages"]:
      waited, last = time.perf_counter() - start, self.results["stages"][-1]
      last["seconds"] += waited
      last["seconds_by_phase"]["checkpoint"] += waited

  train_rack = train_progressively   # the upstream's name for the same entry

  # --- structure and resuming ------------------------------------------------------------------

  def _stage_plan(self, builder, target, data):
    """Yields (specs a stage trains, where it resumes or None). With a checkpoint, first rebuilds
    the rack's structure by replaying the stages it finished and restores params, results and
    the data iterator; a stage cut off mid-way comes first, with its optimizer state."""
    stages = stage_specs(builder, target)
    if self.checkpoints is not None and self.checkpoints.latest is not None:
      new, resume = self.restore(builder, stages, data)
      if resume is not None:
        yield new, resume
    for new in stages:
      yield new, None

  def restore(self, builder, stages=None, data=None):
    """Replays the stages of the latest checkpoint on `builder` (same config, empty) and loads
    their params; `data`, if given, is set to the checkpoint's iterator state. Returns
    (specs of the last stage, the checkpoint if that stage was cut off mid-way, else None)."""
    ckpt = self.checkpoints.latest
    meta = ckpt.meta
    new = restore_checkpoint(builder, ckpt, stages)
    self.results = meta["results"]
    if data is not None:
      self.checkpoints.restore_data(data)
    where = ("the end of the stage" if ckpt.stage_done
             else f"step {meta['step']}/{meta.get('stage_steps', meta['steps_per_stack'])}")
    self.log(f"resuming from {ckpt.path}: stage {meta['stage']}, {where}")
    return new, None if ckpt.stage_done else ckpt

  def _save(self, builder, stage: Stage, step, data_state, progress) -> None:
    """Checkpoints the run at `step` of `stage` (`progress`: the stage's losses so far)."""
    opt = {k: v for k, v in stage.state.items() if k != "params"}
    meta = {"stage": stage.context.number, "step": step, "stage_steps": stage.steps,
            "final": stage.context.final, "building_mode": builder.building_mode,
            "specs": stack_specs(builder.specs), "results": self.results, "progress": progress}
    # Every stage before the final one has stage_steps(config) steps.
    self.checkpoints.save((stage.context.number - 1) * stage_steps(self.config) + step,
                          params=stage.full_params(builder.params), opt=opt,
                          data_state=data_state, meta=meta)

  # --- one stage -------------------------------------------------------------------------------

  def _run_stage(self, builder, new_specs, number, target, data, eval_examples, resume) -> None:
    """Sets up, trains and summarises one stage (from `resume`, a mid-stage checkpoint, if
    given); appends its result to `self.results` and checkpoints its end."""
    t = self.config.training
    clock = PhaseClock()
    started = time.perf_counter()
    with clock("compile"):   # set-up is counted with compilation: both are paid once a stage
      self._ahead.wait()     # what it did not hide of this stage's compilation
      final = is_final(new_specs)
      frozen = set_labels(builder, final)
      params_axes = builder.build_rack().axes()   # as declared where the params were created
      builder.update_params(jax.device_put(
          builder.params, tree_shardings(self.mesh, builder.params, params_axes)))
      rack = builder.build_rack()
      context = StageContext(number, new_specs, final, rack, builder.labels(),
                             plan_stage(rack, frozen, t.progressive.cache_activations))
      self._say_why_not_cached(builder, context)
    with clock("cache"):
      if hasattr(data, "set_stage"):   # a mixture's weights may change by stage (data/mixture.py)
        data.set_stage(number)
      data_start = data.get_state()   # where a fresh cached stage's data resumes from
      example_at, prefetch, eval_examples = self._examples(builder, context, data, eval_examples)
    with clock("compile"):
      stage = self._setup(context, example_at, prefetch, eval_examples, resume, data_start, clock)
      if eval_examples:   # compiled here, so eval time is evaluation only
        stage.eval_step(stage.state["params"], eval_examples[0])[0].block_until_ready()

    # The next stage compiles once this one's step has (it compiles on its first call).
    first_step = threading.Event()
    stage.train_step = ahead.first_call_sets(first_step, stage.train_step)
    self._compile_next(builder, context, target, eval_examples, first_step)
    try:
      outcome = self._train_loop(builder, stage, target, data)
    finally:
      first_step.set()
    steady = max(stage.steps - outcome.start - 1, 1)
    step_seconds = clock.seconds["train"] / steady
    with clock("train"):   # the stage's bookkeeping
      builder.update_params(stage.full_params(builder.params))
      self.state = stage.state
      builder.trained.update(s.name for s in new_specs)
      result = self._result(builder, stage, outcome)
      if hasattr(data, "set_stage"):
        result["mixture"] = self._mixture(data, stage)
    result["step_seconds"] = step_seconds
    result["tokens_per_s"] = t.batch_size * t.seq_len / max(step_seconds, 1e-9)
    self.results["stages"].append(result)
    self.results["final_eval_loss"] = result["eval_loss"]
    self.results["final_eval_bits_per_byte"] = result["eval_bits_per_byte"]
    def stamp():
      result["seconds"] = time.perf_counter() - started
      result["seconds_by_phase"] = dict(clock.seconds)

    stamp()
    if self.checkpoints is not None:   # its copy of the results lacks only this save's time
      with clock("checkpoint"):
        self._save(builder, stage, stage.steps, data.get_state(), progress=None)
      stamp()
    if self.metrics is not None:
      self.metrics.stage(result)
    if self.checkpoints is not None:
      self._stop_if_asked(number, stage.steps)

  def _train_loop(self, builder, stage: Stage, target, data) -> "LoopOutcome":
    """The stage's steps, evals and mid-stage checkpoints (from `stage.resume`'s step, if
    given). The stage's last step always evaluates, so that bits per byte is the stage's end,
    resumed or not."""
    t, number, plan = self.config.training, stage.context.number, stage.context.plan
    resume, clock, eval_examples = stage.resume, stage.clock, stage.eval_examples
    losses, eval_curve, start, skipped, bits_per_byte = [], [], 0, 0, None
    if resume is not None:
      start = resume.meta["step"]
      progress = resume.meta["progress"]
      losses = [math.nan if x is None else x for x in progress["losses"]]
      eval_curve, skipped = progress["eval_curve"], progress["skipped_steps"]
    first_step = sum(s["steps"] for s in self.results["stages"])   # the run's steps before
    name = ("final stage" if stage.context.final
            else f"stage {number} ({len(stage.context.rack.specs)}/{target} stacks)")
    bar = tqdm(total=stage.steps, initial=start, disable=not self.progress,
               desc=f"{name} [{plan.activation_mode}]", dynamic_ncols=True,
               file=sys.stderr)

    def on_loss(step, loss):   # as the guard reads it: every log_every steps, one step late
      if step % t.log_every == 0:
        bar.set_postfix(loss=f"{loss:.3f}")
        self._metric("train/loss", loss, first_step + step)

    # Losses and verdicts stay on the device until read: every log_every steps, in one transfer.
    guard = DivergenceGuard(t.nonfinite, t.max_skipped_steps, number, losses, skipped,
                            read_every=t.log_every, on_loss=on_loss)
    indices = range(start, stage.steps)
    loop_start, first_done = time.perf_counter(), None
    with bar, (Prefetcher(stage.example_at, indices) if stage.prefetch
               else contextlib.nullcontext(map(stage.example_at, indices))) as examples:
      for i, example in zip(indices, examples):
        if first_done is None:   # the first step compiles (or loads) the step: compile time
          stage.state, metrics = stage.train_step(stage.state, example)
          metrics["loss"].block_until_ready()
          first_done = time.perf_counter()
          clock.seconds["compile"] += first_done - loop_start
          in_loop = dict(clock.seconds)
        else:
          stage.state, metrics = stage.train_step(stage.state, example)
        guard.after(i + 1, metrics)   # appends the losses it reads to `losses`
        last = i + 1 == stage.steps
        if last or (t.eval_every and (i + 1) % t.eval_every == 0):
          guard.flush()   # waits for the steps queued so far: they are train time, not eval
          with clock("eval"):
            ev = (evaluate_with(stage.eval_step, stage.state["params"], eval_examples,
                                n_bytes=self._eval_bytes) if eval_examples else {})
            eval_curve.append([i + 1, ev.get("loss")])
            bits_per_byte = ev.get("bits_per_byte")
          bar.set_postfix(loss=f"{losses[-1]:.3f}", eval=f"{eval_curve[-1][1]:.3f}")
          self._metric("eval/loss", eval_curve[-1][1], first_step + i + 1)
          if bits_per_byte is not None:
            self._metric("eval/bits_per_byte", bits_per_byte, first_step + i + 1)
        bar.update(1)
        due = t.checkpoint_every and (i + 1) % t.checkpoint_every == 0
        if self.checkpoints is not None and not last and (due or self._stop_signal):
          guard.flush()   # a diverged state is never saved
          with clock("checkpoint"):
            fresh_cached = plan.cached and t.data_reuse == "fresh"
            self._save(builder, stage, i + 1,
                       stage.data_start if fresh_cached else data.get_state(),
                       {"losses": [float(x) for x in losses], "eval_curve": eval_curve,
                        "skipped_steps": guard.skipped})
          self._stop_if_asked(number, i + 1)
      guard.flush()
      jax.block_until_ready(stage.state["params"])
    if first_done is not None:   # the loop after its first step, less its evals and checkpoints
      elsewhere = sum(clock.seconds[p] - in_loop[p] for p in ("eval", "checkpoint"))
      clock.seconds["train"] += time.perf_counter() - first_done - elsewhere
    return LoopOutcome(losses, eval_curve, bits_per_byte, guard.skipped, start)

  def _setup(self, context: StageContext, example_at, prefetch, eval_examples, resume,
             data_start, clock) -> Stage:
    """The stage's optimizer, train state and compiled steps (shared with earlier stages whose
    step computes the same thing)."""
    view, step_rack, step_plan, step_labels, tx, steps = self._step_parts(context)
    state = self._initial_state(context, step_rack.params, tx, step_plan)
    if resume is not None:
      opt = restore_into({k: v for k, v in state.items() if k != "params"}, resume.opt,
                         "optimizer state")
      state = {**state, **opt}
    shardings = tree_shardings(self.mesh, state, step_rack.axes())
    state = jax.device_put(state, shardings)
    train_step, eval_step = self._step_fns(context, step_rack, step_plan, step_labels, tx, steps,
                                           shardings)
    return Stage(context, view, state, train_step, eval_step, steps, example_at, prefetch,
                 eval_examples, resume, data_start, clock)

  def _step_parts(self, context: StageContext):
    """(view, step rack, step plan, step labels, optimizer, steps) of a stage's step: what it
    sees (a cached stage's `StepView`; None: the whole rack) and how it updates it."""
    t, plan = self.config.training, context.plan
    steps = stage_steps(self.config, context.final)
    view = StepView.of(plan) if plan.cached else None
    step_rack, step_plan = (view.rack(context.rack), view.plan(plan)) if view else (context.rack,
                                                                                    plan)
    step_labels = view.take(context.labels) if view else context.labels
    tx = make_optimizer(t, step_labels, steps, t.final_stage_lr if context.final else t.lr)
    return view, step_rack, step_plan, step_labels, tx, steps

  def _initial_state(self, context: StageContext, params, tx, step_plan) -> dict:
    return init_train_state(params, tx, step_plan,
                            dropout_seed=self.config.training.seed * 1000 + context.number)

  def _step_fns(self, context, step_rack, step_plan, step_labels, tx, steps, shardings):
    """(train step, eval step) of a stage: jitted once for every stage whose step computes the
    same thing (and compiled ahead into the same functions, `_compile_next`)."""
    t = self.config.training
    lr = t.final_stage_lr if context.final else t.lr
    key = (steps, lr, step_rack.structure(), step_plan, jax.tree.structure(step_labels),
           tuple(jax.tree.leaves(step_labels)), tuple(jax.tree.leaves(shardings)))
    if key not in self._compiled:
      self._compiled[key] = (
          make_train_step(step_rack, step_plan, tx, step_labels,
                          shardings=(shardings, replicated(self.mesh))),
          make_eval_step(step_rack, step_plan))
    return self._compiled[key]

  def _compile_next(self, builder, context: StageContext, target, eval_examples,
                    after) -> None:
    """Starts compiling the next stage's train and eval steps and its trunk's forward on a
    background thread once the event `after` is set, while this stage trains
    (training.compile_ahead; ahead.py). Nothing where there is no next stage or it cannot be
    known."""
    if not ahead.wanted(self.config.training.compile_ahead, self.mesh.devices.flat[0].platform):
      return
    specs, config = stack_specs(builder.specs), builder.config
    evals = [{k: v for k, v in ex.items() if k != "h"} for ex in eval_examples[:1]]
    masking = builder.masking
    self._ahead.start(
        lambda: self._compile_stage(config, masking, target, context.number, specs, evals), after)

  def _compile_stage(self, config, masking, target, number, specs, eval_examples) -> None:
    """Compiles stage `number` + 1's programs from its abstract shapes: its rack as
    `next_stage_shapes` grows it after stage `number` (whose rack has `specs`), its state as
    `_setup` makes it, its examples as `_examples` makes them from this run's batches (with the
    run's `masking`)."""
    t = self.config.training
    found = next_stage_shapes(config, target, number, specs)
    if found is None:
      return
    scratch, new, frozen = found
    rack = scratch.build_rack()
    rack = dataclasses.replace(rack, params=ahead.abstract(
        rack.params, tree_shardings(self.mesh, rack.params, rack.axes())))
    context = StageContext(number + 1, new, is_final(new), rack, scratch.labels(),
                           plan_stage(rack, frozen, t.progressive.cache_activations))
    _, step_rack, step_plan, step_labels, tx, steps = self._step_parts(context)
    state = jax.eval_shape(lambda p: self._initial_state(context, p, tx, step_plan),
                           step_rack.params)
    shardings = tree_shardings(self.mesh, state, step_rack.axes())
    state = ahead.abstract(state, shardings)
    train_step, eval_step = self._step_fns(context, step_rack, step_plan, step_labels, tx, steps,
                                           shardings)
    salt = POOL_SALT if t.data_reuse == "pool" else number + 1
    example = ahead.compile(self._preparer(masking, context, salt), self._batch_shapes)
    evals = ahead.abstract(eval_examples[0]) if eval_examples else None
    if context.plan.cached:
      runner, prefix = caching.PrefixRunner(rack), context.plan.prefix
      dtype = caching.cache_dtype(rack, prefix)
      h = runner.compile(rack.params, prefix, example)
      h = jax.ShapeDtypeStruct(h.shape, dtype, sharding=h.sharding)
      entry_bytes = h.size // jax.process_count() * np.dtype(dtype).itemsize
      example = {**example, "h": h}
      if caching.device_budget(t.progressive.cache_device_bytes) < entry_bytes:
        # Entries in host memory come back as global batches (`_cached_example`).
        batch = NamedSharding(self.mesh, batch_spec())
        example = ahead.abstract(example, jax.tree.map(lambda _: batch, example))
      if evals is not None and _input_side_frozen(context.labels):
        h = runner.compile(rack.params, prefix, evals)
        evals = {**evals, "h": jax.ShapeDtypeStruct(h.shape, dtype, sharding=h.sharding)}
    ahead.compile(train_step, state, example)
    if evals is not None:
      ahead.compile(eval_step, state["params"], evals)

  def _preparer(self, masking, context: StageContext, salt: int):
    """A global batch -> the stage's training example (`TimeStepMasking.stage_example`), jitted
    once per distinct function: a stage calls the one compile-ahead compiled for it."""
    trains = tuple(context.trains)
    body = tuple(s for s in context.rack.specs if s.name in context.plan.body)
    key = (id(masking), trains, body, salt)   # the function holds `masking`: its id stays unique
    if key not in self._preparers:
      def prepare_example(batch):
        return masking.stage_example(batch, list(trains), list(body), salt)
      self._preparers[key] = jax.jit(prepare_example)
    return self._preparers[key]

  def _examples(self, builder, context: StageContext, data, eval_examples):
    """-> (step index -> example on the device, whether that is by index, eval examples) of the
    stage (masked as `TimeStepMasking.stage_example` says; the final stage
    as if every stack were new: each example trains the rack its stack trained on in its own
    stage, end to end).

    A cached stage reads its trunk activations from a cache, extended from the previous stage's
    where the trunk's input did not change (design §8), else built; eval examples likewise."""
    t, p = self.config.training, self.config.training.progressive
    masking = builder.masking
    pool = t.data_reuse == "pool"
    number, rack, labels, plan = context.number, context.rack, context.labels, context.plan
    salt = POOL_SALT if pool else number
    prepare = self._preparer(masking, context, salt)
    order = pool_order(t, number, stage_steps(self.config, context.final)) if pool else None
    if not plan.cached:
      self._drop_caches()
      if pool:
        return (lambda i: prepare(global_batch(self.mesh, self._pool[order[i]])), True,
                eval_examples)
      return lambda i: prepare(global_batch(self.mesh, next(data))), False, eval_examples
    inputs_fixed = pool and (not OBJECTIVES[p.training_objective].masks
                             or p.time_interpretation == "input")
    embedding_frozen = _input_side_frozen(labels)
    batches = (lambda: self._pool) if pool else (
        lambda: [next(data) for _ in range(t.steps_per_stack)])
    train = self._train_activations(
        rack, plan, number, lambda: [prepare(global_batch(self.mesh, b)) for b in batches()],
        extend=inputs_fixed and embedding_frozen)
    if embedding_frozen:   # eval examples never change: their activations extend in every mode
      evals = self._eval_activations(rack, plan, eval_examples)
      eval_examples = [{**ex, "h": h} for ex, h in zip(eval_examples, evals)]
    else:
      self._eval_cache = None
    entry = lambda j: self._cached_example(train, j)
    return ((lambda i: entry(order[i])) if pool else entry), True, eval_examples

  def _cached_example(self, store, j) -> dict:
    """Entry j of an activation cache as a global example with its activations "h"."""
    h, example = store.get(j)
    if store.on_device(j):
      return {**example, "h": h}
    return global_batch(self.mesh, {**example, "h": h})

  def _stored_form(self, store, j, tree):
    """`tree` (global arrays) as entry j of `store` keeps it: as it is where the entry is on the
    devices, else this host's share in host memory."""
    return tree if store.on_device(j) else jax.device_get(local_batch(self.mesh, tree))

  @staticmethod
  def _extends(kept, plan) -> bool:
    """Whether activations `kept` (prefix names, store) serve `plan`'s prefix as they are or
    with the stacks the prefix gained since (one a stage, or several: `stacks_per_stage`)."""
    return kept is not None and tuple(plan.prefix[:len(kept[0])]) == tuple(kept[0])

  def _train_activations(self, rack, plan, number, make_examples,
                         extend) -> caching.ActivationCache:
    """This host's share of the prefix activations of the stage's examples: with `extend`, the
    previous stage's cache extended by the stack added to the prefix since; else built from
    `make_examples()` (prepared, global)."""
    t = self.config.training
    runner, dtype = caching.PrefixRunner(rack), caching.cache_dtype(rack, plan.prefix)
    if extend and self._extends(self._train_cache, plan):
      names, store = self._train_cache
      if names != plan.prefix:
        self._tell("extend", "pool mode: the trunk's input is the same at every stage, so its "
                   "cached activations are extended by the stacks a stage adds, not recomputed")
        for j in range(len(store)):
          g = self._cached_example(store, j)
          h = _extended(runner, rack, plan.prefix, names, g["h"], g)
          store.put(j, self._stored_form(store, j, h), store.examples[j])   # same example
    else:
      examples = make_examples()
      if self._train_cache is not None:
        self._train_cache[1].close()
      if t.data_reuse == "pool":
        self._tell("rebuild", self._why_rebuilt())
      shape = (t.batch_size // jax.process_count(), t.seq_len, self.config.model.d_model)
      store = caching.ActivationCache(
          len(examples), shape, t.progressive.cache_max_bytes,
          f"{t.workdir}/cache" if t.workdir else None, dtype=dtype,
          device_bytes=caching.device_budget(t.progressive.cache_device_bytes))
      for j, ex in enumerate(tqdm(examples, desc=f"stage {number}: caching trunk activations",
                                  disable=not self.progress, dynamic_ncols=True, file=sys.stderr,
                                  leave=False)):
        h = runner.build(rack.params, plan.prefix, ex).astype(dtype)
        store.put(j, *self._stored_form(store, j, (h, ex)))
      if store.bytes_on_disk or store.bytes_on_device:
        self.log(f"stage {number}: activation cache {store.nbytes / 2**20:.1f} MiB: "
                 f"{store.bytes_on_device / 2**20:.1f} on the devices, "
                 f"{store.bytes_in_memory / 2**20:.1f} in host memory, "
                 f"{store.bytes_on_disk / 2**20:.1f} spilled to disk")
    self._train_cache = (plan.prefix, store)
    return store

  def _eval_activations(self, rack, plan, examples) -> list:
    """The prefix activations of the eval examples (global arrays): the previous stage's
    extended by the stacks added since, else built; rounded as the train cache stores them, so
    both ways give the same bits."""
    runner, dtype = caching.PrefixRunner(rack), caching.cache_dtype(rack, plan.prefix)
    if self._extends(self._eval_cache, plan):
      names, store = self._eval_cache
      if names != plan.prefix:
        store = [_extended(runner, rack, plan.prefix, names, h, ex)
                 for h, ex in zip(store, examples)]
    else:
      store = [runner.build(rack.params, plan.prefix, ex).astype(dtype) for ex in examples]
    self._eval_cache = (plan.prefix, store)
    return store

  def _why_rebuilt(self) -> str:
    p = self.config.training.progressive
    if OBJECTIVES[p.training_objective].masks and p.time_interpretation == "depth":
      return ("pool mode: the trunk's cached activations are rebuilt every stage, since with time "
              "as depth each stage masks its examples at its own time step")
    return ("pool mode: the trunk's cached activations are rebuilt this stage (the embedding "
            "trains, or the run resumed)")

  def _drop_caches(self) -> None:
    if self._train_cache is not None:
      self._train_cache[1].close()
    self._train_cache = self._eval_cache = None

  def _say_why_not_cached(self, builder, context: StageContext) -> None:
    p = self.config.training.progressive
    if p.cache_activations and not context.plan.cached and builder.trained:
      why = ("the final stage trains the whole rack" if context.final
             else "the trunk trains with the new stack (trunk_strategy='train')"
             if p.trunk_strategy == "train"
             else "prepend mode: the trunk follows the new stack" if builder.building_mode == "prepend"
             else "the trunk's adapters train, so cached trunk outputs would go stale")
      self._tell(why, f"cache_activations=True, but trunk activations are streamed ({why})")

  def _tell(self, reason: str, message: str) -> None:
    if reason not in self._told:
      self._told.add(reason)
      self.log(message)

  def _result(self, builder, stage: Stage, outcome: "LoopOutcome") -> dict:
    t, context = self.config.training, stage.context
    final, trains, eval_curve = context.final, context.trains, outcome.eval_curve
    last = None if final else context.new_specs[-1]   # the final stage adds no stack
    losses = [float(x) for x in outcome.losses]
    params = builder.params
    opt_names = stage.view.names if stage.view else {}
    counts = _param_counts(params, context.labels)
    return {
        "stage": context.number,
        "final": final,
        "stack_index": None if final else last.index,
        "new_stacks": [s.name for s in context.new_specs],
        "new_stack_init": self.config.training.progressive.new_stack_init,
        "init_from": {s.name: builder.init_sources.get(s.name) for s in context.new_specs},
        "stack_order": list(context.rack.order),
        "building_mode": builder.building_mode,
        "time_step": None if final else last.time_step,
        "time_steps": [s.time_step for s in trains],
        # The final stage draws one stack's time step per example (stage_example).
        "mask_ratio": (float(np.mean([builder.masking.mask_ratio_at(s.time_step) for s in trains]))
                       if final else builder.masking.mask_ratio_at(last.time_step)),
        "steps": stage.steps,
        "epochs": (stage.steps / t.steps_per_stack if final and t.data_reuse == "pool"
                   else t.epochs_per_stack),
        "tokens": stage.steps * t.batch_size * t.seq_len,
        "loss_start": losses[0],
        "loss_end": _finite_mean(losses[-min(10, len(losses)):]),
        "eval_loss": eval_curve[-1][1] if eval_curve else None,
        "eval_bits_per_byte": outcome.bits_per_byte,
        "trainable_params": counts["trainable"],
        "frozen_params": counts["frozen"],
        "lora_params": counts["lora"],
        "memory": stack_memory(context.rack.specs, params, stage.state["opt_state"], opt_names),
        "cache_bytes": self._train_cache[1].nbytes if context.plan.cached else 0,
        "cache_bytes_on_disk": self._train_cache[1].bytes_on_disk if context.plan.cached else 0,
        "cache_bytes_on_device": (self._train_cache[1].bytes_on_device if context.plan.cached
                                  else 0),
        "activation_mode": context.plan.activation_mode,
        "data_reuse": t.data_reuse,
        "skipped_steps": outcome.skipped,
        "peak_memory_bytes": _peak_device_memory(),
        "losses": losses,
        "eval_curve": eval_curve,
    }

  def _mixture(self, data, stage: Stage) -> dict:
    """A mixture's weights in `stage` (normalized) and the tokens each source gave its steps:
    the records the stage drew (fresh data: the iterator counts them, in its checkpointed
    state), or those of the pool batches its steps went over (pool)."""
    t, number = self.config.training, stage.context.number
    if t.data_reuse == "pool":
      records = sum(np.bincount(self._pool[j]["source"], minlength=len(data.names))
                    for j in pool_order(t, number, stage.steps))
      if jax.process_count() > 1:   # each host counted its share of every batch
        records = multihost_utils.process_allgather(records).sum(0)
    else:
      records = data.records_by_stage(number)
    return {"weights": dict(zip(data.names, map(float, data.weights_at(number)))),
            "tokens_by_source": {name: int(n) * t.seq_len for name, n in zip(data.names, records)}}

  def _metric(self, tag, value, step) -> None:
    if self.metrics is not None:
      self.metrics.scalar(tag, value, step)

  def _stop_if_asked(self, stage, step) -> None:
    if self._stop_signal is not None:
      raise TrainingInterrupted(f"stopped by {signal.Signals(self._stop_signal).name} at stage "
                                f"{stage}, step {step}: checkpoint saved in "
                                f"{self.checkpoints.directory}; run the same command to resume",
                                self._stop_signal)


def _extended(runner, rack, prefix, names, h, example):
  """Activations `h` of prefix `names` carried through the stacks `prefix` has after them, each
  output rounded to its cache dtype as `PrefixRunner.build` rounds it (the same bits)."""
  for k in range(len(names), len(prefix)):
    h = runner.extend(rack.params, prefix[k], h, example).astype(
        caching.cache_dtype(rack, prefix[:k + 1]))
  return h


def check_resumable(workdir: str, config) -> None:
  """Raises ConfigError if the newest checkpoint in `workdir` cannot go on under `config`:
  another config (`check_compatible`), or trained stacks it would move to other time steps
  (`check_time_steps_kept`). Reads only the checkpoints' meta items, so a command can refuse
  before it reads data or writes anything (a bpe:N tokenizer is trained into the workdir)."""
  directory = os.path.join(os.path.abspath(workdir), "checkpoints")
  if not os.path.isdir(directory):
    return
  verbosity = logging.get_verbosity()
  logging.set_verbosity(logging.ERROR)   # orbax warns that it opens them read-only
  try:
    step, meta = latest_meta(workdir)
  except ConfigError:   # none readable: RunCheckpoints moves them aside, or says what is wrong
    return
  finally:
    logging.set_verbosity(verbosity)
  check_compatible(meta, config, directory)
  check_time_steps_kept(meta["specs"], from_yaml(meta["config"]), config,
                        os.path.join(directory, str(step)))


def setting_warnings(config, dataloader) -> list[tuple[str, str]]:
  """(reason, one line) for each setting that trains otherwise than it reads: a warm-up longer
  than a stage (make_optimizer shortens it to the stage), worker processes for a mixture (which
  reads in this process), and an eval that needs more held-out records than the split has
  (`eval_batches` then cycles, repeating records)."""
  t, warnings, shorter = config.training, [], []
  if t.warmup_steps > stage_steps(config):
    shorter.append(f"a stage's {stage_steps(config)} steps (training.steps_per_stack"
                   f"{' × epochs_per_stack' if t.epochs_per_stack > 1 else ''})")
  if t.final_stage and t.warmup_steps > t.final_stage_steps:
    shorter.append(f"the final stage's {t.final_stage_steps} steps (training.final_stage_steps)")
  if shorter:
    warnings.append(("warmup", f"training.warmup_steps={t.warmup_steps} is larger than "
                               f"{' and '.join(shorter)}: the warm-up is cut to the stage, "
                               "reaching the peak lr at its last step"))
  if config.data.mixture and config.data.num_workers > 0:
    warnings.append(("num_workers", f"data.num_workers={config.data.num_workers} is not used "
                                    "with data.mixture: its batches are gathered in this process "
                                    "from records packed ahead (thousands of times faster than "
                                    "a step, BUILD_NOTES *data*)"))
  records = getattr(dataloader, "num_val_records", None)   # None: no held-out split of its own
  needed = t.eval_batches * t.batch_size
  if records is not None and records < needed:
    warnings.append(("eval split", f"the held-out split has {records} records of "
                                   f"training.seq_len={t.seq_len} tokens, fewer than one eval "
                                   f"reads (training.eval_batches={t.eval_batches} × "
                                   f"batch_size={t.batch_size} = {needed}): eval repeats records "
                                   "(more data or a larger data.val_fraction gives it more)"))
  return warnings


def pool_order(training, stage: int, steps: int | None = None) -> np.ndarray:
  """Pool mode: the pool indices of a stage's `steps` steps (default: epochs_per_stack epochs),
  epoch after epoch, each epoch a permutation drawn from (seed, stage, epoch); a last epoch
  cut short where `steps` ends mid-way."""
  n = training.steps_per_stack
  steps = n * training.epochs_per_stack if steps is None else steps
  return np.concatenate([np.random.default_rng([training.seed, stage, epoch]).permutation(n)
                         for epoch in range(-(-steps // n))])[:steps]


def _input_side_frozen(labels) -> bool:
  """Whether the token/time embedding is frozen: then the trunk's input is fixed."""
  eh = labels["embed_head"]
  return all(label == FROZEN for key, sub in eh.items() if key not in HEAD_SIDE
             for label in jax.tree.leaves(sub))


class TrainingInterrupted(Exception):
  """SIGINT/SIGTERM stopped a run after it saved a checkpoint. args: (message, signal number)."""


@contextlib.contextmanager
def _saving_on_signals(trainer, enabled: bool):
  """While training with checkpoints, SIGINT/SIGTERM ask the trainer to save and stop after the
  current step instead of killing it (a second signal acts as usual)."""
  if not enabled or threading.current_thread() is not threading.main_thread():
    yield
    return
  previous = {sig: signal.getsignal(sig) for sig in (signal.SIGINT, signal.SIGTERM)}

  def ask_to_stop(signum, frame):
    trainer._stop_signal = signum
    for sig, handler in previous.items():
      signal.signal(sig, handler)

  for sig in previous:
    signal.signal(sig, ask_to_stop)
  try:
    yield
  finally:
    for sig, handler in previous.items():
      signal.signal(sig, handler)


def _param_counts(params, labels) -> dict:
  """Trainable and frozen params (they add up to all params); `lora`: those in adapters."""
  counts = {"trainable": 0, "frozen": 0, "lora": 0}
  leaves = jax.tree_util.tree_leaves_with_path(params)
  for (path, x), label in zip(leaves, jax.tree.leaves(labels)):
    counts["frozen" if label == FROZEN else "trainable"] += x.size
    counts["lora"] += x.size if is_adapter_path(path) else 0
  return counts


def stack_memory(specs, params, opt_state, names: dict | None = None) -> dict:
  """Per stack: bytes of base weights (int4 as packed half bytes, nvfp4 as stored packed),
  adapters and optimizer state.

  Optimizer state is attributed by path: every state leaf under `stacks/<name>` (Adam's mu and nu
  of that stack's trainable leaves; frozen leaves have none). `names` maps the stack keys of a
  cached step's optimizer state (StepView) to the rack's stack names.
  """
  names = names or {}
  report = {s.name: {"precision": s.precision, "quantized": s.quantized, "packed": s.packed,
                     "base_bytes": 0,
                     "adapter_bytes": 0, "optimizer_bytes": 0} for s in specs}
  for path, x in jax.tree_util.tree_leaves_with_path(params["stacks"]):
    keys = plain_keys(path)
    report[keys[0]]["adapter_bytes" if is_adapter_path(keys) else "base_bytes"] += leaf_bytes(x)
  for path, x in jax.tree_util.tree_leaves_with_path(opt_state):
    keys = plain_keys(path)
    if "stacks" in keys[:-1]:
      name = keys[keys.index("stacks") + 1]
      name = names.get(name, name)
      if name in report:
        report[name]["optimizer_bytes"] += leaf_bytes(x)
  return report


def _finite_mean(values) -> float | None:
  finite = [x for x in values if math.isfinite(x)]
  return float(np.mean(finite)) if finite else None


def _peak_device_memory() -> int | None:
  stats = jax.local_devices()[0].memory_stats() or {}
  return stats.get("peak_bytes_in_use")
