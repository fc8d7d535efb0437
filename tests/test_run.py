"""`huey-worker run` (what `make run` starts): a private Redis and every
daemon in the foreground; Ctrl-C stops them all and leaves nothing behind.

Each test gives `run` its own HOME, XDG_RUNTIME_DIR and TMPDIR, so neither
the developer's `make run` nor the machine's Redis on 6379 is ever seen."""
import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
import urllib.request

import pytest

from conftest import ROOT
from huey_worker.devredis import free_port


def alive(pid):
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    # A zombie is gone for our purpose only once reaped by its parent; the
    # children of `run` are reaped by `run` itself before it exits.
    try:
        with open('/proc/%d/stat' % pid) as fh:
            return fh.read().split(')')[-1].split()[0] != 'Z'
    except FileNotFoundError:
        return False


def wait_until(predicate, timeout, what):
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, what()
        time.sleep(0.05)


def port_free(port):
    with socket.socket() as sock:
        try:
            sock.bind(('127.0.0.1', port))
        except OSError:
            return False
    return True


@pytest.fixture
def run_env(tmp_path):
    """No variable naming a Redis, a config or a state, a private home."""
    for name in ('home', 'runtime', 'tmp'):
        (tmp_path / name).mkdir()
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(('HUEY_', 'REDIS_', 'NOTIFY_SOCKET', 'XDG_',
                                'WATCHDOG_'))}
    env.update(PYTHONPATH=os.path.join(ROOT, 'tests'),
               HUEY_MODULES='sample_tasks', HUEY_WORKER_TASKS_BUILTIN='false',
               HUEY_WORKER_STATUS_PORT=str(free_port()), PYTHONUNBUFFERED='1',
               HOME=str(tmp_path / 'home'),
               XDG_RUNTIME_DIR=str(tmp_path / 'runtime'),
               TMPDIR=str(tmp_path / 'tmp'))
    return env


class Run:
    """A real `huey-worker run` in its own process group, as a terminal
    would start it, with its output in a file."""

    def __init__(self, tmp_path, env, args=(), name='run'):
        self.log_path = tmp_path / ('%s.log' % name)
        with open(self.log_path, 'wb') as log:
            self.proc = subprocess.Popen(
                [sys.executable, '-m', 'huey_worker', 'run'] + list(args),
                env=env, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT,
                start_new_session=True)

    @property
    def pid(self):
        return self.proc.pid

    def output(self):
        return self.log_path.read_text()

    def wait_ready(self, timeout=60):
        wait_until(lambda: 'Ctrl-C stops everything' in self.output() or
                   self.proc.poll() is not None, timeout, self.output)
        assert self.proc.poll() is None, self.output()
        return self.output()

    def wait(self, timeout=90):
        return self.proc.wait(timeout)

    def children(self):
        """Every pid `run` printed: the private Redis and the daemons."""
        return [int(p) for p in re.findall(
            r'^(?:private Redis at|started) \S+ \(pid (\d+)', self.output(),
            re.M)]

    def redis_url(self):
        return re.search(r'private Redis at (\S+)', self.output()).group(1)

    def status_url(self):
        return re.search(r'status endpoint: (http://\S+)/health',
                         self.output()).group(1)

    def kill(self):
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait()


@pytest.fixture
def start_run(tmp_path):
    runs = []

    def start(env, *args, name='run'):
        run = Run(tmp_path, env, args, name)
        runs.append(run)
        return run
    yield start
    for run in runs:
        run.kill()
        for pid in run.children():   # a test that failed may leave them
            try:
                os.killpg(pid, signal.SIGKILL)
            except (ProcessLookupError, PermissionError):
                pass


