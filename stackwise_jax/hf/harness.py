"""lm-evaluation-harness on our own forward and sampler (design §12).

`RackLM` is an lm-eval model (`lm_eval.api.model.TemplateLM`) over a causal rack and the run's
tokenizer, scored the way lm-eval's `HFLM` scores the rack's Hugging Face export
(`stackwise-jax export --format hf`), so the two give the same numbers:
  tokens          lm-eval's own `TemplateLM._encode_pair`: a context's trailing spaces move onto
                  the continuation, continuation = encode(context + continuation) minus
                  encode(context); `tok_encode` adds no special ids (nor does the export's
                  tokenizer);
  prefix          an empty context, and a rolling document's first window, start with the
                  tokenizer's BOS (`HFLM.prefix_token_id`: bos_token_id, else eos);
  windows         `loglikelihood_rolling` cuts a document with lm-eval's
                  `get_rolling_token_windows` / `make_disjoint_window` at model.max_seq_len;
  truncation      context + continuation past max_seq_len + 1 tokens loses tokens on the left;
  scores          log_softmax over the whole vocabulary in fp32, summed over the continuation;
                  greedy = argmax at every continuation position equals the continuation.
Requests are sorted by length and padded on the right (causal: padding never reaches a real
position) to a few lengths (powers of two from 16, capped at max_seq_len), and every batch to
`batch_size` rows, so the forward compiles once per length, not once per request.

`generate_until` decodes with the KV cache (`Rack.decode`): the prompts fill it in one call, then
each row advances at its own position. Tokens are chosen by `sample.pick` as `sample.generate`
chooses them (greedy, or temperature and top_k), never a special id (`tokenizer.sampled_ids`, the
export's `suppress_tokens`): a row ends at one of its `until` strings or after max_gen_toks, and
its text is cut before the first `until` string as HFLM cuts it.

`load_tasks` reads `eval --tasks` (task names, task YAML files, directories of them) into lm-eval
tasks, their data included, so a wrong name or unreadable data fails before the rack is built;
`run_tasks` runs them (`lm_eval.simple_evaluate`) on a RackLM.

transformers and torch are not used here; lm-eval is imported by whoever imports this module
(only `eval --tasks` does).
"""
import json
import logging
import os

import jax
import jax.numpy as jnp
from lm_eval import simple_evaluate
from lm_eval.api.model import TemplateLM
from lm_eval.models.utils import handle_stop_sequences, normalize_gen_kwargs
from lm_eval.models.utils import postprocess_generated_text
from lm_eval.tasks import TaskManager
from lm_eval.utils import get_rolling_token_windows, make_disjoint_window, make_table
import numpy as np
from tqdm.auto import tqdm

from stackwise_jax.errors import ConfigError
from stackwise_jax.data.tokenizer import sampled_ids
from stackwise_jax.model.rack import Rack, is_causal
from stackwise_jax.sample import pick

MIN_LENGTH = 16   # the shortest padded length: below it a compile costs more than the padding


def padded_length(n: int, max_len: int) -> int:
  """The length `n` tokens are padded to: the next power of two >= MIN_LENGTH, at most
  `max_len`."""
  return min(max(MIN_LENGTH, 1 << (n - 1).bit_length()), max_len)


def check_causal(config) -> None:
  """Only a causal rack gives next-token log-likelihoods. Raises ConfigError naming the
  objective otherwise."""
  if not is_causal(config):
    objective = config.training.progressive.training_objective
    raise ConfigError(f"training.progressive.training_objective={objective!r}: lm-eval needs a "
                      "causal rack (allowed: 'clm'); a masked-LM rack has no next-token "
                      "log-likelihood")


