"""Data mixtures by stage (design §10, data/mixture.py): records drawn by each stage's weights,
deterministic from the seed, resumed exactly; per-stage weights and tokens by source, and eval
by source, in the results; bad weights exit 2 naming the field."""
import json
import math

import numpy as np
import pytest

from conftest import (MICRO, REPO, TRUNKS, assert_same_run, checkpoint_steps, cut_copy, micro_args,
                      micro_config, tensorboard_scalars, text_config, train_run, write_corpus)
from stackwise_jax.checkpoint import check_compatible
from stackwise_jax.cli import main
from stackwise_jax.config import load_config, to_yaml
from stackwise_jax.data import make_dataloader
from stackwise_jax.data.mixture import MixtureLoader
from stackwise_jax.progressive.trainer import setting_warnings


def _write_code(directory) -> str:
  """A few small Python-like files in `directory`; returns their glob pattern."""
  directory.mkdir(parents=True, exist_ok=True)
  for i in range(6):
    (directory / f"mod{i}.py").write_text(
        "".join(f"def f{j}(x):\n    return x * {i + j}\n" for j in range(60)))
  return str(directory / "*.py")


@pytest.fixture
def sources(tmp_path):
  """(general text glob, code glob), each a few files."""
  (tmp_path / "general").mkdir()
  return write_corpus(tmp_path / "general"), _write_code(tmp_path / "code")


def _mixture(sources, weights=(1.0, 3.0)):
  general, code = sources
  return ({"source": "text", "paths": (general,), "weight": weights[0]},
          {"source": "text", "paths": (code,), "text_field": "text", "weight": weights[1]})


def _loader(sources, by_stage=(), seed=0, **fields) -> MixtureLoader:
  config = micro_config()
  config.data.mixture, config.data.mixture_by_stage = _mixture(sources), by_stage
  config.data.shuffle_seed = seed
  for name, value in fields.items():
    config.data[name] = value
  return make_dataloader(config, log=lambda _: None)


