"""The task journal, with real consumers and a real Redis: every state
reached for real, progress seen while a task runs, retention, and the
writes riding the round trips the producer and worker make anyway."""
import os
import signal
import threading
import time

import pytest
import redis

from ops_helpers import (history_states, monitored, task_record,
                         wait_for_state, wait_until)

import sample_tasks


def test_producer_records_pending_scheduled_and_args(producer):
    result = sample_tasks.add(1, 2)
    record = task_record(producer, result.id)
    assert record['state'] == 'pending'
    assert record['name'] == 'sample_tasks.add'
    assert record['args'] == {'args': [1, 2], 'kwargs': {}}
    assert record['enqueued'] and record['queue'] == 'huey'
    assert history_states(record) == ['pending']

    later = sample_tasks.add.schedule((3, 4), delay=3600)
    record = task_record(producer, later.id)
    assert record['state'] == 'scheduled'
    assert record['eta'] == pytest.approx(time.time() + 3600, abs=60)

    secret = sample_tasks.login('alice', 'hunter2')
    record = task_record(producer, secret.id)
    assert record['args'] is None and record['args_sensitive'] is True
    raw = producer.storage.conn.hgetall(producer.keys.task(secret.id))
    assert b'hunter2' not in b''.join(raw.values())

    partly = sample_tasks.call_api('https://example.test', token='t0ps3cret')
    record = task_record(producer, partly.id)
    assert record['args']['args'] == ['https://example.test']
    assert record['args']['kwargs'] == {'token': '********'}
    # The same name passed by position is masked too.
    by_position = sample_tasks.call_api('https://example.test', 't0ps3cret')
    record = task_record(producer, by_position.id)
    assert record['args']['args'] == ['https://example.test', '********']
    raw = producer.storage.conn.hgetall(producer.keys.task(by_position.id))
    assert b't0ps3cret' not in b''.join(raw.values())

    huge = sample_tasks.add('y' * 100000, 'z')
    record = task_record(producer, huge.id)
    text = producer.storage.conn.hget(producer.keys.task(huge.id), 'args')
    assert len(text) <= 1024 + 3
    assert record['args_truncated'] or len(str(record['args'])) < 1100

    assert task_record(producer, 'no-such-task') is None


def _monitored(redis_server, action, until='LPUSH huey.redis.huey'):
    """The MONITOR entries (redis-py's dicts) seen while `action()` runs,
    up to the first command that starts with `until`, and what action
    returned."""
    entries = []
    monitor_ready = threading.Event()

    def watch():
        client = redis_server.client()
        with client.monitor() as m:
            monitor_ready.set()
            for entry in m.listen():
                entries.append(entry)
                if entry['command'].startswith(until):
                    break
        client.close()
    thread = threading.Thread(target=watch, daemon=True)
    thread.start()
    monitor_ready.wait(5)
    time.sleep(0.2)   # MONITOR is active once its reply arrived
    returned = action()
    thread.join(10)
    return entries, returned


def test_enqueue_record_rides_the_lpush_in_one_script(producer,
                                                      redis_server):
    """MONITOR shows the journal's record and the message's LPUSH as one
    script a producer sends (one round trip, one command: no reader can
    see one without the other), the LPUSH first (a queue key Redis
    refuses it on leaves no record)."""
    sample_tasks.add(1, 2)   # Redis knows the script: sent by SHA alone
    entries, result = _monitored(
        redis_server, lambda: sample_tasks.add(5, 6),
        until='EXPIRE hw:huey:journal:name:sample_tasks.add')
    sent = [e['command'] for e in entries
            if e.get('client_type') != 'lua' and result.id in e['command']]
    assert len(sent) == 1 and sent[0].split()[0] == 'EVALSHA', sent
    ran = [e['command'] for e in entries if e.get('client_type') == 'lua']
    record = [i for i, c in enumerate(ran)
              if c.startswith('HSET hw:huey:task:%s' % result.id)]
    assert ran[0].startswith('LPUSH huey.redis.huey') and record, ran
    assert not any(e['command'].split()[0] in ('KEYS', 'MULTI')
                   for e in entries)
    assert task_record(producer, result.id)['state'] == 'pending'


