"""One search per workdir: the lock refuses a second holder, names the first, dies with it."""

from __future__ import annotations

import datetime
import json
import os
from pathlib import Path
import signal
import socket
import stat
import subprocess
import sys
import textwrap
import threading

import pytest

from blockqnn_jax.storage import workdir_lock
from blockqnn_jax.storage.workdir_lock import LOCK_FILE, WorkdirBusy, WorkdirLock

REPO = Path(__file__).resolve().parents[1]

# Another process, driven by its arguments: MODE WORKDIR.
#   hold: takes the lock, says 'locked', holds it until its stdin closes (or it is killed).
#   fork: as hold, but forks a child that sleeps on; says the child's pid once it runs.
#   bare: flocks the lock file without writing a record, as a holder caught mid-start would.
#   try: tries the lock once and says what happened as JSON.
_SCRIPT = textwrap.dedent('''\
    import fcntl, json, os, sys, time
    from blockqnn_jax.storage.workdir_lock import LOCK_FILE, WorkdirBusy, WorkdirLock
    mode, workdir = sys.argv[1], sys.argv[2]
    if mode == 'try':
      try:
        with WorkdirLock(workdir):
          print(json.dumps({'took': True}))
      except WorkdirBusy as e:
        print(json.dumps({'busy': e.pid, 'message': str(e)}))
      sys.exit(0)
    if mode == 'bare':
      os.makedirs(workdir, exist_ok=True)
      f = open(os.path.join(workdir, LOCK_FILE), 'a')
      fcntl.flock(f, fcntl.LOCK_EX)
    else:
      lock = WorkdirLock(workdir, purpose='search').acquire()
    if mode == 'fork':
      ready, tell = os.pipe()
      child = os.fork()
      if child == 0:  # fork's hooks have run by the time the child gets here
        os.write(tell, b'x')
        time.sleep(600)
        os._exit(0)
      os.read(ready, 1)  # until then the child still shares the lock's descriptor
      print(child, flush=True)
    print('locked', flush=True)
    sys.stdin.read()
    ''')