def _draw(iterator, records: int) -> list[dict]:
  return [next(iterator) for _ in range(records // 4)]   # micro batches hold 4 records


def _counts(batches) -> np.ndarray:
  return sum(np.bincount(b["source"], minlength=2) for b in batches)


def _within_3_sd(counts, weights) -> bool:
  n, p = counts.sum(), np.asarray(weights) / np.sum(weights)
  sd = np.sqrt(n * p * (1 - p))
  return bool(np.all(np.abs(counts - n * p) <= 3 * sd))


def test_records_follow_each_stages_weights(sources):
  loader = _loader(sources, by_stage=((1.0, 3.0), (3.0, 1.0), (0.0, 1.0)))
  assert loader.names == ["text.0", "text.1"]
  it = loader.train_iter()
  first = _counts(_draw(it, 1000))
  assert first.sum() == 1000 and _within_3_sd(first, (1, 3)), first
  it.set_stage(2)
  second = _counts(_draw(it, 1000))
  assert _within_3_sd(second, (3, 1)) and second[0] > first[0] + 200, (first, second)
  it.set_stage(3)   # a weight of 0 is never drawn; later stages keep the last row
  assert _counts(_draw(it, 200))[0] == 0
  it.set_stage(5)
  assert _counts(_draw(it, 200))[0] == 0
  assert it.records_by_stage(1).tolist() == first.tolist()
  assert it.records_by_stage(2).tolist() == second.tolist()
  assert it.records_by_stage(4).tolist() == [0, 0]


def test_batches_carry_their_source_and_distinct_example_ids(sources):
  loader = _loader(sources)
  batches = _draw(loader.train_iter(), 400)
  for b in batches:
    assert b["tokens"].shape == (4, 16) and b["tokens"].dtype == np.int32
    assert b["source"].dtype == b["example_id"].dtype == np.int32
  ids, entries = (np.concatenate([b[k] for b in batches]) for k in ("example_id", "source"))
  general = len(loader.corpora[0].train.records)
  # An entry's example ids follow the records of the entries before it.
  assert np.all((ids < general) == (entries == 0))
  assert ids.max() < loader.num_train_records


def test_a_one_entry_mixture_gives_the_single_source_batches(sources):
  plain = micro_config()
  plain.data.source, plain.data.paths = "text", (sources[1],)
  mixed = micro_config()
  mixed.data.mixture = ({"source": "text", "paths": (sources[1],), "weight": 1.0},)
  for a, b in zip(_draw(make_dataloader(plain, log=lambda _: None).train_iter(), 200),
                  _draw(make_dataloader(mixed, log=lambda _: None).train_iter(), 200)):
    np.testing.assert_array_equal(a["tokens"], b["tokens"])
    np.testing.assert_array_equal(a["example_id"], b["example_id"])


def test_a_restored_iterator_gives_the_same_batches(sources):
  loader = _loader(sources, by_stage=((1.0, 3.0), (3.0, 1.0)))
  it = loader.train_iter()
  _draw(it, 40)
  it.set_stage(2)
  _draw(it, 20)
  state = json.loads(json.dumps(it.get_state()))   # as a checkpoint stores it
  expected = _draw(it, 40)
  again = _loader(sources, by_stage=((1.0, 3.0), (3.0, 1.0))).train_iter()
  again.set_state(state)
  for a, b in zip(expected, _draw(again, 40)):
    assert a.keys() == b.keys()
    for key in a:
      np.testing.assert_array_equal(a[key], b[key])
  assert again.get_state() == it.get_state()


def test_the_seed_decides_the_records(sources):
  def tokens(seed):
    return np.stack([b["tokens"] for b in _draw(_loader(sources, seed=seed).train_iter(), 80)])
  np.testing.assert_array_equal(tokens(0), tokens(0))
  assert not np.array_equal(tokens(0), tokens(1))


def test_eval_batches_are_fixed_and_by_source_reads_each_val_split(sources):
  a, b = _loader(sources, seed=0), _loader(sources, seed=7)
  for x, y in zip(a.eval_batches(3), b.eval_batches(3)):   # the same for every shuffle seed
    np.testing.assert_array_equal(x["tokens"], y["tokens"])
  by_source = a.eval_batches_by_source(2)
  assert list(by_source) == a.names
  for entry, (name, batches) in enumerate(by_source.items()):
    assert len(batches) == 2 and all(np.all(x["source"] == entry) for x in batches)
    first = a.corpora[entry].val.records[0]
    np.testing.assert_array_equal(batches[0]["tokens"][0], first)


def _mixture_config(sources, by_stage=((1.0, 3.0), (3.0, 1.0)), **progressive):
  config = text_config(sources[0], **progressive)
  config.data.mixture, config.data.mixture_by_stage = _mixture(sources), by_stage
  return config


def _mixtures(results) -> list:
  return [s["mixture"] for s in results["stages"]]


@pytest.mark.parametrize("trunk", sorted(TRUNKS))
def test_resume_mid_stage_gives_the_same_losses_and_counts(sources, tmp_path, trunk):
  config = _mixture_config(sources, target_stacks=2, **TRUNKS[trunk])
  whole = train_run(config, tmp_path / "whole")
  steps = checkpoint_steps(tmp_path / "whole")
  assert steps == [3, 6, 8, 11, 14, 16]
  # Cut off after stage 2's third step: its data comes back from the checkpoint (a cached
  # stage's from the stage's start, a streamed one's from step 3), stage and counts with it.
  cut_copy(tmp_path / "whole", tmp_path / "cut", 11)
  resumed = train_run(config, tmp_path / "cut")
  assert resumed[0]["stages"][1]["activation_mode"] == (
      "cached" if trunk == "frozen" else "streamed")
  assert_same_run(whole, resumed)
  assert _mixtures(whole[0]) == _mixtures(resumed[0])
  assert whole[0]["final_eval_by_source"] == resumed[0]["final_eval_by_source"]


def test_a_pool_run_counts_the_tokens_its_steps_went_over(sources, tmp_path):
  config = _mixture_config(sources, by_stage=(), target_stacks=2)
  config.training.data_reuse, config.training.epochs_per_stack = "pool", 2
  config.training.checkpoint_every = 0
  results, _ = train_run(config, tmp_path / "run")
  first, second = _mixtures(results)
  assert first["weights"] == second["weights"] == {"text.0": 0.25, "text.1": 0.75}
  # Both stages go over the same pool twice: the same tokens from each source.
  assert first["tokens_by_source"] == second["tokens_by_source"]
  assert sum(first["tokens_by_source"].values()) == results["stages"][0]["tokens"]
  assert all(n > 0 for n in first["tokens_by_source"].values())


def _cli_mixture(sources) -> list[str]:
  general, code = sources
  return [f'--config.data.mixture=({{"source": "text", "paths": ("{general}",), "weight": 1.0}}, '
          f'{{"source": "text", "paths": ("{code}",), "weight": 3.0}})',
          "--config.data.mixture_by_stage=((1.0, 0.0), (1.0, 3.0))"]


def test_results_json_holds_each_stages_weights_tokens_and_eval_by_source(sources, tmp_path,
                                                                          capsys):
  workdir = tmp_path / "run"
  assert main([*micro_args(sources[0], workdir), *_cli_mixture(sources)]) == 0
  assert "data: mixture of 2 sources" in capsys.readouterr().err
  results = json.loads((workdir / "results.json").read_text())
  first, second = (s["mixture"] for s in results["stages"])
  assert first["weights"] == {"text.0": 1.0, "text.1": 0.0}
  assert second["weights"] == {"text.0": 0.25, "text.1": 0.75}
  tokens = results["stages"][0]["tokens"]   # 6 steps of 4 records of 16 tokens
  assert first["tokens_by_source"] == {"text.0": tokens, "text.1": 0}
  assert sum(second["tokens_by_source"].values()) == tokens
  by_source = results["final_eval_by_source"]
  assert list(by_source) == ["text.0", "text.1"]
  assert all(math.isfinite(e["loss"]) and e["bits_per_byte"] > 0 for e in by_source.values())
  # TensorBoard (and W&B, through the same scalars) gets them at the run's last step.
  scalars = tensorboard_scalars(workdir / "tensorboard")
  last_step = sum(s["steps"] for s in results["stages"])
  for name, figures in by_source.items():
    for key in ("loss", "bits_per_byte"):
      (logged,) = scalars[f"eval_by_source/{name}/{key}"]
      assert logged == (last_step, pytest.approx(figures[key], rel=1e-6))

  assert main(["eval", "--workdir", str(workdir)]) == 0
  rows = json.loads((workdir / "eval.json").read_text())["racks"]
  assert [list(r["by_source"]) for r in rows] == [["text.0", "text.1"]] * 2
  # The final rack's eval by source is the one training reported.
  assert rows[-1]["by_source"]["text.1"]["loss"] == pytest.approx(by_source["text.1"]["loss"],
                                                                  rel=1e-5)


def test_a_yaml_mixture_loads_as_the_command_lines_and_resumes_under_it(sources, tmp_path):
  general, code = sources
  path = tmp_path / "mixture.yaml"
  path.write_text(f"data:\n  mixture:\n"
                  f"    - {{source: text, paths: ['{general}'], weight: 1.0}}\n"
                  f"    - source: text\n      paths: ['{code}']\n      weight: 3\n"
                  f"  mixture_by_stage:\n    - [1.0, 0.0]\n    - [1.0, 3.0]\n")
  (tmp_path / "plain.yaml").write_text("data:\n  shuffle_seed: 0\n")
  from_yaml = load_config(str(path))
  from_cli = load_config(str(tmp_path / "plain.yaml"),
                         [a.removeprefix("--config.") for a in _cli_mixture(sources)])
  assert [dict(e)["paths"][0] for e in from_yaml.data.mixture] == [general, code]
  assert [list(r) for r in from_yaml.data.mixture_by_stage] == [[1.0, 0.0], [1.0, 3.0]]
  # A checkpoint stores its config as YAML (lists); the command line gives tuples: the same run.
  for saved, now in ((from_cli, from_yaml), (from_yaml, from_cli), (from_cli, from_cli)):
    check_compatible({"config": to_yaml(saved), "specs": []}, now, str(tmp_path))


@pytest.mark.parametrize("extra, field", [
    (['--config.data.mixture=({"source": "builtin", "weight": -1.0},)'], "data.mixture="),
    (['--config.data.mixture=({"source": "builtin", "weight": 0.0}, '
      '{"source": "builtin", "weight": 0})'], "data.mixture="),
    (['--config.data.mixture=({"source": "builtin", "weight": 1.0},)',
      "--config.data.mixture_by_stage=((1.0, 2.0),)"], "data.mixture_by_stage="),
    (['--config.data.mixture=({"source": "builtin", "weight": 1.0},)',
      "--config.data.mixture_by_stage=((1.0,),)", "--config.training.data_reuse=pool"],
     "data.mixture_by_stage="),
    (['--config.data.mixture=({"source": "builtin", "weight": 1.0},)',
      "--config.data.tokenizer=bpe:300", "--config.model.vocab_size=300"], "data.tokenizer="),
    (['--config.data.mixture=({"source": "builtin", "weight": 1.0}, '
      '{"source": "text", "paths": ("/nonexistent/*.txt",), "weight": 1.0})'],
     "data.mixture[1] (text): data.paths"),
])
def test_bad_mixtures_exit_2_with_one_line_naming_the_field(text_corpus, tmp_path, capsys, extra,
                                                            field):
  assert main([*micro_args(text_corpus, tmp_path / "run"), *extra]) == 2
  err = capsys.readouterr().err
  assert err.startswith(f"stackwise-jax: error: {field}") and err.count("\n") == 1, err
  assert not (tmp_path / "run" / "results.json").exists()


def test_prepare_refuses_a_mixture(tmp_path, capsys):
  assert main(["prepare", "--config", str(REPO / "configs/tiny.py"), "--out", str(tmp_path / "p"),
               '--config.data.mixture=({"source": "builtin", "weight": 1.0},)', *MICRO]) == 2
  err = capsys.readouterr().err
  assert err.startswith("stackwise-jax: error: data.mixture: ") and err.count("\n") == 1, err


def test_worker_processes_with_a_mixture_warn_that_they_are_not_used(sources):
  config = micro_config()
  config.data.mixture = _mixture(sources)
  assert not [w for w in setting_warnings(config, None) if w[0] == "num_workers"]
  config.data.num_workers = 2
  ((_, line),) = [w for w in setting_warnings(config, None) if w[0] == "num_workers"]
  assert line.startswith("data.num_workers=2 is not used with data.mixture")
