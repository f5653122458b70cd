"""A drop-in for the original StackWise's users. Its YAML files load (stackwise_jax/upstream.py):
each key mapped to our field or named as ignored in one warning line; values we do not implement,
unknown keys and Python tags are one-line ConfigErrors (exit 2 from the CLI); a key given twice
is kept last with one warning, as the original's PyYAML keeps it (ours refuses one). Its
API words work: keyword `stack_idx`, a builder from field names."""
import json
import pathlib
import re
import textwrap

import jax.numpy as jnp
import numpy as np
import pytest
import yaml

from conftest import REPO
from stackwise_jax import ProgressiveRackBuilder, TimeStepMasking
from stackwise_jax.cli import main
from stackwise_jax.config import default_config, load_config
from stackwise_jax.errors import ConfigError
from stackwise_jax.upstream import IGNORED
from stackwise_jax.upstream import ORIGINAL
from stackwise_jax.data.tokenizer import special_ids

FIXTURES = pathlib.Path(__file__).parent / "fixtures" / "upstream"

# Every key of the original's schema (its src/config/base.py), values other than ours where the
# key maps to a field. attention_preset "custom" makes attention_custom count.
FULL = """\
model:
  vocab_size: 300
  d_model: 64
  n_heads: 4
  n_kv_heads: 2
  d_ff: 128
  architecture:
    n_stacks: 5
    blocks_per_stack: 2
  attention_preset: custom
  attention_custom:
    attention_type: mha
    attention_mode: bidirectional
    mla_rq: 64
    mla_rkv: 32
    kernel_type: linear
    kernel_dim: 32
  dropout: 0.1
  tie_embeddings: false
  freeze_up_proj: false
  use_rope: true
  rope_theta: 5000.0
  mask_fraction_min: 0.2
  mask_fraction_max: 1.0
  special_mask_id: 258
  tokenizer_embedding:
    family: gpt2
    embedding_option: embed_tokens
    freeze_embeddings: true
    adapter_hidden_dim: null
training:
  batch_size: 8
  seq_len: 32
  max_steps: 7
  optimizer:
    optimizer_type: AdamW
    lr: 2.0e-4
    weight_decay: 0.05
    betas: [0.9, 0.999]
    eps: 1.0e-8
    momentum: 0.9
    dampening: 0.0
    nesterov: false
    custom_params: {}
    use_groups: false
    groups: []
  device: cpu
  gradient_checkpointing: true
  cache_dir: ./cache
  cache_mode: stack
  save_stacks: true
  save_rack: false
  min_mask_fraction: 0.2
  max_mask_fraction: 1.0
  mask_schedule_type: linear
  mask_token_id: 259
  epochs_per_stack: 2
  joint_tuning_steps: 50
  fine_tune_mode: clm
  strategy: progressive
  end_to_end_scope: stackwise
  run_id: r1
  qlora:
    enabled: true
    rank: 4
    alpha: 8
    dropout: 0.1
    lr: 1.0e-5
    progressive_enabled: true
    progressive_rank: 2
    progressive_alpha: 4
    strategy: variable
    rank_pattern: increasing
    alpha_pattern: decreasing
    configs:
      0: {rank: 2, alpha: 4, dropout: 0.1}
      1: {rank: 8}
      2: {alpha: 2}
      3: {rank: 4, alpha: 8, lr: 1.0e-4}
    mixed_precision: true
  current_block_lr: 1.0e-4
  quantization_enabled: true
  quantization_type: fp16
  time_step_masking: true
  num_time_steps: 5
  time_step_mask_fractions: [0.2, 0.4, 0.6, 0.8, 1.0]
  progressive:
    enabled: true
    max_stacks: 6
    target_stacks: 4
    building_mode: prepend
    trunk_strategy: qlora
    new_stack_precision: bfloat16
    cache_activations: false
    time_interpretation: input
    training_objective: mlm
  log_interval: 3
  save_interval: 9
  checkpoint_dir: ./ckpt
  use_wandb: false
  wandb_project: p
  wandb_entity: null
  wandb_run_name: null
  wandb_tags: []
  wandb_notes: null
data:
  dataset_path: corpus/*.txt
  use_dummy_data: false
  num_samples: 100
  tokenizer_path: null
  max_length: 48
  padding: right
  num_workers: 1
  pin_memory: true
  shuffle: true
"""

