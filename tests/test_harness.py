"""lm-evaluation-harness on our forward and sampler (design §12): `RackLM` scores as lm-eval's HFLM
scores the rack's Hugging Face export, checked against log_softmax of the rack's own logits, the
sampler and HFLM itself; `eval --tasks` runs local task files end to end."""
import functools
import json
import subprocess
import sys

import jax
import numpy as np
import pytest

pytest.importorskip("lm_eval")

from lm_eval.api.instance import Instance  # noqa: E402

from stackwise_jax import load_rack  # noqa: E402
from stackwise_jax.cli import main  # noqa: E402
from stackwise_jax.errors import ConfigError  # noqa: E402
from stackwise_jax.data.tokenizer import BYTES, load_tokenizer  # noqa: E402
from stackwise_jax.hf.harness import RackLM, padded_length  # noqa: E402
from stackwise_jax.progressive import ProgressiveRackBuilder  # noqa: E402
from stackwise_jax.sample import generate  # noqa: E402
from conftest import micro_config, train_two_stacks  # noqa: E402

CHOICE_YAML = """task: tiny_choice
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
test_split: test
output_type: multiple_choice
doc_to_text: "{{{{question}}}}"
doc_to_choice: "{{{{choices}}}}"
doc_to_target: "{{{{answer}}}}"
metric_list:
  - metric: acc
    aggregation: mean
    higher_is_better: true
"""

TEXT_YAML = """task: tiny_text
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
test_split: test
output_type: loglikelihood_rolling
doc_to_text: ""
doc_to_target: "{{{{text}}}}"
metric_list:
  - metric: word_perplexity
    aggregation: weighted_perplexity
    higher_is_better: false
  - metric: byte_perplexity
    aggregation: weighted_perplexity
    higher_is_better: false
  - metric: bits_per_byte
    aggregation: bits_per_byte
    higher_is_better: false
"""

GEN_YAML = """task: tiny_gen
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
test_split: test
output_type: generate_until
doc_to_text: "{{{{question}}}}"
doc_to_target: "{{{{answer}}}}"
generation_kwargs:
  until: [" fox", "\\n"]
  max_gen_toks: 8
  do_sample: false
metric_list:
  - metric: exact_match
    aggregation: mean
    higher_is_better: true
"""
TASKS = ["tiny_choice", "tiny_gen", "tiny_text"]


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
  """A 2-stage causal run (max_seq_len 32, byte tokenizer) in a workdir, its rack and a RackLM."""
  workdir, _, _ = train_two_stacks(tmp_path_factory.mktemp("harness"))
  rack = load_rack(str(workdir))
  tokenizer = load_tokenizer(rack.config)
  return workdir, rack, tokenizer, RackLM(rack, tokenizer, batch_size=4)


@pytest.fixture(scope="module")
def tasks(tmp_path_factory):
  """A directory with a multiple-choice, a generation and a rolling-log-likelihood task on local
  JSONL data."""
  root = tmp_path_factory.mktemp("tasks")
  questions = [{"question": f"word{i} the quick", "choices": [" brown", " lazy", " fox"],
                "answer": i % 3} for i in range(10)]
  prompts = [{"question": f"word{i} the", "answer": " quick brown"} for i in range(10)]
  texts = [{"text": " ".join(f"word{j} the quick brown fox" for j in range(i, i + 1 + i % 4))}
           for i in range(10)]
  for name, rows, yaml in (("choice", questions, CHOICE_YAML), ("gen", prompts, GEN_YAML),
                           ("text", texts, TEXT_YAML)):
    data = root / "data" / f"{name}.jsonl"
    data.parent.mkdir(exist_ok=True)
    data.write_text("\n".join(json.dumps(row) for row in rows))
    (root / f"{name}.yaml").write_text(yaml.format(data=data))
  return root


def _requests(kind, *args):
  return [Instance(request_type=kind, doc={}, arguments=a, idx=0) for a in args]


@functools.cache
def _forward(rack):
  return jax.jit(rack.__call__)


def _logprobs(rack, ids):
  """log_softmax (NumPy, fp64) of the rack's logits for `ids` (one row, its inputs padded to
  max_seq_len: one compile) -> (log probability of each next token [len - 1], whether it is the
  argmax [len - 1])."""
  inputs = np.zeros((1, rack.config.model.max_seq_len), np.int32)
  inputs[0, :len(ids) - 1] = ids[:-1]
  logits = np.asarray(_forward(rack)(rack.params, inputs), np.float64)[0, :len(ids) - 1]
  logits -= logits.max(-1, keepdims=True)
  logp = logits - np.log(np.exp(logits).sum(-1, keepdims=True))
  targets = np.asarray(ids[1:])
  return logp[np.arange(len(targets)), targets], logits.argmax(-1) == targets


