"""Command line: `stackwise-jax train --config configs/tiny.py [--config.a.b=v ...] --workdir DIR`,
`stackwise-jax eval --workdir DIR [--tasks T1,T2 --limit N]`,
`stackwise-jax sample --workdir DIR --prompt TEXT`,
`stackwise-jax export --workdir DIR --format safetensors|npz`,
`stackwise-jax prepare --config configs/tiny.py [--config.a.b=v ...] --out DIR`."""
import argparse
import contextlib
import gc
import os
import sys
import time

from stackwise_jax.config import check_saveable, load_config, to_yaml
from stackwise_jax.errors import ConfigError
from stackwise_jax.files import WorkdirBusy, describe_file_error, file_error

_OVERRIDE_PREFIX = "--config."


class _ArgumentParser(argparse.ArgumentParser):
  def error(self, message):   # one clear line and status 2, no usage dump
    print(f"stackwise-jax: error: {message}", file=sys.stderr)
    sys.exit(2)


def _parser() -> argparse.ArgumentParser:
  parser = _ArgumentParser(prog="stackwise-jax", description=__doc__)
  commands = parser.add_subparsers(dest="command", required=True, parser_class=_ArgumentParser)
  train = commands.add_parser("train", help="progressive training run")
  train.add_argument("--config", required=True, help="configs/*.py or an upstream YAML file")
  train.add_argument("--workdir", required=True, help="directory for results.json and the config")
  train.add_argument("--no-progress", action="store_true", help="no progress bars")
  train.add_argument("--distributed", action="store_true",
                     help="multi-host: call jax.distributed.initialize() first (or set "
                          "STACKWISE_DISTRIBUTED=1); a cluster JAX detects (SLURM, Open MPI, "
                          "TPU pod) needs nothing more")
  train.add_argument("--coordinator", metavar="HOST:PORT",
                     help="with --distributed where JAX detects no cluster: process 0's address "
                          "(also --num-processes, --process-id)")
  train.add_argument("--num-processes", type=int)
  train.add_argument("--process-id", type=int)
  train.add_argument("--fresh", action="store_true",
                     help="start over: move the workdir's checkpoints aside instead of resuming")
  evaluate = commands.add_parser("eval", help="loss, perplexity, accuracy, bits per byte of each "
                                                 "stage's rack")
  evaluate.add_argument("--workdir", required=True, help="a train command's workdir")
  evaluate.add_argument("--batches", type=int, help="eval batches (default: the run's)")
  evaluate.add_argument("--tasks", help="run lm-evaluation-harness instead (the hf extra): "
                                        "comma-separated task names, task YAML files or "
                                        "directories of them; results in WORKDIR/lm_eval.json")
  evaluate.add_argument("--limit", type=int, help="with --tasks: examples per task (default: all)")
  evaluate.add_argument("--num-fewshot", type=int,
                        help="with --tasks: few-shot examples (default: each task's own)")
  evaluate.add_argument("--step", type=int,
                        help="checkpoint step: the racks up to it (with --tasks: its rack; "
                             "default: the latest)")
  sample = commands.add_parser("sample", help="generate or fill masks with a trained rack")
  sample.add_argument("--workdir", required=True, help="a train command's workdir")
  sample.add_argument("--prompt", help="text to continue (masked racks: unmask what follows it)")
  sample.add_argument("--infill", help="masked racks: text with [MASK] (one byte) or [MASK:n] "
                                       "(n bytes) to fill, e.g. 'The [MASK:3] sat'")
  sample.add_argument("--max-new-tokens", type=int, default=64, help="bytes after --prompt")
  sample.add_argument("--steps", type=int, default=8,
                      help="unmasking steps, t from 1 to 0 (masked racks with time as input)")
  sample.add_argument("--temperature", type=float, default=0.0, help="0 = greedy")
  sample.add_argument("--top-k", type=int, default=0, help="draw from the k likeliest (0: all)")
  sample.add_argument("--seed", type=int, default=0)
  sample.add_argument("--num-samples", type=int, default=1)
  sample.add_argument("--step", type=int, help="checkpoint step (default: the latest)")
  plot = commands.add_parser("plot", help="PNG plots of a run (loss, eval by depth, cost)")
  plot.add_argument("--workdir", required=True, help="a train command's workdir")
  plot.add_argument("--out", help="output directory (default: WORKDIR/plots)")
  prepare = commands.add_parser(
      "prepare", help="tokenize and pack the config's data once into ArrayRecord shards (train "
                      "from them with data.source=array_record, data.paths=(DIR,))")
  prepare.add_argument("--config", required=True, help="configs/*.py or a YAML file, as for train")
  prepare.add_argument("--out", required=True, help="directory for the shards and manifest.json")
  prepare.add_argument("--no-progress", action="store_true", help="no progress bars")
  export = commands.add_parser("export", help="write a trained rack's params and a manifest, or "
                                               "a Hugging Face Llama directory (--format hf)")
  export.add_argument("--workdir", required=True, help="a train command's workdir")
  export.add_argument("--format", required=True, choices=("safetensors", "npz", "hf"))
  export.add_argument("--out", help="output directory (default: WORKDIR/export)")
  export.add_argument("--dtype", default="float32", choices=("float32", "bfloat16"),
                      help="--format hf: the weights' dtype")
  export.add_argument("--step", type=int, help="checkpoint step (default: the latest)")
  return parser


