"""Document-aware packing (data.packing="documents", design §10): records keep the concat layout,
segment ids and positions follow the tokenizer's EOS, attention and loss stay within a document,
and the ids travel with cached activations, resumes and prepared shards."""
import json
import math
import pathlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from conftest import (assert_same_run, checkpoint_steps, cut_copy, micro_args, micro_config,
                      text_config, train_run)
from stackwise_jax.cli import main
from stackwise_jax.data import make_dataloader
from stackwise_jax.data.iterable import as_dataloader
from stackwise_jax.data.packing import document_segments, pack
from stackwise_jax.data.prepared import prepare
from stackwise_jax.data.tokenizer import BYTES, special_ids
from stackwise_jax.model import layers
from stackwise_jax.model.layers import Segments, attend
from stackwise_jax.progressive import ProgressiveRackBuilder, ProgressiveTrainer
from stackwise_jax.progressive.evaluate import eval_example, evaluate
from stackwise_jax.progressive.masking import TimeStepMasking
from stackwise_jax.progressive.steps import (init_train_state, make_optimizer, make_train_step,
                                             plan_stage)

E = 9   # the EOS id of the hand-made records


def _segments_reference(tokens, eos):
  """Segment ids and positions by walking each record token by token."""
  ids, positions = np.zeros_like(tokens), np.zeros_like(tokens)
  for b, row in enumerate(tokens):
    segment = position = 0
    for i, token in enumerate(row):
      ids[b, i], positions[b, i] = segment, position
      segment, position = (segment + 1, 0) if token == eos else (segment, position + 1)
  return ids, positions


def test_segments_follow_eos_and_restart_at_each_record():
  # Documents [1 2 3], [4 5], [6 7 8 10 11], [], [12 13 ...] each followed by EOS, cut into
  # records of 4: an EOS ending a record, a document over two records, a record opening with EOS.
  stream = np.array([1, 2, 3, E, 4, 5, E, 6, 7, 8, 10, 11, E, E, 12, 13, 14], np.uint16)
  records = pack(stream, 4)
  ids, positions = map(np.asarray, document_segments(records, E))
  np.testing.assert_array_equal(ids, [[0, 0, 0, 0], [0, 0, 0, 1], [0, 0, 0, 0], [0, 1, 2, 2]])
  np.testing.assert_array_equal(positions,
                                [[0, 1, 2, 3], [0, 1, 2, 0], [0, 1, 2, 3], [0, 0, 0, 1]])
  assert ids.dtype == positions.dtype == np.int32
  tokens = np.random.default_rng(0).choice([E, 1, 2, 3], size=(16, 40), p=[0.2, 0.3, 0.3, 0.2])
  got = jax.jit(document_segments, static_argnums=1)(tokens, E)
  for g, want in zip(got, _segments_reference(tokens, E)):
    np.testing.assert_array_equal(g, want)


def _packed_row(rng, lengths, eos):
  """A record of documents of `lengths` tokens (bytes), each but the last followed by EOS ->
  (tokens [1, T], [(start, end)] of each document)."""
  row, spans = [], []
  for i, n in enumerate(lengths):
    spans.append((len(row), len(row) + n))
    row += list(rng.integers(0, 256, n)) + ([eos] if i + 1 < len(lengths) else [])
  return jnp.asarray([row], jnp.int32), spans


@pytest.mark.parametrize("objective,seq", [("clm", 16), ("clm", 96), ("mlm", 96)])
def test_a_token_sees_only_its_own_document(objective, seq):
  """Changing one document of a record leaves the others' logits as they were with documents
  packing, and each document's logits are those it has alone; with concat packing they move.
  96 tokens take the chunked causal attention of XLA:CPU, 16 one chunk."""
  config = micro_config(training_objective=objective)
  config.data.packing = "documents"
  builder = ProgressiveRackBuilder(config)
  builder.add_stack()
  rack = builder.build_rack()
  eos, rng = special_ids(config).eos, np.random.default_rng(1)
  third = (seq - 2) // 3
  tokens, spans = _packed_row(rng, [third, third, seq - 2 - 2 * third], eos)
  (_, _), (s1, e1), (s2, e2) = spans
  other = tokens.at[0, s1:e1].set(jnp.asarray(rng.integers(0, 256, e1 - s1)))
  forward = jax.jit(lambda tokens, segments: rack(rack.params, tokens, segments=segments))
  logits = lambda tokens: forward(tokens, Segments(*document_segments(tokens, eos)))
  a, b = logits(tokens), logits(other)
  kept = np.r_[0:s1, e1 + 1:seq]   # the other documents (the changed one's EOS is its own)
  np.testing.assert_allclose(a[0, kept], b[0, kept], rtol=0, atol=1e-6)
  alone = rack(rack.params, tokens[:, s2:e2])   # the last document alone, positions from 0
  np.testing.assert_allclose(a[0, s2:e2], alone[0], rtol=1e-5, atol=1e-5)
  concat = jax.jit(lambda tokens: rack(rack.params, tokens))
  assert np.abs(concat(tokens)[0, s2:] - concat(other)[0, s2:]).max() > 1e-3


