"""One search per workdir: an exclusive lock that a search (or a retraining run) holds on it.

Two processes writing one workdir interleave their records and overwrite each other's agent
state, so the second is refused at once, with a ``WorkdirBusy`` that says who holds the
workdir::

  with WorkdirLock(workdir, purpose='search'):
    ...  # the only process writing ``workdir`` until the block exits

The lock is ``fcntl.flock`` on ``<workdir>/.workdir.lock``. The kernel drops a flock when the
last descriptor of its open file goes, so a holder that exits in any way, ``kill -9``
included, leaves no stale lock to clean up; the file's content (pid, host, command line,
since when) only feeds the refusal's message. The file is never deleted: unlinking a lock
file lets a late opener lock an orphaned inode while a third process locks a new one.

* Re-entry: the thread that holds a workdir may take it again (nested ``with`` blocks, or an
  entry point and the library function it calls both taking it); it is released when the
  outermost exits. Another thread of the same process is refused like another process.
* Forked children (multiprocessing workers) do not keep the lock: a child closes its copy
  of the descriptor as it starts (there is no close-on-fork flag to do it sooner), so the
  lock still ends with the process that took it.
* A workdir that does not exist yet is made in a hidden sibling directory, with its lock
  taken and its holder written there, and renamed into place: nobody sees a workdir without
  its holder record, and an attempt that loses the race to create it (and is refused) or
  fails leaves nothing behind.
* Across hosts the lock holds where the filesystem supports flock (local disks; NFSv4
  emulates it with byte-range locks).
"""

from __future__ import annotations

import dataclasses
import datetime
import errno
import fcntl
import json
import os
from pathlib import Path
import secrets
import shlex
import socket
import sys
import threading
import time

LOCK_FILE = '.workdir.lock'
# How long a refused process waits for a holder that has the lock but has not yet written
# its record (a window of microseconds between flock and write).
_RECORD_WAIT_S = 1.0


@dataclasses.dataclass(frozen=True)
class Holder:
  """Who holds a workdir: the record written into its lock file."""

  pid: int
  host: str
  command: str
  since: str  # ISO 8601, local time with its UTC offset
  purpose: str = 'search'

  @classmethod
  def of_this_process(cls, purpose: str) -> 'Holder':
    argv = getattr(sys, 'orig_argv', None) or [sys.executable, *sys.argv]
    return cls(pid=os.getpid(), host=socket.gethostname(), command=shlex.join(argv),
               since=datetime.datetime.now().astimezone().isoformat(timespec='seconds'),
               purpose=purpose)

  def to_bytes(self) -> bytes:
    return (json.dumps(dataclasses.asdict(self)) + '\n').encode()

  @classmethod
  def from_bytes(cls, data: bytes) -> 'Holder | None':
    """The record, or None for an empty or partly written one."""
    try:
      fields = json.loads(data.decode())
    except (ValueError, RecursionError):  # empty, cut short mid-write, or not ours
      return None
    if not isinstance(fields, dict):
      return None
    try:
      return cls(**{f.name: fields[f.name] for f in dataclasses.fields(cls) if f.name in fields})
    except TypeError:  # a required field missing
      return None


class WorkdirBusy(RuntimeError):
  """Another live process (or another thread of this one) holds the workdir.

  Attributes:
    workdir: the workdir asked for.
    holder: the holder's record, or None when it could not be read.
  """

  def __init__(self, workdir: Path, holder: Holder | None, same_process: bool = False):
    self.workdir = workdir
    self.holder = holder
    self._same_process = same_process
    if holder is None:
      who = 'a live process whose record could not be read'
    else:
      who = (f'a {holder.purpose} in pid {holder.pid} on {holder.host}, running '
             f'`{holder.command}`, since {holder.since}')
    if same_process:
      who += ' (another thread of this process)'
    elif holder is not None and holder.host != socket.gethostname():
      who += ' (on another machine: stop it there)'
    super().__init__(
        f'workdir {workdir} is in use by {who}. One search per workdir: wait for it to end, '
        f'stop it, or pick another --workdir. The lock ends with its process, even a kill -9, '
        f'so there is no file to delete.')

  @property
  def pid(self) -> int | None:
    return None if self.holder is None else self.holder.pid

  def __reduce__(self):  # pickles (to cross a process pool) with its own arguments
    return type(self), (self.workdir, self.holder, self._same_process)


@dataclasses.dataclass
class _Held:
  """A workdir this process holds: its locked descriptor, owning thread and nesting depth."""

  fd: int
  thread: int
  depth: int
  holder: Holder


# Workdirs this process holds, by their lock file's (device, inode): two spellings of one
# path (relative, absolute, through a symlink) are the same lock.
_held: dict[tuple[int, int], _Held] = {}
_registry = threading.Lock()


def _forget_in_child() -> None:
  """After fork: the child holds nothing, and closing its copies leaves the parent's lock."""
  global _registry
  _registry = threading.Lock()  # another thread may have held the old one at the fork
  for held in _held.values():
    try:
      os.close(held.fd)  # not LOCK_UN: that would release the parent's lock too
    except OSError:
      pass
  _held.clear()


os.register_at_fork(after_in_child=_forget_in_child)


def _publish(made: Path, workdir: Path) -> None:
  """Renames a fully made workdir into place; fails if ``workdir`` exists and is not empty.

  A seam for tests, which simulate losing the race to create the workdir.
  """
  os.rename(made, workdir)


