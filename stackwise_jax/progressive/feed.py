"""Puts a stage's next examples on the device from a background thread, so the step never waits
on host memory or a spilled cache file."""
import queue
import threading

_DONE = object()


class Prefetcher:
  """Yields `make(i)` for i in `indices`, made `depth` items ahead on a thread. An exception in
  `make` is raised where the item would have been yielded. Use as a context manager: leaving it
  stops the thread."""

  def __init__(self, make, indices, depth: int = 2):
    self._queue = queue.Queue(maxsize=depth)
    self._stop = threading.Event()
    self._thread = threading.Thread(target=self._fill, args=(make, indices), daemon=True)
    self._thread.start()

  def _fill(self, make, indices):
    try:
      for i in indices:
        if self._stop.is_set():
          return
        self._put(make(i))
    except BaseException as e:   # handed to the consumer
      self._put(e)
    self._put(_DONE)

  def _put(self, item):
    while not self._stop.is_set():
      try:
        self._queue.put(item, timeout=0.1)
        return
      except queue.Full:
        continue

  def __iter__(self):
    while (item := self._queue.get()) is not _DONE:
      if isinstance(item, BaseException):
        raise item
      yield item

  def __enter__(self):
    return self

  def __exit__(self, *exc):
    self._stop.set()
    self._thread.join()