def test_enqueue_sends_the_script_again_as_text_after_script_flush(
        producer, redis_server):
    """A Redis that forgot its scripts (a restart, SCRIPT FLUSH) answers
    the producer's EVALSHA with NOSCRIPT, which ran nothing: the enqueue
    sends it again as EVAL and succeeds, record and message both there,
    the message once."""
    client = redis_server.client()
    sample_tasks.add(1, 2)             # the script is known to Redis
    client.script_flush()
    before = client.llen('huey.redis.huey')
    result = sample_tasks.add(3, 4)
    assert client.llen('huey.redis.huey') == before + 1
    assert task_record(producer, result.id)['state'] == 'pending'
    again = sample_tasks.add(5, 6)     # loaded by the EVAL: by SHA again
    assert task_record(producer, again.id)['state'] == 'pending'


def test_enqueue_with_other_writes_staged_goes_in_one_transaction(
        producer, redis_server):
    """An enqueue from inside Huey's own enqueue of another task (a
    pipeline's or an enqueue signal's handler) finds writes staged: the
    record rides the MULTI with them, still before the LPUSH."""
    storage = producer.storage
    storage.stage_command('SET', 'hw:test:staged', '1')

    def enqueue():
        try:
            return sample_tasks.add(7, 8)
        finally:
            storage.discard_pending()
    entries, result = _monitored(redis_server, enqueue)
    ours = [e['command'] for e in entries
            if result.id in e['command'] or e['command'] in ('MULTI', 'EXEC')
            or e['command'].startswith(('LPUSH', 'SET hw:test:staged'))]
    start = max(i for i, c in enumerate(ours) if c == 'MULTI')
    block = ours[start:]
    assert block[1] == 'SET hw:test:staged 1', block
    assert block[-1].startswith('LPUSH huey.redis.huey'), block
    assert any(c.startswith('HSET hw:huey:task:%s' % result.id)
               for c in block), block
    assert redis_server.client().get('hw:test:staged') == b'1'
    assert task_record(producer, result.id)['state'] == 'pending'


def test_every_state_in_thread_mode(producer, base_env, start_daemon,
                                    tmp_path):
    # Before any consumer runs: pending, a revoked task, an expired one.
    revoked = sample_tasks.add(1, 1)
    producer.revoke_by_id(revoked.id, revoke_once=True)
    expired = producer.enqueue(sample_tasks.add.s(2, 2, expires=0.2))
    assert task_record(producer, expired.id)['state'] == 'pending'
    time.sleep(0.5)   # let its expiry time pass before a worker sees it
    scheduled = sample_tasks.add.schedule((7, 7), delay=3600)
    gate = tmp_path / 'gate'
    marker = tmp_path / 'marker'
    steps = sample_tasks.progress_steps(10, str(gate))
    held = sample_tasks.hold_until(str(gate), str(marker))
    done = sample_tasks.add(20, 22)
    failed = sample_tasks.boom()
    retrying = sample_tasks.fail_retry_later()

    consumer = start_daemon(['consumer', '--workers', '3'], base_env)
    consumer.wait_for_output('consumer ready')

    assert wait_for_state(producer, revoked.id, 'revoked')['terminal']
    assert wait_for_state(producer, expired.id, 'expired')['terminal']

    # Progress while the task runs: half way, with its metadata.
    def halfway():
        record = task_record(producer, steps.id)
        progress = record.get('progress') or {}
        return record if record['state'] == 'running' and \
            progress.get('current') == 5 else None
    record = wait_until(halfway, what='progress 5/10')
    assert record['progress'] == {
        'current': 5, 'total': 10, 'percent': 50.0,
        'message': 'step 5 of 10', 'updated': record['progress']['updated']}
    assert record['metadata'] == {'last_step': 5, 'unit': 'items'}
    assert record['worker']['pid'] == consumer.pid
    assert record['started'] and record['attempt'] == 1

    # The running task reads its own id and delivery count.
    wait_until(lambda: marker.exists() and
               len(marker.read_text().split()) == 3)
    pid, task_id, delivery = marker.read_text().split()
    assert (int(pid), task_id, delivery) == (consumer.pid, held.id, '1')
    assert task_record(producer, held.id)['state'] == 'running'

    record = wait_for_state(producer, done.id, 'complete')
    assert record['result'] == 42 and record['duration'] is not None
    assert history_states(record) == ['pending', 'running', 'complete']
    assert producer.get(done.id, peek=True) == 42   # reading deleted nothing
    assert task_record(producer, done.id)['result'] == 42

    record = wait_for_state(producer, failed.id, 'failed')
    # Failed for good: the traceback too, ending where it was raised.
    error = dict(record['error'])
    trace = error.pop('traceback')
    assert trace.startswith('Traceback (most recent call last):')
    assert trace.rstrip().endswith('ValueError: boom')
    assert 'sample_tasks.py' in trace
    assert error == {'type': 'ValueError', 'message': 'boom',
                     'dead_letter': None}

    record = wait_for_state(producer, retrying.id, 'retrying')
    assert 'traceback' not in record['error']   # a retry's would be replaced
    assert record['retries_left'] == 1 and record['retries_total'] == 2
    # retry_delay 3600, drawn between half of it and all of it (jitter).
    assert time.time() + 1800 - 60 <= record['next_retry'] <= \
        time.time() + 3600 + 60
    assert record['error']['type'] == 'RuntimeError'

    record = wait_for_state(producer, scheduled.id, 'scheduled')
    assert 'running' not in history_states(record)

    gate.touch()
    record = wait_for_state(producer, steps.id, 'complete')
    assert record['progress']['current'] == 10
    assert record['result'] == {'steps': 10}
    assert wait_for_state(producer, held.id, 'complete')['result'] == \
        'released'