def _split_overrides(argv):
  """Separates `--config.a.b=v` / `--config.a.b v` from the other arguments."""
  rest, overrides = [], []
  i = 0
  while i < len(argv):
    arg = argv[i]
    if arg.startswith(_OVERRIDE_PREFIX):
      body = arg[len(_OVERRIDE_PREFIX):]
      if "=" not in body:
        if i + 1 >= len(argv):
          raise ConfigError(f"{arg}: missing value (use {arg}=VALUE)")
        body, i = f"{body}={argv[i + 1]}", i + 1
      overrides.append(body)
    else:
      rest.append(arg)
    i += 1
  return rest, overrides


def _prepare_train(args, overrides, cleanup):
  """Everything that can fail on bad input, before any model is built and before the workdir is
  touched: the config, the data, the workdir's lock and checkpoints (another config's are
  refused). Returns the run. `cleanup` (an ExitStack) releases the lock when the command ends;
  the kernel releases it if the process dies."""
  import jax
  from stackwise_jax.checkpoint import RunCheckpoints
  from stackwise_jax.data import make_dataloader
  from stackwise_jax.files import WorkdirLock
  from stackwise_jax.metrics import check_wandb
  from stackwise_jax.progressive import TimeStepMasking
  from stackwise_jax.progressive.masking import check_objective_data
  from stackwise_jax.sharding import make_mesh
  from stackwise_jax import xla_cache
  config = load_config(args.config, overrides)
  config.training.workdir = args.workdir
  check_wandb(config)   # logging.wandb without the extra: one line, before any work
  xla_cache.enable(config)   # process-wide, before anything compiles (JAX checks it once)
  TimeStepMasking(config)   # a custom time mapping must be registered (e.g. by the config file)
  check_saveable(config)    # the run saves its config and checkpoints
  # Before anything starts JAX's backend (orbax's manager below asks for the process index).
  if args.distributed or os.environ.get("STACKWISE_DISTRIBUTED") == "1":
    _initialize_distributed(args)
  if not args.fresh:   # before the data is read: a bpe:N tokenizer is trained into the workdir
    from stackwise_jax.progressive.trainer import check_resumable
    check_resumable(args.workdir, config)
  make_mesh(config)   # mesh sizes and batch size against the devices there are
  # Each host reads its own share of every batch; bad data paths fail here.
  dataloader = make_dataloader(config, jax.process_index(), jax.process_count())
  check_objective_data(config.training.progressive.training_objective,
                       dataloader.eval_batches(1)[0])
  results_path = os.path.join(args.workdir, "results.json")
  log = lambda msg: print(msg, file=sys.stderr, flush=True)
  if os.path.exists(results_path) and not args.fresh and not os.path.isdir(
      os.path.join(args.workdir, "checkpoints")):
    raise ConfigError(f"--workdir {args.workdir} holds results.json but no checkpoint to resume; "
                      "pass --fresh to start over there, or choose another --workdir")
  if jax.process_index() == 0:   # one writer per workdir (a flock is local to one machine)
    os.makedirs(args.workdir, exist_ok=True)
    cleanup.callback(WorkdirLock(args.workdir).acquire().release)
  checkpoints = RunCheckpoints(args.workdir, config, fresh=args.fresh, log=log)
  latest = checkpoints.latest
  if (latest is not None and latest.stage_done
      and len(latest.meta["specs"]) == config.training.progressive.target_stacks
      and latest.final == config.training.final_stage):
    checkpoints.close()
    return lambda: _show_finished(args.workdir, latest.meta["results"])
  return lambda: _train(config, dataloader, checkpoints, args)


