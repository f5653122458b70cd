"""Sampling from a trained rack (design §12).

How a rack samples is its objective's `sampling` (stackwise_jax/objectives.py). "generate" racks
(clm) generate left to right with a KV cache (`Rack.decode`): the prompt fills the cache in one
call, then every new token costs one position. "unmask" racks (mlm) generate by iterative unmasking
of the positions holding the run's mask id (`tokenizer.special_ids`), never touching any other
token:
  time as input  `steps` denoising steps, t going from 1 to 0; at step s the rack sees time step
                 (N-1)(1 - s/steps) and reveals its most confident predictions until the masks
                 left match the schedule (none after the last step);
  time as depth  one pass through the stacks in forward order (highest noise first); after each
                 stack the head reads the residual stream, the stack reveals its share of the
                 masks, and the revealed tokens enter the stream from there on (their embedding
                 replaces the mask's).
Token choice: greedy at temperature 0, else a draw from softmax(logits / temperature) restricted
to the top_k logits (0: all), with the key fold_in(key(seed), position or step).
"""
import math
import re

import jax
import jax.numpy as jnp
import numpy as np

from stackwise_jax.errors import ConfigError
from stackwise_jax.data import tokenizer as tokenizers
from stackwise_jax.model.rack import Rack
from stackwise_jax.objectives import OBJECTIVES

def pick(logits, key, temperature: float, top_k: int, choices=(256, ())):
  """logits [..., vocab] -> token ids [...]: greedy (temperature 0) or a top-k draw among
  `choices` = (n, excluded): ids below n less the excluded (`tokenizer.sampled_ids`: special ids
  are never chosen)."""
  logits = _choosable(logits, choices)
  if temperature == 0.0:
    return jnp.argmax(logits, axis=-1).astype(jnp.int32)
  logits = logits / temperature
  if top_k:
    kth = jax.lax.top_k(logits, top_k)[0][..., -1:]
    logits = jnp.where(logits < kth, -jnp.inf, logits)
  return jax.random.categorical(key, logits).astype(jnp.int32)


def _sampling(config) -> str | None:
  """How racks of this run sample: "generate", "unmask" or None (see OBJECTIVES)."""
  return OBJECTIVES[config.training.progressive.training_objective].sampling


def _objectives(sampling: str) -> str:
  """The objective names whose racks sample by `sampling`, for messages: e.g. "'clm'"."""
  return " or ".join(repr(name) for name, o in OBJECTIVES.items() if o.sampling == sampling)


def _check(temperature: float, top_k: int, length: int, config) -> None:
  if not (math.isfinite(temperature) and temperature >= 0):
    raise ConfigError(f"--temperature={temperature}: allowed: a finite number >= 0 (0 = greedy)")
  n, excluded = tokenizers.sampled_ids(config)
  if not 0 <= top_k <= n - len(excluded):
    raise ConfigError(f"--top-k={top_k}: allowed: 0 (all) to {n - len(excluded)}, the tokens a "
                      "sample may hold")
  if length > config.model.max_seq_len:
    raise ConfigError(f"a sample of {length} tokens: allowed: at most model.max_seq_len="
                      f"{config.model.max_seq_len} (shorten the prompt or --max-new-tokens)")


def generate(rack: Rack, prompt, max_new_tokens: int, *, temperature: float = 0.0,
             top_k: int = 0, seed: int = 0, use_cache: bool = True) -> np.ndarray:
  """Continues `prompt` (int [batch, p], p >= 1) by `max_new_tokens` tokens with a causal rack.
  `use_cache=False` recomputes the whole prefix for every token (the reference the KV cache must
  match). Returns int32 [batch, p + max_new_tokens]."""
  if _sampling(rack.config) != "generate":
    raise ConfigError(f"generate: a causal rack (training_objective={_objectives('generate')}) is "
                      "needed; use unmask")
  prompt = jnp.asarray(prompt, jnp.int32)
  (b, p), total = prompt.shape, prompt.shape[1] + max_new_tokens
  _check(temperature, top_k, total, rack.config)
  time_step = jnp.zeros((b,), jnp.int32)   # a clm rack with time as input is trained at t=0
  key, choices = jax.random.key(seed), tokenizers.sampled_ids(rack.config)
  choose = lambda logits, pos: pick(logits, jax.random.fold_in(key, pos), temperature, top_k,
                                    choices)
  tokens = jnp.zeros((b, total), jnp.int32).at[:, :p].set(prompt)
  if use_cache:
    step = jax.jit(lambda params, tokens, cache, pos: rack.decode(params, tokens, cache, pos,
                                                                   time_step))
    logits, cache = step(rack.params, prompt, rack.init_cache(b, total), 0)
    for pos in range(p, total):
      token = choose(logits[:, -1], pos)
      tokens = tokens.at[:, pos].set(token)
      if pos + 1 < total:
        logits, cache = step(rack.params, token[:, None], cache, jnp.int32(pos))
    return np.asarray(tokens)
  forward = jax.jit(lambda params, tokens: rack(params, tokens, time_step))
  for pos in range(p, total):   # causal: the zeros after pos do not reach position pos - 1
    tokens = tokens.at[:, pos].set(choose(forward(rack.params, tokens)[:, pos - 1], pos))
  return np.asarray(tokens)