FULL_EXPECTED = {
    "model.vocab_size": 300, "model.d_model": 64, "model.n_heads": 4, "model.n_kv_heads": 2,
    "model.d_ff": 128, "model.attention": "gqa", "model.n_blocks_per_stack": 2,
    "model.dropout": 0.1, "model.tie_embeddings": False, "model.rope_theta": 5000.0,
    "model.max_seq_len": 48,                      # the longer of seq_len and data.max_length
    "training.batch_size": 8, "training.seq_len": 32, "training.steps_per_stack": 7,
    "training.lr": 2e-4, "training.weight_decay": 0.05, "training.epochs_per_stack": 2,
    "training.data_reuse": "pool", "training.log_every": 3, "training.checkpoint_every": 9,
    "training.workdir": "./ckpt",
    "training.progressive.enabled": True, "training.progressive.max_stacks": 6,
    "training.progressive.target_stacks": 4,      # the progressive block wins over n_stacks
    "training.progressive.building_mode": "prepend",
    "training.progressive.trunk_strategy": "qlora",
    "training.progressive.new_stack_precision": "bfloat16",
    "training.progressive.cache_activations": False,
    "training.progressive.time_interpretation": "input",
    "training.progressive.training_objective": "mlm",
    "training.progressive.mask_token_id": 259,    # training.mask_token_id wins over special_mask_id
    "training.progressive.mlm_min_ratio": 0.2, "training.progressive.num_time_steps": 5,
    "training.progressive.qlora_enabled": True, "training.progressive.qlora_rank": 4,
    "training.progressive.qlora_alpha": 8.0, "training.progressive.progressive_qlora": True,
    "training.progressive.progressive_qlora_rank": 2,
    "training.progressive.progressive_qlora_alpha": 4.0,
    "training.progressive.qlora_strategy": "variable",
    "training.progressive.qlora_rank_pattern": "increasing",
    "training.progressive.qlora_alpha_pattern": "decreasing",
    "data.source": "text", "data.paths": ("corpus/*.txt",), "data.num_workers": 1,
    "logging.wandb": False, "logging.wandb_project": "p",   # the null ones keep ours
    "logging.wandb_entity": "", "logging.wandb_tags": (),
}


def _write(tmp_path, text, name="original.yaml"):
  path = tmp_path / name
  path.write_text(textwrap.dedent(text))
  return str(path)


def _field(config, path):
  for name in path.split("."):
    config = config[name]
  return config


def _keys(text):
  """The dotted keys of YAML `text` down to ORIGINAL's rows."""
  def walk(node, prefix):
    for key, value in node.items():
      path = f"{prefix}.{key}" if prefix else key
      yield from ([path] if path in ORIGINAL else walk(value, path))
  return set(walk(yaml.safe_load(text), ""))


def _warning(capsys) -> str:
  lines = capsys.readouterr().err.strip().splitlines()
  assert len(lines) == 1, lines
  return lines[0]


# --- Every key: mapped, or named in the warning. ---


def test_full_fixture_has_every_key_of_the_original_schema():
  assert _keys(FULL) == set(ORIGINAL)


def test_every_key_maps_to_our_field(tmp_path, capsys):
  config = load_config(_write(tmp_path, FULL))
  for path, expected in FULL_EXPECTED.items():
    assert _field(config, path) == expected, path
  # Per stack rank and alpha; the missing ones come from qlora.rank / qlora.alpha.
  assert config.training.progressive.qlora_configs.to_dict() == {
      0: {"rank": 2, "alpha": 4}, 1: {"rank": 8, "alpha": 8.0}, 2: {"rank": 4, "alpha": 2},
      3: {"rank": 4, "alpha": 8}}
  warning = _warning(capsys)
  assert "run differently" not in warning   # every value here is one we reproduce


def test_ignored_keys_are_named_in_one_warning_line(tmp_path, capsys):
  load_config(_write(tmp_path, FULL))
  warning = _warning(capsys)
  named = set(re.search(r"no equivalent here: (.*)$", warning).group(1).split(", "))
  expected = {key for key, rule in ORIGINAL.items() if rule is IGNORED}
  # Read by the original only with strategy end_to_end; per-stack adapter dropout and lr.
  expected |= {"training.end_to_end_scope", "training.qlora.configs.0.dropout",
               "training.qlora.configs.3.lr"}
  assert named == expected


def test_values_run_differently_are_named_in_the_warning(tmp_path, capsys):
  config = load_config(_write(tmp_path, """\
      model:
        freeze_up_proj: true
        special_mask_id: 4
      training:
        optimizer:
          betas: [0.9, 0.95]
        max_mask_fraction: 0.9
      """))
  warning = _warning(capsys)
  for fragment in ("model.freeze_up_proj=True", "training.optimizer.betas=[0.9, 0.95]",
                   "training.max_mask_fraction=0.9", "model.special_mask_id=4 (a byte"):
    assert fragment in warning
  assert config.training.progressive.mask_token_id is None   # a byte id is never the mask
  assert special_ids(config).mask == 257


def test_original_names_are_in_the_readme():
  readme = (REPO / "README.md").read_text()
  start = readme.index("## Coming from the original StackWise")
  section = readme[start:readme.index("\n## ", start + 1)]
  missing = [key for key in ORIGINAL if f"`{key}`" not in section]
  assert not missing


