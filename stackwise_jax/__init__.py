"""stackwise-jax: grow a transformer one stack at a time (see README.md)."""
import sys

# flax.nnx imports IPython when it loads (~0.25 CPU s, 0.4-0.8 s of every command's start-up)
# to ask get_ipython() whether to colour its reprs; outside IPython (not loaded yet) the answer
# is no, so it is hidden from that import, as the metrics hide torch from tensorboardX's.
if "IPython" not in sys.modules and "flax" not in sys.modules:
  sys.modules["IPython"] = None   # `import IPython` raises ImportError while this is set
  try:
    import flax.nnx  # noqa: F401
  finally:
    del sys.modules["IPython"]

from stackwise_jax.config import load_config, validate
from stackwise_jax.errors import ConfigError
from stackwise_jax.progressive import (ProgressiveRackBuilder, ProgressiveTrainer, TimeStepMasking,
                                       load_rack)

__all__ = ["ConfigError", "ProgressiveRackBuilder", "ProgressiveTrainer", "TimeStepMasking",
           "load_config", "load_rack", "validate"]