def test_run_starts_everything_and_ctrl_c_stops_everything(
        tmp_path, run_env, start_run):
    run = start_run(run_env, '--state-dir', str(tmp_path / 'state'))
    out = run.wait_ready()
    pids = run.children()
    started = re.findall(r'started (\S+) \(pid', out)
    assert 'consumer' in started
    assert len(pids) == len(started) + 1  # + the private Redis

    # The suite works: a task enqueued on the private Redis runs.
    import redis
    import sample_tasks
    from huey_worker.app import huey
    client = redis.Redis.from_url(run.redis_url(), protocol=2)
    task = sample_tasks.add.s(2, 2)
    client.lpush('huey.redis.huey', huey.serialize_task(task))
    wait_until(lambda: client.exists('huey.r.huey.' + task.id), 30,
               run.output)
    client.close()

    began = time.monotonic()
    os.killpg(run.pid, signal.SIGINT)  # what Ctrl-C in a terminal does
    assert run.wait() == 0, run.output()
    took = time.monotonic() - began
    out = run.output()
    assert out.rstrip().endswith('stopped')
    # Redis outlives the daemons, so they stop cleanly.
    assert 'Redis unreachable' not in out and 'Traceback' not in out
    for pid in pids:
        assert not alive(pid), 'pid %d left behind' % pid
    # The daemons are down within about a second (the consumer's blocking
    # read); `run` returns right after, not seconds later.
    assert took < 3.5, 'Ctrl-C took %.1fs:\n%s' % (took, out)


@pytest.mark.parametrize('how', ['SIGHUP', 'SIGINT', 'SIGTERM', 'SIGKILL'])
def test_every_way_run_ends_leaves_nothing(tmp_path, run_env, start_run,
                                           how):
    """SIGHUP to the group is the terminal closing; SIGKILL of `run` alone
    is an OOM kill or `kill -9`: its children die with it all the same."""
    port = int(run_env['HUEY_WORKER_STATUS_PORT'])
    run = start_run(run_env, '--state-dir', str(tmp_path / 'state'))
    run.wait_ready()
    pids = run.children()
    assert len(pids) == 4, run.output()
    wait_until(lambda: not port_free(port), 10,
               lambda: 'status port %d not listening' % port)
    signum = getattr(signal, how)
    if signum == signal.SIGKILL:
        os.kill(run.pid, signum)
        assert run.wait() == -signal.SIGKILL
    else:
        os.killpg(run.pid, signum)
        assert run.wait() == 0, run.output()
        assert run.output().rstrip().endswith('stopped')
    wait_until(lambda: not any(alive(pid) for pid in pids), 30,
               lambda: 'left behind: %s\n%s' % (
                   [p for p in pids if alive(p)], run.output()))
    wait_until(lambda: port_free(port), 10,
               lambda: 'status port %d still held' % port)


def test_run_exits_with_the_code_of_a_failing_daemon(tmp_path, run_env,
                                                     start_run):
    # The status port is taken: the status-server exits 69, so does `run`.
    with socket.socket() as taken:
        taken.bind(('127.0.0.1', 0))
        taken.listen(1)
        env = dict(run_env,
                   HUEY_WORKER_STATUS_PORT=str(taken.getsockname()[1]))
        run = start_run(env, '--state-dir', str(tmp_path / 'a'), name='port')
        assert run.wait() == 69, run.output()
    assert 'status-server exited with 69; stopping' in run.output()
    pids = run.children()
    assert pids and not any(alive(pid) for pid in pids), run.output()

    # A task module that cannot be imported is a configuration error (78)
    # that only the daemons find.
    env = dict(run_env, HUEY_MODULES='no_such_module_for_run')
    run = start_run(env, '--state-dir', str(tmp_path / 'b'), name='module')
    assert run.wait() == 78, run.output()
    assert re.search(r'\S+ exited with 78; stopping', run.output())

    # A configuration error `run` finds itself: 78 before anything starts.
    run = start_run(run_env, '--state-dir', str(tmp_path / 'c'),
                    '--set', 'consumer.workers=none', name='set')
    assert run.wait() == 78, run.output()
    assert 'config error' in run.output()
    assert 'private Redis at' not in run.output()