def test_on_a_gpu_segments_take_xla_attention_with_one_note(monkeypatch, capsys):
  """cuDNN's fused kernel takes no segment mask here: the masked attention is XLA's, said once."""
  q, k, v = (jax.random.normal(jax.random.key(i), (2, 16, 2, 8), jnp.bfloat16) for i in range(3))
  ids = jnp.asarray([[0] * 5 + [1] * 11, [0] * 16], jnp.int32)
  on_cpu = attend(q, k, v, causal=True, segment_ids=ids)
  monkeypatch.setattr(layers, "_NOTED", set())
  monkeypatch.setattr(layers.jax, "default_backend", lambda: "gpu")
  for _ in range(2):
    np.testing.assert_array_equal(attend(q, k, v, causal=True, segment_ids=ids), on_cpu)
  err = capsys.readouterr().err
  assert err.count("\n") == 1 and "data.packing='documents'" in err and "XLA" in err


def _write_docs(path: pathlib.Path, n: int = 400) -> str:
  """A jsonl file of `n` short documents (2 to 12 bytes): a record of 16 tokens holds several."""
  words = "the quick brown fox jumps over the lazy dog while stacks grow".split()
  path.write_text("".join(json.dumps({"text": " ".join(words[i % 11:i % 11 + 1 + i % 2])}) + "\n"
                          for i in range(n)))
  return str(path)


def docs_config(path: str, **progressive):
  """`text_config` over the jsonl documents at `path`, packed as documents."""
  config = text_config(path, **progressive)
  config.data.source, config.data.packing = "jsonl", "documents"
  return config


def test_clm_loss_leaves_out_each_eos_position(tmp_path):
  """The EOS position's target (the next document's first token) counts in neither the train
  loss, nor the eval loss, nor the bytes of bits per byte: a NumPy recomputation."""
  config = docs_config(_write_docs(tmp_path / "docs.jsonl"), target_stacks=1)
  builder = ProgressiveRackBuilder(config)
  builder.add_stack()
  rack, labels = builder.build_rack(), builder.labels()
  batch = make_dataloader(config).eval_batches(1)[0]
  example = eval_example(TimeStepMasking(config), batch)
  tokens, eos = np.asarray(batch["tokens"]), special_ids(config).eos
  assert (tokens[:, :-1] == eos).sum() >= 4   # several boundaries inside the records
  want_mask = np.ones(tokens.shape, np.float32)
  want_mask[:, -1] = 0
  want_mask[:, :-1] *= tokens[:, :-1] != eos
  np.testing.assert_array_equal(example["loss_mask"], want_mask)

  logits = np.asarray(rack(rack.params, example["inputs"], segments=Segments.of(example)),
                      np.float64)
  targets = np.concatenate([tokens[:, 1:], np.zeros((len(tokens), 1), int)], 1)
  top = logits.max(-1, keepdims=True)
  log_p = logits - top - np.log(np.exp(logits - top).sum(-1, keepdims=True))
  nll = -np.take_along_axis(log_p, targets[..., None], -1)[..., 0]
  want_loss = (nll * want_mask).sum() / want_mask.sum()
  want_bits = (nll * want_mask).sum() / math.log(2) / (BYTES.token_bytes[targets] * want_mask).sum()

  plan = plan_stage(rack, set(), cache_activations=False)
  tx = make_optimizer(config.training, labels, 8)
  state = init_train_state(jax.tree.map(jnp.array, rack.params), tx, plan)
  _, metrics = make_train_step(rack, plan, tx, labels)(state, example)
  assert float(metrics["loss"]) == pytest.approx(want_loss, rel=1e-5)
  got = evaluate(rack, [example], token_bytes=BYTES.token_bytes)
  assert got["loss"] == pytest.approx(want_loss, rel=1e-5)
  assert got["tokens"] == want_mask.sum()
  assert got["bits_per_byte"] == pytest.approx(want_bits, rel=1e-5)