def _worker_pid_running(producer, task_id):
    record = task_record(producer, task_id)
    if record and record['state'] == 'running' and record['worker']:
        return record['worker']['pid']
    return None


def test_lost_and_interrupted_in_process_mode(producer, base_env,
                                              start_daemon, tmp_path):
    env = dict(base_env, HUEY_WORKER_TYPE='process',
               HUEY_WORKER_CONSUMER_SHUTDOWN_TIMEOUT='0')
    gate = tmp_path / 'gate'
    marker = tmp_path / 'marker'
    held = sample_tasks.hold_until(str(gate), str(marker))
    consumer = start_daemon(['consumer', '--workers', '2'], env)
    consumer.wait_for_output('consumer ready')

    # lost: kill -9 the worker process running the task.
    worker_pid = wait_until(lambda: _worker_pid_running(producer, held.id),
                            what='the task to run in a worker process')
    assert worker_pid != consumer.pid
    os.kill(worker_pid, signal.SIGKILL)
    consumer.wait_for_output('put back in the queue')

    def redelivered():
        record = task_record(producer, held.id)
        return record if record['state'] == 'running' and \
            record['worker']['pid'] != worker_pid and \
            'lost' in history_states(record) else None
    record = wait_until(redelivered, what='the task to run again')
    states = history_states(record)
    assert states[:2] == ['pending', 'running']
    # In the order it happened: the loss first; 'pending' only when the
    # consumer's note came before a worker took the task again.
    assert states[2:] in (['lost', 'pending', 'running'], ['lost', 'running'])
    assert record['requeues'] == 1 and record['requeued_reason'] == 'lost'
    assert record['attempt'] == 2
    wait_until(lambda: marker.read_text().split()[2:] == ['2'],
               what='the second delivery to be counted')
    gate.touch()
    wait_for_state(producer, held.id, 'complete')

    # interrupted: stop the consumer while a task runs (no grace time).
    gate.unlink()
    again = sample_tasks.hold_until(str(gate))
    wait_until(lambda: _worker_pid_running(producer, again.id))
    consumer.signal(signal.SIGTERM)
    assert consumer.wait(30) == 0
    record = task_record(producer, again.id)
    assert record['state'] == 'pending'
    assert history_states(record)[-2:] == ['interrupted', 'pending']
    assert record['requeued_reason'] == 'interrupted'
    assert producer.storage.conn.llen(producer.storage.queue_key) == 1


