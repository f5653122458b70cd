"""Shared fixtures and helpers: small configs that build in milliseconds, small runs, and an
independent plain-JAX forward pass; test modules import them from here, never from each other."""
import os
import pathlib
import shutil
import struct
import tempfile

# The tests, and the CLI subprocesses they start (which inherit this environment), compile the
# same small steps again and again: XLA's persistent compilation cache serves the repeats (~13%
# off test_checkpoint.py). Set before jax is imported; a user's own cache settings win.
os.environ.setdefault("JAX_COMPILATION_CACHE_DIR",
                      os.path.join(tempfile.gettempdir(), "stackwise-jax-tests-xla-cache"))
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0")
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES", "0")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402

from stackwise_jax.checkpoint import RunCheckpoints  # noqa: E402
from stackwise_jax.config import default_config  # noqa: E402
from stackwise_jax.data import make_dataloader  # noqa: E402
from stackwise_jax.progressive import ProgressiveRackBuilder, ProgressiveTrainer  # noqa: E402

REPO = pathlib.Path(__file__).resolve().parents[1]


def micro_config(**progressive):
  """A 2-head, d_model 32 config over a tiny text corpus; override progressive fields by name."""
  c = default_config()
  c.model.d_model, c.model.n_heads, c.model.n_kv_heads, c.model.d_ff = 32, 2, 2, 64
  c.model.max_seq_len = 32
  c.training.batch_size, c.training.seq_len = 4, 16
  c.training.steps_per_stack, c.training.warmup_steps = 8, 2
  c.training.eval_every, c.training.eval_batches, c.training.log_every = 0, 2, 4
  c.training.progressive.max_stacks, c.training.progressive.target_stacks = 4, 3
  for key, value in progressive.items():
    c.training.progressive[key] = value
  return c


def write_corpus(directory) -> str:
  """Writes a few small text files into `directory`; returns their glob pattern."""
  words = "the quick brown fox jumps over the lazy dog while stacks grow one at a time".split()
  for i in range(6):
    (directory / f"doc{i}.txt").write_text(" ".join(words[i:] + words[:i]) * 40)
  return str(directory / "*.txt")


@pytest.fixture
def text_corpus(tmp_path):
  return write_corpus(tmp_path)


MICRO = ["--config.model.d_model=32", "--config.model.n_heads=2", "--config.model.n_kv_heads=2",
         "--config.model.d_ff=64", "--config.training.batch_size=4", "--config.training.seq_len=16",
         "--config.training.steps_per_stack=6", "--config.training.eval_batches=1",
         "--config.training.progressive.target_stacks=2"]


def micro_args(text_corpus, workdir):
  """`train` arguments of configs/tiny.py at micro sizes (2 stages) on `text_corpus`."""
  return ["train", "--config", str(REPO / "configs/tiny.py"), "--workdir", str(workdir),
          "--no-progress", "--config.data.source=text", f"--config.data.paths=('{text_corpus}',)",
          *MICRO]


# The trunk strategies a run can take, as micro_config fields.
TRUNKS = {"frozen": {},
          "qlora": dict(trunk_strategy="qlora", qlora_enabled=True, progressive_qlora=True,
                        quant_block_size=16)}


def text_config(text_corpus, **progressive):
  """`micro_config` over the text files `text_corpus` (a glob), checkpoints every 3 steps."""
  config = micro_config(**progressive)
  config.data.source, config.data.paths = "text", (text_corpus,)
  config.training.checkpoint_every, config.training.keep_checkpoints = 3, 100
  config.training.eval_every = 4
  return config


def train_run(config, workdir):
  """Trains `config` with checkpoints in `workdir` -> (results, the builder's final params)."""
  checkpoints = RunCheckpoints(str(workdir), config, log=lambda _: None)
  builder = ProgressiveRackBuilder(config)
  trainer = ProgressiveTrainer(config, progress=False, log=lambda _: None, checkpoints=checkpoints)
  results = trainer.train_progressively(builder, make_dataloader(config))
  checkpoints.close()
  return results, builder.params


def train_two_stacks(directory):
  """A 2-stage causal run (frozen cached trunk, checkpoints at each stage's end) in
  `directory`/run -> (its workdir, config, results)."""
  corpus = directory / "corpus.txt"
  corpus.write_text(" ".join(f"word{i % 37} the quick brown fox" for i in range(3000)))
  config = text_config(str(corpus), target_stacks=2)
  config.training.checkpoint_every = 0
  results, _ = train_run(config, directory / "run")
  return directory / "run", config, results


def checkpoint_steps(workdir) -> list[int]:
  """The checkpoint steps of the run in `workdir`, in order."""
  return sorted(int(p.name) for p in (pathlib.Path(workdir) / "checkpoints").iterdir()
                if p.name.isdigit())