@pytest.fixture
def other_process(tmp_path):
  """Starts ``_SCRIPT`` in another process; kills whatever is still running at teardown."""
  script = tmp_path / 'other_process.py'
  script.write_text(_SCRIPT)
  started = []

  def start(mode: str, workdir: Path) -> subprocess.Popen:
    proc = subprocess.Popen([sys.executable, str(script), mode, str(workdir)], cwd=REPO,
                            env={**os.environ, 'PYTHONPATH': str(REPO)},
                            stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    started.append(proc)
    return proc

  yield start
  for proc in started:
    if proc.poll() is None:
      proc.kill()
    proc.wait(timeout=60)


def _hold(start, workdir: Path, mode: str = 'hold') -> subprocess.Popen:
  """A holder in another process, once it holds the workdir."""
  proc = start(mode, workdir)
  line = proc.stdout.readline().strip()
  if mode == 'fork':
    proc.child = int(line)
    line = proc.stdout.readline().strip()
  assert line == 'locked', f'the holder did not start (exit code {proc.wait()})'
  return proc


def _try_elsewhere(start, workdir: Path) -> dict:
  """What another process gets when it tries the workdir now."""
  proc = start('try', workdir)
  out, _ = proc.communicate(timeout=120)
  return json.loads(out)


def _tree(root: Path) -> dict[str, bytes | None]:
  """Every path under ``root`` with a file's bytes (None for a directory)."""
  return {str(p.relative_to(root)): None if p.is_dir() else p.read_bytes()
          for p in sorted(root.rglob('*'))}


def test_a_second_process_is_refused_at_once_naming_the_holder(tmp_path, other_process):
  workdir = tmp_path / 'w'
  holder = _hold(other_process, workdir)
  with pytest.raises(WorkdirBusy) as info:
    WorkdirLock(workdir).acquire()
  assert isinstance(info.value, RuntimeError)
  assert info.value.pid == holder.pid
  record = info.value.holder
  assert (record.host, record.purpose) == (socket.gethostname(), 'search')
  assert 'other_process.py hold' in record.command
  assert datetime.datetime.fromisoformat(record.since).tzinfo is not None
  message = str(info.value)
  for part in (str(workdir), f'pid {holder.pid}', socket.gethostname(),
               'other_process.py hold', record.since):
    assert part in message


def test_a_process_holding_it_is_named_to_another_process(tmp_path, other_process):
  with WorkdirLock(tmp_path / 'w', purpose='retraining'):
    seen = _try_elsewhere(other_process, tmp_path / 'w')
  assert seen['busy'] == os.getpid() and 'a retraining in pid' in seen['message']
  assert _try_elsewhere(other_process, tmp_path / 'w') == {'took': True}  # released


def test_kill_9_frees_the_lock_at_once(tmp_path, other_process):
  workdir = tmp_path / 'w'
  holder = _hold(other_process, workdir)
  holder.send_signal(signal.SIGKILL)
  holder.wait(timeout=60)
  # No waiting and nothing to clean up: the kernel dropped the lock with the process.
  with WorkdirLock(workdir) as lock:
    assert lock.holder.pid == os.getpid()
    assert workdir_lock.Holder.from_bytes((workdir / LOCK_FILE).read_bytes()) == lock.holder


def test_forked_children_do_not_keep_the_lock(tmp_path, other_process):
  workdir = tmp_path / 'w'
  holder = _hold(other_process, workdir, mode='fork')
  try:
    holder.send_signal(signal.SIGKILL)
    holder.wait(timeout=60)
    os.kill(holder.child, 0)  # the forked child lives on ...
    with WorkdirLock(workdir):  # ... yet the lock died with the process that took it
      pass
  finally:
    os.kill(holder.child, signal.SIGKILL)


def test_the_holding_thread_may_reenter_and_the_outermost_release_frees(tmp_path,
                                                                       other_process):
  workdir = tmp_path / 'w'
  outer = WorkdirLock(workdir)
  with outer:
    with WorkdirLock(workdir) as inner:  # another object in the same thread: nests
      assert inner.held and inner.holder == outer.holder
      with outer:  # the same object again
        pass
      assert outer.held
    assert outer.held and not inner.held
    assert _try_elsewhere(other_process, workdir)['busy'] == os.getpid()  # still held
  assert not outer.held
  assert _try_elsewhere(other_process, workdir) == {'took': True}
  assert (workdir / LOCK_FILE).read_bytes() == b''  # released: no record of a holder left
  outer.release()  # once too often: nothing to undo


def test_another_thread_of_the_holding_process_is_refused(tmp_path):
  caught = []

  def second_search():
    try:
      WorkdirLock(tmp_path / 'w').acquire()
    except WorkdirBusy as e:
      caught.append(e)

  with WorkdirLock(tmp_path / 'w'):
    thread = threading.Thread(target=second_search)
    thread.start()
    thread.join()
  assert len(caught) == 1 and caught[0].pid == os.getpid()
  assert 'another thread of this process' in str(caught[0])


def test_a_fresh_workdir_is_made_with_its_lock_and_the_usual_permissions(tmp_path):
  workdir = tmp_path / 'runs' / 'cifar' / 'w'
  with WorkdirLock(workdir):
    assert [p.name for p in workdir.iterdir()] == [LOCK_FILE]
    assert workdir_lock.Holder.from_bytes((workdir / LOCK_FILE).read_bytes()).pid == os.getpid()
  (tmp_path / 'runs' / 'cifar' / 'plain').mkdir()
  mode = lambda p: stat.S_IMODE(p.stat().st_mode)
  assert mode(workdir) == mode(tmp_path / 'runs' / 'cifar' / 'plain')
  assert sorted(p.name for p in workdir.parent.iterdir()) == ['plain', 'w']


def test_a_refused_lock_leaves_the_workdir_as_it_was(tmp_path, other_process):
  workdir = tmp_path / 'runs' / 'w'
  _hold(other_process, workdir)  # made fresh by the holder
  before = _tree(tmp_path / 'runs')
  assert list(before) == ['w', f'w/{LOCK_FILE}'] and before[f'w/{LOCK_FILE}']
  for _ in range(2):
    with pytest.raises(WorkdirBusy):
      WorkdirLock(workdir).acquire()
  assert _tree(tmp_path / 'runs') == before  # not a byte of the holder's record touched


def test_losing_the_race_to_make_a_fresh_workdir_leaves_nothing(tmp_path, other_process,
                                                                monkeypatch):
  workdir = tmp_path / 'runs' / 'w'
  publish = workdir_lock._publish
  rivals = []

  def rival_publishes_first(made, target):
    # Ours is made and locked in its hidden directory; another search makes the workdir now.
    rivals.append(_hold(other_process, target))
    publish(made, target)

  monkeypatch.setattr(workdir_lock, '_publish', rival_publishes_first)
  with pytest.raises(WorkdirBusy) as info:
    WorkdirLock(workdir).acquire()
  assert info.value.pid == rivals[0].pid
  tree = _tree(tmp_path / 'runs')
  assert list(tree) == ['w', f'w/{LOCK_FILE}']  # no half-made directory of ours left
  assert workdir_lock.Holder.from_bytes(tree[f'w/{LOCK_FILE}']).pid == rivals[0].pid


def test_a_holder_without_a_readable_record_is_still_refused(tmp_path, other_process,
                                                            monkeypatch):
  monkeypatch.setattr(workdir_lock, '_RECORD_WAIT_S', 0.1)
  _hold(other_process, tmp_path / 'w', mode='bare')
  with pytest.raises(WorkdirBusy, match='record could not be read') as info:
    WorkdirLock(tmp_path / 'w').acquire()
  assert info.value.holder is None and info.value.pid is None