class WorkdirLock:
  """An exclusive, re-entrant lock on a workdir; a context manager.

  Args:
    workdir: the directory to hold; made (with its parents) if it does not exist.
    purpose: what holds it, for the message another process gets ('search', 'retraining').
  """

  def __init__(self, workdir: str | os.PathLike, purpose: str = 'search'):
    self.workdir = Path(workdir)
    self.purpose = purpose
    self._key: tuple[int, int] | None = None  # the lock file's (device, inode) while held
    self._depth = 0  # this object's nested acquires
    self._pid: int | None = None

  @property
  def held(self) -> bool:
    """Whether this object holds the workdir (a forked child's copy does not)."""
    return self._depth > 0 and self._pid == os.getpid()

  @property
  def holder(self) -> Holder | None:
    """The record this process wrote, while held."""
    return _held[self._key].holder if self.held else None

  def acquire(self) -> 'WorkdirLock':
    """Takes the workdir, or raises ``WorkdirBusy`` at once if someone else holds it.

    Taking it again from the holding thread (through this or another ``WorkdirLock``) nests.
    """
    with _registry:
      if self.held:
        self._reenter(_held[self._key])
        return self
      fd = self._lock_fresh() if not self.workdir.exists() else None
      if fd is not None:
        self._hold(fd, Holder.from_bytes(os.pread(fd, 65536, 0)))
        return self
      fd = os.open(self.workdir / LOCK_FILE, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
      try:
        key = _key_of(fd)
        if key in _held:  # this process holds it already, through another WorkdirLock
          self._reenter(_held[key])
          self._key, self._depth, self._pid = key, 1, os.getpid()
          os.close(fd)
          return self
        try:
          fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
          busy = False
        except BlockingIOError:
          busy = True
        if not busy:
          self._hold(fd, _write_record(fd, self.purpose))
          return self
      except BaseException:
        os.close(fd)
        raise
    # Refused. Read who holds it outside the registry (it may wait for a record being
    # written); the file was opened, never written, so the refusal changed nothing.
    try:
      holder = _read_record(fd)
    finally:
      os.close(fd)
    raise WorkdirBusy(self.workdir, holder)

  def release(self) -> None:
    """Undoes one ``acquire``; the outermost one in the process gives the workdir up."""
    with _registry:
      if not self.held:
        return  # never taken, already given up, or a forked child's copy
      self._depth -= 1
      held = _held[self._key]
      held.depth -= 1
      if self._depth == 0:
        self._key = None
      if held.depth == 0:
        del _held[_key_of(held.fd)]
        try:
          os.ftruncate(held.fd, 0)  # a record left behind would describe nobody
        except OSError:
          pass
        fcntl.flock(held.fd, fcntl.LOCK_UN)
        os.close(held.fd)

  def __enter__(self) -> 'WorkdirLock':
    return self.acquire()

  def __exit__(self, *exc_info) -> None:
    self.release()

  def _hold(self, fd: int, holder: Holder | None) -> None:
    self._key, self._depth, self._pid = _key_of(fd), 1, os.getpid()
    _held[self._key] = _Held(fd, threading.get_ident(), 1, holder)

  def _reenter(self, held: _Held) -> None:
    if held.thread != threading.get_ident():
      raise WorkdirBusy(self.workdir, held.holder, same_process=True)
    held.depth += 1
    self._depth += 1

  def _lock_fresh(self) -> int | None:
    """Makes a missing workdir with its lock taken and record written, then publishes it.

    Returns the locked descriptor, or None if another process made the workdir first (the
    caller then locks that one like any existing workdir).
    """
    parent = self.workdir.parent
    parent.mkdir(parents=True, exist_ok=True)
    # Made by os.mkdir, not tempfile, so the workdir gets the usual umask permissions.
    made = parent / f'.{self.workdir.name}.{os.getpid()}.{secrets.token_hex(4)}.new'
    os.mkdir(made)
    fd = None
    try:
      fd = os.open(made / LOCK_FILE, os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o644)
      fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)  # nobody else can see the file yet
      _write_record(fd, self.purpose)
      try:
        _publish(made, self.workdir)
      except OSError as e:
        if e.errno not in (errno.EEXIST, errno.ENOTEMPTY, errno.ENOTDIR):
          raise
        os.close(fd)  # lost the race: the workdir is someone else's now
        fd = None
        return None
      made = None
      return fd
    except BaseException:
      if fd is not None:
        os.close(fd)
      raise
    finally:
      if made is not None:  # not published: leave no half-made directory behind
        try:
          (made / LOCK_FILE).unlink(missing_ok=True)
          made.rmdir()
        except OSError:
          pass


def _key_of(fd: int) -> tuple[int, int]:
  stat = os.fstat(fd)
  return stat.st_dev, stat.st_ino


def _write_record(fd: int, purpose: str) -> Holder:
  holder = Holder.of_this_process(purpose)
  os.ftruncate(fd, 0)
  os.pwrite(fd, holder.to_bytes(), 0)
  return holder


def _read_record(fd: int) -> Holder | None:
  """The holder's record; waits briefly for one that has the lock but is still writing it."""
  deadline = time.monotonic() + _RECORD_WAIT_S
  while True:
    holder = Holder.from_bytes(os.pread(fd, 65536, 0))
    if holder is not None or time.monotonic() > deadline:
      return holder
    time.sleep(0.02)