# --- Derived fields. ---


def test_no_training_objective_trains_mlm_as_the_original(tmp_path):
  config = load_config(_write(tmp_path, "model:\n  architecture:\n    n_stacks: 2\n"))
  assert config.training.progressive.training_objective == "mlm"
  ours = load_config(_write(tmp_path, "model:\n  d_model: 64\n", name="ours.yaml"))
  assert ours.training.progressive.training_objective == "clm"   # our own files keep our default


@pytest.mark.parametrize("n_kv_heads, attention", [(2, "gqa"), (4, "mha")])
def test_fewer_kv_heads_means_grouped_query_attention(tmp_path, n_kv_heads, attention):
  config = load_config(_write(tmp_path, f"""\
      model:
        n_heads: 4
        n_kv_heads: {n_kv_heads}
        attention_preset: efficient_gqa
      """))
  assert config.model.attention == attention


def test_fallback_keys_fill_what_the_training_block_leaves_out(tmp_path):
  config = load_config(_write(tmp_path, """\
      model:
        architecture:
          n_stacks: 6
        mask_fraction_min: 0.3
        special_mask_id: 259
      data:
        max_length: 64
      """))
  p = config.training.progressive
  assert (p.target_stacks, p.max_stacks) == (6, 6)
  assert (p.mlm_min_ratio, p.mask_token_id) == (0.3, 259)
  assert (config.training.seq_len, config.model.max_seq_len) == (64, 64)


def test_end_to_end_is_one_stage_over_the_whole_rack(tmp_path):
  config = load_config(_write(tmp_path, """\
      training:
        strategy: end_to_end
        end_to_end_scope: rackwise
        progressive:
          enabled: true
      """))
  assert config.training.progressive.enabled is False


def test_attention_custom_is_ignored_unless_the_preset_is_custom(tmp_path, capsys):
  config = load_config(_write(tmp_path, """\
      model:
        attention_preset: gpt_style
        attention_custom:
          attention_type: mla
      training:
        progressive:
          training_objective: clm
      """))
  assert config.training.progressive.training_objective == "clm"
  assert "model.attention_custom.attention_type" in _warning(capsys)


# --- What we cannot run: one line naming it. ---


@pytest.mark.parametrize("text, needle", [
    ("model:\n  attention_preset: mla_attention\n", "model.attention_preset='mla_attention'"),
    ("model:\n  attention_preset: kernel_attention\n", "model.attention_preset='kernel_attention'"),
    ("model:\n  attention_preset: mlgka\n", "model.attention_preset='mlgka'"),
    ("model:\n  attention_preset: custom\n  attention_custom:\n    attention_type: mla\n",
     "model.attention_custom.attention_type='mla'"),
    ("model:\n  attention_preset: custom\n  attention_custom:\n    kernel_type: gaussian\n",
     "model.attention_custom.kernel_type='gaussian'"),
    ("model:\n  use_rope: false\n", "model.use_rope=False"),
    ("training:\n  optimizer:\n    optimizer_type: SGD\n",
     "training.optimizer.optimizer_type='SGD'"),
    ("training:\n  optimizer:\n    use_groups: true\n", "training.optimizer.use_groups=True"),
    ("training:\n  optimizer:\n    custom_params: {amsgrad: true}\n",
     "training.optimizer.custom_params="),
    ("training:\n  mask_schedule_type: cosine\n", "training.mask_schedule_type='cosine'"),
    ("training:\n  time_step_mask_fractions: [0.1, 0.5, 0.6]\n",
     "training.time_step_mask_fractions=[0.1, 0.5, 0.6]"),
    ("training:\n  strategy: end_to_end\n  end_to_end_scope: stackwise\n",
     "training.end_to_end_scope='stackwise'"),
    ("model:\n  attention_preset: gpt_style\n", "model.attention_preset='gpt_style' (causal"),
    ("training:\n  min_mask_fraction: 0.1\n  time_step_mask_fractions: [0.2, 0.6, 1.0]\n",
     "training.min_mask_fraction=0.1"),   # two keys set mlm_min_ratio differently
])
def test_values_we_do_not_implement_are_config_errors(tmp_path, text, needle):
  with pytest.raises(ConfigError) as e:
    load_config(_write(tmp_path, text))
  assert needle in str(e.value) and "\n" not in str(e.value)


def test_a_tokenizer_path_is_our_tokenizer(tmp_path):
  from stackwise_jax.data.tokenizer import train_bpe
  train_bpe(["some text to learn from " * 20], 300).save(str(tmp_path))
  path = tmp_path / "tokenizer.json"
  config = load_config(_write(tmp_path, f"data:\n  tokenizer_path: {path}\n"))
  assert config.data.tokenizer == str(path)
  with pytest.raises(ConfigError, match="data.tokenizer='tok.json': allowed: .*an existing"):
    load_config(_write(tmp_path, "data:\n  tokenizer_path: tok.json\n"))


