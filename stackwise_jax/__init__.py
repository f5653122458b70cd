"""stackwise-jax: grow a transformer one stack at a time (see README.md)."""
from stackwise_jax.config import load_config, validate
from stackwise_jax.errors import ConfigError
from stackwise_jax.progressive import (ProgressiveRackBuilder, ProgressiveTrainer, TimeStepMasking,
                                       load_rack)

__all__ = ["ConfigError", "ProgressiveRackBuilder", "ProgressiveTrainer", "TimeStepMasking",
           "load_config", "load_rack", "validate"]
