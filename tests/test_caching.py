"""ActivationCache: devices, then memory, then disk; exact round trip, reported sizes."""
import os

import jax
import jax.numpy as jnp
import numpy as np

from stackwise_jax.progressive.caching import ActivationCache, device_budget


def test_cache_spills_beyond_max_bytes_and_round_trips_exactly(tmp_path):
  shape = (2, 3, 4)
  entry_bytes = 2 * 3 * 4 * 4
  cache = ActivationCache(5, shape, max_bytes=2 * entry_bytes, spill_dir=str(tmp_path))
  data = [np.random.default_rng(i).standard_normal(shape).astype(np.float32) for i in range(5)]
  for i, x in enumerate(data):
    cache.put(i, x, {"i": i})
  assert cache.bytes_in_memory == 2 * entry_bytes
  assert cache.bytes_on_disk == 3 * entry_bytes
  assert cache.nbytes == 5 * entry_bytes
  assert len(os.listdir(tmp_path)) == 1
  for i, x in enumerate(data):
    got, example = cache.get(i)
    np.testing.assert_array_equal(got, x)
    assert example == {"i": i}
  cache.close()
  assert os.listdir(tmp_path) == []


def test_cache_within_budget_stays_in_memory(tmp_path):
  cache = ActivationCache(3, (4,), max_bytes=1 << 20, spill_dir=str(tmp_path))
  assert cache.bytes_on_disk == 0 and cache.nbytes == 3 * 16
  assert os.listdir(tmp_path) == []


def test_first_entries_stay_on_the_device_as_given(tmp_path):
  shape, entry_bytes = (2, 4), 2 * 4 * 4
  cache = ActivationCache(5, shape, max_bytes=entry_bytes, spill_dir=str(tmp_path),
                          device_bytes=2 * entry_bytes + 1)
  assert [cache.on_device(i) for i in range(5)] == [True, True, False, False, False]
  assert (cache.bytes_on_device, cache.bytes_in_memory, cache.bytes_on_disk) == (
      2 * entry_bytes, entry_bytes, 2 * entry_bytes)
  data = [jnp.full(shape, i, jnp.float32) for i in range(5)]
  for i, x in enumerate(data):
    cache.put(i, x if cache.on_device(i) else np.asarray(x), {"i": i})
  for i, x in enumerate(data):
    got, example = cache.get(i)
    assert isinstance(got, jax.Array) == cache.on_device(i) and example == {"i": i}
    np.testing.assert_array_equal(got, x)
  cache.close()
  assert os.listdir(tmp_path) == []


def test_device_budget_is_none_on_a_cpu_unless_set():
  assert jax.local_devices()[0].platform == "cpu"
  assert device_budget(None) == 0 and device_budget(12345) == 12345