def test_an_unimplemented_value_exits_2_from_the_cli(tmp_path, capsys):
  path = _write(tmp_path, "model:\n  attention_preset: mla_attention\n")
  assert main(["train", "--config", path, "--workdir", str(tmp_path / "run")]) == 2
  assert "model.attention_preset='mla_attention'" in capsys.readouterr().err


@pytest.mark.parametrize("text, needle", [
    ("model:\n  architecture:\n    n_layers: 2\n", "model.architecture.n_layers: unknown field"),
    ("training:\n  max_steps: 5\n  lr: 0.1\n", "training.lr: unknown field"),
])
def test_a_key_in_neither_list_is_unknown(tmp_path, text, needle):
  with pytest.raises(ConfigError, match=re.escape(needle)):
    load_config(_write(tmp_path, text))


def test_a_duplicate_key_in_our_format_is_refused_with_file_and_line(tmp_path, capsys):
  path = _write(tmp_path, "model:\n  d_model: 64\n  d_model: 32\n")
  with pytest.raises(ConfigError, match=r"original\.yaml:3: duplicate key 'd_model' at lines 2 and 3"):
    load_config(path)
  assert main(["train", "--config", path, "--workdir", str(tmp_path / "run")]) == 2
  err = capsys.readouterr().err
  assert err.startswith(f"stackwise-jax: error: {path}:3: duplicate key") and err.count("\n") == 1


def test_a_duplicate_key_in_the_originals_format_keeps_the_last_with_one_warning(tmp_path, capsys):
  # PyYAML, which the original reads its files with, keeps the last.
  config = load_config(_write(tmp_path, "model:\n  architecture:\n    n_stacks: 2\n"
                                        "  d_model: 64\n  d_model: 32\n"))
  assert config.model.d_model == 32
  warnings = [line for line in capsys.readouterr().err.splitlines() if "duplicate key" in line]
  assert warnings == [f"stackwise-jax: warning: {tmp_path / 'original.yaml'}: duplicate key "
                      "'d_model' at lines 4 and 5: the last one is used, as the original "
                      "StackWise (PyYAML) uses it"]


def test_python_tags_are_refused_by_name(tmp_path):
  with pytest.raises(ConfigError, match=r"original\.yaml:2:17: tag !!python/object:os\.system is not "
                                        r"allowed"):
    load_config(_write(tmp_path, "model:\n  architecture: !!python/object:os.system\n    n: 1\n"))


# --- The original's own files (tests/fixtures/upstream, copied from its repository). ---


@pytest.mark.parametrize("name, objective, attention, stacks", [
    ("tiny_bert_config.yaml", "mlm", "mha", 4),
    ("tiny_llama_config.yaml", "clm", "gqa", 6),
])
def test_original_example_files_load_and_validate(name, objective, attention, stacks):
  config = load_config(str(FIXTURES / name))
  assert config.training.progressive.training_objective == objective
  assert config.model.attention == attention
  assert config.training.progressive.target_stacks == stacks


@pytest.mark.parametrize("name, lines", [
    ("config.yaml", (120, 178)), ("config_small.yaml", (120, 178)),
    ("config_standard.yaml", (109, 167)),
])
def test_original_files_with_two_progressive_blocks_keep_the_second(tmp_path, capsys, name, lines):
  config = load_config(str(FIXTURES / name))
  err = capsys.readouterr().err
  assert f"duplicate key 'progressive' at lines {lines[0]} and {lines[1]}: the last one is used" in err
  # The same as the file without its first block: what PyYAML keeps.
  text = (FIXTURES / name).read_text().splitlines(keepends=True)
  start = text.index("  progressive:\n")
  end = next(i for i in range(start + 1, len(text)) if not text[i].startswith("    "))
  kept = load_config(_write(tmp_path, "".join(text[:start] + text[end:])))
  assert "duplicate key" not in capsys.readouterr().err
  assert config.to_dict() == kept.to_dict()
  assert config.training.progressive.max_stacks == 12
  assert config.training.progressive.target_stacks == 2    # model.architecture.n_stacks


# Sizes small enough to train in seconds; every other field is the file's.
TINY_RUN = ["--config.model.vocab_size=260", "--config.model.d_model=32",
            "--config.model.n_heads=2", "--config.model.n_kv_heads=2", "--config.model.d_ff=64",
            "--config.model.n_blocks_per_stack=1", "--config.training.batch_size=4",
            "--config.training.seq_len=16", "--config.training.steps_per_stack=3",
            "--config.training.warmup_steps=1", "--config.training.eval_batches=1",
            "--config.training.progressive.target_stacks=2", "--config.data.source=text",
            # tiny_llama_config.yaml has use_wandb: true (tests/test_wandb.py logs offline)
            "--config.logging.wandb_mode=disabled"]


