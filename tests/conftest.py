"""Shared fixtures: a private redis-server per test session (never the
machine's own Redis), a clean database per test, and real daemon processes.
"""
import os
import signal
import subprocess
import sys
import time

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, 'tests'))

from huey_worker.devredis import EmbeddedRedis  # noqa: E402

_db_counter = iter(range(1, 16))


@pytest.hookimpl(tryfirst=True)
def pytest_collection_modifyitems(config, items):
    # Under pytest-xdist (make test: -n auto --dist loadgroup) the system
    # tests run one after another on one worker: they boot machines, build
    # network namespaces and load both cores, and their waits are sized for
    # a machine that runs one of them at a time.  The other workers take
    # the rest.
    for item in items:
        if item.get_closest_marker('slow'):
            item.add_marker(pytest.mark.xdist_group('system'))


@pytest.fixture(scope='session')
def redis_server(tmp_path_factory):
    server = EmbeddedRedis(str(tmp_path_factory.mktemp('redis')))
    server.start()
    yield server
    server.cleanup()


@pytest.fixture
def redis_url(redis_server):
    """A URL to a freshly emptied database of the private server."""
    client = redis_server.client()
    client.flushall()  # our own private server, started by this session
    client.close()
    return redis_server.url


@pytest.fixture
def base_env(redis_url, tmp_path):
    """Environment for daemons under test: the private Redis, an empty
    config file in tmp_path (conf.d/ beside it takes drop-ins), the tests'
    task modules importable."""
    config_path = tmp_path / 'huey-worker.ini'
    config_path.touch()
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(('HUEY_', 'REDIS_', 'NOTIFY_SOCKET',
                                'WATCHDOG_'))}
    env.update({
        'HUEY_REDIS_URL': redis_url,
        'HUEY_WORKER_CONFIG': str(config_path),
        'PYTHONPATH': os.path.join(ROOT, 'tests'),
        'HUEY_WORKER_TASKS_BUILTIN': 'false',
        'HUEY_MODULES': 'sample_tasks',
        'PYTHONUNBUFFERED': '1',
        # Tests wait for a task's 'start' line; the default logs its end only.
        'HUEY_WORKER_LOGGING_TASK_EVENTS': 'both',
    })
    return env


class Daemon:
    """A real huey-worker daemon process with its output in a file."""

    def __init__(self, args, env, log_path):
        self.log_path = log_path
        self._log = open(log_path, 'ab')
        self.proc = subprocess.Popen(
            [sys.executable, '-m', 'huey_worker'] + list(args), env=env, cwd=ROOT,
            stdout=self._log, stderr=subprocess.STDOUT,
            start_new_session=True)

    @property
    def pid(self):
        return self.proc.pid

    def output(self):
        with open(self.log_path, 'rb') as fh:
            return fh.read().decode('utf-8', 'replace')

    def wait_for_output(self, text, timeout=20):
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if text in self.output():
                return True
            if self.proc.poll() is not None and text not in self.output():
                raise AssertionError('daemon exited (%s) before printing %r:\n%s'
                                     % (self.proc.returncode, text,
                                        self.output()))
            time.sleep(0.05)
        raise AssertionError('timed out waiting for %r in:\n%s'
                             % (text, self.output()))

    def signal(self, signum):
        os.kill(self.proc.pid, signum)

    def wait(self, timeout=60):
        return self.proc.wait(timeout)

    def stop(self):
        if self.proc.poll() is None:
            try:
                os.killpg(self.proc.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            self.proc.wait(10)
        self._log.close()


@pytest.fixture
def start_daemon(tmp_path):
    started = []

    def start(args, env, name='daemon'):
        daemon = Daemon(args, env, str(tmp_path / ('%s-%d.log' % (
            name, len(started)))))
        started.append(daemon)
        return daemon
    yield start
    for daemon in started:
        daemon.stop()


@pytest.fixture
def producer(redis_url, monkeypatch, tmp_path):
    """The shared Huey app configured for the private Redis, as a web app
    producing tasks would have it."""
    from huey_worker import app as app_module
    from huey_worker import config
    for name in list(os.environ):
        if name.startswith(('HUEY_', 'REDIS_')):
            monkeypatch.delenv(name)
    monkeypatch.setenv('HUEY_REDIS_URL', redis_url)
    producer_config = tmp_path / 'producer.ini'
    producer_config.touch()
    monkeypatch.setenv('HUEY_WORKER_CONFIG', str(producer_config))
    cfg = config.load()
    app_module.huey.configure(cfg)
    import sample_tasks  # noqa: F401  registers the test tasks
    return app_module.huey
