"""Compile ahead (training.compile_ahead): while a stage trains, the next stage's programs are
lowered and compiled on a background thread from their abstract shapes.

Each program is compiled through the very jitted function the next stage calls, with the
signature it will be called with (`jax.ShapeDtypeStruct`s carrying shapes, dtypes and
shardings): `jitted.lower(*args).compile()` puts the executable in that function's cache (and
XLA's persistent cache), so the stage's first call runs it instead of compiling. A signature that
turns out otherwise only wastes the work: the call compiles in place, with the same result.
"""
import threading

import jax


def wanted(setting: bool | None, platform: str) -> bool:
  """Whether a run compiles ahead: `training.compile_ahead` as set, or (None) where its steps run
  on an accelerator (`platform`: "gpu", "tpu", "cpu"). There the host idles while the device
  trains; on a CPU the background compile takes the cores the step itself runs on, and the job was
  slower with it than without (BUILD_NOTES *job*)."""
  return platform != "cpu" if setting is None else setting


def abstract(tree, shardings=None):
  """`tree`'s arrays (or shapes) as `jax.ShapeDtypeStruct`s with their shardings, or with
  `shardings` (a matching tree) where given."""
  if shardings is None:
    shardings = jax.tree.map(lambda x: getattr(x, "sharding", None), tree)
  return jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s),
                      tree, shardings)


def first_call_sets(event: threading.Event, fn):
  """`fn`, setting `event` once its first call returned (a jitted step: compiled and dispatched)."""

  def call(*args):
    out = fn(*args)
    event.set()
    return out

  return call


def compile(jitted, *args):
  """Compiles `jitted` for `args` (abstract) into its cache. Returns its output, abstract, with
  the shardings the executable gives it."""
  lowered = jitted.lower(*args)   # traced once: its out_info is the output's shapes
  return abstract(lowered.out_info, lowered.compile().output_shardings)


class CompileAhead:
  """One background compile at a time: `start(work, after)` runs `work()` on a thread once the
  event `after` is set, `wait()` returns once it is done. An error there is one log line; what it
  did not compile compiles in place."""

  def __init__(self, log):
    self._log = log
    self._thread = None

  def start(self, work, after: threading.Event) -> None:
    self.wait()
    # jax.log_compiles(True) around the run is thread-local: the thread logs its compiles too.
    log_compiles = jax.config.jax_log_compiles
    self._thread = threading.Thread(target=self._run, args=(work, after, log_compiles),
                                    name="compile-ahead", daemon=True)
    self._thread.start()

  def _run(self, work, after, log_compiles) -> None:
    after.wait()
    try:
      with jax.log_compiles(log_compiles):
        work()
    except Exception as e:   # never the run's end: the stage compiles in place instead
      self._log(f"compile ahead: {type(e).__name__}: {e}; the next stage compiles in place")

  def wait(self) -> None:
    if self._thread is not None:
      self._thread.join()
      self._thread = None