def _reveal(masked, confidence, keep_masked):
  """Bool [batch, seq]: the masked positions to reveal now, the most confident first, leaving
  `keep_masked` [batch] masks per row."""
  confidence = jnp.where(masked, confidence, -jnp.inf)
  rank = jnp.argsort(jnp.argsort(-confidence, axis=-1), axis=-1)   # 0 = most confident
  n_reveal = masked.sum(-1) - keep_masked
  return masked & (rank < n_reveal[:, None])


def _choosable(logits, choices):
  """The logits of the ids a sample may hold: the first n, with the excluded ones at -inf."""
  n, excluded = choices
  logits = logits[..., :n]
  return logits.at[..., list(excluded)].set(-jnp.inf) if excluded else logits


def _predict(logits, key, temperature, top_k, choices):
  """(tokens, their probability) per position."""
  tokens = pick(logits, key, temperature, top_k, choices)
  probs = jax.nn.softmax(_choosable(logits, choices), axis=-1)
  return tokens, jnp.take_along_axis(probs, tokens[..., None], axis=-1)[..., 0]


def unmask(rack: Rack, tokens, *, steps: int = 8, temperature: float = 0.0, top_k: int = 0,
           seed: int = 0, stop_after: int | None = None) -> np.ndarray:
  """Fills every position of `tokens` (int [batch, seq]) holding the run's
  the run's mask id (`tokenizer.special_ids`) with a masked-LM rack; other tokens stay as they are.
  `steps` applies to time as input (time as depth takes one pass); `stop_after` returns the partly
  unmasked tokens after that many of them. Returns int32 [batch, seq]."""
  p, sampling = rack.config.training.progressive, _sampling(rack.config)
  if sampling != "unmask":
    raise ConfigError(f"unmask: a masked-LM rack is needed (training_objective="
                      f"{_objectives('unmask')}); this one is {p.training_objective!r}"
                      + (", use generate" if sampling == "generate" else ""))
  if steps < 1:
    raise ConfigError(f"--steps={steps}: allowed: >= 1")
  tokens = jnp.asarray(tokens, jnp.int32)
  _check(temperature, top_k, tokens.shape[1], rack.config)
  mask_id, choices = tokenizers.special_ids(rack.config).mask, tokenizers.sampled_ids(rack.config)
  n0 = (tokens == mask_id).sum(-1)
  key = jax.random.key(seed)
  if p.time_interpretation == "depth":
    return np.asarray(_one_pass(rack, tokens, mask_id, n0, key, temperature, top_k, choices))
  n = p.num_time_steps

  @jax.jit
  def step(params, tokens, s):
    t = jnp.round((n - 1) * (1.0 - s / steps)).astype(jnp.int32)
    logits = rack(params, tokens, jnp.full((tokens.shape[0],), t))
    predicted, confidence = _predict(logits, jax.random.fold_in(key, s), temperature, top_k,
                                     choices)
    keep = n0 * (steps - 1 - s) // steps
    reveal = _reveal(tokens == mask_id, confidence, keep)
    return jnp.where(reveal, predicted, tokens)

  for s in range(steps if stop_after is None else min(stop_after, steps)):
    tokens = step(rack.params, tokens, s)
  return np.asarray(tokens)


