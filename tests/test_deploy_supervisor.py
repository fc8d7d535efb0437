"""The Supervisor blocks (deploy/supervisor/) and the logrotate file, run by
a real supervisord and a real logrotate: the blocks are rendered for a
temporary root by the same templates `make install` uses."""
import gzip
import os
import re
import shutil
import subprocess
import threading
import time

import pytest

from deploy_support import (Supervisord, free_port, make_dirs, read,
                            temp_layout, wait_for, write_config,
                            write_launcher, write_rendered)

pytestmark = pytest.mark.slow

CONSUMER = 'huey-worker:huey-worker-consumer'
PROGRAMS = (CONSUMER, 'huey-worker:huey-worker-scheduler',
            'huey-worker:huey-worker-status')


@pytest.fixture
def suite(tmp_path, redis_url):
    """The rendered install under tmp_path, its config pointing at the
    private Redis, and a supervisord (not started) including the blocks."""
    root = str(tmp_path / 'root')
    os.makedirs(root)
    # supervisorctl as the rendered logrotate postrotate runs it: with the
    # private supervisord's config.
    supervisord = Supervisord(str(tmp_path), os.path.join(
        root, 'share', 'huey-worker', 'supervisor', 'huey-worker.conf'))
    layout = temp_layout(root, supervisorctl=supervisord.ctl_command)
    make_dirs(layout)
    write_launcher(layout)
    files = write_rendered(layout)
    tests_dir = os.path.dirname(os.path.abspath(__file__))
    port = free_port()
    write_config(layout, '\n'.join([
        '[redis]', 'url = %s' % redis_url,
        '[tasks]', 'builtin = false', 'modules = sample_tasks',
        'python_path = %s' % tests_dir,
        '[consumer]', 'workers = 2',
        '[logging]', 'file = %s' % os.path.join(layout.logdir,
                                                 'huey-worker.log'),
        'task_events = both',
        '[status]', 'port = %d' % port, '']))
    assert os.path.exists(supervisord.blocks)
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(('HUEY_', 'REDIS_', 'NOTIFY_SOCKET',
                                'WATCHDOG_', 'PYTHON'))}
    yield layout, files, supervisord, env, port
    supervisord.stop()


def consumer_log(layout):
    return read(os.path.join(layout.logdir, 'huey-worker.log'))


def test_supervisord_start_stop_restart_reload_config_error(suite, producer):
    import sample_tasks
    layout, files, supervisord, env, port = suite
    supervisord.start(env)
    for name in PROGRAMS:
        supervisord.wait_state(name, 'RUNNING')
    pid = supervisord.states()[CONSUMER][1]
    print('supervisord: all three programs RUNNING; consumer pid %d' % pid)

    # Each daemon writes its own log file under logdir.
    for name in ('huey-worker.log', 'huey-worker-scheduler.log',
                 'huey-worker-status.log'):
        wait_for(lambda: read(os.path.join(layout.logdir, name)), 20,
                 what='%s to be written' % name)

    # A task in flight when supervisorctl stops the consumer finishes first.
    marker = os.path.join(layout.statedir, 'in-flight-done')
    result = sample_tasks.touch_after(1.5, marker)
    wait_for(lambda: 'start sample_tasks.touch_after %s' % result.id
             in consumer_log(layout), 20, what='the task to start')
    out = supervisord.ctl('stop', CONSUMER)
    assert 'stopped' in out, out
    assert os.path.exists(marker), 'the in-flight task did not finish'
    assert result(blocking=True, timeout=5) == marker
    log = consumer_log(layout)
    assert re.search(r'end sample_tasks.touch_after %s' % result.id, log)
    assert 'stopping: finishing running tasks' in log
    assert supervisord.states()[CONSUMER][0] == 'STOPPED'
    print('graceful stop: the in-flight task finished, result %r' % marker)

    # restart: the stopped consumer starts, the others restart.
    before = {name: supervisord.states()[name][1] for name in PROGRAMS}
    supervisord.ctl('restart', 'huey-worker:*', check=True)
    for name in PROGRAMS:
        state, restarted_pid = supervisord.wait_state(name, 'RUNNING')
        assert restarted_pid != before[name]
    assert sample_tasks.add(4, 5)(blocking=True, timeout=20) == 9
    print('restart of the group: RUNNING with new pids, tasks run')

    # SIGHUP reloads in place: same pid.
    pid = supervisord.states()[CONSUMER][1]
    ready = consumer_log(layout).count('consumer ready')
    supervisord.ctl('signal', 'HUP', CONSUMER, check=True)
    wait_for(lambda: consumer_log(layout).count('consumer ready') > ready, 30,
             what='the consumer to come back after SIGHUP')
    assert supervisord.states()[CONSUMER] == ('RUNNING', pid)
    assert sample_tasks.add(1, 1)(blocking=True, timeout=20) == 2
    print('reload (signal HUP): same pid %d, tasks run' % pid)

    # A configuration error (exit 78) is not restarted in a loop: the quick
    # exit is retried startretries (3) times, then the program is FATAL.
    def spawns():
        return supervisord.supervisord_log().count(
            "spawned: 'huey-worker-consumer'")
    before = spawns()
    os.makedirs(os.path.join(layout.confdir, 'conf.d'))
    with open(os.path.join(layout.confdir, 'conf.d', 'broken.ini'), 'w') as fh:
        fh.write('[consumer]\nworkers = many\n')
    supervisord.ctl('restart', CONSUMER)
    supervisord.wait_state(CONSUMER, 'FATAL', timeout=60)
    assert spawns() - before == 4, supervisord.supervisord_log()
    time.sleep(1.5)  # FATAL stays FATAL: nothing spawns it again
    assert spawns() - before == 4
    assert supervisord.states()[CONSUMER][0] == 'FATAL'
    stderr = read(os.path.join(layout.supervisorlogdir,
                               'huey-worker-consumer.log'))
    assert "[consumer] workers = 'many'" in stderr, stderr
    print('config error: 4 quick exits, then FATAL; the error is in %s'
          % os.path.join(layout.supervisorlogdir, 'huey-worker-consumer.log'))


