"""data: records per second of the input pipeline (text files, jsonl, prepared ArrayRecord shards;
0, 1 and 2 grain workers; document-aware packing; a 3-source mixture) against the records per
second the train step of CONFIG consumes, and `prepare` throughput in MB/s of input.

The corpus is the built-in one (the stdlib's .py files), the first `files` of them, copied as text
files and as one jsonl file. Loading (read, tokenize, pack) and the first batch (which starts the
workers) are timed apart from the steady rate, and the train step's compile apart from its steps.
The step is stage 1's (one stack, the cheapest, so the most data-hungry); the goal is a pipeline
at least GOAL times faster than it.
"""
import json
import os
import pathlib
import shutil
import statistics
import sys
import tempfile
import time

import jax

from stackwise_jax.config import load_config
from stackwise_jax.data import corpus, make_dataloader
from stackwise_jax.data.prepared import prepare
from stackwise_jax.progressive import ProgressiveRackBuilder, ProgressiveTrainer

from bench import REPO
from bench.common import check_positive
from bench.stage import build_stage

CONFIG = "configs/small.py"
SETTINGS = {"files": 0, "batches": 300, "steps": 5, "workers": [0, 1, 2],   # files 0: all
            "seeds": [0, 1, 2], "packing_steps": 250}
QUICK = {"files": 300, "batches": 100, "steps": 2, "seeds": [0], "packing_steps": 10}
# Documents against concat packing: configs/tiny.py's run (its steps a stage: packing_steps).
PACKING_CONFIG = "configs/tiny.py"
GOAL = 100


def _write_corpus(root: pathlib.Path, n: int) -> tuple[str, str, int]:
  """The first n (0: all) builtin files as text files and as one jsonl; -> (text glob, jsonl
  path, bytes)."""
  files = corpus.builtin_corpus_files()
  files = files[:n] if n else files
  (root / "text").mkdir()
  size = 0
  with open(root / "docs.jsonl", "w", encoding="utf-8") as jsonl:
    for i, f in enumerate(files):
      data = f.read_bytes()
      size += len(data)
      (root / "text" / f"{i:05d}.py").write_bytes(data)
      jsonl.write(json.dumps({"text": data.decode("utf-8", errors="replace")}) + "\n")
  return str(root / "text" / "*.py"), str(root / "docs.jsonl"), size


def _pipeline_row(config, source: str, workers: int, batches: int) -> dict:
  config.data.num_workers = workers
  start = time.perf_counter()
  loader = make_dataloader(config, log=lambda _: None)
  load = time.perf_counter() - start
  start = time.perf_counter()
  it = loader.train_iter()
  next(it)   # starts the workers, if any
  first = time.perf_counter() - start
  start = time.perf_counter()
  for _ in range(batches):
    next(it)
  rate = batches * loader.batch_size / (time.perf_counter() - start)
  del it   # stops its workers
  return {"what": "pipeline", "source": source, "workers": workers, "records_per_s": rate,
          "setup_s": load, "first_s": first}


def _step_row(config, steps: int) -> dict:
  start = time.perf_counter()
  stage = build_stage(config, 1)
  build = time.perf_counter() - start
  state = stage.state

  def one_step():
    nonlocal state
    state, metrics = stage.step(state, stage.example)
    jax.block_until_ready((state, metrics))

  start = time.perf_counter()
  one_step()   # compiles
  compile_s = time.perf_counter() - start
  times = []
  for _ in range(steps):
    start = time.perf_counter()
    one_step()
    times.append(time.perf_counter() - start)
  step_s = statistics.median(times)
  return {"what": "train step", "source": "stage 1", "workers": None,
          "records_per_s": config.training.batch_size / step_s, "setup_s": build,
          "first_s": compile_s, "step_ms": 1000 * step_s}