def _initialize_distributed(args):
  import jax
  explicit = (args.coordinator, args.num_processes, args.process_id)
  if any(x is not None for x in explicit) and None in explicit:
    raise ConfigError("--coordinator, --num-processes and --process-id: allowed: all three or "
                      "none (none: JAX reads them from the cluster's environment)")
  if args.num_processes is not None and not 0 <= args.process_id < args.num_processes:
    raise ConfigError(f"--process-id={args.process_id}: allowed: 0 to --num-processes - 1 "
                      f"({args.num_processes - 1})")
  jax.distributed.initialize(*explicit)


def _show_finished(workdir, results) -> int:
  """A finished run's summary; a missing or damaged results.json is written again from the
  newest checkpoint's results (train is the one command that writes into a run)."""
  from stackwise_jax.report import read_results, summary_table, write_json
  print(f"{workdir} already holds this finished run; nothing to train. Its summary:", file=sys.stderr)
  path = os.path.join(workdir, "results.json")
  if read_results(path)[0] is None:
    write_json(path, results)
    print(f"{path} was missing or damaged: written again from the checkpoints", file=sys.stderr)
  print(summary_table(results))
  return 0


def _train(config, dataloader, checkpoints, args) -> int:
  import jax
  from stackwise_jax.progressive import (ProgressiveRackBuilder, ProgressiveTrainer,
                                         TrainingDiverged, TrainingInterrupted)
  from stackwise_jax.metrics import Metrics, TensorBoard, WandB, wandb_wanted
  from stackwise_jax.report import seconds_outside_stages, summary_table, write_json
  primary = jax.process_index() == 0   # on several hosts one of them writes the shared files
  # A resumed run's earlier stages ran in earlier processes: this one's wall time holds the rest.
  done_before = (len(checkpoints.latest.meta["results"]["stages"])
                 if checkpoints.latest is not None else 0)
  if primary:
    with open(os.path.join(args.workdir, "config.yaml"), "w") as f:
      f.write(to_yaml(config))
  print(dataloader.describe(), file=sys.stderr)
  builder = ProgressiveRackBuilder(config)
  metrics = wandb_run = None
  if primary:   # only process 0 logs
    latest = checkpoints.latest
    try:
      wandb_run = (WandB(config, args.workdir, resumed=latest is not None,
                     stages=latest.meta["results"]["stages"] if latest is not None else ())
               if wandb_wanted(config) else None)
    except ConfigError as e:   # W&B did not start
      checkpoints.close()
      print(f"stackwise-jax: error: {e}", file=sys.stderr)
      return 2
    tensorboard = TensorBoard(os.path.join(args.workdir, "tensorboard"))
    metrics = Metrics([tensorboard, *([wandb_run] if wandb_run else [])])
  trainer = ProgressiveTrainer(config, checkpoints=checkpoints, metrics=metrics,
                               progress=not args.no_progress and primary)
  trained = False
  try:
    results = trainer.train_progressively(builder, dataloader)
    trained = True
  except TrainingInterrupted as e:
    message, signum = e.args
    print(f"stackwise-jax: {message}", file=sys.stderr)
    return 128 + signum
  except TrainingDiverged as e:
    print(f"stackwise-jax: error: {e}", file=sys.stderr)
    return 3
  except ConfigError as e:   # a checkpoint whose rack this config does not build
    print(f"stackwise-jax: error: {e}", file=sys.stderr)
    return 2
  finally:
    checkpoints.close()
    if metrics is not None and not trained:
      # A full disk that stopped training fails the events' last flush too: the first error,
      # which names the file, is the one to report.
      with contextlib.suppress(OSError):
        metrics.close()
  if primary:
    from stackwise_jax.plots import plot_run   # matplotlib: imported after training, not before it
    results_path = os.path.join(args.workdir, "results.json")
    outside = lambda: seconds_outside_stages(results["stages"][done_before:], args.started)
    try:
      results["seconds_outside_stages"] = outside()
      write_json(results_path, results)   # before the plots: a failing plot leaves the results
      plots = plot_run(results, os.path.join(args.workdir, "plots"))
      results["seconds_outside_stages"] = outside()   # the plots' time too
      write_json(results_path, results)
      print(summary_table(results))
      print(f"results: {results_path}")
      if wandb_run is not None:   # after the plots, which it logs as images
        wandb_run.end(results, plots)
    except BaseException:
      with contextlib.suppress(OSError):   # the first error is the one to report
        metrics.close()
      raise
    metrics.close()
    print(f"plots: {', '.join(plots)}; TensorBoard: tensorboard --logdir {tensorboard.logdir}")
  return 0