@pytest.mark.parametrize("name, duplicates", [
    ("config.yaml", 1), ("config_small.yaml", 1), ("config_standard.yaml", 1),
    ("tiny_bert_config.yaml", 0), ("tiny_llama_config.yaml", 0),
])
def test_the_originals_shipped_files_train_a_tiny_two_stage_run(text_corpus, tmp_path, capsys,
                                                                 name, duplicates):
  workdir = tmp_path / "run"
  assert main(["train", "--config", str(FIXTURES / name), "--workdir", str(workdir),
               "--no-progress", *TINY_RUN, f"--config.data.paths=('{text_corpus}',)"]) == 0
  err = capsys.readouterr().err
  assert sum("duplicate key 'progressive'" in line for line in err.splitlines()) == duplicates
  stages = json.loads((workdir / "results.json").read_text())["stages"]
  assert [s["stage"] for s in stages] == [1, 2]


def test_original_dump_with_python_tags_is_refused_and_loads_without_them(tmp_path):
  path = FIXTURES / "custom_config.yaml"
  with pytest.raises(ConfigError, match=r"tag !!python/object:src\.config\.base\."
                                        r"ArchitectureConfig is not allowed"):
    load_config(str(path))
  config = load_config(_write(tmp_path, re.sub(r" !!python/object:\S+", "", path.read_text())))
  assert (config.model.d_model, config.model.attention) == (2048, "gqa")
  assert config.training.steps_per_stack == 500


def test_stack_idx_keyword_gives_the_time_step_of_the_stacks_level():
  config = default_config()   # append mode, 3 target stacks, linear mapping, 4 steps a level
  p = config.training.progressive
  masking = TimeStepMasking(config)
  # append: stack k sits at level target_stacks - 1 - k; time step = level * time_per_stack
  for stack_idx, level in ((0, 2), (1, 1), (2, 0)):
    assert masking.level_of_stack(stack_idx=stack_idx) == level
    assert masking.get_time_step_for_stack(stack_idx=stack_idx) == level * p.time_per_stack
  batch = {"tokens": jnp.arange(2 * 16).reshape(2, 16) % 200, "example_id": jnp.array([3, 9])}
  by_keyword = masking.generate_masks_for_stack(batch, stack_idx=1, salt=5)
  by_position = masking.generate_masks_for_stack(batch, 1, 5)
  for key in by_position:
    np.testing.assert_array_equal(by_keyword[key], by_position[key])
  assert np.all(np.asarray(by_keyword["time_step"]) == p.time_per_stack)


def test_builder_from_field_names_builds_those_sizes():
  builder = ProgressiveRackBuilder(vocab_size=300, d_model=64, d_ff=96, n_heads=2, n_kv_heads=2,
                                   max_stacks=5)
  m = builder.config.model
  assert (m.vocab_size, m.d_model, m.d_ff, m.n_heads) == (300, 64, 96, 2)
  assert builder.config.training.progressive.max_stacks == 5
  builder.add_stack()
  params = builder.params
  assert params["embed_head"]["embed"]["embedding"].shape == (300, 64)
  block = params["stacks"]["stack_0"]["blocks"][0]
  assert block["attn"]["q"]["kernel"].shape == (64, 64)
  assert block["ffn"]["gate"]["kernel"].shape == (64, 96)
  # the fields go on top of a given config too, which is left as it was
  base = default_config()
  assert ProgressiveRackBuilder(base, d_model=32).config.model.d_model == 32
  assert base.model.d_model == 128


@pytest.mark.parametrize("fields, fragment", [
    ({"d_modle": 64}, "d_modle=64: not a config field"),
    ({"d_model": "wide"}, "model.d_model='wide': expected an int"),
    ({"d_model": 66}, "model.d_model=66"),   # validated: not a multiple of n_heads=4
])
def test_builder_field_names_are_checked(fields, fragment):
  with pytest.raises(ConfigError, match=fragment.replace("(", r"\(").replace(")", r"\)")):
    ProgressiveRackBuilder(**fields)


def _depth_builder(mode):
  config = default_config()
  p = config.training.progressive
  p.building_mode, p.target_stacks, p.max_stacks = mode, 4, 5
  p.time_interpretation, p.stack_time_mapping, p.time_per_stack = "depth", "linear", 4
  p.training_objective = "mlm"
  return ProgressiveRackBuilder(config)


