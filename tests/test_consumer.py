"""The consumer daemon as a real process: tasks in thread and process mode,
signals with tasks in flight, sd_notify on a real datagram socket, log
reopening after a rename, Redis going away, config errors."""
import os
import signal
import time

import pytest

from ops_helpers import NotifySocket, wait_until

from huey_worker.devredis import EmbeddedRedis


@pytest.fixture
def notify_socket(tmp_path):
    sock = NotifySocket(tmp_path / 'notify.sock')
    yield sock
    sock.close()


def consumer_env(base_env, **extra):
    env = dict(base_env)
    env.update({k: str(v) for k, v in extra.items()})
    return env


def pending(app):
    return app.storage.conn.llen(app.storage.queue_key)


@pytest.mark.parametrize('worker_type', ['thread', 'process'])
def test_tasks_run_and_results_are_kept(producer, base_env, start_daemon,
                                        worker_type):
    import sample_tasks
    env = dict(base_env)
    del env['HUEY_WORKER_LOGGING_TASK_EVENTS']   # the default: end lines
    daemon = start_daemon(['consumer', '--workers', '2', '--worker-type',
                           worker_type], env)
    daemon.wait_for_output('consumer ready')
    results = [sample_tasks.add(i, 1) for i in range(20)]
    assert [r.get(blocking=True, timeout=20) for r in results] == \
        list(range(1, 21))
    # Reading a result does not delete it (results expire instead).
    assert results[0].get(blocking=True, timeout=5) == 1
    ttl = producer.storage.conn.ttl(producer.storage.result_key(results[0].id))
    assert 0 < ttl <= 604800
    out = daemon.output()
    assert 'end sample_tasks.add %s complete' % results[0].id in out
    assert 'start sample_tasks.add' not in out
    daemon.signal(signal.SIGTERM)
    assert daemon.wait() == 0


@pytest.mark.parametrize('setting, start, end', [
    ('both', True, True), ('none', False, False),
    ('false', False, False), ('end', False, True)])
def test_task_event_lines_follow_the_setting(producer, base_env, start_daemon,
                                             setting, start, end):
    import sample_tasks
    daemon = start_daemon(['consumer', '--workers', '1'], consumer_env(
        base_env, HUEY_WORKER_LOGGING_TASK_EVENTS=setting))
    daemon.wait_for_output('consumer ready')
    results = [sample_tasks.add(i, 1) for i in range(3)]
    assert [r.get(blocking=True, timeout=20) for r in results] == [1, 2, 3]
    daemon.signal(signal.SIGTERM)
    assert daemon.wait() == 0
    out = daemon.output()
    for result in results:
        assert (('start sample_tasks.add %s' % result.id) in out) is start
        assert (('end sample_tasks.add %s complete' % result.id)
                in out) is end


@pytest.mark.parametrize('signum', [signal.SIGTERM, signal.SIGINT])
@pytest.mark.parametrize('worker_type', ['thread', 'process'])
def test_graceful_stop_lets_the_running_task_finish(
        producer, base_env, start_daemon, tmp_path, signum, worker_type):
    import sample_tasks
    daemon = start_daemon(['consumer', '--workers', '1', '--worker-type',
                           worker_type], base_env)
    daemon.wait_for_output('consumer ready')
    marker = tmp_path / 'done'
    result = sample_tasks.touch_after(1.5, str(marker))
    daemon.wait_for_output('start sample_tasks.touch_after')
    daemon.signal(signum)
    assert daemon.wait() == 0
    assert marker.exists()
    assert result.get(blocking=True, timeout=5) == str(marker)
    assert pending(producer) == 0
    assert 'on %s' % signal.Signals(signum).name in daemon.output()


@pytest.mark.parametrize('worker_type', ['thread', 'process'])
def test_second_signal_stops_at_once_and_requeues(producer, base_env,
                                                  start_daemon, tmp_path,
                                                  worker_type):
    import sample_tasks
    daemon = start_daemon(['consumer', '--workers', '1', '--worker-type',
                           worker_type], base_env)
    daemon.wait_for_output('consumer ready')
    result = sample_tasks.touch_after(30, str(tmp_path / 'never'))
    daemon.wait_for_output('start sample_tasks.touch_after')
    daemon.signal(signal.SIGTERM)
    daemon.wait_for_output('finishing running tasks')
    daemon.signal(signal.SIGTERM)
    assert daemon.wait(20) == 0
    assert 'second stop signal' in daemon.output()
    # Not lost: the task is back at the head of the queue.
    assert pending(producer) == 1
    task = producer.deserialize_task(
        producer.storage.conn.lindex(producer.storage.queue_key, -1))
    assert task.id == result.id
    assert not (tmp_path / 'never').exists()