def cut_copy(workdir, to, last_step: int) -> None:
  """Copies the run in `workdir` to `to` as if it had stopped after checkpoint `last_step`: the
  later checkpoints are left out."""
  shutil.copytree(workdir, to)
  for step in checkpoint_steps(to):
    if step > last_step:
      shutil.rmtree(pathlib.Path(to) / "checkpoints" / str(step))


def assert_same_run(a, b):
  """Two `train_run` results are the same run: losses, evals, bits per byte and params."""
  (results_a, params_a), (results_b, params_b) = a, b
  assert [s["losses"] for s in results_a["stages"]] == [s["losses"] for s in results_b["stages"]]
  assert [s["eval_curve"] for s in results_a["stages"]] == [s["eval_curve"] for s in results_b["stages"]]
  assert ([s["eval_bits_per_byte"] for s in results_a["stages"]]
          == [s["eval_bits_per_byte"] for s in results_b["stages"]])
  assert results_a["final_eval_bits_per_byte"] == results_b["final_eval_bits_per_byte"] is not None
  jax.tree.map(np.testing.assert_array_equal, params_a, params_b)


def reference_logits(params, config, order, tokens, causal):
  """Pre-norm RoPE transformer written directly against the params dicts (fp32, no NNX)."""
  m = config.model
  hd = m.d_model // m.n_heads

  def rms(x, scale):
    return x / jnp.sqrt(jnp.mean(x * x, -1, keepdims=True) + m.norm_eps) * scale

  def rope(x):                      # x: [B, T, H, hd]
    t, half = x.shape[1], hd // 2
    inv = m.rope_theta ** (-np.arange(half) / half)
    ang = np.arange(t)[:, None] * inv[None, :]
    cos, sin = np.cos(ang)[None, :, None, :], np.sin(ang)[None, :, None, :]
    x1, x2 = x[..., :half], x[..., half:]
    return jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], -1)

  def attention(x, p):
    b, t, _ = x.shape
    q = rope((x @ p["q"]["kernel"]).reshape(b, t, m.n_heads, hd))
    k = rope((x @ p["k"]["kernel"]).reshape(b, t, m.n_kv_heads, hd))
    v = (x @ p["v"]["kernel"]).reshape(b, t, m.n_kv_heads, hd)
    rep = m.n_heads // m.n_kv_heads
    k, v = jnp.repeat(k, rep, axis=2), jnp.repeat(v, rep, axis=2)
    scores = jnp.einsum("bqhd,bkhd->bhqk", q, k) / np.sqrt(hd)
    if causal:
      scores = jnp.where(np.tril(np.ones((t, t), bool)), scores, -1e30)
    out = jnp.einsum("bhqk,bkhd->bqhd", jax.nn.softmax(scores, -1), v).reshape(b, t, -1)
    return out @ p["o"]["kernel"]

  eh = params["embed_head"]
  x = eh["embed"]["embedding"][tokens]
  for name in order:
    for blk in params["stacks"][name]["blocks"].values():
      x = x + attention(rms(x, blk["attn_norm"]["scale"]), blk["attn"])
      f = blk["ffn"]
      h = rms(x, blk["ffn_norm"]["scale"])
      x = x + (jax.nn.silu(h @ f["gate"]["kernel"]) * (h @ f["up"]["kernel"])) @ f["down"]["kernel"]
  x = rms(x, eh["final_norm"]["scale"])
  return x @ eh["embed"]["embedding"].T


def mark_trained(builder, spec):
  """Marks `spec` trained, its float params shifted away from any fresh init (by its index, so
  stacks differ from each other too); returns it."""
  params = builder.params
  stacks = dict(params["stacks"])
  shift = lambda x: x + 0.01 * (spec.index + 1) if jnp.issubdtype(x.dtype, jnp.floating) else x
  stacks[spec.name] = jax.tree.map(shift, stacks[spec.name])
  builder.update_params({**params, "stacks": stacks})
  builder.trained.add(spec.name)
  return spec


def tensorboard_scalars(logdir) -> dict:
  """{tag: [(step, value)]} read back from the TFRecord framing of the event files in `logdir`
  (length, its CRC, the Event proto, its CRC)."""
  from tensorboardX.proto import event_pb2
  scalars = {}
  for path in sorted(pathlib.Path(logdir).glob("events.out.tfevents.*")):
    data = path.read_bytes()
    at = 0
    while at < len(data):
      (length,) = struct.unpack("<Q", data[at:at + 8])
      event = event_pb2.Event.FromString(data[at + 12:at + 12 + length])
      at += 12 + length + 4
      for value in event.summary.value:
        scalars.setdefault(value.tag, []).append((event.step, value.simple_value))
  return scalars
