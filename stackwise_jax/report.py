"""Turning `results` into what a person reads: the per-stage summary table and results.json."""
import json
import math
import os
import time

from stackwise_jax.quant import stack_format

# Where a stage's seconds go (results' `seconds_by_phase`): building its step (set-up, tracing,
# XLA compile, the first step), preparing examples and trunk activations, the other train steps,
# evaluation, checkpoints.
PHASES = ("compile", "cache", "train", "eval", "checkpoint")

# (header, results key, format)
_COLUMNS = (
    ("stage", "stage", "{}"),
    ("stack", "stack_index", "{}"),
    ("mode", "building_mode", "{}"),
    ("t", "time_step", "{}"),
    ("mask", "mask_ratio", "{:.2f}"),
    ("steps", "steps", "{}"),
    ("loss start", "loss_start", "{:.3f}"),
    ("loss end", "loss_end", "{:.3f}"),
    ("eval loss", "eval_loss", "{:.3f}"),
    ("bits/byte", "eval_bits_per_byte", "{:.3f}"),   # eval loss in bits per UTF-8 byte
    ("tokens/s", "tokens_per_s", "{:,.0f}"),
    ("seconds", "seconds", "{:.1f}"),
    ("compile", "compile", "{:.1f}"),   # the parts of `seconds` (seconds_by_phase)
    ("cache", "cache", "{:.1f}"),
    ("train", "train", "{:.1f}"),
    ("eval", "eval", "{:.1f}"),
    ("ckpt", "checkpoint", "{:.1f}"),
    ("trainable", "trainable_params", "{:,}"),
    ("frozen", "frozen_params", "{:,}"),
    ("lora", "lora_params", "{:,}"),
    ("cache MiB", "cache_bytes", None),
    ("activations", "activation_mode", "{}"),
)


# The final stage's row (`training.final_stage`): it adds no stack and trains them all.
_FINAL_CELLS = {"stage": "{} final", "stack_index": "all"}


def _cell(stage, key, fmt):
  if stage.get("final") and key in _FINAL_CELLS:
    return _FINAL_CELLS[key].format(stage[key])
  value = stage.get(key, stage.get("seconds_by_phase", {}).get(key))
  if value is None:
    return "-"
  if key == "cache_bytes":
    return f"{value / 2**20:.1f}"
  return fmt.format(value)


def _table(rows: list[list[str]]) -> list[str]:
  widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
  lines = ["  ".join(c.rjust(w) for c, w in zip(r, widths)) for r in rows]
  lines.insert(1, "  ".join("-" * w for w in widths))
  return lines


def _stored(memory: dict) -> str:
  """How a stack's kernels are stored, after its precision: " (int4)", " (packed)" or ""."""
  if memory["packed"]:
    return " (packed)"
  return f" ({stack_format(memory['precision'], True).name})" if memory["quantized"] else ""


def memory_table(memory: dict) -> list[str]:
  """One row per stack (a stage's `memory`): base weights, adapters, optimizer state in MiB."""
  mib = lambda b: f"{b / 2**20:.2f}"
  rows = [["stack", "precision", "base MiB", "adapters MiB", "optimizer MiB"]]
  rows += [[name, m["precision"] + _stored(m), mib(m["base_bytes"]), mib(m["adapter_bytes"]),
            mib(m["optimizer_bytes"])] for name, m in memory.items()]
  return _table(rows)


def summary_rows(stages: list[dict]) -> tuple[list[str], list[list[str]]]:
  """The summary table's headers and its row of cells for each of `stages` (results' stages);
  also the W&B `stages` table (metrics.py)."""
  columns = _COLUMNS
  if any(s.get("skipped_steps") for s in stages):   # training.nonfinite="skip"
    columns += (("skipped", "skipped_steps", "{}"),)
  return ([h for h, _, _ in columns],
          [[_cell(s, key, fmt) for _, key, fmt in columns] for s in stages])


def summary_table(results: dict) -> str:
  """A plain-text table, one row per stage; the final eval loss and bits per byte; the seconds
  outside the stages (a train command's); the last stage's memory per stack."""
  headers, rows = summary_rows(results["stages"])
  lines = _table([headers, *rows])
  for name, key in (("final eval loss", "final_eval_loss"),
                    ("final eval bits per byte", "final_eval_bits_per_byte")):
    final = results.get(key)
    lines.append(f"{name}: {final:.4f}" if final is not None else f"{name}: -")
  if results.get("seconds_outside_stages") is not None:   # the train command's own process
    lines.append(f"seconds outside stages: {results['seconds_outside_stages']:.1f} (start-up, "
                 "imports, data set-up, results and plots)")
  if results["stages"] and results["stages"][-1].get("memory"):
    lines += ["", "memory per stack (last stage):", *memory_table(results["stages"][-1]["memory"])]
  return "\n".join(lines)


def process_seconds() -> float | None:
  """Seconds since this process started, interpreter start-up included (Linux's /proc, to 10
  ms); None where that is not known."""
  try:
    with open("/proc/uptime") as f:
      uptime = float(f.read().split()[0])
    with open("/proc/self/stat") as f:   # field 22, starttime, after the name in parentheses
      started = int(f.read().rsplit(")", 1)[1].split()[19])
    return uptime - started / os.sysconf("SC_CLK_TCK")
  except (OSError, ValueError, IndexError, AttributeError):
    return None


def seconds_outside_stages(stages: list[dict], started: float) -> float:
  """The wall seconds since `started` (a `time.perf_counter()` reading) that `stages` (the stages
  this process ran) do not count: start-up, imports, data set-up, results and plots."""
  return time.perf_counter() - started - sum(s["seconds"] for s in stages)


def strict_json(value):
  """`value` with every NaN or Inf float replaced by None: JSON that strict parsers accept."""
  if isinstance(value, float):
    return value if math.isfinite(value) else None
  if isinstance(value, dict):
    return {k: strict_json(v) for k, v in value.items()}
  if isinstance(value, (list, tuple)):
    return [strict_json(v) for v in value]
  return value


def write_json(path: str, payload: dict) -> None:
  """Writes strict JSON atomically, so an interrupted write never leaves a truncated file."""
  tmp = path + ".tmp"
  with open(tmp, "w") as f:
    json.dump(strict_json(payload), f, indent=2, allow_nan=False)
  os.replace(tmp, path)


def read_results(path: str) -> tuple[dict | None, str | None]:
  """(results, None) from a results.json `write_json` wrote; (None, None) where there is none;
  (None, what is wrong) for a damaged one."""
  if not os.path.exists(path):
    return None, None
  try:
    with open(path) as f:
      results = json.load(f)
    if not isinstance(results, dict) or not isinstance(results.get("stages"), list):
      return None, "no list of stages"
    return results, None
  except (ValueError, UnicodeDecodeError) as e:
    return None, f"not valid JSON: {e}"


def eval_table(rows: list[dict]) -> str:
  """`evaluate_run`'s rows: one line per evaluated rack."""
  bpb = lambda r: "-" if r.get("bits_per_byte") is None else f"{r['bits_per_byte']:.4f}"
  table = [["stage", "step", "stacks", "loss", "perplexity", "accuracy", "bits/byte", "tokens"]]
  table += [[str(r["stage"]), str(r["step"]), " ".join(r["stacks"]), f"{r['loss']:.4f}",
             f"{r['perplexity']:.2f}", f"{r['accuracy']:.4f}", bpb(r), f"{r['tokens']:,}"]
            for r in rows]
  return "\n".join(_table(table))
