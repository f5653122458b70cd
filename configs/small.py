"""Small config: up to 8 stacks of 2 blocks, d_model 256, grouped-query attention."""
from stackwise_jax.config import default_config


def get_config():
  config = default_config()
  config.model.d_model = 256
  config.model.n_heads = 8
  config.model.n_kv_heads = 4
  config.model.attention = "gqa"
  config.model.d_ff = 768
  config.model.max_seq_len = 256
  config.model.n_blocks_per_stack = 2

  config.training.batch_size = 16
  config.training.seq_len = 256
  config.training.lr = 1e-3
  config.training.warmup_steps = 50
  config.training.steps_per_stack = 300
  config.training.eval_every = 100
  config.training.eval_batches = 8

  config.training.progressive.max_stacks = 8
  config.training.progressive.target_stacks = 6
  # Function-preserving growth on the frozen, cached trunk: the quality benchmark's winner against
  # an lr-tuned end-to-end run, on two corpora (BUILD_NOTES, *quality*). trunk_strategy="train"
  # ends lower at a fixed budget but saves fewer FLOPs to reach end-to-end's loss.
  config.training.progressive.new_stack_init = "identity"
  return config