def rotated_text(path):
    """The live file and its rotations, oldest first."""
    texts = []
    for n in range(9, 0, -1):
        for candidate in ('%s.%d' % (path, n), '%s.%d.gz' % (path, n)):
            if os.path.exists(candidate):
                opener = gzip.open if candidate.endswith('.gz') else open
                with opener(candidate, 'rt') as fh:
                    texts.append((candidate, fh.read()))
    texts.append((path, read(path)))
    return texts


@pytest.mark.skipif(not shutil.which('logrotate'),
                    reason='logrotate is not installed (.ci/run installs it)')
def test_logrotate_loses_no_line(suite, producer):
    """Rotate twice with logrotate -f while the consumer logs two lines per
    task: every line lands in the old or the new file, and the postrotate
    command reaches the daemons through supervisorctl."""
    import sample_tasks
    layout, files, supervisord, env, port = suite
    logrotate_conf = os.path.join(layout.logrotatedir, 'huey-worker')
    text = files[logrotate_conf]
    assert 'copytruncate' not in re.sub(r'#.*', '', text)
    assert 'supervisorctl -c' in text
    supervisord.start(env)
    supervisord.wait_state(CONSUMER, 'RUNNING')

    total = 400
    ids = []

    def produce():
        for i in range(total):
            ids.append(sample_tasks.add(i, 1).id)
            time.sleep(0.01)
    thread = threading.Thread(target=produce)
    thread.start()
    state = os.path.join(supervisord.directory, 'logrotate.state')
    log_path = os.path.join(layout.logdir, 'huey-worker.log')
    for _ in range(2):
        wait_for(lambda: len(ids) > 100 * (_ + 1), 30, what='tasks queued')
        result = subprocess.run(['logrotate', '-f', '-s', state,
                                 logrotate_conf], stdout=subprocess.PIPE,
                                stderr=subprocess.STDOUT, text=True)
        assert result.returncode == 0, result.stdout
    thread.join(60)
    wait_for(lambda: sum(t.count(' end sample_tasks.add ')
                         for _, t in rotated_text(log_path)) >= total, 60,
             what='every task to be logged')
    texts = rotated_text(log_path)
    everything = ''.join(t for _, t in texts)
    for task_id in ids:
        assert everything.count('start sample_tasks.add %s' % task_id) == 1
        assert everything.count('end sample_tasks.add %s' % task_id) == 1
    # Every line whole: each starts with a timestamp.
    for name, text in texts:
        for line in text.splitlines():
            assert re.match(r'\d{4}-\d\d-\d\d ', line), (name, line)
    # The postrotate command reached the consumer (SIGUSR1 -> reopen).
    assert 'log files reopened' in everything
    assert len([n for n, t in texts if t]) >= 3
    print('logrotate -f twice during %d tasks: %d files, every start/end '
          'line present once: %s' % (
              total, len(texts), ', '.join('%s: %d lines' % (
                  os.path.basename(n), len(t.splitlines()))
                  for n, t in texts)))
