"""Turning `results` into what a person reads: the per-stage summary table and results.json."""
import json
import os

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
    ("tokens/s", "tokens_per_s", "{:,.0f}"),
    ("seconds", "seconds", "{:.1f}"),
    ("trainable", "trainable_params", "{:,}"),
    ("frozen", "frozen_params", "{:,}"),
    ("cache MiB", "cache_bytes", None),
    ("activations", "activation_mode", "{}"),
)


def _cell(stage, key, fmt):
  value = stage.get(key)
  if value is None:
    return "-"
  if key == "cache_bytes":
    return f"{value / 2**20:.1f}"
  return fmt.format(value)


def summary_table(results: dict) -> str:
  """A plain-text table, one row per stage, then the final eval loss."""
  rows = [[h for h, _, _ in _COLUMNS]]
  rows += [[_cell(s, key, fmt) for _, key, fmt in _COLUMNS] for s in results["stages"]]
  widths = [max(len(r[i]) for r in rows) for i in range(len(_COLUMNS))]
  lines = ["  ".join(c.rjust(w) for c, w in zip(r, widths)) for r in rows]
  lines.insert(1, "  ".join("-" * w for w in widths))
  final = results.get("final_eval_loss")
  lines.append(f"final eval loss: {final:.4f}" if final is not None else "final eval loss: -")
  return "\n".join(lines)


def write_json(path: str, payload: dict) -> None:
  """Writes atomically, so an interrupted write never leaves a truncated file behind."""
  tmp = path + ".tmp"
  with open(tmp, "w") as f:
    json.dump(payload, f, indent=2)
  os.replace(tmp, path)