@pytest.mark.parametrize("mode, operations, want", [
    # (name, time step) from the embedding to the head. Levels count from the head (0 = lowest
    # noise) in the rack of target_stacks=4; the time step is 4 per level.
    ("append", ["append", "append", "prepend", "append"],
     [("stack_2", 12), ("stack_0", 8), ("stack_1", 4), ("stack_3", 0)]),
    ("append", ["prepend", "prepend"], [("stack_1", 12), ("stack_0", 8)]),
    # prepend mode: one more stack is still to come in front of these three
    ("prepend", ["prepend", "append", "prepend"], [("stack_2", 8), ("stack_0", 4), ("stack_1", 0)]),
    ("prepend", ["prepend", "prepend", "prepend", "prepend"],
     [("stack_3", 12), ("stack_2", 8), ("stack_1", 4), ("stack_0", 0)]),
])
def test_time_steps_follow_position_whatever_built_the_rack(mode, operations, want):
  builder = _depth_builder(mode)
  for op in operations:
    getattr(builder, f"{op}_stack")()
  assert [(s.name, s.time_step) for s in builder.specs] == want


def test_a_trained_stack_keeps_its_time_step_and_stages_mask_at_the_stacks_own():
  builder = _depth_builder("append")
  builder.append_stack()
  builder.trained.add("stack_0")      # as after its stage
  new = builder.prepend_stack()       # next to the embedding: the highest noise
  assert [(s.name, s.time_step) for s in builder.specs] == [("stack_1", 12), ("stack_0", 12)]
  assert new.time_step == 12
  masking = builder.masking
  batch = {"tokens": jnp.zeros((2, 16), jnp.int32), "example_id": jnp.array([1, 2])}
  example = masking.example(batch, masking.time_steps_at(batch, new.time_step, salt=0))
  np.testing.assert_array_equal(example["time_step"], [12, 12])
  assert masking.mask_ratio_at(12) == pytest.approx(
      masking.min_ratio + (1 - masking.min_ratio) * 12 / (masking.num_time_steps - 1))


def _log_softmax(x):
  x = x - x.max(-1, keepdims=True)
  return x - np.log(np.exp(x).sum(-1, keepdims=True))


@pytest.mark.parametrize("mode, operations", [("append", ["append", "append", "append"]),
                                              ("prepend", ["prepend", "prepend"]),
                                              ("append", ["append", "prepend"])])
def test_stacks_trained_together_each_train_at_their_own_time_step(mode, operations):
  """Untrained stacks trained in one stage: each example trains one of them, masked at its time
  step, on the rack that stack would have met in a stage of its own (the stacks built after it
  left out). The stage's first loss is recomputed here example by example with plain forwards
  through exactly those stacks."""
  from conftest import micro_config
  from stackwise_jax import ProgressiveTrainer
  from stackwise_jax.data.iterable import as_dataloader
  config = micro_config(training_objective="mlm", building_mode=mode, time_interpretation="depth",
                        target_stacks=len(operations), time_per_stack=4)
  config.training.steps_per_stack, config.training.batch_size = 1, 8
  rng = np.random.default_rng(0)
  batches = [{"tokens": rng.integers(0, 256, (8, 16)).astype(np.int32)} for _ in range(3)]

  def built():
    builder = ProgressiveRackBuilder(config)
    for op in operations:
      getattr(builder, f"{op}_stack")()
    return builder

  results = ProgressiveTrainer(config, progress=False).train_progressively(
      built(), batches, target_stacks=len(operations))
  builder = built()   # the same initial params
  specs, masking = builder.specs, builder.masking
  stage = results["stages"][0]
  assert stage["new_stacks"] == [s.name for s in specs]
  assert stage["time_steps"] == [s.time_step for s in specs]
  assert len(set(stage["time_steps"])) == len(specs)   # distinct steps: the test can tell them apart

  batch = next(as_dataloader(batches, config).train_iter())
  example = masking.stage_example(batch, specs, specs, salt=1)   # stage 1's salt
  time_steps = np.asarray(example["time_step"])
  assert set(time_steps) == set(stage["time_steps"])   # every new stack trains
  # masked as at its own time step
  again = masking.example(batch, time_steps)
  for key in ("inputs", "targets", "loss_mask"):
    np.testing.assert_array_equal(example[key], again[key])
  rack = builder.build_rack()
  by_step = {s.time_step: s for s in specs}
  loss_sum = tokens = 0.0
  for b, t in enumerate(time_steps):
    runs = [s.name for s in specs if s.index <= by_step[t].index]   # forward order
    one = lambda key: jnp.asarray(example[key])[b:b + 1]
    h, _ = rack.embed(rack.params, one("inputs"))
    logits = np.asarray(rack.logits(rack.params, rack.apply_stacks(rack.params, runs, h)))
    nll = -np.take_along_axis(_log_softmax(logits), np.asarray(one("targets"))[..., None], -1)
    loss_sum += float((nll[..., 0] * np.asarray(one("loss_mask"))).sum())
    tokens += float(np.asarray(one("loss_mask")).sum())
  assert stage["loss_start"] == pytest.approx(loss_sum / tokens, rel=1e-5)