class RackLM(TemplateLM):
  """An lm-eval model over `rack` (causal) and `tokenizer` (`data.tokenizer.load_tokenizer`),
  scoring `batch_size` sequences at a time."""

  def __init__(self, rack: Rack, tokenizer, batch_size: int = 8):
    super().__init__()
    check_causal(rack.config)
    if batch_size < 1:
      raise ConfigError(f"batch_size={batch_size}: allowed: >= 1")
    self.rack, self.text, self.batch_size = rack, tokenizer, batch_size
    self.max_length = rack.config.model.max_seq_len
    self._choices = sampled_ids(rack.config)
    time = lambda tokens: jnp.zeros(tokens.shape[:1], jnp.int32)   # clm with time as input: t=0
    self._score = jax.jit(lambda params, tokens, targets: _score(
        rack(params, tokens, time(tokens)), targets))
    self._prefill = jax.jit(lambda params, tokens, cache: rack.decode(
        params, tokens, cache, 0, time(tokens)))

    def advance(params, token, cache, pos):   # one row: token [], cache without batch, pos []
      cache = jax.tree.map(lambda x: x[None], cache)
      logits, cache = rack.decode(params, token[None, None], cache, pos, time(token[None]))
      return logits[0, 0], jax.tree.map(lambda x: x[0], cache)

    # Each row of a batch at its own position: [batch] tokens and positions.
    self._advance = jax.jit(jax.vmap(advance, in_axes=(None, 0, 0, 0)))
    # logits [batch, vocab] -> the tokens at `positions` [batch], drawn as sample.generate draws.
    self._pick = jax.jit(lambda logits, key, positions, temperature, top_k: jax.vmap(
        lambda row, p: pick(row, jax.random.fold_in(key, p), temperature, top_k, self._choices))(
            logits, positions), static_argnums=(3, 4))

  # -- tokens, as TemplateLM and HFLM use them --------------------------------------------------

  @property
  def eot_token_id(self) -> int:
    return int(self.text.special.eos)

  @property
  def prefix_token_id(self) -> int:
    return int(self.text.special.bos)

  @property
  def tokenizer_name(self) -> str:
    return self.text.name

  def tok_encode(self, string: str, add_special_tokens=None, left_truncate_len=None,
                 **kwargs) -> list[int]:
    del add_special_tokens, kwargs   # our encode never adds special ids
    ids = [int(i) for i in self.text.encode(string)]
    return ids[-left_truncate_len:] if left_truncate_len else ids

  def tok_decode(self, ids) -> str:
    return self.text.decode(np.asarray(ids, np.int64))

  # -- log-likelihoods --------------------------------------------------------------------------

  def _loglikelihood_tokens(self, requests, disable_tqdm: bool = False, **kwargs):
    """requests: (key, context ids, continuation ids) -> [(sum of the continuation's log
    probabilities in nats, whether greedy decoding gives the continuation)], in order."""
    del kwargs
    rows = []   # (inputs, targets, continuation length)
    for _, context, continuation in requests:
      if len(continuation) > self.max_length:
        raise ValueError(f"a continuation of {len(continuation)} tokens: allowed: at most "
                         f"model.max_seq_len={self.max_length}")
      whole = (list(context) + list(continuation))[-(self.max_length + 1):]
      rows.append((whole[:-1], whole[1:], len(continuation)))
    order = sorted(range(len(rows)), key=lambda i: -len(rows[i][0]))   # similar lengths batched
    results = [None] * len(rows)
    bar = tqdm(total=len(rows), disable=disable_tqdm, desc="loglikelihood requests")
    for start in range(0, len(order), self.batch_size):
      batch = order[start:start + self.batch_size]
      length = padded_length(max(len(rows[i][0]) for i in batch), self.max_length)
      tokens = np.zeros((self.batch_size, length), np.int32)
      targets = np.zeros((self.batch_size, length), np.int32)
      for r, i in enumerate(batch):
        inputs, target, _ = rows[i]
        tokens[r, :len(inputs)], targets[r, :len(target)] = inputs, target
      logprobs, greedy = map(np.asarray, self._score(self.rack.params, tokens, targets))
      for r, i in enumerate(batch):
        n, n_cont = len(rows[i][0]), rows[i][2]
        span = slice(n - n_cont, n)
        results[i] = (float(np.sum(logprobs[r, span], dtype=np.float64)),
                      bool(np.all(greedy[r, span])))
      bar.update(len(batch))
    bar.close()
    return results

  def loglikelihood_rolling(self, requests, disable_tqdm: bool = False) -> list[float]:
    """Each document's log-likelihood (nats), after the prefix token, in windows of at most
    max_seq_len tokens that predict every token once (lm-eval's rolling windows)."""
    windows, owner = [], []
    for doc, (string,) in enumerate(req.args for req in requests):
      for context, continuation in map(make_disjoint_window, get_rolling_token_windows(
          token_list=self.tok_encode(string), prefix_token=self.prefix_token_id,
          max_seq_len=self.max_length, context_len=1)):
        windows.append((None, context, continuation))
        owner.append(doc)
    totals = [0.0] * len(requests)
    for doc, (logprob, _) in zip(owner, self._loglikelihood_tokens(windows, disable_tqdm)):
      totals[doc] += logprob
    return totals

  # -- generation -------------------------------------------------------------------------------

  def generate_until(self, requests, disable_tqdm: bool = False) -> list[str]:
    """Each request's continuation of its context, cut before the first of its `until`
    strings; at most `max_gen_toks` tokens (default 256, and fewer than max_seq_len)."""
    groups = {}   # requests with the same generation kwargs decode together
    for i, (_, gen_kwargs) in enumerate(req.args for req in requests):
      groups.setdefault(json.dumps(gen_kwargs, sort_keys=True, default=str), []).append(i)
    results = [None] * len(requests)
    bar = tqdm(total=len(requests), disable=disable_tqdm, desc="generate_until requests")
    for indices in groups.values():
      kwargs = normalize_gen_kwargs(requests[indices[0]].args[1], 256)
      until = handle_stop_sequences(kwargs.pop("until", None), eos=None)
      max_new = max(1, min(int(kwargs.pop("max_gen_toks")), self.max_length - 1))
      temperature = float(kwargs.get("temperature") or 0.0) if kwargs.get("do_sample") else 0.0
      top_k = int(kwargs.get("top_k") or 0)
      for start in range(0, len(indices), self.batch_size):
        batch = indices[start:start + self.batch_size]
        # HFLM's truncation: the context keeps its last max_seq_len - max_gen_toks tokens.
        prompts = [self.tok_encode(requests[i].args[0],
                                   left_truncate_len=self.max_length - max_new)
                   or [self.prefix_token_id] for i in batch]
        for i, ids in zip(batch, self.generate_ids(prompts, max_new, until,
                                                    temperature=temperature, top_k=top_k)):
          results[i] = postprocess_generated_text(self.tok_decode(ids), until, None)
        bar.update(len(batch))
    bar.close()
    return results

  def generate_ids(self, prompts: list[list[int]], max_new_tokens: int, until=(), *,
                   temperature: float = 0.0, top_k: int = 0, seed: int = 0) -> list[list[int]]:
    """The tokens generated after each prompt (at most batch_size prompts, each with
    len + max_new_tokens <= max_seq_len): a row stops once its text holds one of `until`, or
    after max_new_tokens. The token at position p is drawn with key fold_in(key(seed), p), as
    `sample.generate` draws it."""
    n, rows = len(prompts), self.batch_size
    lengths = np.ones(rows, np.int32)
    lengths[:n] = [len(p) for p in prompts]
    tokens = np.zeros((rows, padded_length(int(lengths.max()), self.max_length)), np.int32)
    for r, ids in enumerate(prompts):
      tokens[r, :len(ids)] = ids
    logits, cache = self._prefill(self.rack.params, tokens,
                                  self.rack.init_cache(rows, self.max_length))
    logits = logits[jnp.arange(rows), lengths - 1]   # [rows, vocab] at each prompt's end
    key, out, done = jax.random.key(seed), [[] for _ in range(n)], [False] * n
    for step in range(max_new_tokens):
      positions = lengths + step
      token = self._pick(logits, key, positions, temperature, top_k)
      chosen = np.asarray(token)
      for r in range(n):
        if not done[r]:
          out[r].append(int(chosen[r]))
          text = self.tok_decode(out[r]) if until else ""
          done[r] = any(stop and stop in text for stop in until)
      if all(done) or step + 1 == max_new_tokens:
        break
      logits, cache = self._advance(self.rack.params, token, cache, positions)
    return out