def test_run_honours_the_config_file_and_set_and_prints_the_bound_port(
        tmp_path, run_env, start_run):
    config = tmp_path / 'dev.ini'
    config.write_text('[consumer]\nidentity = devbox\n')
    port = free_port()
    env = dict(run_env, HUEY_WORKER_CONFIG=str(config),
               HUEY_STATUS_PORT=str(port))
    del env['HUEY_WORKER_STATUS_PORT']
    run = start_run(env, '--state-dir', str(tmp_path / 'state'),
                    '--set', 'scheduler.interval=0.5', name='env-port')
    out = run.wait_ready()
    assert run.status_url() == 'http://127.0.0.1:%d' % port
    assert 'config: %s' % config in out
    assert 'consumer devbox starting' in out     # the file reached it
    body = json.load(urllib.request.urlopen(run.status_url() + '/health',
                                            timeout=10))
    assert body['status'] == 'ok'
    os.killpg(run.pid, signal.SIGINT)
    assert run.wait() == 0, run.output()

    # Port 0: the system picks one, and `run` prints the one it picked.
    run = start_run(env, '--state-dir', str(tmp_path / 'state'),
                    '--port', '0', '-c', str(config), name='port-0')
    run.wait_ready()
    url = run.status_url()
    assert re.fullmatch(r'http://127\.0\.0\.1:\d+', url) and \
        not url.endswith((':0', ':%d' % port)), url
    body = json.load(urllib.request.urlopen(url + '/health', timeout=10))
    assert body['status'] == 'ok'
    os.killpg(run.pid, signal.SIGINT)
    assert run.wait() == 0, run.output()


def test_state_dir_is_per_user_kept_and_never_shared(tmp_path, run_env,
                                                     start_run):
    env = dict(run_env, XDG_STATE_HOME=str(tmp_path / 'state-home'))
    state = tmp_path / 'state-home' / 'huey-worker' / 'run'
    run = start_run(env)
    out = run.wait_ready()
    assert 'state dir: %s' % state in out
    assert 'private Redis at %s' % run.redis_url() in out
    assert (state / 'redis').is_dir() and (state / 'huey-worker.ini').exists()

    # A second `run` on the same directory would share Redis's files.
    second = start_run(env, name='second')
    assert second.wait() == 69, second.output()
    assert 'in use by another `huey-worker run` (pid %d)' % run.pid \
        in second.output()

    os.killpg(run.pid, signal.SIGINT)
    assert run.wait() == 0, run.output()
    assert (state / 'redis').is_dir()              # kept for the next run
    assert os.listdir(tmp_path / 'tmp') == []      # nothing in /tmp

    # Named with --state-dir: used and kept as well.
    named = tmp_path / 'named'
    run = start_run(env, '--state-dir', str(named), name='named')
    run.wait_ready()
    os.killpg(run.pid, signal.SIGTERM)
    assert run.wait() == 0, run.output()
    assert (named / 'redis').is_dir() and os.listdir(tmp_path / 'tmp') == []


def test_private_redis_whatever_the_environment_says_unless_named_on_run(
        tmp_path, run_env, start_run, redis_url):
    # An exported URL (from an earlier `make run`) and a password meant for
    # another Redis: the daemons still use the private one, and can.
    env = dict(run_env, HUEY_REDIS_URL='redis://127.0.0.1:1/0',
               REDIS_PASSWORD='not-for-the-private-one')
    run = start_run(env, '--state-dir', str(tmp_path / 'a'), name='env')
    run.wait_ready()
    wait_until(lambda: 'consumer ready' in run.output(), 30, run.output)
    assert "on %s" % run.redis_url() in run.output()  # its start line
    os.killpg(run.pid, signal.SIGINT)
    assert run.wait() == 0, run.output()
    assert 'Redis unreachable' not in run.output()

    # --redis-url on run's command line: that Redis, no private one.
    run = start_run(run_env, '--state-dir', str(tmp_path / 'b'),
                    '--redis-url', redis_url, name='named')
    out = run.wait_ready()
    assert 'private Redis at' not in out
    assert '  export HUEY_REDIS_URL=%s\n' % redis_url in out
    wait_until(lambda: 'consumer ready' in run.output(), 30, run.output)
    assert "on %s" % redis_url in run.output()
    os.killpg(run.pid, signal.SIGINT)
    assert run.wait() == 0, run.output()


