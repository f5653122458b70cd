"""hf: Hugging Face export and import of a whole rack, wall time and peak host RSS, each in a
fresh process (ru_maxrss is a process's peak so far).

For each config (`--config`, and `configs/gpu_1b.py` unless --quick): a rack grown the trainer's
way to target_stacks stacks (random params; frozen stacks stored in their compute dtype, as a
finished run holds them) is exported with `export --format hf`'s function in float32, then that
directory is imported with `ProgressiveRackBuilder.from_pretrained`. `seconds` times that call
alone (not the process start-up, imports or building the rack); the peak RSS is the process's.
"""
import os
import resource
import tempfile
import time

import jax

from stackwise_jax.config import load_config
from stackwise_jax.data.tokenizer import BYTES
from stackwise_jax.hf.llama import export_hf
from stackwise_jax.progressive import ProgressiveRackBuilder
from stackwise_jax.progressive.stages import grow
from stackwise_jax.trees import leaf_bytes

from bench import REPO
from bench.common import check_positive, in_subprocess

CONFIG = "configs/small.py"
SETTINGS = {"files": 2}            # configs: small.py, then gpu_1b.py
QUICK = {"files": 1}


def _peak_mib() -> float:
  return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def worker(config_path, action, directory) -> dict:
  config = load_config(config_path)
  if action == "export":
    builder = ProgressiveRackBuilder(config)
    grow(builder, config.training.progressive.target_stacks)
    rack = builder.build_rack()
    jax.block_until_ready(rack.params)
    params_mib = sum(leaf_bytes(x) for x in jax.tree.leaves(rack.params)) / 2**20
    before = _peak_mib()
    start = time.perf_counter()
    files = export_hf(rack, directory, tokenizer=BYTES, record={"benchmark": "hf"})
    seconds = time.perf_counter() - start
    written = sum(os.path.getsize(f) for f in files) / 2**20
    return {"params_mib": params_mib, "seconds": seconds, "peak_rss_mib": _peak_mib(),
            "peak_rss_before_mib": before, "written_mib": written, "files": len(files)}
  config.training.progressive.target_stacks = config.training.progressive.max_stacks
  before = _peak_mib()
  start = time.perf_counter()
  builder = ProgressiveRackBuilder.from_pretrained(directory, config)
  jax.block_until_ready(builder.params)
  seconds = time.perf_counter() - start
  params_mib = sum(leaf_bytes(x) for x in jax.tree.leaves(builder.params)) / 2**20
  return {"params_mib": params_mib, "seconds": seconds, "peak_rss_mib": _peak_mib(),
          "peak_rss_before_mib": before, "stacks": len(builder.specs)}


def run(args, s):
  configs = [args.config, os.path.join(REPO, "configs/gpu_1b.py")][:s["files"]]
  rows = []
  for path in configs:
    with tempfile.TemporaryDirectory() as directory:
      for action in ("export", "import"):
        row = in_subprocess("hf", {"config_path": path, "action": action,
                                   "directory": directory})
        rows.append({"config": os.path.relpath(path, REPO), "action": action, **row})
  check_positive(rows, "seconds", "peak_rss_mib")
  summary = {f"{r['config'].rsplit('/', 1)[-1][:-3]}_{r['action']}_seconds": r["seconds"]
             for r in rows}
  summary.update({f"{r['config'].rsplit('/', 1)[-1][:-3]}_{r['action']}_peak_rss_mib":
                  r["peak_rss_mib"] for r in rows})
  columns = [("config", "config", "{}"), ("action", "action", "{}"),
             ("rack params MiB", "params_mib", "{:.0f}"), ("seconds", "seconds", "{:.1f}"),
             ("peak RSS before MiB", "peak_rss_before_mib", "{:.0f}"),
             ("peak RSS MiB", "peak_rss_mib", "{:.0f}")]
  return columns, rows, summary