def _score(logits, targets):
  """logits [batch, seq, vocab] fp32, targets int [batch, seq] -> (log probability of each
  target [batch, seq] fp32, whether it is the argmax [batch, seq] bool)."""
  logprobs = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
  picked = jnp.take_along_axis(logprobs, targets[..., None], axis=-1)[..., 0]
  return picked, jnp.argmax(logits, axis=-1) == targets


# -- tasks --------------------------------------------------------------------------------------

_HOW = ("allowed: lm-eval task names (list them: lm_eval --tasks list), task YAML files or "
        "directories of them, comma-separated")


def load_tasks(spec: str):
  """`eval --tasks` -> (TaskManager, [lm-eval Task or Group], their names). `spec`: comma-
  separated items, each a task, group or tag name, a task YAML file (its task) or a directory
  (every task in its YAML files, recursively). Paths join lm-eval's task index
  (`TaskManager(include_path=...)`), so tasks on local files need no download; lm-eval's own
  tasks are indexed (some seconds) only when a name is given. Each task's data is loaded here.
  Raises ConfigError naming the item."""
  quiet_lm_eval()
  items = [item.strip() for item in spec.split(",") if item.strip()]
  if not items:
    raise ConfigError(f"--tasks {spec!r}: {_HOW}")
  paths = [os.path.abspath(item) for item in items if os.path.exists(item)]
  include = sorted({p if os.path.isdir(p) else os.path.dirname(p) for p in paths})
  manager = TaskManager(include_path=include or None,
                        include_defaults=len(paths) < len(items))
  names = []
  for item in items:
    found = _tasks_in(manager, item) if os.path.exists(item) else [item]
    if not found:
      what = "not an lm-eval task YAML" if os.path.isfile(item) else "no lm-eval task in its YAMLs"
      raise ConfigError(f"--tasks {item}: {what} (a task YAML has a 'task:' key; see lm-eval's "
                        "docs/task_guide.md)")
    unknown = [name for name in found if name not in manager.all_tasks]
    if unknown:
      raise ConfigError(f"--tasks {unknown[0]}: no such lm-eval task, group or tag, nor a file; "
                        f"{_HOW}")
    names += [name for name in found if name not in names]
  tasks = []
  for name in names:
    try:
      loaded = manager.load([name])
    except Exception as e:   # lm-eval and datasets raise many kinds: a bad YAML, data offline
      raise ConfigError(f"--tasks {name}: lm-eval could not load it: "
                        f"{type(e).__name__}: {_first_line(e)}") from e
    groups = loaded.get("groups") or {}
    tasks += [groups[name]] if name in groups else list(loaded["tasks"].values())
  try:
    manager.load(tasks)   # a task asked for twice, e.g. alone and in its group
  except ValueError as e:
    raise ConfigError(f"--tasks {spec}: {_first_line(e)}") from e
  return manager, tasks, names


