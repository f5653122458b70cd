"""memory: peak host RSS (and device memory) per stage, one process per trunk strategy."""
import os
import resource

from stackwise_jax.config import load_config
from stackwise_jax.data import make_dataloader
from stackwise_jax.progressive import ProgressiveRackBuilder, ProgressiveTrainer

from bench.common import MODES, check_positive, in_subprocess

CONFIG = "configs/small.py"
SETTINGS = {"stages": 8, "steps": 6, "modes": ["cached", "qlora", "nvfp4"]}
QUICK = {"stages": 2, "steps": 3}


def rss_mib() -> float | None:
  """Resident set size now, MiB (Linux)."""
  if not os.path.exists("/proc/self/statm"):
    return None
  with open("/proc/self/statm") as f:
    return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def worker(config_path, overrides, stages, steps) -> list[dict]:
  """Grows one rack stage by stage with the real trainer; after each stage reads this process's
  peak RSS (ru_maxrss: the peak so far, so the process must be fresh) and the device's peak."""
  config = load_config(config_path, [*overrides, f"training.steps_per_stack={steps}",
                                     "training.eval_every=0", "training.eval_batches=1"])
  trainer = ProgressiveTrainer(config, progress=False, log=lambda _: None)
  builder, loader = ProgressiveRackBuilder(config), make_dataloader(config)
  rows = [{"stage": 0, "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
           "rss_mib": rss_mib()}]   # before training: jax, the corpus, the data pipeline
  for k in range(1, stages + 1):   # a call per stage, so we can measure between stages
    r = trainer.train_progressively(builder, loader, target_stacks=k)["stages"][-1]
    mib = lambda stacks, key: sum(m[key] for name, m in r["memory"].items() if stacks(name)) / 2**20
    trunk = lambda name: name not in r["new_stacks"]
    device = r["peak_memory_bytes"]
    rows.append({
        "stage": k, "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        "rss_mib": rss_mib(), "device_peak_mib": None if device is None else device / 2**20,
        "step_ms": 1000 * r["step_seconds"], "activation_mode": r["activation_mode"],
        "cache_mib": r["cache_bytes"] / 2**20, "trunk_base_mib": mib(trunk, "base_bytes"),
        "trunk_adapter_mib": mib(trunk, "adapter_bytes"),
        "trunk_optimizer_mib": mib(trunk, "optimizer_bytes"),
        "new_optimizer_mib": mib(lambda name: not trunk(name), "optimizer_bytes")})
  return rows


def run(args, s):
  rows = []
  for mode in s["modes"]:
    for row in in_subprocess("memory", {"config_path": args.config, "stages": s["stages"],
                                        "steps": s["steps"],
                                        "overrides": [*args.overrides, *MODES[mode]]}):
      rows.append({"trunk": mode, **row})
  check_positive([r for r in rows if r["stage"]], "step_ms", "peak_rss_mib")
  last = {mode: [r for r in rows if r["trunk"] == mode][-1] for mode in s["modes"]}
  summary = {f"{mode}_peak_rss_mib": r["peak_rss_mib"] for mode, r in last.items()}
  summary.update({f"{mode}_trunk_base_mib": r["trunk_base_mib"] for mode, r in last.items()})
  columns = [("trunk", "trunk", "{}"), ("stage", "stage", "{}"),
             ("peak RSS so far MiB", "peak_rss_mib", "{:.0f}"), ("RSS after MiB", "rss_mib", "{:.0f}"),
             ("device peak MiB", "device_peak_mib", "{:.0f}"), ("ms/step", "step_ms", "{:.1f}"),
             ("activations", "activation_mode", "{}"), ("cache MiB", "cache_mib", "{:.1f}"),
             ("trunk base MiB", "trunk_base_mib", "{:.2f}"),
             ("trunk adapters MiB", "trunk_adapter_mib", "{:.2f}"),
             ("trunk optimizer MiB", "trunk_optimizer_mib", "{:.2f}"),
             ("new stack optimizer MiB", "new_optimizer_mib", "{:.2f}")]
  return columns, rows, summary
