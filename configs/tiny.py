"""Tiny config: 3 stacks of 1 block, d_model 128. Trains in under two minutes on 2 CPU cores."""
from stackwise_jax.config import default_config


def get_config():
  config = default_config()
  config.model.d_model = 128
  config.model.n_heads = 4
  config.model.n_kv_heads = 4
  config.model.d_ff = 384
  config.model.max_seq_len = 128
  config.model.n_blocks_per_stack = 1

  config.training.batch_size = 16
  config.training.seq_len = 128
  config.training.lr = 3e-3
  config.training.warmup_steps = 20
  config.training.steps_per_stack = 250
  config.training.eval_every = 50
  config.training.eval_batches = 4
  config.training.log_every = 10

  config.training.progressive.max_stacks = 4
  config.training.progressive.target_stacks = 3
  # Function-preserving growth on the frozen, cached trunk: the quality benchmark's winner against
  # an lr-tuned end-to-end run, on two corpora (BUILD_NOTES, *quality*). trunk_strategy="train"
  # ends lower at a fixed budget but saves fewer FLOPs to reach end-to-end's loss.
  config.training.progressive.new_stack_init = "identity"
  return config