def test_shutdown_timeout_requeues_what_is_still_running(
        producer, base_env, start_daemon, tmp_path):
    import sample_tasks
    env = consumer_env(base_env, HUEY_WORKER_CONSUMER_SHUTDOWN_TIMEOUT=1)
    daemon = start_daemon(['consumer', '--workers', '1', '--worker-type',
                           'process'], env)
    daemon.wait_for_output('consumer ready')
    sample_tasks.touch_after(30, str(tmp_path / 'never'))
    daemon.wait_for_output('start sample_tasks.touch_after')
    daemon.signal(signal.SIGTERM)
    assert daemon.wait(30) == 0
    assert 'shutdown_timeout (1s) reached with 1 task(s) still running' in \
        daemon.output()
    assert pending(producer) == 1


def test_sighup_reloads_the_config_in_place(producer, base_env, start_daemon,
                                            tmp_path):
    import sample_tasks
    config_path = base_env['HUEY_WORKER_CONFIG']
    with open(config_path, 'w') as fh:
        fh.write('[consumer]\nworkers = 2\n')
    daemon = start_daemon(['consumer'], base_env)
    daemon.wait_for_output('consumer ready')
    assert '2 thread workers (set explicitly)' in daemon.output()
    marker = tmp_path / 'finished-before-reload'
    result = sample_tasks.touch_after(1, str(marker))
    daemon.wait_for_output('start sample_tasks.touch_after')

    # An invalid config is refused and the old one kept.
    with open(config_path, 'w') as fh:
        fh.write('[consumer]\nworkers = three\n')
    daemon.signal(signal.SIGHUP)
    daemon.wait_for_output('configuration not reloaded, keeping the current')
    assert daemon.proc.poll() is None

    # A valid one: running tasks finish, same PID, new worker count.
    with open(config_path, 'w') as fh:
        fh.write('[consumer]\nworkers = 3\n')
    daemon.signal(signal.SIGHUP)
    daemon.wait_for_output('3 thread workers (set explicitly)')
    wait_until(lambda: daemon.output().count('consumer ready') == 2,
               what='ready again')
    assert marker.exists()
    assert result.get(blocking=True, timeout=5) == str(marker)
    assert daemon.proc.poll() is None  # same process, exec'd in place
    assert sample_tasks.add(2, 3).get(blocking=True, timeout=20) == 5
    daemon.signal(signal.SIGTERM)
    assert daemon.wait() == 0


def test_sighup_refuses_what_the_new_process_would_refuse(
        producer, base_env, start_daemon, tmp_path):
    # The reload re-executes the consumer, which imports the task modules
    # and the app afresh: a module changed on disk since the start, a new
    # module that does not import, or an app that cannot be adopted must be
    # refused like a bad value, not end the consumer with 78.
    import sample_tasks
    code = tmp_path / 'code'
    code.mkdir()
    (code / 'reload_mod.py').write_text('VALUE = 1\n')
    config_path = base_env['HUEY_WORKER_CONFIG']
    good = ('[tasks]\nmodules = sample_tasks, reload_mod\npython_path = %s\n'
            % code)
    with open(config_path, 'w') as fh:
        fh.write(good)
    env = {k: v for k, v in base_env.items() if k != 'HUEY_MODULES'}
    daemon = start_daemon(['consumer', '--workers', '1'], env)
    daemon.wait_for_output('consumer ready')
    (code / 'reload_mod.py').write_text('raise RuntimeError("broken on '
                                        'disk")\n')
    daemon.signal(signal.SIGHUP)
    wait_until(lambda: daemon.output().count('configuration not reloaded')
               == 1, what='the reload refused')
    assert 'broken on disk' in daemon.output()
    (code / 'reload_mod.py').write_text('VALUE = 2\n')
    with open(config_path, 'w') as fh:
        fh.write(good + '[huey]\napp = no_such_project.tasks:huey\n')
    daemon.signal(signal.SIGHUP)
    wait_until(lambda: daemon.output().count('configuration not reloaded')
               == 2, what='the second reload refused')
    assert 'no_such_project' in daemon.output()
    assert daemon.proc.poll() is None
    assert daemon.output().count('consumer ready') == 1
    assert sample_tasks.add(1, 2).get(blocking=True, timeout=20) == 3
    daemon.signal(signal.SIGTERM)
    assert daemon.wait() == 0


