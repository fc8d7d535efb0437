"""`huey-worker status --watch` into a pipe (a line per refresh, the
change of a queue seen in a later line, Ctrl-C ends it as SIGINT) and on a
terminal (a pseudo-terminal: each refresh clears the screen and redraws),
and `huey-worker tasks` / GET /task-names listing the registered tasks
with their retry and time-limit settings."""
import json
import os
import pty
import select
import signal
import subprocess
import sys

from conftest import ROOT
from ops_helpers import Client, start_status_server

import sample_tasks
from huey_worker.cli.status_cmd import CLEAR


def watch(env, *args, **popen):
    return subprocess.Popen(
        [sys.executable, '-m', 'huey_worker', 'status', '--watch'] +
        list(args), cwd=ROOT, env=env, **popen)


def test_watch_into_a_pipe_prints_a_line_per_refresh(base_env, producer):
    proc = watch(base_env, '0.2', stdout=subprocess.PIPE, text=True)
    try:
        first = proc.stdout.readline()
        assert ' health=unhealthy queue=huey pending=0 ' in first, first
        assert '\x1b' not in first
        sample_tasks.add(1, 2)   # no consumer: it stays pending
        for _ in range(50):
            line = proc.stdout.readline()
            assert line.endswith('\n')
            if ' pending=1 ' in line:
                break
        else:
            raise AssertionError('the enqueued task never showed')
        assert 'no live consumer' in line
    finally:
        proc.send_signal(signal.SIGINT)
        code = proc.wait(20)
    assert code == -signal.SIGINT


def test_watch_json_is_one_object_per_line(base_env, producer):
    proc = watch(base_env, '--json', stdout=subprocess.PIPE, text=True)
    try:
        record = json.loads(proc.stdout.readline())
    finally:
        proc.send_signal(signal.SIGINT)
        proc.wait(20)
    assert record['error'] is None and record['time']
    assert record['report']['queue']['huey']['pending'] == 0


def test_watch_on_a_terminal_redraws_in_place(base_env, producer):
    master, slave = pty.openpty()
    proc = watch(base_env, '0.2', stdout=slave, stderr=slave)
    os.close(slave)
    seen = b''
    try:
        while seen.count(CLEAR.encode()) < 3:
            ready, _, _ = select.select([master], [], [], 20)
            assert ready, seen
            seen += os.read(master, 65536)
    finally:
        proc.send_signal(signal.SIGINT)
        proc.wait(20)
        os.close(master)
    screens = seen.split(CLEAR.encode())[1:]
    assert b'every 0.2s' in screens[0] and b'QUEUE' in screens[0]
    assert b'health: unhealthy' in screens[1]


def test_tasks_lists_settings_as_the_endpoint_does(base_env, start_daemon):
    env = dict(base_env, HUEY_WORKER_TASKS_TIMEOUT='120')
    out = subprocess.run(
        [sys.executable, '-m', 'huey_worker', 'tasks', '--json'], cwd=ROOT,
        env=env, capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    listed = json.loads(out.stdout)
    tasks = {t['name']: t for t in listed['tasks']}
    assert tasks['sample_tasks.fail_once']['retries'] == 1
    assert tasks['sample_tasks.fail_retry_later']['retry_delay'] == 3600
    assert tasks['sample_tasks.add']['timeout'] == 120
    assert tasks['sample_tasks.add']['timeout_from'] == '[tasks] timeout'
    assert listed['default_timeout'] == 120
    _, port = start_status_server(start_daemon, env)
    status, body = Client(port).get('/task-names')
    assert status == 200 and body == listed
    text = subprocess.run(
        [sys.executable, '-m', 'huey_worker', 'tasks'], cwd=ROOT, env=env,
        capture_output=True, text=True, timeout=60).stdout
    line = [ln for ln in text.splitlines()
            if ln.startswith('sample_tasks.fail_retry_later ')][0]
    assert line.split()[1:3] == ['2', '3600s'] and '120s (default)' in line
