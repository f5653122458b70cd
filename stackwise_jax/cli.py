"""Command line: `stackwise-jax train --config configs/tiny.py [--config.a.b=v ...] --workdir DIR`."""
import argparse
import os
import sys

from stackwise_jax.config import ConfigError, load_config, to_yaml

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
                          "STACKWISE_DISTRIBUTED=1)")
  train.add_argument("--fresh", action="store_true",
                     help="start over: move the workdir's checkpoints aside instead of resuming")
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


def _prepare_train(args, overrides):
  """Everything that can fail on bad input, before any model is built: the config, the workdir's
  checkpoints (another config's are refused) and the data. Returns the run."""
  import jax
  from stackwise_jax.checkpoint import RunCheckpoints
  from stackwise_jax.data import make_dataloader
  from stackwise_jax.sharding import make_mesh
  config = load_config(args.config, overrides)
  config.training.workdir = args.workdir
  if args.distributed or os.environ.get("STACKWISE_DISTRIBUTED") == "1":
    jax.distributed.initialize()   # coordinator and process ids from the cluster's environment
  make_mesh(config)   # mesh sizes and batch size against the devices there are
  results_path = os.path.join(args.workdir, "results.json")
  log = lambda msg: print(msg, file=sys.stderr, flush=True)
  if os.path.exists(results_path) and not args.fresh and not os.path.isdir(
      os.path.join(args.workdir, "checkpoints")):
    raise ConfigError(f"--workdir {args.workdir} holds results.json but no checkpoint to resume; "
                      "pass --fresh to start over there, or choose another --workdir")
  checkpoints = RunCheckpoints(args.workdir, config, fresh=args.fresh, log=log)
  latest = checkpoints.latest
  if (latest is not None and latest.stage_done
      and len(latest.meta["specs"]) == config.training.progressive.target_stacks):
    checkpoints.close()
    return lambda: _show_finished(args.workdir, latest.meta["results"])
  # Each host reads its own share of every batch; bad data paths fail here.
  dataloader = make_dataloader(config, jax.process_index(), jax.process_count())
  return lambda: _train(config, dataloader, checkpoints, args)


def _show_finished(workdir, results) -> int:
  from stackwise_jax.report import summary_table
  print(f"{workdir} already holds this finished run; nothing to train. Its summary:", file=sys.stderr)
  print(summary_table(results))
  return 0


def _train(config, dataloader, checkpoints, args) -> int:
  import jax
  from stackwise_jax.progressive import ProgressiveRackBuilder, ProgressiveTrainer
  from stackwise_jax.progressive.trainer import TrainingInterrupted
  from stackwise_jax.report import summary_table, write_json
  with open(os.path.join(args.workdir, "config.yaml"), "w") as f:
    f.write(to_yaml(config))
  print(dataloader.describe(), file=sys.stderr)
  builder = ProgressiveRackBuilder(config)
  trainer = ProgressiveTrainer(config, checkpoints=checkpoints,
                               progress=not args.no_progress and jax.process_index() == 0)
  try:
    results = trainer.train_progressively(builder, dataloader)
  except TrainingInterrupted as e:
    message, signum = e.args
    print(f"stackwise-jax: {message}", file=sys.stderr)
    return 128 + signum
  except ConfigError as e:   # a checkpoint whose rack this config does not build
    print(f"stackwise-jax: error: {e}", file=sys.stderr)
    return 2
  finally:
    checkpoints.close()
  results_path = os.path.join(args.workdir, "results.json")
  write_json(results_path, results)
  print(summary_table(results))
  print(f"results: {results_path}")
  return 0


def main(argv=None) -> int:
  argv = sys.argv[1:] if argv is None else list(argv)
  try:
    rest, overrides = _split_overrides(argv)
    args = _parser().parse_args(rest)
    run = _prepare_train(args, overrides)
  except (ValueError, OSError) as e:   # ConfigError is a ValueError
    print(f"stackwise-jax: error: {e}", file=sys.stderr)
    return 2
  return run()


if __name__ == "__main__":
  sys.exit(main())
