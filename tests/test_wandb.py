"""Weights & Biases (design §10, README's *Plots, TensorBoard and Weights & Biases*): with
`logging.wandb` a train run logs the same scalars as TensorBoard at the same steps, its config, the
summary table's rows and the plots; a resumed run continues the same W&B run; without the `wandb`
extra it exits 2 before any work; readers never open W&B. Runs offline, read back from W&B's own
offline run files."""
import hashlib
import json
import os
import shutil
import struct
import sys

import numpy as np
import pytest

from conftest import micro_args, tensorboard_scalars, write_corpus
from stackwise_jax.cli import main
from stackwise_jax.config import default_config, load_config
from stackwise_jax.metrics import RUN_ID_FILE, check_wandb
from stackwise_jax.report import summary_rows

WANDB = ["--config.logging.wandb=True", "--config.logging.wandb_mode=offline",
         "--config.training.log_every=2", "--config.training.eval_every=3",
         "--config.logging.wandb_tags=('micro',)",
         # time as input: a run may grow on to a larger target_stacks (the resume test)
         "--config.training.progressive.time_interpretation=input"]


def _wandb_env(monkeypatch, directory):
  """W&B's own settings kept inside `directory`, offline and quiet."""
  for name, value in (("WANDB_DIR", str(directory)), ("WANDB_CONFIG_DIR", str(directory)),
                      ("WANDB_CACHE_DIR", str(directory)), ("WANDB_DATA_DIR", str(directory)),
                      ("WANDB_MODE", "offline"),
                      ("WANDB_SILENT", "true")):
    monkeypatch.setenv(name, value)


def _records(path):
  """The protobuf records of an offline run's `run-ID.wandb` file: W&B's 7-byte header, then
  LevelDB's log format (32 KiB blocks; each chunk: CRC, length, type FULL=1 FIRST=2 MIDDLE=3
  LAST=4)."""
  from wandb.proto import wandb_internal_pb2
  data = path.read_bytes()
  assert data[:4] == b":W&B"
  at, block, pending = 7, 32768, b""
  while at + 7 <= len(data):
    if block - at % block < 7:   # a block's tail too short for a header is padding
      at += block - at % block
      continue
    _, length, kind = struct.unpack("<IHB", data[at:at + 7])
    if kind == 0:
      break
    pending += data[at + 7:at + 7 + length]
    at += 7 + length
    if kind in (1, 4):
      record = wandb_internal_pb2.Record()
      record.ParseFromString(pending)
      pending = b""
      yield record


def _offline_runs(workdir) -> list[dict]:
  """Each offline run W&B wrote under WORKDIR/wandb, oldest first: {"id", "resume", "config",
  "history": {key: [(step, value)]}, "dir"}."""
  runs = []
  for run_dir in sorted((workdir / "wandb").glob("offline-run-*")):
    run = {"dir": run_dir, "history": {}}
    for record in _records(next(run_dir.glob("run-*.wandb"))):
      kind = record.WhichOneof("record_type")
      if kind == "run":
        run["id"], run["resume"] = record.run.run_id, record.run.resume
        run["tags"] = list(record.run.tags)
        run["config"] = {u.key: json.loads(u.value_json) for u in record.run.config.update}
      elif kind == "history":
        items = {"/".join(i.nested_key) or i.key: i.value_json for i in record.history.item}
        for key, value in items.items():
          run["history"].setdefault(key, []).append((record.history.step.num, json.loads(value)))
    runs.append(run)
  return runs


def _values(history, tag):
  return [(step, value) for step, value in history.get(tag, [])]


@pytest.fixture(scope="module")
def run(tmp_path_factory):
  """A 2-stage CLI run of 6 steps a stage logged to W&B offline -> (workdir, results, the
  train command's arguments)."""
  pytest.importorskip("wandb")
  tmp = tmp_path_factory.mktemp("wandb")
  with pytest.MonkeyPatch.context() as monkeypatch:
    _wandb_env(monkeypatch, tmp)
    workdir = tmp / "run"
    args = [*micro_args(write_corpus(tmp), workdir), *WANDB]
    assert main(args) == 0
  return workdir, json.loads((workdir / "results.json").read_text()), args


def test_wandb_holds_the_tensorboard_scalars_at_the_same_steps(run):
  workdir, results, _ = run
  (logged,) = _offline_runs(workdir)
  history, tensorboard = logged["history"], tensorboard_scalars(workdir / "tensorboard")
  first, second = results["stages"]
  train = [(s, first["losses"][s - 1]) for s in (2, 4, 6)]
  train += [(6 + s, second["losses"][s - 1]) for s in (2, 4, 6)]
  assert _values(history, "train/loss") == train   # the floats of results.json, exactly
  evals = first["eval_curve"] + [[6 + x, v] for x, v in second["eval_curve"]]
  assert _values(history, "eval/loss") == [tuple(e) for e in evals]
  for tag in ("train/loss", "eval/loss", "eval/bits_per_byte"):
    assert [s for s, _ in _values(history, tag)] == [s for s, _ in tensorboard[tag]], tag
    np.testing.assert_allclose([v for _, v in _values(history, tag)],
                               [v for _, v in tensorboard[tag]], rtol=1e-6, err_msg=tag)
  # stage/* go with W&B's step metric `stage`, in the rows of the stages' last steps.
  assert [v for _, v in _values(history, "stage")] == [1, 2]
  assert [s for s, _ in _values(history, "stage")] == [6, 12]
  stage_tags = [t for t in tensorboard if t.startswith("stage/")]
  assert sorted(stage_tags) == sorted(t for t in history if t.startswith("stage/"))
  for tag in stage_tags:
    np.testing.assert_allclose([v for _, v in _values(history, tag)],
                               [v for _, v in tensorboard[tag]], rtol=1e-6, err_msg=tag)


