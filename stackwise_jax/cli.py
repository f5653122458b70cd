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


def train(args, overrides) -> int:
  # Imported here so that `--help` and argument errors answer without loading JAX.
  from stackwise_jax.data import make_dataloader
  from stackwise_jax.progressive import ProgressiveRackBuilder, ProgressiveTrainer
  from stackwise_jax.report import summary_table, write_json

  config = load_config(args.config, overrides)
  results_path = os.path.join(args.workdir, "results.json")
  if os.path.exists(results_path):
    raise ConfigError(f"--workdir {args.workdir} already holds a finished run ({results_path}); "
                      "choose another --workdir")
  config.training.workdir = args.workdir
  dataloader = make_dataloader(config)   # bad data paths fail here, before any model is built
  os.makedirs(args.workdir, exist_ok=True)
  with open(os.path.join(args.workdir, "config.yaml"), "w") as f:
    f.write(to_yaml(config))
  print(dataloader.describe(), file=sys.stderr)
  builder = ProgressiveRackBuilder(config)
  trainer = ProgressiveTrainer(config, progress=not args.no_progress)
  results = trainer.train_progressively(builder, dataloader)
  write_json(results_path, results)
  print(summary_table(results))
  print(f"results: {results_path}")
  return 0


def main(argv=None) -> int:
  argv = sys.argv[1:] if argv is None else list(argv)
  try:
    rest, overrides = _split_overrides(argv)
    args = _parser().parse_args(rest)
    return train(args, overrides)
  except (ConfigError, ValueError, FileNotFoundError) as e:
    print(f"stackwise-jax: error: {e}", file=sys.stderr)
    return 2


if __name__ == "__main__":
  sys.exit(main())