def test_loglikelihood_sums_log_softmax_over_the_continuation(trained):
  _, rack, tokenizer, lm = trained
  bos, max_len = tokenizer.special.bos, rack.config.model.max_seq_len
  pairs = [("word3 the", " quick"), ("word3 the ", "quick brown"), ("", "word5"),
           ("x" * 40, " the quick"), ("word1", " the quick brown fox"), ("a", "b")]
  got = lm.loglikelihood(_requests("loglikelihood", *pairs), disable_tqdm=True)
  for (context, continuation), (logprob, greedy) in zip(pairs, got):
    cut = len(context.rstrip())   # HFLM moves trailing spaces onto the continuation
    context, continuation = context[:cut], context[cut:] + continuation
    ctx = list(tokenizer.encode(context)) or [bos]
    whole = (ctx + list(tokenizer.encode(continuation)))[-(max_len + 1):]   # left-truncated
    n = len(tokenizer.encode(continuation))
    expected, argmax = _logprobs(rack, whole)
    assert logprob == pytest.approx(float(expected[-n:].sum()), abs=1e-4)
    assert greedy == bool(argmax[-n:].all())


def test_rolling_loglikelihood_of_a_short_document_follows_the_prefix_token(trained):
  _, rack, tokenizer, lm = trained
  doc = "word7 the quick brown"   # 21 bytes < max_seq_len
  [got] = lm.loglikelihood_rolling(_requests("loglikelihood_rolling", (doc,)), disable_tqdm=True)
  expected, _ = _logprobs(rack, [tokenizer.special.bos] + list(tokenizer.encode(doc)))
  assert got == pytest.approx(float(expected.sum()), abs=1e-4)


def test_rolling_loglikelihood_of_a_long_document_sums_full_context_windows(trained):
  _, rack, tokenizer, lm = trained
  L = rack.config.model.max_seq_len
  doc = " ".join(f"word{i} the quick brown fox" for i in range(4))   # 95 bytes: 4 windows
  ids = list(tokenizer.encode(doc))
  first, _ = _logprobs(rack, [tokenizer.special.bos] + ids[:L])   # predicts ids[:L]
  expected, done = float(first.sum()), L
  while done < len(ids):   # each later window: L tokens of context, scores the new ones only
    end = min(done + L, len(ids))
    window, _ = _logprobs(rack, ids[end - L - 1:end])
    expected += float(window[-(end - done):].sum())
    done = end
  short = "word7 the quick brown"
  got = lm.loglikelihood_rolling(_requests("loglikelihood_rolling", (doc,), (short,)),
                                 disable_tqdm=True)
  assert got[0] == pytest.approx(expected, abs=1e-3)
  assert got[1] == pytest.approx(float(_logprobs(rack, [tokenizer.special.bos] + list(
      tokenizer.encode(short)))[0].sum()), abs=1e-4)


def test_forward_compiles_once_per_padded_length(trained):
  _, rack, tokenizer, _ = trained
  lm = RackLM(rack, tokenizer, batch_size=3)
  pairs = [("w" * n, " x") for n in range(1, 40, 3)]   # 2 .. 41 tokens, some truncated
  lm.loglikelihood(_requests("loglikelihood", *pairs), disable_tqdm=True)
  assert {padded_length(n, 32) for n in (2, 17, 33)} == {16, 32}
  assert lm._score._cache_size() == 2   # lengths 16 and 32, not one per request


def test_generate_until_at_temperature_0_is_the_greedy_sample_cut_at_the_stop():
  builder = ProgressiveRackBuilder(micro_config())   # untrained: its greedy text varies
  builder.add_stack(), builder.add_stack()
  rack, tokenizer = builder.build_rack(), BYTES
  lm = RackLM(rack, tokenizer, batch_size=4)
  prompts = ["word1 the quick", "word22 the"]
  greedy = [tokenizer.decode(generate(rack, tokenizer.encode(p)[None], 12)[0, len(p):])
            for p in prompts]
  text = greedy[0]   # stop at an ASCII character that first appears after the start
  stop = next(c for i, c in enumerate(text) if i > 0 and c.isascii() and c not in text[:i])
  got = lm.generate_until(_requests(
      "generate_until", (prompts[0], {"until": [stop], "max_gen_toks": 12}),
      (prompts[1], {"until": [stop], "max_gen_toks": 12}),
      (prompts[1], {"until": ["never"], "max_gen_toks": 12, "do_sample": False})),
      disable_tqdm=True)
  assert got == [text[:text.index(stop)], greedy[1].split(stop)[0], greedy[1]]


def test_a_masked_lm_rack_is_refused():
  builder = ProgressiveRackBuilder(micro_config(training_objective="mlm"))
  builder.add_stack()
  with pytest.raises(ConfigError, match="training_objective='mlm'.*causal"):
    RackLM(builder.build_rack(), None)