def test_retention_follows_result_timeout(producer, base_env, start_daemon):
    storage = producer.storage
    keys = storage.keys
    ttl = storage._expire_time
    result = sample_tasks.add(1, 2)
    assert 0 < storage.conn.ttl(keys.task(result.id)) <= ttl
    # Its first event is not stored (reads put it back from `enqueued`):
    # no history list before a worker takes the task.
    assert not storage.conn.exists(keys.task_log(result.id))
    assert history_states(task_record(producer, result.id)) == ['pending']
    # Index entries older than the retention window are dropped by the
    # next outcome, and the listing index stays within index_max.
    old = time.time() - ttl - 10
    storage.conn.zadd(keys.journal_recent, {'ancient-%d' % i: old + i
                                            for i in range(5)})
    storage.conn.zadd(keys.journal_results, {'ancient': old})
    consumer = start_daemon(['consumer', '--workers', '1'], base_env)
    consumer.wait_for_output('consumer ready')
    wait_for_state(producer, result.id, 'complete')
    assert storage.conn.zscore(keys.journal_recent, 'ancient-0') is None
    assert storage.conn.zscore(keys.journal_results, 'ancient') is None
    # The compact layout: listed in its state index, its result counted
    # by the hour (no per-task entry that would outlive the record).
    assert storage.conn.zscore(keys.journal_state('complete'), result.id)
    from huey_worker.journal.reads import replies, results_held_command
    # (Counted in the worker and sent within a second or two:
    # journal.counters.)
    wait_until(lambda: replies(storage.pool,
                               [results_held_command(storage)]) == [1],
               what='the result counted')
    # Records live [journal] retention (one day by default), within the
    # results' own time.
    journal_ttl = min(ttl, producer.config.journal.retention or ttl)
    assert 0 < storage.conn.ttl(keys.task(result.id)) <= journal_ttl
    # A task that ran once to its end has no history list at all: its
    # record's fields tell its running and its end.
    assert not storage.conn.exists(keys.task_log(result.id))
    assert history_states(task_record(producer, result.id)) == [
        'pending', 'running', 'complete']


def test_journal_can_be_switched_off(producer, monkeypatch):
    from huey_worker import config
    monkeypatch.setenv('HUEY_WORKER_JOURNAL_ENABLED', 'false')
    producer.configure(config.load())
    try:
        result = sample_tasks.add(1, 2)
        assert producer.storage.conn.llen(producer.storage.queue_key) == 1
        assert not producer.storage.conn.exists(producer.keys.task(result.id))
        assert not list(producer.storage.conn.scan_iter('hw:*', count=1000))
    finally:
        monkeypatch.delenv('HUEY_WORKER_JOURNAL_ENABLED')
        producer.configure(config.load())   # the shared app, as it was


def test_progress_api_outside_a_task_does_nothing(producer):
    from huey_worker.journal import (current_delivery, current_task_id,
                                report_progress)
    assert report_progress(1, 2, 'x') is False
    assert current_delivery() is None and current_task_id() is None


def test_progress_is_cheap_per_item(producer, monkeypatch):
    """Thousands of reports cost a handful of writes, and a Redis failure
    never reaches the task."""
    from huey_worker import progress
    writes = []
    ctx = progress.TaskContext(producer.storage, 'cheap-task', 'x', 3600)
    real_write = progress._write
    monkeypatch.setattr(progress, '_write',
                        lambda c, now: (writes.append(now),
                                        real_write(c, now)))
    progress.enter(ctx)
    try:
        for i in range(1, 5001):
            progress.report_progress(i, 10000, 'item %d' % i)
        assert len(writes) == 1 and ctx.dirty     # first call only
        progress.report_progress(10000, 10000, 'done')
        assert len(writes) == 2 and not ctx.dirty  # the last one always
        with pytest.raises(TypeError):
            progress.report_progress('five')
        ctx.storage = type('Down', (), {
            'conn': redis.Redis(port=1, socket_connect_timeout=0.2),
            'keys': producer.storage.keys})()
        progress.report_progress(1, 2)   # Redis down: no exception
        assert ctx.dirty
    finally:
        progress.leave()
    fields = producer.storage.conn.hgetall(producer.keys.task('cheap-task'))
    assert fields[b'progress_current'] == b'10000'
    assert fields[b'progress_message'] == b'done'


