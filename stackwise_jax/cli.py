"""Command line: `stackwise-jax train --config configs/tiny.py [--config.a.b=v ...] --workdir DIR`."""
import argparse
import json
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


def _flatten(d, prefix=""):
  out = {}
  for key, value in d.items():
    path = f"{prefix}{key}"
    out.update(_flatten(value, path + ".") if isinstance(value, dict) else {path: value})
  return out


def _check_workdir(workdir, config) -> dict | None:
  """Returns the results of a finished run with this same config; refuses a different one."""
  results_path = os.path.join(workdir, "results.json")
  if not os.path.exists(results_path):
    return None
  stored = _flatten(load_config(os.path.join(workdir, "config.yaml")).to_dict())
  wanted = _flatten(config.to_dict())
  diff = sorted(k for k in stored.keys() | wanted.keys() if stored.get(k) != wanted.get(k))
  if diff:
    raise ConfigError(f"--workdir {workdir} holds a finished run with another config ({diff[0]}: "
                      f"{stored.get(diff[0])!r} there, {wanted.get(diff[0])!r} now); "
                      "choose another --workdir")
  with open(results_path) as f:
    return json.load(f)


def _prepare_train(args, overrides):
  """Everything that can fail on bad input, before any model is built. Returns the run."""
  from stackwise_jax.data import make_dataloader

  config = load_config(args.config, overrides)
  config.training.workdir = args.workdir
  finished = _check_workdir(args.workdir, config)
  if finished is not None:
    return lambda: _show_finished(args.workdir, finished)
  dataloader = make_dataloader(config)   # bad data paths fail here
  return lambda: _train(config, dataloader, args)


def _show_finished(workdir, results) -> int:
  from stackwise_jax.report import summary_table
  print(f"{workdir} already holds this finished run; nothing to train. Its summary:", file=sys.stderr)
  print(summary_table(results))
  return 0


def _train(config, dataloader, args) -> int:
  from stackwise_jax.progressive import ProgressiveRackBuilder, ProgressiveTrainer
  from stackwise_jax.report import summary_table, write_json

  os.makedirs(args.workdir, exist_ok=True)
  with open(os.path.join(args.workdir, "config.yaml"), "w") as f:
    f.write(to_yaml(config))
  print(dataloader.describe(), file=sys.stderr)
  builder = ProgressiveRackBuilder(config)
  trainer = ProgressiveTrainer(config, progress=not args.no_progress)
  results = trainer.train_progressively(builder, dataloader)
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