@pytest.mark.parametrize('worker_type', ['thread', 'process'])
def test_sigusr1_reopens_the_log_file_after_rotation(
        producer, base_env, start_daemon, tmp_path, worker_type):
    import sample_tasks
    log_file = tmp_path / 'huey-worker.log'
    env = consumer_env(base_env, HUEY_LOG_FILE=log_file)
    daemon = start_daemon(['consumer', '--workers', '2', '--worker-type',
                           worker_type], env)
    daemon.wait_for_output('consumer ready')
    before = [sample_tasks.add(i, 0) for i in range(5)]
    for r in before:
        r.get(blocking=True, timeout=20)
    wait_until(lambda: log_file.read_text().count('end sample_tasks.add') == 5,
               what='5 end lines in the log file')
    rotated = tmp_path / 'huey-worker.log.1'
    os.rename(log_file, rotated)
    daemon.signal(signal.SIGUSR1)
    wait_until(log_file.exists, what='a new log file')
    after = [sample_tasks.add(i, 0) for i in range(5)]
    for r in after:
        r.get(blocking=True, timeout=20)
    wait_until(lambda: log_file.read_text().count('end sample_tasks.add') == 5,
               what='5 end lines in the new file')
    old_text, new_text = rotated.read_text(), log_file.read_text()
    for r in before:
        assert 'end sample_tasks.add %s' % r.id in old_text
    for r in after:
        # The worker lines (in worker processes too) moved to the new file.
        assert 'end sample_tasks.add %s' % r.id in new_text
        assert r.id not in old_text
    assert 'log files reopened' in new_text
    daemon.signal(signal.SIGTERM)
    assert daemon.wait() == 0


def test_sd_notify_ready_status_watchdog_stopping_reloading(
        producer, base_env, start_daemon, notify_socket):
    env = consumer_env(base_env, NOTIFY_SOCKET=notify_socket.path,
                       WATCHDOG_USEC=1000000)
    daemon = start_daemon(['consumer', '--workers', '2'], env)
    ready = notify_socket.wait_for('READY=1')[0]
    assert 'STATUS=2 thread workers, 0 busy, 0 done, 0 failed, queue' in ready
    notify_socket.wait_for('WATCHDOG=1')
    import sample_tasks
    sample_tasks.add(1, 1).get(blocking=True, timeout=20)
    notify_socket.wait_for('STATUS=2 thread workers, 0 busy, 1 done, 0 '
                           'failed, queue 0')
    daemon.signal(signal.SIGHUP)
    notify_socket.wait_for('RELOADING=1')
    wait_until(lambda: len([m for m in notify_socket.drain()
                            if 'READY=1' in m]) == 2, what='READY again')
    daemon.signal(signal.SIGTERM)
    notify_socket.wait_for('STOPPING=1')
    assert daemon.wait() == 0


def test_watchdog_is_not_fed_while_a_worker_is_stuck(
        producer, base_env, start_daemon, notify_socket):
    env = consumer_env(base_env, NOTIFY_SOCKET=notify_socket.path,
                       WATCHDOG_USEC=400000,
                       HUEY_WORKER_CONSUMER_STUCK_TIMEOUT=5)
    daemon = start_daemon(['consumer', '--workers', '1', '--worker-type',
                           'process'], env)
    notify_socket.wait_for('READY=1')
    notify_socket.wait_for('WATCHDOG=1')
    worker_pid = int(wait_until(lambda: _worker_pid(producer),
                                what='worker pid in the heartbeat'))
    assert worker_pid != daemon.pid
    os.kill(worker_pid, signal.SIGSTOP)  # alive, but no sign of life
    try:
        daemon.wait_for_output('watchdog not fed: worker(s) 0 stuck', 30)
        notify_socket.drain()
        notify_socket.messages.clear()
        time.sleep(1.5)  # several watchdog intervals (0.2 s) pass unfed
        assert not [m for m in notify_socket.drain() if 'WATCHDOG=1' in m]
    finally:
        os.kill(worker_pid, signal.SIGCONT)
    daemon.wait_for_output('watchdog fed again')
    notify_socket.wait_for('WATCHDOG=1')
    daemon.signal(signal.SIGTERM)
    assert daemon.wait() == 0


