"""Commands that read a run never write into it (issue 28): `eval`, `sample`, `export`, `plot` on a
healthy run and on damaged ones leave every file and directory name of the run's own state as it
was, writing only their own output; `train` is the one command that moves a damaged checkpoint
aside or writes a results.json again."""
import hashlib
import json
import os
import shutil

import pytest

from stackwise_jax.cli import main
from conftest import write_corpus

# Each reader, and the outputs it may write into the workdir.
READERS = {"eval": ([], ("eval.json",)),
           "sample": (["--prompt", "the", "--max-new-tokens", "4"], ()),
           "export": (["--format", "safetensors"], ("export",)),
           "export_hf": (["--format", "hf"], ("export",)),
           "plot": ([], ("plots",))}


def _command(name, workdir, *extra):
  args, _ = READERS[name]
  return [name.split("_")[0], "--workdir", str(workdir), *args, *extra]


def _state(workdir, outputs=()) -> dict:
  """{relative path: sha256 of a file's bytes, or "dir"} of everything in `workdir` but
  `outputs` (top-level names) and what is under them."""
  state = {}
  for root, dirs, files in os.walk(workdir):
    for name in dirs + files:
      path = os.path.join(root, name)
      rel = os.path.relpath(path, workdir)
      if rel.split(os.sep)[0] in outputs:
        continue
      if name in dirs:
        state[rel] = "dir"
      else:
        with open(path, "rb") as f:
          state[rel] = hashlib.sha256(f.read()).hexdigest()
  return state


@pytest.fixture(scope="module")
def finished(tmp_path_factory):
  """A finished 2-stage CLI run (a trained BPE in the workdir, checkpoints at steps 8 and 16)."""
  root = tmp_path_factory.mktemp("readers")
  config = root / "config.py"
  config.write_text("from conftest import micro_config\n"
                    "def get_config():\n  c = micro_config(target_stacks=2)\n"
                    f"  c.data.source, c.data.paths = 'text', ({write_corpus(root)!r},)\n"
                    "  c.data.tokenizer, c.model.vocab_size = 'bpe:300', 300\n"
                    "  return c\n")
  assert main(["train", "--config", str(config), "--workdir", str(root / "run"),
               "--no-progress"]) == 0
  assert sorted(os.listdir(root / "run" / "checkpoints")) == ["16", "8"]
  return root / "run", config


def _copy(finished, tmp_path):
  workdir = tmp_path / "run"
  shutil.copytree(finished[0], workdir)
  return workdir


def _run_reader(name, workdir, capsys, *extra):
  """Runs reader `name`; asserts the run's own state is unchanged; returns (status, stderr)."""
  outputs = READERS[name][1]
  before = _state(workdir, outputs)
  capsys.readouterr()
  status = main(_command(name, workdir, *extra))
  err = capsys.readouterr().err.strip()
  assert _state(workdir, outputs) == before, name
  return status, err


@pytest.mark.parametrize("name", sorted(READERS))
def test_readers_change_nothing_in_a_healthy_run(finished, tmp_path, capsys, name):
  workdir = _copy(finished, tmp_path)
  status, err = _run_reader(name, workdir, capsys)
  assert status == 0, err


DAMAGES = {
    "params_removed": lambda step_dir: shutil.rmtree(step_dir / "params"),
    "params_truncated": lambda step_dir: [
        os.truncate(os.path.join(root, f), 0) for root, _, files in os.walk(step_dir / "params")
        for f in files],
}


@pytest.mark.parametrize("damage", sorted(DAMAGES))
@pytest.mark.parametrize("name", ["eval", "export", "export_hf", "sample"])
def test_a_damaged_newest_checkpoint_is_named_and_step_reads_an_older_one(
    finished, tmp_path, capsys, damage, name):
  workdir = _copy(finished, tmp_path)
  DAMAGES[damage](workdir / "checkpoints" / "16")
  status, err = _run_reader(name, workdir, capsys)
  assert status == 2 and len(err.splitlines()) == 1, err
  assert "checkpoints/16 is unreadable" in err and "--step 8 reads the newest good one" in err
  status, err = _run_reader(name, workdir, capsys, "--step", "8")
  assert status == 0, err
  assert sorted(os.listdir(workdir / "checkpoints")) == ["16", "8"]   # nothing moved aside


@pytest.mark.parametrize("name", ["eval", "export", "export_hf", "sample"])
def test_a_missing_trained_tokenizer_is_named_never_trained_again(finished, tmp_path, capsys,
                                                                  name):
  workdir = _copy(finished, tmp_path)
  (workdir / "tokenizer.json").unlink()
  status, err = _run_reader(name, workdir, capsys)
  assert status == 2 and len(err.splitlines()) == 1, err
  assert f"no trained tokenizer at {workdir / 'tokenizer.json'}" in err
  assert not (workdir / "tokenizer.json").exists()


def test_a_damaged_results_file_is_plotted_from_the_checkpoints_and_train_rewrites_it(
    finished, tmp_path, capsys):
  workdir = _copy(finished, tmp_path)
  good = json.loads((workdir / "results.json").read_text())
  (workdir / "results.json").write_text('{"stages": [')
  status, err = _run_reader("plot", workdir, capsys)
  assert status == 0 and "results.json is damaged" in err and "train" in err, err
  assert main(["train", "--config", str(finished[1]), "--workdir", str(workdir),
               "--no-progress"]) == 0
  assert "written again from the checkpoints" in capsys.readouterr().err
  rewritten = json.loads((workdir / "results.json").read_text())
  assert [s["losses"] for s in rewritten["stages"]] == [s["losses"] for s in good["stages"]]


def test_train_still_moves_a_damaged_checkpoint_aside(finished, tmp_path, capsys):
  workdir = _copy(finished, tmp_path)
  DAMAGES["params_removed"](workdir / "checkpoints" / "16")
  assert main(["train", "--config", str(finished[1]), "--workdir", str(workdir),
               "--no-progress"]) == 0
  assert "is unreadable" in capsys.readouterr().err
  names = os.listdir(workdir / "checkpoints")
  assert any(n.startswith("16.unreadable-") for n in names) and "16" in names   # retrained


def test_prepare_reads_its_inputs_and_writes_only_its_out(finished, tmp_path, capsys):
  corpus = finished[1].parent   # the config and its text files
  before = _state(corpus, outputs=("run",))
  assert main(["prepare", "--config", str(finished[1]), "--out", str(tmp_path / "prepared"),
               "--no-progress"]) == 0, capsys.readouterr().err
  assert _state(corpus, outputs=("run",)) == before
  assert (tmp_path / "prepared" / "manifest.json").exists()
