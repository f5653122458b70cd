"""configs/tiny.py with a QLoRA trunk: once a stack is trunk its kernels become int4 (qwix, bf16
compute) and only its adapters train — its stack LoRA and a smaller progressive adapter.
About two minutes on 2 CPU cores."""
import os

from stackwise_jax.config import load_config


def get_config():
  config = load_config(os.path.join(os.path.dirname(__file__), "tiny.py"))
  config.training.steps_per_stack = 200
  p = config.training.progressive
  p.trunk_strategy = "qlora"
  p.qlora_enabled = True            # stack LoRA on every stack
  p.qlora_rank = 8
  p.qlora_alpha = 16.0
  p.progressive_qlora = True        # plus a smaller adapter on each trunk stack
  p.progressive_qlora_rank = 4
  p.progressive_qlora_alpha = 8.0
  p.quant_block_size = 64
  return config
