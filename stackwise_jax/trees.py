"""Params-tree helpers shared by checkpoints, sharding, export and reports: how a leaf is named
(its key path) and how many bytes it is stored in."""
import jax
import jax.numpy as jnp


def plain_keys(path) -> tuple:
  """A jax key path (DictKey, SequenceKey, GetAttrKey) or a tuple of keys -> plain keys."""
  return tuple(getattr(k, "key", getattr(k, "idx", getattr(k, "name", k))) for k in path)


def key_path(path) -> str:
  """A jax key path as `stacks/stack_0/blocks/0/attn/q/kernel`: how checkpoints, exports and
  sharding rules name a leaf."""
  return "/".join(map(str, plain_keys(path)))


def leaf_bytes(x) -> int:
  """Stored bytes of one leaf: int4 counts as half a byte (packed, as on GPU/TPU and in
  checkpoints; XLA:CPU holds one int4 value per byte)."""
  info = jnp.iinfo if jnp.issubdtype(x.dtype, jnp.integer) else jnp.finfo
  return -(-x.size * info(x.dtype).bits // 8)


def tree_bytes(tree) -> int:
  return sum(leaf_bytes(x) for x in jax.tree.leaves(tree))
