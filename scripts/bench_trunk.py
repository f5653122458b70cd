"""Trunk memory and step time, frozen vs qlora trunk, at several depths (QLoRA issue).

  python scripts/bench_trunk.py --config configs/small.py --depths 2 4 6 --steps 8 --out bench_results/bench_trunk.json

For each trunk strategy it grows one rack to the largest depth with the real trainer and reads,
at each requested depth, the stage's steady-state step time and its per-stack memory report
(`stages[*].memory`): the trunk's base weights (int4 counted packed), adapters and optimizer state.
Strategies: `frozen` (cached trunk, the default), `frozen-streamed` (recomputed every step) and
`qlora` (int4 trunk, stack LoRA + progressive adapters training, streamed).
"""
import sys

from bench_stages import bench_parser, run, save

STRATEGIES = {
    "frozen": ["training.progressive.trunk_strategy=frozen"],
    "frozen-streamed": ["training.progressive.trunk_strategy=frozen",
                        "training.progressive.cache_activations=False"],
    "qlora": ["training.progressive.trunk_strategy=qlora", "training.progressive.qlora_enabled=True",
              "training.progressive.progressive_qlora=True"],
}


def main():
  parser = bench_parser(__doc__, "bench_trunk.json")
  parser.add_argument("--depths", type=int, nargs="+", default=[2, 4, 6])
  parser.add_argument("--steps", type=int, default=8, help="train steps per stage (timed: steps-1)")
  parser.add_argument("--strategies", nargs="+", default=list(STRATEGIES), choices=list(STRATEGIES))
  args = parser.parse_args()

  rows = []
  for strategy in args.strategies:
    stages = run(args.config, max(args.depths), args.steps, None,
                 [*args.overrides, *STRATEGIES[strategy]])["stages"]
    for depth in args.depths:
      s = stages[depth - 1]
      trunk = [m for name, m in s["memory"].items() if name not in s["new_stacks"]]
      row = {"strategy": strategy, "depth": depth, "step_ms": 1000 * s["step_seconds"],
             "tokens_per_s": s["tokens_per_s"], "activation_mode": s["activation_mode"],
             **{f"trunk_{k}": sum(m[k] for m in trunk)
                for k in ("base_bytes", "adapter_bytes", "optimizer_bytes")}}
      if row["step_ms"] <= 0 or row["trunk_base_bytes"] <= 0:
        raise SystemExit(f"implausible measurement: {row}")
      rows.append(row)

  mib = lambda b: b / 2**20
  print(f"$ python {' '.join(sys.argv)}")
  print(f"{'trunk':>15}  {'depth':>5}  {'step ms':>8}  {'tokens/s':>9}  {'base MiB':>8}  "
        f"{'adapters MiB':>12}  {'optimizer MiB':>13}")
  for r in rows:
    print(f"{r['strategy']:>15}  {r['depth']:>5}  {r['step_ms']:>8.1f}  {r['tokens_per_s']:>9,.0f}  "
          f"{mib(r['trunk_base_bytes']):>8.2f}  {mib(r['trunk_adapter_bytes']):>12.2f}  "
          f"{mib(r['trunk_optimizer_bytes']):>13.2f}")
  save(args.out, {"rows": rows, "config": args.config, "steps_per_stage": args.steps})


if __name__ == "__main__":
  main()
