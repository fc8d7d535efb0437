"""`huey-worker run` (what `make run` starts): a private Redis and every
daemon in the foreground; Ctrl-C stops them all and leaves nothing behind."""
import os
import re
import signal
import subprocess
import sys
import time

from conftest import ROOT
from huey_worker.devredis import free_port


def alive(pid):
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    # A zombie is gone for our purpose only once reaped by its parent; the
    # children of `run` are reaped by `run` itself before it exits.
    with open('/proc/%d/stat' % pid) as fh:
        return fh.read().split(')')[-1].split()[0] != 'Z'


def test_run_starts_everything_and_ctrl_c_stops_everything(tmp_path):
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(('HUEY_', 'REDIS_', 'NOTIFY_SOCKET'))}
    env.update(PYTHONPATH=os.path.join(ROOT, 'tests'),
               HUEY_MODULES='sample_tasks', HUEY_WORKER_TASKS_BUILTIN='false',
               HUEY_WORKER_STATUS_PORT=str(free_port()), PYTHONUNBUFFERED='1')
    log_path = tmp_path / 'run.log'
    with open(log_path, 'wb') as log:
        proc = subprocess.Popen(
            [sys.executable, '-m', 'huey_worker', 'run', '--state-dir',
             str(tmp_path / 'state')], env=env, cwd=ROOT, stdout=log,
            stderr=subprocess.STDOUT, start_new_session=True)
    try:
        deadline = time.monotonic() + 60
        while 'Ctrl-C stops everything' not in log_path.read_text():
            assert proc.poll() is None, log_path.read_text()
            assert time.monotonic() < deadline, log_path.read_text()
            time.sleep(0.1)
        out = log_path.read_text()
        redis_url = re.search(r'private Redis at (\S+)', out).group(1)
        pids = [int(p) for p in re.findall(r'\(pid (\d+)', out)]
        started = re.findall(r'started (\S+) \(pid', out)
        assert 'consumer' in started
        assert len(pids) == len(started) + 1  # + the private Redis

        # The suite works: a task enqueued on the private Redis runs.
        import redis
        import sample_tasks
        from huey_worker.app import huey
        client = redis.Redis.from_url(redis_url, protocol=2)
        task = sample_tasks.add.s(2, 2)
        client.lpush('huey.redis.huey', huey.serialize_task(task))
        while not client.exists('huey.r.huey.' + task.id):
            assert time.monotonic() < deadline, log_path.read_text()
            time.sleep(0.1)

        os.killpg(proc.pid, signal.SIGINT)  # what Ctrl-C in a terminal does
        assert proc.wait(90) == 0, log_path.read_text()
        out = log_path.read_text()
        assert out.rstrip().endswith('stopped')
        # Redis outlives the daemons, so they stop cleanly.
        assert 'Redis unreachable' not in out and 'Traceback' not in out
        for pid in pids:
            assert not alive(pid), 'pid %d left behind' % pid
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
