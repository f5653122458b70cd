"""Shared by the benchmarks: the trunk modes, sanity checks, timing, the worker subprocess, and
the JSON and Markdown output."""
import datetime
import json
import os
import platform
import shlex
import statistics
import subprocess
import sys
import tempfile
import time

import jax

from bench import REPO

NOISY_SPREAD = 0.25     # (slowest - fastest) / median step time above which a row is flagged

# How each trunk strategy is set up, as config overrides (used by the stage steps and the trainer).
MODES = {
    "cached": ["training.progressive.trunk_strategy=frozen",
               "training.progressive.cache_activations=True"],
    "streamed": ["training.progressive.trunk_strategy=frozen",
                 "training.progressive.cache_activations=False"],
    "qlora": ["training.progressive.trunk_strategy=qlora", "training.progressive.qlora_enabled=True",
              "training.progressive.progressive_qlora=True"],
    "nvfp4": ["training.progressive.trunk_strategy=frozen",
              "training.progressive.new_stack_precision=nvfp4"],
    "end-to-end": ["training.progressive.enabled=False"],   # all stacks, one stage
}


# --- Output: JSON, Markdown, sanity. --------------------------------------------------------------


def fail(message: str):
  raise SystemExit(f"bench.py: implausible result: {message}")


def check_positive(rows, *keys) -> None:
  for row in rows:
    for key in keys:
      if row.get(key) is not None and not row[key] > 0:
        fail(f"{key}={row[key]} in {row}")


def machine() -> dict:
  cpu = platform.processor() or platform.machine()
  if os.path.exists("/proc/cpuinfo"):
    with open("/proc/cpuinfo") as f:
      cpu = next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), cpu)
  device = jax.devices()[0]
  return {"platform": platform.platform(), "cpu": cpu, "cpu_count": os.cpu_count(),
          "cores_used": len(os.sched_getaffinity(0)), "jax": jax.__version__,
          "backend": jax.default_backend(), "device_kind": device.device_kind,
          "device_count": jax.device_count()}


def markdown(columns, rows) -> str:
  """columns: (header, key, format) triples; a None value shows as '-'."""
  cell = lambda row, key, fmt: "-" if row.get(key) is None else fmt.format(row[key])
  lines = ["| " + " | ".join(h for h, _, _ in columns) + " |", "|" + "---|" * len(columns)]
  lines += ["| " + " | ".join(cell(r, k, f) for _, k, f in columns) + " |" for r in rows]
  return "\n".join(lines)


def write(args, settings, columns, rows, summary, load_start) -> None:
  """Writes args.out (JSON) and its .md twin, and prints the table under the command line."""
  command = "python " + " ".join(shlex.quote(a) for a in sys.argv)
  payload = {"benchmark": args.benchmark, "date": datetime.date.today().isoformat(),
             "machine": machine(), "command": command, "config": os.path.relpath(args.config, REPO),
             "overrides": args.overrides, "settings": settings,
             "load_average": [load_start, os.getloadavg()[0]], "rows": rows, "summary": summary}
  shown = lambda v: f"{v:.4g}" if isinstance(v, float) else json.dumps(v)
  m = payload["machine"]
  text = (f"`{command}`\n\n{payload['date']}, {m['cpu']} ({m['cores_used']} cores used), "
          f"jax {m['jax']} {m['backend']} ({m['device_kind']})\n\n{markdown(columns, rows)}\n\n"
          + "\n".join(f"- {k}: {shown(v)}" for k, v in summary.items()) + "\n")
  os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
  with open(args.out, "w") as f:
    json.dump(payload, f, indent=2)
  with open(os.path.splitext(args.out)[0] + ".md", "w") as f:
    f.write(text)
  print(f"$ {command}\n\n{text}\nwrote {args.out} and its .md")


def median_ms(times) -> float:
  return 1000 * statistics.median(times)


def spread(times) -> float:
  return (max(times) - min(times)) / statistics.median(times)


def flag_noise(rows) -> None:
  for row in rows:
    row["noisy"] = row["spread"] > NOISY_SPREAD
    if row["noisy"]:
      print(f"warning: step times spread {row['spread']:.0%} in {row}", file=sys.stderr)


# --- Timing, and workers in fresh processes. ------------------------------------------------------


def time_calls(fn, n: int) -> list[float]:
  """Calls fn() once to warm up, then n times; returns those n wall times in seconds."""
  fn()
  times = []
  for _ in range(n):
    start = time.perf_counter()
    fn()
    times.append(time.perf_counter() - start)
  return times


def in_subprocess(kind: str, params: dict, env: dict | None = None):
  """Runs `python scripts/bench.py --worker KIND OUT PARAMS` in a fresh process (its own peak RSS,
  its own XLA flags); returns the rows that benchmark's `worker(**PARAMS)` wrote to OUT."""
  with tempfile.TemporaryDirectory() as tmp:
    out = os.path.join(tmp, "rows.json")
    script = os.path.join(REPO, "scripts", "bench.py")
    subprocess.run([sys.executable, script, "--worker", kind, out, json.dumps(params)], check=True,
                   env={**os.environ, **(env or {})})
    with open(out) as f:
      return json.load(f)