def cli(env, *args, timeout=60):
    return subprocess.run([sys.executable, '-m', 'huey_worker'] + list(args),
                          env=env, cwd=ROOT, capture_output=True, text=True,
                          timeout=timeout)


def test_the_cli_next_to_run_reaches_its_redis_with_nothing_set(
        tmp_path, run_env, start_run):
    run = start_run(run_env, '--state-dir', str(tmp_path / 'state'))
    out = run.wait_ready()
    redis_url = run.redis_url()
    record = tmp_path / 'runtime' / 'huey-worker' / 'run.json'
    assert '  export HUEY_REDIS_URL=%s\n' % redis_url in out
    assert str(record) in out

    # Another terminal: the same user, no variable naming a Redis.  `config`
    # goes first: it never connects, so a miss cannot reach 6379.
    env = {k: v for k, v in run_env.items()
           if k not in ('HUEY_WORKER_STATUS_PORT',)}
    env['HUEY_WORKER_CONFIG'] = str(tmp_path / 'empty.ini')
    (tmp_path / 'empty.ini').touch()
    shown = cli(env, 'config', '--json')
    assert shown.returncode == 0, shown.stderr
    url = json.loads(shown.stdout)['settings']['redis']['url']
    assert url == {'value': redis_url, 'source': 'make run (pid %d, file %s)'
                   % (run.pid, record)}
    text = cli(env, 'config').stdout
    assert re.search(r'^url += %s +# make run \(pid %d, file %s\)$' % (
        re.escape(redis_url), run.pid, re.escape(str(record))), text, re.M)

    status = cli(env, 'status')
    assert status.returncode == 0, status.stdout + status.stderr
    assert 'health: ok' in status.stdout
    submitted = cli(env, 'submit', 'add', '20', '22', '--wait')
    assert submitted.returncode == 0, submitted.stdout + submitted.stderr
    task_id = submitted.stdout.split()[0]
    shown = cli(env, 'task', task_id)
    assert shown.returncode == 0, shown.stderr
    assert re.search(r'^state +complete$', shown.stdout, re.M)
    assert re.search(r'^result +42$', shown.stdout, re.M)

    # Something that names a Redis wins over the record.
    named = cli(dict(env, REDIS_HOST='127.0.0.2'), 'config', '--json')
    url = json.loads(named.stdout)['settings']['redis']['url']
    assert url == {'value': '', 'source': 'default'}

    os.killpg(run.pid, signal.SIGINT)
    assert run.wait() == 0, run.output()
    assert not record.exists()
    url = json.loads(cli(env, 'config', '--json').stdout)[
        'settings']['redis']['url']
    assert url == {'value': '', 'source': 'default'}


def test_pdf_extract_works_on_a_fresh_run(tmp_path, run_env, start_run):
    pymupdf = pytest.importorskip('pymupdf')
    env = dict(run_env, HUEY_WORKER_TASKS_BUILTIN='true')
    state = tmp_path / 'state'
    run = start_run(env, '--state-dir', str(state))
    out = run.wait_ready()
    inputs, outputs = state / 'input', state / 'output' / 'pdf'
    assert 'pdf.extract reads files below %s; writes to %s' % (
        inputs, outputs) in out
    assert 'collect.* writes to %s' % (state / 'output' / 'collect') in out
    assert inputs.is_dir() and outputs.is_dir()

    doc = pymupdf.open()
    doc.new_page().insert_text((72, 72), 'hello from make run')
    doc.save(str(inputs / 'hello.pdf'))
    # A bare name is below the input dir, as the summary says.
    submitted = cli(env, 'submit', 'pdf.extract', 'hello.pdf', '--wait',
                    '--json', timeout=120)
    assert submitted.returncode == 0, submitted.stdout + submitted.stderr
    assert json.loads(submitted.stdout)['state'] == 'complete'
    written = [p.read_text(errors='replace') for p in outputs.rglob('*')
               if p.is_file()]
    assert any('hello from make run' in text for text in written), written
    os.killpg(run.pid, signal.SIGINT)
    assert run.wait() == 0, run.output()