def test_wandb_holds_the_config_the_stage_rows_and_the_plots(run):
  workdir, results, _ = run
  (logged,) = _offline_runs(workdir)
  assert logged["id"] == json.loads((workdir / RUN_ID_FILE).read_text())["id"]
  assert logged["tags"] == ["micro"]
  config = load_config(str(workdir / "config.yaml"))
  for group in ("model", "training", "data", "logging"):
    assert logged["config"][group] == json.loads(json.dumps(config[group].to_dict())), group
  # The `stages` table after the last stage: the summary table's rows.
  table = logged["history"]["stages/path"][-1][1]
  rows = json.loads((logged["dir"] / "files" / table).read_text())
  assert (rows["columns"], rows["data"]) == summary_rows(results["stages"])
  for name in ("loss", "eval_by_depth", "stage_cost"):
    (image,) = [v for _, v in logged["history"][f"plots/{name}/path"]]
    assert (logged["dir"] / "files" / image).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def _state(workdir, outputs=()) -> dict:
  """{relative path: sha256 of a file, or "dir"} of everything in `workdir` but `outputs`."""
  state = {}
  for root, dirs, files in os.walk(workdir):
    for name in dirs + files:
      path = os.path.join(root, name)
      rel = os.path.relpath(path, workdir)
      if rel.split(os.sep)[0] not in outputs:
        state[rel] = "dir" if name in dirs else hashlib.sha256(open(path, "rb").read()).hexdigest()
  return state


def test_readers_never_open_wandb(run, tmp_path, monkeypatch, capsys):
  workdir = tmp_path / "run"
  shutil.copytree(run[0], workdir)
  _wandb_env(monkeypatch, tmp_path)
  monkeypatch.setitem(sys.modules, "wandb", None)   # any `import wandb` fails
  before = _state(workdir, ("eval.json",))
  assert main(["eval", "--workdir", str(workdir)]) == 0
  assert main(["sample", "--workdir", str(workdir), "--prompt", "the",
               "--max-new-tokens", "4"]) == 0
  assert _state(workdir, ("eval.json",)) == before


def test_a_resumed_run_continues_the_same_wandb_run(run, tmp_path, monkeypatch):
  """Trained on to a third stack from the 2-stack run's checkpoints: the same W&B run id, its
  steps after the first run's, its `stages` table holding all three stages."""
  workdir = tmp_path / "run"
  shutil.copytree(run[0], workdir)
  _wandb_env(monkeypatch, tmp_path)
  args = run[2]
  args = [str(workdir) if a == str(run[0]) else a for a in args]   # its copy, the same corpus
  assert main([*args, "--config.training.progressive.target_stacks=3",
               "--config.logging.wandb_notes=on to 3"]) == 0   # logging.* may change on resume
  first, resumed = _offline_runs(workdir)
  assert resumed["id"] == first["id"] == json.loads((workdir / RUN_ID_FILE).read_text())["id"]
  assert resumed["resume"]
  results = json.loads((workdir / "results.json").read_text())
  third = results["stages"][2]
  assert _values(resumed["history"], "train/loss") == [(12 + s, third["losses"][s - 1])
                                                       for s in (2, 4, 6)]
  assert [v for _, v in _values(resumed["history"], "stage")] == [3]
  table = resumed["history"]["stages/path"][-1][1]
  rows = json.loads((resumed["dir"] / "files" / table).read_text())
  assert rows["data"] == summary_rows(results["stages"])[1]


def test_wandb_without_the_extra_exits_2_before_any_work(tmp_path, monkeypatch, capsys):
  monkeypatch.setitem(sys.modules, "wandb", None)   # `import wandb` raises ImportError
  workdir = tmp_path / "run"
  assert main([*micro_args(write_corpus(tmp_path), workdir), *WANDB]) == 2
  err = capsys.readouterr().err.strip().splitlines()
  assert err == ["stackwise-jax: error: logging.wandb=True: needs the wandb extra: "
                 "pip install 'stackwise-jax[wandb]'"]
  assert not workdir.exists()
  config = default_config()   # wandb_mode="disabled" is W&B off: no package needed
  config.logging.wandb, config.logging.wandb_mode = True, "disabled"
  check_wandb(config)


def test_the_originals_wandb_keys_map_to_logging(tmp_path, capsys):
  path = tmp_path / "original.yaml"
  path.write_text("training:\n  max_steps: 5\n  use_wandb: true\n  wandb_project: proj\n"
                  "  wandb_entity: team\n  wandb_run_name: first\n  wandb_tags: [a, b]\n"
                  "  wandb_notes: a note\n")
  config = load_config(str(path))
  assert config.logging.to_dict() == {
      "wandb": True, "wandb_project": "proj", "wandb_entity": "team", "wandb_run_name": "first",
      "wandb_tags": ("a", "b"), "wandb_notes": "a note", "wandb_mode": "online"}
  assert "wandb" not in capsys.readouterr().err   # mapped, not named as ignored
  path.write_text("training:\n  max_steps: 5\n  use_wandb: false\n  wandb_project: null\n"
                  "  wandb_entity: null\n  wandb_run_name: null\n  wandb_tags: []\n"
                  "  wandb_notes: null\n")
  config = load_config(str(path))   # null keeps ours
  assert config.logging.to_dict() == {
      "wandb": False, "wandb_project": "stackwise-jax", "wandb_entity": "",
      "wandb_run_name": "", "wandb_tags": (), "wandb_notes": "", "wandb_mode": "online"}