def _tasks_in(manager, path: str) -> list[str]:
  """The task names a YAML file (whatever it defines) or a directory (its tasks) adds to the
  index."""
  path = os.path.abspath(path)
  inside = (lambda p: p == path) if os.path.isfile(path) else (
      lambda p: p.startswith(path + os.sep))
  return sorted(name for name, entry in manager.task_index.items()
                if entry.yaml_path is not None and inside(os.path.abspath(entry.yaml_path))
                and (os.path.isfile(path) or entry.kind.name in ("TASK", "PY_TASK")))


def _first_line(e: Exception) -> str:
  lines = str(e).strip().splitlines()
  return lines[0] if lines else repr(e)


def quiet_lm_eval() -> None:
  """lm-eval and datasets log every request batch and data split at INFO: keep WARNING and up,
  so a command's output is its table."""
  logging.getLogger("lm_eval").setLevel(logging.WARNING)
  try:
    import datasets
    datasets.utils.logging.set_verbosity_warning()
    datasets.disable_progress_bars()
  except ImportError:   # lm-eval needs datasets only to read task data
    pass


def run_tasks(lm: RackLM, manager, tasks, *, limit: int | None = None,
              num_fewshot: int | None = None) -> dict:
  """`lm_eval.simple_evaluate` of `tasks` (from `load_tasks`) on `lm`: its result dict
  ("results" per task, "groups" for groups, ...). `limit`: examples per task (None: all);
  `num_fewshot`: None leaves each task's own."""
  quiet_lm_eval()
  return simple_evaluate(model=lm, tasks=list(tasks), task_manager=manager, limit=limit,
                         num_fewshot=num_fewshot)


def table(out: dict) -> str:
  """lm-eval's markdown table of `run_tasks`'s result: tasks, then groups where there are."""
  return make_table(out) + ("\n" + make_table(out, "groups") if out.get("groups") else "")
