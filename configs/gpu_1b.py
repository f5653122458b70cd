"""~1B-parameter config for one GPU (an H100 holds it): 5 stacks of 4 blocks, d_model 2048,
grouped-query attention, bf16 stacks. For GPU speed / MFU runs (BUILD_NOTES.md); far too big
for a laptop CPU."""
from stackwise_jax.config import default_config


def get_config():
  config = default_config()
  config.model.d_model = 2048
  config.model.n_heads = 16
  config.model.n_kv_heads = 8
  config.model.attention = "gqa"
  config.model.d_ff = 5632
  config.model.max_seq_len = 2048
  config.model.n_blocks_per_stack = 4

  config.training.batch_size = 8
  config.training.seq_len = 2048
  config.training.lr = 3e-4
  config.training.warmup_steps = 200
  config.training.steps_per_stack = 2000
  config.training.eval_every = 500
  config.training.eval_batches = 8

  config.training.progressive.new_stack_precision = "bfloat16"
  config.training.progressive.max_stacks = 6
  config.training.progressive.target_stacks = 5
  # Function-preserving growth on the frozen, cached trunk: the quality benchmark's winner against
  # an lr-tuned end-to-end run, on two corpora (BUILD_NOTES, *quality*). trunk_strategy="train"
  # ends lower at a fixed budget but saves fewer FLOPs to reach end-to-end's loss.
  config.training.progressive.new_stack_init = "identity"
  return config