def _prepare_eval(args):
  """The run's checkpoints and held-out data, the number of batches there are, and a writable
  workdir for eval.json. With --tasks: lm-evaluation-harness instead (`_prepare_harness`)."""
  from stackwise_jax.checkpoint import open_run
  from stackwise_jax.data import make_dataloader
  from stackwise_jax.data.tokenizer import load_tokenizer
  from stackwise_jax.files import check_writable
  if args.tasks is not None:
    return _prepare_harness(args)
  harness_only = {"--limit": args.limit, "--num-fewshot": args.num_fewshot}
  for flag, value in harness_only.items():
    if value is not None:
      raise ConfigError(f"{flag}={value}: allowed only with --tasks (the loss table evaluates "
                        "every stage's rack)")
  if args.batches is not None and args.batches <= 0:
    raise ConfigError(f"--batches={args.batches}: allowed: a positive number of batches")
  # Read-only: a workdir without a readable checkpoint, or a damaged newest one, fails here.
  checkpoints = open_run(args.workdir, args.step)
  check_writable(args.workdir)
  config = checkpoints.config
  config.training.workdir = args.workdir   # a trained BPE is read from there, never trained
  load_tokenizer(config)
  dataloader = make_dataloader(config)
  available = max(dataloader.num_val_records // config.training.batch_size, 1)
  if dataloader.num_val_records < config.training.batch_size:
    print(f"warning: the held-out split has {dataloader.num_val_records} records, fewer than one "
          f"batch of {config.training.batch_size}: eval repeats records", file=sys.stderr)
  batches = args.batches or config.training.eval_batches
  if batches > available:
    print(f"--batches={batches}: the held-out split has {available} batches of "
          f"{config.training.batch_size}; evaluating those {available}", file=sys.stderr)
    batches = available
  return lambda: _eval(args, checkpoints, dataloader, batches)


def _eval(args, checkpoints, dataloader, batches) -> int:
  from stackwise_jax.progressive.evaluate import evaluate_run
  from stackwise_jax.report import eval_table, write_json
  try:
    rows = evaluate_run(checkpoints, batches, dataloader, progress=True)
  finally:
    checkpoints.close()
  path = os.path.join(args.workdir, "eval.json")
  write_json(path, {"racks": rows})
  print(eval_table(rows))
  print(f"eval: {path}")
  return 0


def _prepare_harness(args):
  """`eval --tasks`: the options, the run's objective (causal racks only), a writable workdir
  for lm_eval.json, and the tasks with their data, all checked before the rack is built."""
  from stackwise_jax.checkpoint import open_run
  from stackwise_jax.data.tokenizer import load_tokenizer
  from stackwise_jax.files import check_writable
  if args.batches is not None:
    raise ConfigError(f"--batches={args.batches}: the loss table's option; with --tasks, --limit "
                      "sets the examples per task")
  if args.limit is not None and args.limit < 1:
    raise ConfigError(f"--limit={args.limit}: allowed: a positive number of examples per task")
  if args.num_fewshot is not None and args.num_fewshot < 0:
    raise ConfigError(f"--num-fewshot={args.num_fewshot}: allowed: 0 or more examples")
  try:
    import lm_eval.evaluator  # noqa: F401 (lm-eval and what it needs, e.g. datasets)
    import lm_eval.tasks  # noqa: F401
  except ImportError as e:
    raise ConfigError("--tasks needs the hf extra: pip install -e '.[hf]'") from e
  from stackwise_jax.hf import harness
  checkpoints = open_run(args.workdir, args.step)
  try:
    config, ckpt = checkpoints.config, checkpoints.latest
    harness.check_causal(config)
    check_writable(args.workdir)
    config.training.workdir = args.workdir   # a trained BPE is read from there
    tokenizer = load_tokenizer(config)
    manager, tasks, names = harness.load_tasks(args.tasks)
  finally:
    checkpoints.close()
  return lambda: _harness(args, config, ckpt, tokenizer, (manager, tasks, names))


def _harness(args, config, ckpt, tokenizer, tasks) -> int:
  from stackwise_jax.hf.harness import RackLM, run_tasks, table
  from stackwise_jax.progressive.stages import rack_from_checkpoint
  from stackwise_jax.report import write_json
  manager, tasks, names = tasks
  lm = RackLM(rack_from_checkpoint(config, ckpt), tokenizer, config.training.batch_size)
  out = run_tasks(lm, manager, tasks, limit=args.limit, num_fewshot=args.num_fewshot)
  path = os.path.join(args.workdir, "lm_eval.json")
  run = {"tasks": names, "limit": args.limit, "num_fewshot": args.num_fewshot, "step": ckpt.step,
         "stage": ckpt.meta["stage"], "batch_size": config.training.batch_size}
  write_json(path, {"results": out["results"], **({"groups": out["groups"]} if out.get("groups")
                                                   else {}), "config": run})
  print(table(out))
  print(f"lm_eval: {path}")
  return 0


def _prepare_sample(args):
  """Loads the rack, then checks the options against it before anything is generated."""
  from stackwise_jax.checkpoint import open_run
  from stackwise_jax.data.tokenizer import load_tokenizer
  from stackwise_jax.progressive.stages import rack_from_checkpoint
  from stackwise_jax.sample import prompt_batch
  checkpoints = open_run(args.workdir, args.step)
  checkpoints.close()
  ckpt, config = checkpoints.latest, checkpoints.config
  config.training.workdir = args.workdir   # a trained BPE is read from there
  tokenizer = load_tokenizer(config)
  options = dict(temperature=args.temperature, top_k=args.top_k, seed=args.seed, steps=args.steps)
  batch = prompt_batch(config, prompt=args.prompt, infill=args.infill, tokenizer=tokenizer,
                       max_new_tokens=args.max_new_tokens, num_samples=args.num_samples, **options)
  rack = rack_from_checkpoint(config, ckpt)
  return lambda: _sample(rack, batch, args.max_new_tokens, options, tokenizer.decode)


def _sample(rack, batch, max_new_tokens, options, decode) -> int:
  from stackwise_jax.sample import complete
  rows = complete(rack, batch, max_new_tokens, **options)
  for i, row in enumerate(rows):
    if len(rows) > 1:   # samples may hold newlines of their own
      print(f"--- sample {i + 1} ---")
    print(decode(row))
  return 0


def _prepare_plot(args):
  """The results of a finished run (results.json) or, for one still going or cut off (or whose
  results.json is damaged, with a warning), of its latest checkpoint."""
  from stackwise_jax.checkpoint import latest_meta
  from stackwise_jax.files import check_writable
  from stackwise_jax.report import read_results
  path = os.path.join(args.workdir, "results.json")
  results, why = read_results(path)
  if results is None:
    _, meta = latest_meta(args.workdir)   # neither: fails here, naming the workdir
    results = meta["results"]
    if why:
      print(f"warning: {path} is damaged ({why}); plotting the newest checkpoint's results "
            "(train on the finished run rewrites the file from them)", file=sys.stderr)
  if not results["stages"]:
    raise ConfigError(f"--workdir {args.workdir}: no stage has finished yet; nothing to plot")
  out = args.out or os.path.join(args.workdir, "plots")
  check_writable(out)
  return lambda: _plot(results, out)


def _plot(results, out) -> int:
  from stackwise_jax.plots import plot_run
  print(f"plots: {', '.join(plot_run(results, out))}")
  return 0


def _prepare_export(args):
  """Reads the workdir's checkpoint (refusing a missing or unreadable one) and checks that the
  format can hold its rack; returns the export."""
  from stackwise_jax.checkpoint import open_run
  from stackwise_jax.data.tokenizer import load_tokenizer
  from stackwise_jax.files import check_writable
  checkpoints = open_run(args.workdir, args.step)
  checkpoints.close()
  ckpt, config = checkpoints.latest, checkpoints.config
  if args.format == "hf":
    from stackwise_jax.hf.llama import check_exportable
    check_exportable(config)
  out = args.out or os.path.join(args.workdir, "export")
  check_writable(out)
  config.training.workdir = args.workdir   # a trained BPE is read from there
  tokenizer = load_tokenizer(config)
  return lambda: _export(args, config, ckpt, out, tokenizer)


def _export(args, config, ckpt, out, tokenizer) -> int:
  from stackwise_jax.progressive.stages import rack_from_checkpoint
  rack = rack_from_checkpoint(config, ckpt)
  if args.format == "hf":
    from stackwise_jax.hf.llama import export_hf
    record = {"workdir": os.path.abspath(args.workdir), "step": ckpt.step,
              "checkpoint": os.path.abspath(ckpt.path), "stage": ckpt.meta["stage"]}
    files = export_hf(rack, out, tokenizer=tokenizer, dtype=args.dtype, record=record)
    names = ", ".join(map(os.path.basename, files))
    print(f"exported: {out} (Hugging Face Llama: config.json, {names}, tokenizer)")
    return 0
  from stackwise_jax.export import export_rack
  path = export_rack(rack, ckpt.meta["stage"], out, args.format, tokenizer)
  print(f"exported: {path} and {os.path.join(out, 'manifest.json')}")
  return 0


def _prepare_prepare(args, overrides):
  """The config, checked, and a writable --out; the corpus is read when the command runs."""
  from stackwise_jax.files import check_writable
  config = load_config(args.config, overrides)
  if not args.out.strip():
    raise ConfigError(f"--out {args.out!r}: allowed: a directory path")
  check_writable(args.out)
  return lambda: _prepare_data(config, args)


def _prepare_data(config, args) -> int:
  from stackwise_jax.data.prepared import MANIFEST, prepare
  log = lambda msg: print(msg, file=sys.stderr, flush=True)
  try:
    manifest = prepare(config, args.out, progress=not args.no_progress, log=log)
  except ValueError as e:   # bad data found while reading it (ConfigError is a ValueError)
    if file_error(e) is not None:
      raise
    print(f"stackwise-jax: error: {e}", file=sys.stderr)
    return 2
  splits = manifest["splits"]
  skipped = "".join(f", skipped {n:,} {what} rows" for what, n in manifest["skipped"].items() if n)
  print(f"prepared: {args.out}: train {splits['train']['records']:,} records, val "
        f"{splits['val']['records']:,} records of {manifest['record_length']} tokens "
        f"(tokenizer {manifest['tokenizer']['name']}{skipped}); {os.path.join(args.out, MANIFEST)}")
  return 0


def main(argv=None, started=None) -> int:
  """`started`: the `time.perf_counter()` reading at which the process started (`entry` passes
  it), from which a train run's `seconds_outside_stages` counts; default: this call."""
  started = time.perf_counter() if started is None else started
  argv = sys.argv[1:] if argv is None else list(argv)
  with contextlib.ExitStack() as cleanup:   # e.g. the workdir lock of a train command
    try:
      rest, overrides = _split_overrides(argv)
      args = _parser().parse_args(rest)
      args.started = started
      if args.command != "prepare" and not args.workdir.strip():
        raise ConfigError(f"--workdir {args.workdir!r}: allowed: a directory path (an empty one "
                          "would write into the current directory)")
      if args.command not in ("train", "prepare") and overrides:
        raise ConfigError(f"{overrides[0]}: {args.command} takes no config overrides (the "
                          "workdir's config is used)")
      if args.command != "train":   # orbax warns that it opened the checkpoints read-only
        from absl import logging
        logging.set_verbosity(logging.ERROR)
      prepare = {"train": lambda: _prepare_train(args, overrides, cleanup),
                 "eval": lambda: _prepare_eval(args), "export": lambda: _prepare_export(args),
                 "sample": lambda: _prepare_sample(args), "plot": lambda: _prepare_plot(args),
                 "prepare": lambda: _prepare_prepare(args, overrides)}
      run = prepare[args.command]()
    except WorkdirBusy as e:
      print(f"stackwise-jax: error: {e}", file=sys.stderr)
      return 2
    except ValueError as e:   # ConfigError is a ValueError
      if file_error(e) is None:
        print(f"stackwise-jax: error: {e}", file=sys.stderr)
        return 2
      return _report_file_error(e)
    except Exception as e:
      return _report_file_error(e)
    try:
      return run()
    except Exception as e:
      return _report_file_error(e)


def _report_file_error(e: Exception) -> int:
  """A full disk, a read-only or forbidden path: one line and status 1. Anything else is a bug
  and keeps its traceback."""
  error = file_error(e)
  if error is None:
    raise e
  print(f"stackwise-jax: error: {describe_file_error(error)}", file=sys.stderr)
  return 1


def entry() -> None:
  """The console script. After a file error, background writer threads (orbax, TensorBoard) may
  still be failing: the process ends at once so they cannot print past the one-line message."""
  from stackwise_jax.host_memory import reuse_freed_host_memory
  from stackwise_jax.report import process_seconds
  reuse_freed_host_memory()   # before JAX starts its threads: they keep the heaps they first use
  age = process_seconds()   # interpreter start-up and imports included
  code = main(started=None if age is None else time.perf_counter() - age)
  # The interpreter's last collections would walk every object jax and flax made (~0.5 s at the
  # end of every command); refcounts still free what they free, atexit handlers still run.
  gc.freeze()
  if code == 1:
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)
  sys.exit(code)


if __name__ == "__main__":
  entry()
