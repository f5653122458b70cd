"""Host memory for XLA:CPU's steps: keep what a step frees for the next one.

Each train step on a CPU allocates its temporaries (~150 MB at the job's sizes) and frees them
when it ends. With glibc's defaults those allocations land in per-thread heaps of 64 MB that are
unmapped as soon as they are empty, or in `mmap`ed blocks unmapped on `free`: every step then
faults in ~40,000 fresh pages that the kernel must zero (the job's step ~25% slower on 2 cores;
BUILD_NOTES *Decisions*, "Host memory kept for reuse on a CPU"). One arena, no `mmap` for large
blocks and a high trim threshold let the next step reuse the same pages. Where the steps run on
a GPU or TPU, the host allocates little per step and nothing is changed.
"""
import ctypes
import importlib.metadata
import importlib.util
import os
import pkgutil

ENV = "STACKWISE_REUSE_HOST_MEMORY"   # "0": leave glibc's defaults

# mallopt's parameters (glibc's malloc.h)
_M_TRIM_THRESHOLD, _M_MMAP_MAX, _M_ARENA_MAX = -1, -4, -8
_SETTINGS = ((_M_ARENA_MAX, 1), (_M_TRIM_THRESHOLD, 2**31 - 1), (_M_MMAP_MAX, 0))


def reuse_freed_host_memory() -> bool:
  """Makes glibc keep freed memory for reuse in this process, where JAX will run on the CPU
  only. Call it before the first JAX computation (threads made earlier keep their own heaps);
  the `stackwise_jax` command does. Returns whether the settings were applied: not where
  $STACKWISE_REUSE_HOST_MEMORY is "0", an accelerator may be used, or the C library is not
  glibc. The process's memory then stays at its peak instead of shrinking between steps."""
  if os.environ.get(ENV, "1").strip() == "0" or not cpu_only():
    return False
  try:
    libc = ctypes.CDLL(None)
    libc.gnu_get_libc_version   # glibc only: other C libraries' malloc differs
  except (OSError, AttributeError):
    return False
  return all([libc.mallopt(param, value) == 1 for param, value in _SETTINGS])


def cpu_only() -> bool:
  """Whether JAX can only run on the CPU in this process, decided without starting JAX:
  $JAX_PLATFORMS is "cpu", or it is unset and no GPU/TPU plugin (jax_plugins, libtpu) is
  installed."""
  platforms = os.environ.get("JAX_PLATFORMS", "").strip().lower()
  if platforms:
    return platforms == "cpu"
  if importlib.util.find_spec("libtpu") is not None:
    return False
  if importlib.metadata.entry_points(group="jax_plugins"):
    return False
  spec = importlib.util.find_spec("jax_plugins")
  return spec is None or not any(pkgutil.iter_modules(spec.submodule_search_locations))