def test_resolve_task_names(producer):
    from huey_worker import tasknames
    assert tasknames.resolve_task(producer, 'sample_tasks.add') == \
        'sample_tasks.add'
    assert tasknames.resolve_task(producer, 'add') == 'sample_tasks.add'
    tasknames.register_alias('adder', 'sample_tasks.add')
    try:
        assert tasknames.resolve_task(producer, 'adder') == 'sample_tasks.add'
    finally:
        tasknames.ALIASES.pop('adder')
    with pytest.raises(tasknames.UnknownTask) as info:
        tasknames.resolve_task(producer, 'ad')
    assert 'sample_tasks.add' in str(info.value)
    with pytest.raises(tasknames.UnknownTask):
        tasknames.resolve_task(producer, 'tasks.add')  # not on a dot boundary

    @producer.task(name='add')
    def other_add(a, b):
        return a + b
    try:
        with pytest.raises(tasknames.AmbiguousTask) as info:
            tasknames.resolve_task(producer, 'add')
        assert set(info.value.candidates) == {'sample_tasks.add',
                                              '%s.add' % __name__}
    finally:
        other_add.unregister()


def test_worker_writes_ride_its_own_round_trips(producer, base_env,
                                                start_daemon, redis_server):
    """MONITOR: a task's journal writes travel in two transactions of the
    worker (the delivery count before the task, the ack after it) plus the
    producer's one script (record and LPUSH); none goes alone, and
    nothing uses KEYS."""
    consumer = start_daemon(['consumer', '--workers', '1'], base_env)
    consumer.wait_for_output('consumer ready')
    # Redis knows the producer's script from then on: sent by SHA alone.
    wait_for_state(producer, sample_tasks.add(0, 0).id, 'complete')
    with monitored(redis_server, producer.storage.conn) as entries:
        result = sample_tasks.add(2, 3)
        wait_for_state(producer, result.id, 'complete')

    record_key = producer.keys.task(result.id)
    in_multi, blocks, alone = {}, set(), []
    block_number = script = 0
    for entry in entries:
        command = entry['command']
        name = command.split(' ', 1)[0]
        assert name != 'KEYS', command
        if entry.get('client_type') == 'lua':
            # Run by the script sent last (Redis runs one at a time).
            if record_key in command and script:
                blocks.add(script)
            continue
        client = (entry.get('client_address'), entry.get('client_port'))
        if name == 'MULTI':
            block_number += 1
            in_multi[client] = block_number
        elif name in ('EXEC', 'DISCARD'):
            in_multi.pop(client, None)
        elif name in ('EVAL', 'EVALSHA') and client not in in_multi:
            block_number += 1   # a script sent alone: a block of its own
            script = block_number
        elif record_key in command and name not in ('HGETALL', 'HGET'):
            if client in in_multi:
                blocks.add(in_multi[client])
            else:
                alone.append(command)
    assert alone == []
    assert len(blocks) == 3, blocks   # enqueue, start, outcome


def test_scheduler_moves_are_recorded(producer, base_env, start_daemon):
    """A delayed task the scheduler moves into the queue when due becomes
    pending (the scheduler's note); with a worker quick to take it, the
    note never sets it back from running."""
    consumer = start_daemon(['consumer', '--workers', '1'], base_env,
                            'consumer')
    consumer.wait_for_output('consumer ready')
    later = sample_tasks.add.schedule((1, 2), delay=2)
    conn, storage = producer.storage.conn, producer.storage
    wait_until(lambda: conn.zcard(storage.schedule_key) == 1,
               what='the consumer to move it to the schedule')
    consumer.signal(signal.SIGTERM)
    assert consumer.wait(30) == 0
    scheduler = start_daemon(['scheduler'], base_env, 'scheduler')
    record = wait_for_state(producer, later.id, 'pending')
    assert history_states(record) == ['scheduled', 'scheduled', 'pending']
    assert conn.llen(storage.queue_key) == 1

    again = start_daemon(['consumer', '--workers', '1'], base_env,
                         'consumer')
    record = wait_for_state(producer, later.id, 'complete')
    assert history_states(record)[-2:] == ['running', 'complete']
    quick = sample_tasks.add.schedule((3, 4), delay=1)
    record = wait_for_state(producer, quick.id, 'complete')
    states = history_states(record)
    assert states[-2:] == ['running', 'complete'], states
    assert 'pending' not in states[states.index('running'):]
    scheduler.signal(signal.SIGTERM)
    again.signal(signal.SIGTERM)