def run(args, s):
  base = lambda: load_config(args.config, list(args.overrides))
  rows = []
  root = pathlib.Path(tempfile.mkdtemp(prefix="bench-data-"))
  try:
    text, jsonl, size = _write_corpus(root, s["files"])
    print(f"  corpus: {size / 1e6:.1f} MB in {root}", file=sys.stderr)
    for source, path in (("text", text), ("jsonl", jsonl)):
      config = base()
      config.data.source, config.data.paths = source, (path,)
      start = time.perf_counter()
      prepare(config, str(root / f"prepared-{source}"), progress=False, log=lambda _: None)
      seconds = time.perf_counter() - start
      rows.append({"what": "prepare", "source": source, "workers": None, "setup_s": seconds,
                   "mb_per_s": size / 1e6 / seconds})
      print(f"  prepare {source}: {rows[-1]['mb_per_s']:.1f} MB/s", file=sys.stderr)
    step = _step_row(base(), s["steps"])
    print(f"  train step: {step['step_ms']:.0f} ms, compile {step['first_s']:.1f} s",
          file=sys.stderr)
    for workers in s["workers"]:
      for source, path in (("text", text), ("jsonl", jsonl),
                           ("array_record", str(root / "prepared-text"))):
        config = base()
        config.data.source, config.data.paths = source, (path,)
        rows.append(_pipeline_row(config, source, workers, s["batches"]))
        rows[-1]["vs_step"] = rows[-1]["records_per_s"] / step["records_per_s"]
        print(f"  {source}, {workers} workers: {rows[-1]['records_per_s']:,.0f} records/s",
              file=sys.stderr)
    # Issue 30's pipelines, in-process: segment ids from the text files, and the three sources
    # above mixed with weights 0.5 / 0.3 / 0.2.
    variants = {
        "text, documents packing": ["data.source=text", f"data.paths=({text!r},)",
                                    "data.packing=documents"],
        "mixture: text, jsonl, array_record": [
            "data.mixture=(" + ", ".join(
                f"{{'source': {src!r}, 'paths': ({path!r},), 'weight': {w}}}"
                for src, path, w in (("text", text, 0.5), ("jsonl", jsonl, 0.3),
                                     ("array_record", str(root / "prepared-text"), 0.2))) + ")"],
    }
    for source, overrides in variants.items():
      config = load_config(args.config, [*args.overrides, *overrides])
      rows.append(_pipeline_row(config, source, 0, s["batches"]))
      rows[-1]["vs_step"] = rows[-1]["records_per_s"] / step["records_per_s"]
      print(f"  {source}: {rows[-1]['records_per_s']:,.0f} records/s", file=sys.stderr)
    rows.append(step)
  finally:
    shutil.rmtree(root, ignore_errors=True)
  rows += packing_rows(args, s)
  check_positive(rows, "records_per_s", "mb_per_s", "setup_s", "eval_bpb")
  pipelines = [r for r in rows if r["what"] == "pipeline"]
  worst = min(pipelines, key=lambda r: r["vs_step"])
  bpb = {p: [r["eval_bpb"] for r in rows if r.get("packing") == p] for p in ("concat", "documents")}
  diff = [d - c for d, c in zip(bpb["documents"], bpb["concat"], strict=True)]   # same seeds
  summary = {"corpus_mb": size / 1e6, "seq_len": base().training.seq_len,
             "train_step_records_per_s": step["records_per_s"],
             "slowest_pipeline": f"{worst['source']}, {worst['workers']} workers",
             "slowest_vs_step": worst["vs_step"],
             "goal": f"every pipeline >= {GOAL}x the records/s the train step consumes",
             "goal_met": worst["vs_step"] >= GOAL,
             # final eval bits per byte, documents minus concat, per seed: < 0 = documents better
             "documents_minus_concat_bpb": statistics.mean(diff),
             "documents_minus_concat_bpb_sd": statistics.stdev(diff) if len(diff) > 1 else None}
  columns = [("measured", "what", "{}"), ("source", "source", "{}"), ("workers", "workers", "{}"),
             ("records/s", "records_per_s", "{:,.0f}"), ("x train step", "vs_step", "{:,.0f}"),
             ("prepare MB/s", "mb_per_s", "{:.1f}"), ("load/build/run s", "setup_s", "{:.2f}"),
             ("first batch / compile s", "first_s", "{:.2f}"), ("seed", "seed", "{}"),
             ("final eval bpb", "eval_bpb", "{:.4f}")]
  return columns, rows, summary


def packing_rows(args, s) -> list[dict]:
  """PACKING_CONFIG's run on the builtin corpus with concat and with documents packing, per seed:
  its final eval bits per byte."""
  rows = []
  for seed in s["seeds"]:
    for packing in ("concat", "documents"):
      config = load_config(os.path.join(REPO, PACKING_CONFIG), [
          f"data.packing={packing}", f"training.seed={seed}",
          f"training.steps_per_stack={s['packing_steps']}"])
      start = time.perf_counter()
      results = ProgressiveTrainer(config, progress=False, log=lambda _: None).train_progressively(
          ProgressiveRackBuilder(config), make_dataloader(config, log=lambda _: None))
      rows.append({"what": "train tiny.py", "source": f"{packing} packing", "packing": packing,
                   "seed": seed, "eval_bpb": results["final_eval_bits_per_byte"],
                   "setup_s": time.perf_counter() - start})
      print(f"  {packing} packing, seed {seed}: eval {rows[-1]['eval_bpb']:.4f} bits per byte",
            file=sys.stderr)
  return rows