def test_eval_tasks_writes_lm_eval_json_and_prints_the_table(trained, tasks, capsys):
  workdir = trained[0]
  assert main(["eval", "--workdir", str(workdir), "--tasks", str(tasks), "--limit", "8"]) == 0
  saved = json.loads((workdir / "lm_eval.json").read_text())
  assert saved["config"] == {"tasks": TASKS, "limit": 8, "num_fewshot": None, "step": 16,
                             "stage": 2, "batch_size": 4}
  choice, gen, text = (saved["results"][task] for task in TASKS)
  assert choice["sample_len"] == gen["sample_len"] == text["sample_len"] == 8
  assert 0 <= choice["acc,none"] <= 1 and 0 <= gen["exact_match,none"] <= 1
  assert text["bits_per_byte,none"] > 0 and text["byte_perplexity,none"] > 1
  assert text["word_perplexity,none"] > 1
  out = capsys.readouterr().out
  assert all(task in out for task in TASKS) and "bits_per_byte" in out and "|acc" in out
  assert out.rstrip().endswith(f"lm_eval: {workdir / 'lm_eval.json'}")


def test_eval_tasks_of_one_yaml_file_at_an_earlier_step(trained, tasks, capsys):
  workdir = trained[0]
  assert main(["eval", "--workdir", str(workdir), "--tasks", str(tasks / "choice.yaml"),
               "--limit", "4", "--num-fewshot", "1", "--step", "8"]) == 0
  saved = json.loads((workdir / "lm_eval.json").read_text())
  assert list(saved["results"]) == ["tiny_choice"]
  assert (saved["config"]["step"], saved["config"]["stage"], saved["config"]["num_fewshot"]) == (
      8, 1, 1)
  assert "tiny_text" not in capsys.readouterr().out


@pytest.mark.parametrize("args, message", [
    (["--tasks", "no_such_task_anywhere"], "--tasks no_such_task_anywhere: no such lm-eval task"),
    (["--tasks", " , "], "lm_eval --tasks list"),
    (["--tasks", "TASKS", "--limit", "-1"], "--limit=-1: allowed: a positive number"),
    (["--tasks", "TASKS", "--num-fewshot", "-2"], "--num-fewshot=-2: allowed: 0 or more"),
    (["--tasks", "TASKS", "--step", "5"], "--step=5: allowed: a checkpoint step"),
    (["--limit", "3"], "--limit=3: allowed only with --tasks"),
])
def test_eval_tasks_refuses_bad_input_in_one_line(trained, tasks, capsys, args, message):
  args = [str(tasks) if a == "TASKS" else a for a in args]
  assert main(["eval", "--workdir", str(trained[0]), *args]) == 2
  err = capsys.readouterr().err
  assert err.startswith("stackwise-jax: error: ") and message in err and err.count("\n") == 1


def test_eval_tasks_without_lm_eval_names_the_extra(trained, tasks, capsys, monkeypatch):
  monkeypatch.setitem(sys.modules, "lm_eval.evaluator", None)   # import fails as if missing
  assert main(["eval", "--workdir", str(trained[0]), "--tasks", str(tasks)]) == 2
  assert capsys.readouterr().err == ("stackwise-jax: error: --tasks needs the hf extra: "
                                     "pip install -e '.[hf]'\n")


def test_rack_and_its_hugging_face_export_score_the_same_under_lm_eval(trained, tasks, tmp_path):
  """HFLM (transformers, torch) on `export --format hf` gives our accuracy, log-likelihoods and
  greedy generations."""
  llama = pytest.importorskip("stackwise_jax.hf.llama")
  if not hasattr(llama, "export_hf"):
    pytest.skip("stackwise_jax.hf.llama has no export_hf yet")
  pytest.importorskip("transformers")
  pytest.importorskip("accelerate")   # HFLM imports it
  from lm_eval import simple_evaluate
  from lm_eval.tasks import TaskManager
  workdir, _, _, lm = trained
  out = tmp_path / "hf"
  assert main(["export", "--workdir", str(workdir), "--format", "hf", "--out", str(out)]) == 0
  manager = TaskManager(include_path=str(tasks), include_defaults=False)
  run = dict(tasks=TASKS, task_manager=manager, limit=8, log_samples=True)
  theirs = simple_evaluate(model="hf", model_args=f"pretrained={out},dtype=float32",
                           device="cpu", batch_size=4, **run)
  ours = simple_evaluate(model=lm, **run)
  assert ours["results"]["tiny_choice"]["acc,none"] == theirs["results"]["tiny_choice"]["acc,none"]
  for task in run["tasks"]:
    for a, b in zip(ours["samples"][task], theirs["samples"][task], strict=True):
      assert a["doc_id"] == b["doc_id"]
      for x, y in zip(a["resps"], b["resps"], strict=True):
        if task == "tiny_gen":   # greedy text, special ids suppressed on both sides
          assert x == y
          continue
        x, y = np.ravel(np.asarray(x[0], float)), np.ravel(np.asarray(y[0], float))
        np.testing.assert_allclose(x, y, atol=1e-3)   # (logprob, is_greedy) or logprob


def test_training_and_plain_eval_do_not_import_lm_eval():
  code = ("import sys; import stackwise_jax.cli, stackwise_jax.progressive.evaluate, "
          "stackwise_jax.sample, stackwise_jax.progressive.trainer; "
          "assert 'lm_eval' not in sys.modules")
  subprocess.run([sys.executable, "-c", code], check=True)