def test_stacks_trained_together_on_an_objective_without_masks_all_run():
  """With clm a time step masks nothing, so stacks trained together (or end to end) train the
  whole rack on every example: no stack is skipped."""
  builder = _depth_builder("append")
  builder.config.training.progressive.training_objective = "clm"
  masking = TimeStepMasking(builder.config)
  specs = [builder.append_stack() for _ in range(3)]
  batch = {"tokens": jnp.arange(4 * 8).reshape(4, 8) % 200, "example_id": jnp.arange(4)}
  example = masking.stage_example(batch, specs, specs, salt=1)
  assert "active" not in example
  mlm = TimeStepMasking(_depth_builder("append").config)
  assert mlm.stage_example(batch, specs, specs, salt=1)["active"].shape == (4, 3)


def test_custom_time_mapping_may_be_a_callable_but_is_never_saved(tmp_path):
  from stackwise_jax.checkpoint import RunCheckpoints
  from stackwise_jax.config import to_yaml, validate
  config = default_config()
  p = config.training.progressive
  p.time_interpretation, p.stack_time_mapping, p.target_stacks = "depth", "custom", 3
  p.custom_time_mapping = lambda level, n_stacks, num_time_steps: 5 * level + 1
  validate(config)
  masking = TimeStepMasking(config)
  # append mode: stack k sits at level target_stacks - 1 - k; the function's value, clipped to N-1
  assert [masking.get_time_step_for_stack(stack_idx=k) for k in range(3)] == [11, 6, 1]
  builder = ProgressiveRackBuilder(config)
  assert [builder.add_stack().time_step for _ in range(3)] == [11, 6, 1]
  for save in (lambda: to_yaml(config), lambda: RunCheckpoints(str(tmp_path), config)):
    with pytest.raises(ConfigError, match="custom_time_mapping=.*a callable cannot be saved"):
      save()
  assert not (tmp_path / "checkpoints").exists()
  p.custom_time_mapping = 42   # neither a name nor a function
  with pytest.raises(ConfigError, match="custom_time_mapping=42: expected a string"):
    validate(config)


# --- dataloaders: any re-iterable of batch dicts, ours or the original's keys ------------------


def test_original_batch_keys_become_ours_with_padding_left_out_of_the_loss():
  from stackwise_jax.data import PAD_ID
  from stackwise_jax.data.iterable import as_batch
  ids = np.arange(12, dtype=np.int64).reshape(2, 6) + 100
  attention = np.array([[1, 1, 1, 1, 0, 0], [1, 1, 1, 1, 1, 1]])
  batch = as_batch({"input_ids": ids, "target_ids": ids + 1, "attention_mask": attention},
                   first_example=8, shape=(2, 6))
  np.testing.assert_array_equal(batch["tokens"], np.where(attention == 1, ids, PAD_ID))
  np.testing.assert_array_equal(batch["targets"], np.where(attention == 1, ids + 1, PAD_ID))
  np.testing.assert_array_equal(batch["example_id"], [8, 9])
  assert batch["tokens"].dtype == np.int32
  with pytest.raises(ConfigError, match=r"shape \(2, 6\): allowed: .* = \(2, 8\)"):
    as_batch({"input_ids": ids}, first_example=0, shape=(2, 8))
  with pytest.raises(ConfigError, match="'tokens' or 'input_ids'"):
    as_batch({"ids": ids}, first_example=0, shape=(2, 6))


def test_a_list_of_batches_trains_exactly_as_the_loader_it_came_from(text_corpus):
  from conftest import micro_config
  from stackwise_jax import ProgressiveTrainer
  from stackwise_jax.data import make_dataloader
  config = micro_config()
  config.data.source, config.data.paths = "text", (text_corpus,)
  t = config.training
  stream = make_dataloader(config).train_iter()
  batches = [next(stream) for _ in range(2 * t.steps_per_stack)]   # what 2 stages draw
  losses = []
  for loader in (make_dataloader(config), batches):
    results = ProgressiveTrainer(config, progress=False).train_progressively(
        ProgressiveRackBuilder(config), loader, target_stacks=2)
    losses.append([s["losses"] for s in results["stages"]])
  assert losses[0] == losses[1]