def test_a_cached_stage_equals_a_streamed_recompute(tmp_path):
  """The cached stage's examples keep their segments: its losses are the streamed ones."""
  path = _write_docs(tmp_path / "docs.jsonl")
  runs = {}
  for cache in (True, False):
    config = docs_config(path, target_stacks=2, cache_activations=cache)
    trainer = ProgressiveTrainer(config, progress=False, log=lambda _: None)
    runs[cache] = trainer.train_progressively(ProgressiveRackBuilder(config),
                                              make_dataloader(config))["stages"][1]
  assert [runs[c]["activation_mode"] for c in (True, False)] == ["cached", "streamed"]
  np.testing.assert_allclose(runs[True]["losses"], runs[False]["losses"], rtol=1e-5)
  np.testing.assert_allclose([e for _, e in runs[True]["eval_curve"]],
                             [e for _, e in runs[False]["eval_curve"]], rtol=1e-5)


def test_resume_mid_stage_is_bit_identical(tmp_path):
  config = docs_config(_write_docs(tmp_path / "docs.jsonl"), target_stacks=2)
  whole = train_run(config, tmp_path / "whole")
  concat = config.copy_and_resolve_references()
  concat.data.packing = "concat"
  concat_losses = train_run(concat, tmp_path / "concat")[0]["stages"][0]["losses"]
  assert whole[0]["stages"][0]["losses"] != concat_losses   # the segments change the run
  assert checkpoint_steps(tmp_path / "whole") == [3, 6, 8, 11, 14, 16]
  # Cut off after step 11 = stage 2 (cached), step 3.
  cut_copy(tmp_path / "whole", tmp_path / "cut", 11)
  resumed = train_run(config, tmp_path / "cut")
  assert resumed[0]["stages"][1]["activation_mode"] == "cached"
  assert_same_run(whole, resumed)


def test_prepared_shards_give_the_examples_of_their_source(tmp_path):
  """Segments come from the tokens and the tokenizer's EOS (a BPE's, id 3, here), so prepared
  records give the source's segment ids and positions."""
  config = docs_config(_write_docs(tmp_path / "docs.jsonl"))
  config.data.tokenizer, config.model.vocab_size = "bpe:300", 300
  prepare(config, str(tmp_path / "prepared"), progress=False)
  shards = config.copy_and_resolve_references()
  shards.data.source, shards.data.paths = "array_record", (str(tmp_path / "prepared"),)
  masking = TimeStepMasking(config)
  examples = lambda loader: [masking.example(b, 0) for b in
                             loader.eval_batches(2) + [next(loader.train_iter())]]
  source, prepared = examples(make_dataloader(config)), examples(make_dataloader(shards))
  assert special_ids(config).eos == 3
  assert sum(int(ex["segment_ids"].max()) for ex in source) >= 3
  for a, b in zip(source, prepared, strict=True):
    for key in ("inputs", "segment_ids", "positions", "loss_mask"):
      np.testing.assert_array_equal(a[key], b[key])


def test_a_users_batches_get_segments_only_with_documents_packing(tmp_path):
  """A re-iterable of batches (data/iterable.py) is split at the config tokenizer's EOS too."""
  config = micro_config()
  eos = special_ids(config).eos
  tokens = np.tile(np.arange(16), (4, 1))
  tokens[:, 5] = eos
  for packing, keys in (("concat", set()), ("documents", {"segment_ids", "positions"})):
    config.data.packing = packing
    batch = next(as_dataloader([{"input_ids": tokens}], config).train_iter())
    example = TimeStepMasking(config).example(batch, 0)
    assert {"segment_ids", "positions"} & set(example) == keys
  np.testing.assert_array_equal(example["segment_ids"], (np.arange(16) > 5)[None].repeat(4, 0))


def test_an_unknown_packing_exits_2_in_one_line(text_corpus, tmp_path, capsys):
  assert main([*micro_args(text_corpus, tmp_path / "run"), "--config.data.packing=bags"]) == 2
  err = capsys.readouterr().err
  assert "data.packing='bags'" in err and "'documents'" in err and err.count("\n") == 1, err