def _one_pass(rack, tokens, mask_id, n0, key, temperature, top_k, choices):
  """Time as depth: each stack, in forward order, reveals its share of the masks."""
  params, names = rack.params, rack.order
  h, _ = rack.embed(params, tokens)
  mask_embedding = rack.embed(params, jnp.full((1, 1), mask_id))[0][0, 0]
  for i, name in enumerate(names):
    h = rack.apply_stacks(params, [name], h)
    predicted, confidence = _predict(rack.logits(params, h), jax.random.fold_in(key, i),
                                     temperature, top_k, choices)
    reveal = _reveal(tokens == mask_id, confidence, n0 * (len(names) - 1 - i) // len(names))
    tokens = jnp.where(reveal, predicted, tokens)
    revealed = rack.embed(params, predicted)[0]
    h = jnp.where(reveal[..., None], h + revealed - mask_embedding, h)
  return tokens


_MASK_PATTERN = re.compile(r"\[MASK(?::(\d+))?\]")


def parse_infill(text: str, mask_id: int, tokenizer=tokenizers.BYTES) -> np.ndarray:
  """'The [MASK:3] sat' -> the ids of the text between markers (by `tokenizer`), with 3
  `mask_id`s in place of the marker ([MASK] = one). `mask_id`: the run's mask id."""
  if not _MASK_PATTERN.search(text):
    raise ConfigError(f"--infill {text!r}: no [MASK] or [MASK:n] marker to fill")
  ids, end = [], 0
  for match in _MASK_PATTERN.finditer(text):
    ids.append(tokenizer.encode(text[end:match.start()]))
    ids.append(np.full(int(match.group(1) or 1), mask_id, np.int32))
    end = match.end()
  ids.append(tokenizer.encode(text[end:]))
  return np.concatenate(ids)


def prompt_batch(config, *, prompt: str | None = None, infill: str | None = None,
                 max_new_tokens: int = 64, num_samples: int = 1, temperature: float = 0.0,
                 top_k: int = 0, steps: int = 8, seed: int = 0, tokenizer=None) -> np.ndarray:
  """The `sample` command's input, checked against the run's config before any rack is built:
  int32 [num_samples, len] token ids of `prompt` (masked racks: followed by `max_new_tokens`
  masks) or of `infill` with its masks (masked racks only), by `tokenizer` (default: the run's,
  `tokenizer.load_tokenizer`). Raises ConfigError naming the option."""
  del seed   # any int will do
  if (prompt is None) == (infill is None):
    raise ConfigError("sample: give exactly one of --prompt and --infill")
  p, sampling = config.training.progressive, _sampling(config)
  if sampling is None:
    raise ConfigError(f"training.progressive.training_objective={p.training_objective!r}: "
                      f"sample needs a {_objectives('generate')} or {_objectives('unmask')} run")
  causal = sampling == "generate"
  if infill is not None and causal:
    raise ConfigError(f"--infill needs a masked-LM run (training_objective="
                      f"{_objectives('unmask')}); this run is causal: use --prompt")
  if num_samples < 1:
    raise ConfigError(f"--num-samples={num_samples}: allowed: >= 1")
  if steps < 1:
    raise ConfigError(f"--steps={steps}: allowed: >= 1")
  tokenizer = tokenizers.load_tokenizer(config) if tokenizer is None else tokenizer
  mask_id = tokenizers.special_ids(config).mask
  if infill is not None:
    ids = parse_infill(infill, mask_id, tokenizer)
  else:
    ids = tokenizer.encode(prompt)
    if not len(ids):
      raise ConfigError("--prompt '': allowed: at least one character")
    if max_new_tokens < 1:
      raise ConfigError(f"--max-new-tokens={max_new_tokens}: allowed: >= 1")
    if not causal:
      ids = np.concatenate([ids, np.full(max_new_tokens, mask_id, np.int32)])
  length = len(ids) + (max_new_tokens if causal else 0)
  _check(temperature, top_k, length, config)
  return np.tile(ids, (num_samples, 1))


def complete(rack: Rack, batch, max_new_tokens: int, *, steps: int = 8, **options) -> np.ndarray:
  """Generates after `batch` (causal racks) or fills its masks (masked racks)."""
  if _sampling(rack.config) == "generate":
    return generate(rack, batch, max_new_tokens, **options)
  return unmask(rack, batch, steps=steps, **options)