def test_a_torch_dataloader_of_original_batches_trains(text_corpus):
  torch = pytest.importorskip("torch")
  from conftest import micro_config
  from stackwise_jax import ProgressiveTrainer
  config = micro_config(training_objective="mlm")
  t = config.training
  g = torch.Generator().manual_seed(0)
  ids = torch.randint(0, 256, (6 * t.batch_size, t.seq_len), generator=g)
  mask = torch.ones_like(ids)
  mask[:, -3:] = 0   # right padding
  rows = [{"input_ids": i, "attention_mask": m} for i, m in zip(ids, mask)]
  loader = torch.utils.data.DataLoader(rows, batch_size=t.batch_size)
  results = ProgressiveTrainer(config, progress=False).train_progressively(
      ProgressiveRackBuilder(config), loader, target_stacks=2)
  assert all(np.isfinite(s["loss_end"]) and np.isfinite(s["eval_loss"]) for s in results["stages"])


def test_resuming_an_iterable_skips_the_batches_it_gave():
  from stackwise_jax.data.iterable import IterableLoader
  config = default_config()
  config.training.batch_size, config.training.seq_len = 2, 4
  batches = [{"tokens": np.full((2, 4), i)} for i in range(5)]
  loader = IterableLoader(lambda: iter(batches), config)   # a generator function works too
  it = loader.train_iter()
  seen = [int(next(it)["tokens"][0, 0]) for _ in range(7)]
  assert seen == [0, 1, 2, 3, 4, 0, 1]   # endless: the source again from its start
  resumed = loader.train_iter()
  resumed.set_state(it.get_state())
  nxt = next(resumed)
  assert int(nxt["tokens"][0, 0]) == 2 and list(nxt["example_id"]) == [14, 15]
  with pytest.raises(ConfigError, match="one-shot iterator"):
    IterableLoader(iter(batches), config)


def test_a_run_on_a_list_of_batches_resumes_where_it_stopped(text_corpus, tmp_path):
  """Stopped after stage 2 and resumed for stage 3, a run on a plain list draws the same batches
  (the checkpoint holds how many it had taken) and gives stage 3's losses of an unbroken run."""
  from conftest import micro_config
  from stackwise_jax import ProgressiveTrainer
  from stackwise_jax.checkpoint import RunCheckpoints
  from stackwise_jax.data import make_dataloader
  config = micro_config()
  config.data.source, config.data.paths = "text", (text_corpus,)
  config.training.checkpoint_every = 0
  stream = make_dataloader(config).train_iter()
  batches = [{"input_ids": b["tokens"]} for b in (next(stream) for _ in range(30))]

  def run(workdir, target):
    checkpoints = RunCheckpoints(str(workdir), config, log=lambda _: None)
    results = ProgressiveTrainer(config, progress=False, log=lambda _: None,
                                 checkpoints=checkpoints).train_progressively(
        ProgressiveRackBuilder(config), batches, target_stacks=target)
    checkpoints.close()
    return results["stages"]

  unbroken = run(tmp_path / "unbroken", 3)
  run(tmp_path / "broken", 2)
  resumed = run(tmp_path / "broken", 3)
  assert [s["losses"] for s in resumed] == [s["losses"] for s in unbroken]


def test_the_readme_snippet_for_your_own_batches_runs():
  readme = (REPO / "README.md").read_text()
  begin = readme.index("```python\n", readme.index("- Or pass any re-iterable of batch dicts")) + 10
  code = readme[begin:readme.index("```\n", begin)]
  scope = {}
  exec(textwrap.dedent(code), scope)
  stages = scope["results"]["stages"]
  assert len(stages) == 2 and all(np.isfinite(s["eval_loss"]) for s in stages)


def test_progressive_dataloader_yields_the_stages_examples_and_caches_the_trunk():
  from stackwise_jax.progressive import ProgressiveDataLoader
  config = default_config()
  config.training.progressive.training_objective = "mlm"
  masking = TimeStepMasking(config)
  ids = np.random.default_rng(0).integers(0, 256, (3, 2, 16))
  batches = [{"input_ids": x} for x in ids]
  calls = []

  def trunk(example):
    calls.append(1)
    return np.asarray(example["inputs"], np.float32)[..., None] * 2

  loader = ProgressiveDataLoader(batches, masking, stack_idx=1, trunk_activations=trunk)
  for _ in range(2):
    examples = list(loader)
  assert len(calls) == 3   # the second pass read the cached activations
  for n, ex in enumerate(examples):
    ours = {"tokens": ids[n].astype(np.int32), "example_id": np.arange(2 * n, 2 * n + 2,
                                                                       dtype=np.int32)}
    want = masking.generate_masks_for_stack(ours, 1)
    for key in want:
      np.testing.assert_array_equal(ex[key], want[key])
    np.testing.assert_array_equal(ex["h"], np.asarray(want["inputs"], np.float32)[..., None] * 2)
  by_position = ProgressiveDataLoader(batches, masking, 1,
                                      trunk_activations={0: "a", 1: "b", 2: "c"})
  assert [ex["h"] for ex in by_position] == ["a", "b", "c"]
