"""The workdir as the file system sees it: one writer at a time, writable outputs, and file errors
said in one line."""
import errno
import fcntl
import json
import os
import re
import shutil
import socket
import tempfile

LOCK_NAME = ".lock"


class WorkdirBusy(Exception):
  """Another live process holds the workdir's lock. args: (message,)."""


class WorkdirLock:
  """An exclusive `flock` on `WORKDIR/.lock`, held while a run writes there.

  The kernel drops a flock when its holder dies, SIGKILL included, so a stale lock never blocks a
  rerun. The file records the holder's pid and host for the message a second writer gets. On
  several hosts only process 0 takes it (flock is not shared between machines).
  """

  def __init__(self, workdir: str):
    self.path = os.path.join(workdir, LOCK_NAME)
    self._fd = None

  def acquire(self) -> "WorkdirLock":
    fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
      fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
      holder = _read_holder(fd)
      os.close(fd)
      raise WorkdirBusy(f"{os.path.dirname(self.path)} is in use by another train command "
                        f"({holder}); wait for it to finish, stop it, or choose another "
                        "--workdir") from None
    os.ftruncate(fd, 0)
    os.write(fd, json.dumps({"pid": os.getpid(), "host": socket.gethostname()}).encode())
    os.fsync(fd)
    self._fd = fd
    return self

  def release(self) -> None:
    if self._fd is not None:
      os.close(self._fd)   # closing drops the flock
      self._fd = None


def _read_holder(fd: int) -> str:
  try:
    holder = json.loads(os.pread(fd, 4096, 0) or b"{}")
    return f"pid {holder['pid']} on host {holder['host']}"
  except (ValueError, KeyError, TypeError):
    return "a process that is still starting"


def check_writable(directory: str) -> None:
  """Creates `directory` if needed and writes a probe file there, so a read-only, full or
  forbidden output directory fails before any work instead of after it."""
  os.makedirs(directory, exist_ok=True)
  try:
    with tempfile.NamedTemporaryFile(dir=directory, prefix=".write-probe-"):
      pass
  except OSError as e:
    raise OSError(e.errno, e.strerror, directory) from None


# tensorstore (under orbax) reports a failed write as a ValueError whose text carries the errno.
_TENSORSTORE_OS_ERROR = re.compile(r"os_error_code='(\d+)'")
_QUOTED_PATH = re.compile(r'"(/[^"]+)"')


def file_error(exc: BaseException) -> OSError | None:
  """The OSError behind `exc` (itself, or one it was raised from: orbax and tensorstore wrap
  them), or None when no file error caused it."""
  seen = set()
  while exc is not None and id(exc) not in seen:
    seen.add(id(exc))
    if isinstance(exc, OSError) and exc.errno is not None:
      return exc
    code = _TENSORSTORE_OS_ERROR.search(str(exc))
    if code:
      path = _QUOTED_PATH.search(str(exc))
      return OSError(int(code[1]), os.strerror(int(code[1])), path[1] if path else None)
    exc = exc.__cause__ or (None if exc.__suppress_context__ else exc.__context__)
  return None


def describe_file_error(e: OSError) -> str:
  """'PATH: No space left on device' (the path when the error names one)."""
  reason = (e.strerror or os.strerror(e.errno)) if e.errno else str(e)
  name = e.filename
  hint = "; free some space and run the same command to resume" if e.errno == errno.ENOSPC else ""
  return f"{name}: {reason}{hint}" if name else f"{reason}{hint}"


def directory_bytes(path: str) -> int:
  """Bytes the files under `path` take on disk (0 if it does not exist); links are not followed.
  Allocated blocks, not lengths: a checkpoint is many small files, and each fills whole blocks."""
  total = 0
  for root, _, names in os.walk(path):
    for name in names:
      try:
        stat = os.lstat(os.path.join(root, name))
      except FileNotFoundError:
        continue
      total += max(stat.st_size, stat.st_blocks * 512)
  return total


def require_free_space(directory: str, needed: int, what: str) -> None:
  """Raises OSError(ENOSPC) naming `directory` when its file system has less than `needed` bytes
  free: a write that would fail half-way is refused before it starts."""
  free = shutil.disk_usage(directory).free
  if free < needed:
    raise OSError(errno.ENOSPC, f"No space left on device ({what} needs about "
                  f"{needed / 2**20:.1f} MiB, {free / 2**20:.1f} MiB free)", directory)
