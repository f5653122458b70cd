"""Benchmarks: step time per stage, MFU, memory, progressive vs end-to-end, against PyTorch (issue 8),
plus the quantization error of the trunk formats and the bytes moved by collectives.

  python scripts/bench.py {depth,mfu,memory,quality,torch,quant,comm,job,data,reference,hf}
      [--quick]
      [--out FILE.json] [--config FILE] [--stages N] [--steps N] [--seeds S ...] [--depths K ...]
      [--methods M ...] [--lrs LR ...] [--corpus builtin|PATH_GLOB] [--size tiny|small]
      [config overrides]

Each sub-benchmark writes FILE.json ({"benchmark", "date", "machine", "command", "config",
"settings", "rows", "summary"}; default bench_results/NAME.json) and FILE.md (the same table in
Markdown), prints the table under its command line, and exits non-zero when its own numbers are
not sane: a time <= 0, or a model FLOP count more than FLOP_TOLERANCE away from XLA's count of
the step (`jax.jit(step).lower(...).cost_analysis()`). `--quick` runs each in under two minutes on 2 CPU cores
with fewer stages, steps and seeds (`settings` in the JSON says which). Benchmarks are scripts,
never timed tests.

This file parses the command line; the benchmarks are the package next to it, scripts/bench/ (a
module each, and the FLOP model in bench/flops.py).

Step times come from the train step the trainer builds (`plan_stage`, `make_train_step`) for
stage k of a rack grown the trainer's way (`progressive.stages.grow`), timed on a real batch: the
median of `steps` steps after one warm-up (compiling) step. Params are freshly
initialised; the time of a step does not depend on their values.
"""
import argparse
import json
import os
import sys

from stackwise_jax.host_memory import reuse_freed_host_memory

reuse_freed_host_memory()   # as the `stackwise_jax` command does, before JAX starts its threads

from bench import (REPO, comm, data, depth, hf, job, memory, mfu, pytorch, quality,  # noqa: E402
                   quant, reference)
from bench.common import MODES, write  # noqa: E402

BENCHMARKS = {"depth": depth, "mfu": mfu, "memory": memory, "quality": quality, "torch": pytorch,
              "quant": quant, "comm": comm, "job": job, "data": data, "reference": reference,
              "hf": hf}


def main():
  if sys.argv[1:2] == ["--worker"]:   # --worker KIND OUT PARAMS (see common.in_subprocess)
    kind, out, params = sys.argv[2:5]
    with open(out, "w") as f:
      json.dump(BENCHMARKS[kind].worker(**json.loads(params)), f)
    return
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("benchmark", choices=list(BENCHMARKS))
  parser.add_argument("--quick", action="store_true", help="under two minutes on 2 CPU cores")
  parser.add_argument("--out", help="JSON file (default bench_results/BENCHMARK.json); "
                                    "the Markdown table goes next to it as .md")
  parser.add_argument("--config", help="default: the sub-benchmark's (CONFIG in its module)")
  for name in ("stages", "steps", "devices", "files", "batches", "repeats"):
    parser.add_argument(f"--{name}", type=int)
  for name in ("seeds", "depths", "workers"):
    parser.add_argument(f"--{name}", type=int, nargs="+")
  parser.add_argument("--lrs", type=float, nargs="+", help="quality: the lrs each method is swept over")
  parser.add_argument("--corpus", help="quality: builtin, or a glob of plain text files")
  parser.add_argument("--size", help="quality: tiny or small (bench/quality.py SIZES)")
  parser.add_argument("--modes", nargs="+", choices=list(MODES))
  parser.add_argument("--methods", nargs="+", help="quality: e.g. end-to-end identity+final")
  parser.add_argument("--cells", nargs="+", metavar="NxSxE",
                      help="job: only these cells, e.g. 4x40x1 8x300x3 (stacks x steps x epochs)")
  parser.add_argument("overrides", nargs="*", help="config overrides, e.g. training.batch_size=8")
  # Overrides (KEY=VALUE) may stand anywhere, after a list option too (`--seeds 0 1 a.b=1`).
  argv = sys.argv[1:]
  overrides = [arg for arg in argv if "=" in arg and not arg.startswith("-")]
  args = parser.parse_args([arg for arg in argv if arg not in overrides])
  args.overrides = overrides

  benchmark = BENCHMARKS[args.benchmark]
  full = benchmark.SETTINGS
  settings = {**full, **(benchmark.QUICK if args.quick else {}), "quick": args.quick}
  if args.cells is not None:
    if args.benchmark != "job":
      parser.error(f"--cells applies to job only, not {args.benchmark}")
    try:
      args.grid = [[int(x) for x in cell.split("x")] for cell in args.cells]
    except ValueError:
      parser.error(f"--cells {' '.join(args.cells)}: allowed: cells like 4x40x1")
    if any(len(cell) != 3 or min(cell) < 1 for cell in args.grid):
      parser.error(f"--cells {' '.join(args.cells)}: allowed: three positive ints per cell")
  for name in ("stages", "steps", "devices", "files", "batches", "repeats", "seeds", "depths",
               "workers", "lrs", "corpus", "size", "modes", "methods", "grid"):
    value = getattr(args, name, None)
    if value is not None:
      if name not in full:
        parser.error(f"--{name} does not apply to {args.benchmark}; it takes {', '.join(full)}")
      settings[name] = value
  args.config = os.path.abspath(args.config or os.path.join(REPO, benchmark.CONFIG))
  args.out = args.out or os.path.join(REPO, "bench_results", f"{args.benchmark}.json")
  load_start = os.getloadavg()[0]
  columns, rows, summary = benchmark.run(args, settings)
  write(args, settings, columns, rows, summary, load_start)


if __name__ == "__main__":
  main()
