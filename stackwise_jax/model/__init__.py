"""Model: layers, stacks and the rack."""
from stackwise_jax.model.rack import EmbedHead, Rack, StackSpec, init_module, is_causal, time_dim
from stackwise_jax.model.stack import COMPUTE_DTYPES, Block, Stack