def _worker_pid(app):
    import json
    for key in app.storage.conn.zrange(app.keys.consumers, 0, -1):
        raw = app.storage.conn.get(app.keys.consumer(key.decode()))
        if raw:
            workers = json.loads(raw)['worker_list']
            if workers and workers[0]['pid'] and workers[0]['pid'] != 0:
                return workers[0]['pid']
    return None


def test_redis_unreachable_at_start_then_back(tmp_path, base_env,
                                              start_daemon, notify_socket):
    server = EmbeddedRedis(str(tmp_path / 'late-redis'))
    env = consumer_env(base_env, HUEY_REDIS_URL=server.url,
                       NOTIFY_SOCKET=notify_socket.path,
                       HUEY_WORKER_REDIS_RETRY_MAX_DELAY=0.5)
    daemon = start_daemon(['consumer', '--workers', '1'], env)
    try:
        notify_socket.wait_for('STATUS=waiting for Redis at redis://127.0.0.1')
        daemon.wait_for_output('Redis unreachable at')
        time.sleep(1.5)  # several retries happen meanwhile
        out = daemon.output()
        assert out.count('Redis unreachable') == 1  # one line, not a flood
        assert 'Traceback' not in out
        assert not [m for m in notify_socket.drain() if 'READY=1' in m]
        os.makedirs(server.directory, exist_ok=True)
        server.start()
        notify_socket.wait_for('READY=1')
        daemon.wait_for_output('Redis reachable again')
        daemon.signal(signal.SIGTERM)
        assert daemon.wait() == 0
    finally:
        server.cleanup()


def test_redis_lost_while_running_is_retried(tmp_path, base_env,
                                             start_daemon):
    server = EmbeddedRedis(str(tmp_path / 'flaky-redis')).start()
    try:
        env = consumer_env(base_env, HUEY_REDIS_URL=server.url,
                           HUEY_WORKER_REDIS_RETRY_MAX_DELAY=0.5)
        daemon = start_daemon(['consumer', '--workers', '2'], env)
        daemon.wait_for_output('consumer ready')
        server.stop()
        daemon.wait_for_output('Redis unreachable')
        server.start()
        daemon.wait_for_output('Redis reachable again')
        # A task enqueued after the outage still runs.
        client = server.client()
        _enqueue_add_message(client)
        wait_until(lambda: client.llen('huey.redis.huey') == 0
                   and 'end sample_tasks.add' in daemon.output(),
                   what='task run after the outage')
        assert 'Traceback' not in daemon.output()
        assert daemon.proc.poll() is None
        daemon.signal(signal.SIGTERM)
        assert daemon.wait() == 0
    finally:
        server.cleanup()


def _enqueue_add_message(client):
    """Enqueue as a producer would, on a Redis other than the fixture's."""
    import sample_tasks
    from huey_worker.app import huey
    client.lpush('huey.redis.huey', huey.serialize_task(sample_tasks.add.s(1, 2)))


def test_config_error_exits_78_with_a_clear_message(base_env, start_daemon):
    with open(base_env['HUEY_WORKER_CONFIG'], 'w') as fh:
        fh.write('[consumer]\nworkers = 0\n')
    daemon = start_daemon(['consumer'], base_env)
    assert daemon.wait() == 78
    assert "huey-worker: config error: [consumer] workers = '0' (file: %s, " \
           "line 2): expected 'auto' or a whole number >= 1" % \
           base_env['HUEY_WORKER_CONFIG'] in daemon.output()


def test_immediate_mode_and_bad_module_are_config_errors(base_env,
                                                         start_daemon):
    daemon = start_daemon(['consumer'], dict(base_env, HUEY_IMMEDIATE='true'))
    assert daemon.wait() == 78
    assert '[huey] immediate' in daemon.output()
    daemon = start_daemon(['consumer'], dict(base_env,
                                             HUEY_MODULES='no_such_module'))
    assert daemon.wait() == 78
    assert "cannot import task module 'no_such_module'" in daemon.output()


