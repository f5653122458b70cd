"""What a researcher looks at (design §12): the PNG plots of a run, drawn from its results, and the
TensorBoard events written while it trained."""
import json

import numpy as np
import pytest

from conftest import micro_args, tensorboard_scalars, write_corpus
from stackwise_jax.cli import main
from stackwise_jax.plots import PLOTS, _eval_by_depth, _loss, _stage_cost
from stackwise_jax.report import PHASES


@pytest.fixture(scope="module")
def run(tmp_path_factory):
  """A 2-stage run of 6 steps each through the train command; losses logged every 2 steps."""
  tmp = tmp_path_factory.mktemp("plots")
  workdir = tmp / "run"
  assert main([*micro_args(write_corpus(tmp), workdir), "--config.training.log_every=2",
               "--config.training.eval_every=3"]) == 0
  return workdir, json.loads((workdir / "results.json").read_text())


def test_tensorboard_holds_the_losses_of_the_results(run):
  workdir, results = run
  scalars = tensorboard_scalars(workdir / "tensorboard")
  first, second = results["stages"]
  train = [(s, first["losses"][s - 1]) for s in (2, 4, 6)]
  train += [(6 + s, second["losses"][s - 1]) for s in (2, 4, 6)]
  assert [s for s, _ in scalars["train/loss"]] == [s for s, _ in train]
  np.testing.assert_allclose([v for _, v in scalars["train/loss"]], [v for _, v in train],
                             rtol=1e-6)
  evals = [(x, v) for x, v in first["eval_curve"]] + [(6 + x, v) for x, v in second["eval_curve"]]
  assert [s for s, _ in scalars["eval/loss"]] == [3, 6, 9, 12]
  np.testing.assert_allclose([v for _, v in scalars["eval/loss"]], [v for _, v in evals], rtol=1e-6)
  assert [s for s, _ in scalars["eval/bits_per_byte"]] == [3, 6, 9, 12]
  # The last evaluation of a stage is the stage's bits per byte.
  np.testing.assert_allclose([v for s, v in scalars["eval/bits_per_byte"] if s in (6, 12)],
                             [first["eval_bits_per_byte"], second["eval_bits_per_byte"]], rtol=1e-6)
  assert [s for s, _ in scalars["stage/eval_loss"]] == [1, 2]
  np.testing.assert_allclose([v for _, v in scalars["stage/eval_bits_per_byte"]],
                             [s["eval_bits_per_byte"] for s in results["stages"]], rtol=1e-6)
  np.testing.assert_allclose([v for _, v in scalars["stage/tokens_per_s"]],
                             [s["tokens_per_s"] for s in results["stages"]], rtol=1e-6)


def test_train_writes_the_plots_and_plot_redraws_them_from_a_checkpoint(run, capsys):
  workdir, _ = run
  for name in PLOTS:
    png = (workdir / "plots" / name).read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 5000, name
  moved = workdir.parent / "results.json.moved"
  (workdir / "results.json").rename(moved)   # a run cut off: its checkpoint has the results
  try:
    assert main(["plot", "--workdir", str(workdir), "--out", str(workdir.parent / "again")]) == 0
  finally:
    moved.rename(workdir / "results.json")
  assert sorted(p.name for p in (workdir.parent / "again").iterdir()) == sorted(PLOTS)
  assert main(["plot", "--workdir", str(workdir.parent / "nothing")]) == 2
  assert "no readable checkpoint" in capsys.readouterr().err


def test_plots_draw_the_results(run):
  _, results = run
  stages = results["stages"]
  ax = _loss(stages).axes[0]
  curves = {line.get_label(): line for line in ax.get_lines()}
  train2 = curves["stage 2 train"]
  np.testing.assert_array_equal(train2.get_xdata(), np.arange(7, 13))   # after stage 1's 6 steps
  np.testing.assert_allclose(train2.get_ydata(), stages[1]["losses"])
  np.testing.assert_allclose(curves["stage 1 eval"].get_ydata(), [v for _, v in stages[0]["eval_curve"]])
  boundaries = [line for line in ax.get_lines() if line.get_label().startswith("_")]
  assert [line.get_xdata()[0] for line in boundaries] == [6]
  loss_axis, bpb_axis = _eval_by_depth(stages).axes   # bits per byte on a second axis
  (depth,), (bpb,) = loss_axis.get_lines(), bpb_axis.get_lines()
  assert list(depth.get_xdata()) == [1, 2] and list(bpb.get_xdata()) == [1, 2]
  np.testing.assert_allclose(depth.get_ydata(), [s["eval_loss"] for s in stages])
  np.testing.assert_allclose(bpb.get_ydata(), [s["eval_bits_per_byte"] for s in stages])
  # Results from before bits per byte: eval loss alone.
  old = [{k: v for k, v in s.items() if k != "eval_bits_per_byte"} for s in stages]
  assert len(_eval_by_depth(old).axes) == 1
  memory, wall = _stage_cost(stages).axes
  # Stacked by phase, stage by stage: the bars of a stage add up to its seconds.
  heights = np.array([bar.get_height() for bar in wall.patches]).reshape(len(PHASES), len(stages))
  np.testing.assert_allclose(heights, [[s["seconds_by_phase"][p] for s in stages] for p in PHASES])
  np.testing.assert_allclose(heights.sum(0), [s["seconds"] for s in stages], rtol=0.05)
  weights = [sum(m["base_bytes"] for m in s["memory"].values()) / 2**20 for s in stages]
  np.testing.assert_allclose([bar.get_height() for bar in memory.patches[:2]], weights)