def test_greenlet_without_gevent_is_a_config_error(base_env, start_daemon,
                                                   tmp_path):
    # A gevent that cannot be imported, first on the path: as on a machine
    # where gevent is not installed.
    shadow = tmp_path / 'no_gevent'
    shadow.mkdir()
    (shadow / 'gevent.py').write_text(
        "raise ImportError('No module named gevent')\n")
    env = dict(base_env, HUEY_WORKER_TYPE='gevent',
               PYTHONPATH=str(shadow) + os.pathsep + base_env['PYTHONPATH'])
    daemon = start_daemon(['consumer'], env)
    assert daemon.wait() == 78
    assert "[consumer] worker_type = 'greenlet' (env " \
           "HUEY_WORKER_TYPE): gevent is not installed" in daemon.output()


def test_greenlet_workers_run_tasks_when_gevent_is_installed(
        producer, base_env, start_daemon):
    import gevent  # noqa: F401  (in the dev extra, installed by make)
    import sample_tasks
    daemon = start_daemon(['consumer', '--workers', '8'],
                          dict(base_env, HUEY_WORKER_TYPE='gevent'))
    daemon.wait_for_output('consumer ready')
    assert '8 greenlet workers (set explicitly)' in daemon.output()
    results = [sample_tasks.sleep_then_return(0.5, i) for i in range(8)]
    assert [r.get(blocking=True, timeout=30) for r in results] == \
        list(range(8))
    daemon.signal(signal.SIGTERM)
    assert daemon.wait() == 0


def test_bad_signature_and_unknown_task_go_to_dead_letters(
        producer, base_env, start_daemon):
    import json
    import sample_tasks
    from huey.serializer import SignedSerializer
    env = consumer_env(base_env, HUEY_SECRET_KEY='right-key')
    daemon = start_daemon(['consumer', '--workers', '1'], env)
    daemon.wait_for_output('consumer ready')
    storage = producer.storage
    forged = SignedSerializer('wrong-key', salt='huey-worker').serialize(
        producer._registry.create_message(sample_tasks.add.s(1, 1)))
    storage.conn.lpush(storage.queue_key, forged)
    storage.conn.lpush(storage.queue_key, b'not a pickle at all')
    wait_until(lambda: storage.conn.llen(storage.keys.dead) == 2,
               what='two dead letters')
    records = [json.loads(r) for r in storage.conn.lrange(storage.keys.dead,
                                                          0, -1)]
    # With a secret set, an unsigned message fails the signature check too.
    assert [r['reason'] for r in records] == ['bad-signature'] * 2
    assert all(r['message'] and r['detail'] for r in records)
    # Nothing left in flight, and the consumer goes on working.
    assert not any(storage.conn.llen(k) for k in storage.conn.smembers(
        storage.keys.consumer_lists(_identity(producer))))
    assert daemon.proc.poll() is None
    daemon.signal(signal.SIGTERM)
    assert daemon.wait() == 0


def _identity(app):
    return app.storage.conn.zrange(app.keys.consumers, 0, 0)[0].decode()


def test_unknown_task_goes_to_dead_letters_with_its_name(
        producer, base_env, start_daemon):
    import json
    import sample_tasks
    env = consumer_env(base_env, HUEY_MODULES='')  # sample_tasks unknown
    daemon = start_daemon(['consumer', '--workers', '1'], env)
    daemon.wait_for_output('consumer ready')
    result = sample_tasks.add(1, 1)
    storage = producer.storage
    wait_until(lambda: storage.conn.llen(storage.keys.dead) == 1,
               what='a dead letter')
    record = json.loads(storage.conn.lindex(storage.keys.dead, 0))
    assert record['reason'] == 'unknown-task'
    assert 'sample_tasks.add not found' in record['detail']
    # The original message is kept whole, so it can be requeued later.
    import base64
    task = producer.deserialize_task(base64.b64decode(record['message']))
    assert task.id == result.id
    assert 'dead letter (unknown-task)' in daemon.output()
    daemon.signal(signal.SIGTERM)
    assert daemon.wait() == 0
