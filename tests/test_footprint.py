"""What Redis holds per finished task (issue 16): the compact layout keeps
one record, one history and one entry in each of two indexes per task,
all ending with [journal] retention; Huey's result alone stays for
[huey] result_timeout, and the results count is per hour, not per task.
(The bytes against plain huey are bench/footprint.py's: a figure, not a
test.)"""
import pytest

import sample_tasks
from ops_helpers import wait_for_state, wait_until
from huey_worker.journal.reads import read_task, replies, results_held_command

pytestmark = pytest.mark.timeout(120)

COUNT = 200


def test_per_task_keys_and_their_lifetimes(producer, base_env, start_daemon):
    storage, conn, keys = producer.storage, producer.storage.conn, \
        producer.keys
    results = [sample_tasks.add(i, 1) for i in range(COUNT)]
    consumer = start_daemon(['consumer', '--workers', '2'], base_env)
    consumer.wait_for_output('consumer ready')
    for result in results:
        wait_for_state(producer, result.id, 'complete')
    retention = producer.config.journal.retention
    assert 0 < retention < producer.config.huey.result_timeout

    per_task = {}
    for raw in conn.scan_iter(count=1000):
        key = raw.decode()
        for result in results[:1]:
            if result.id in key:
                per_task[key.replace(result.id, 'ID')] = conn.ttl(raw)
    # No history list: a task that ran once to its end has its running
    # and end told by the record's own fields.
    assert set(per_task) == {'hw:huey:task:ID',
                             storage.result_key('ID').decode()}
    assert per_task['hw:huey:task:ID'] <= retention
    assert per_task[storage.result_key('ID').decode()] > retention
    # Two index entries per task, none in the first layout's indexes.
    assert conn.zcard(keys.journal_state('complete')) == COUNT
    assert conn.zcard(keys.journal_name('sample_tasks.add')) == COUNT
    assert not conn.exists(keys.journal_recent, keys.journal_results)
    # Results counted by the hour (summed in the workers, sent within a
    # second or two: journal.counters).
    wait_until(lambda: replies(storage.pool, [results_held_command(
        storage)]) == [COUNT], what='every result counted')
    assert conn.hlen(keys.journal_held) <= 2
    # The record stays in Redis's compact encoding and holds no field the
    # key or the storage already says; reads still show them.
    record_key = keys.task(results[0].id)
    assert conn.object('encoding', record_key) == b'listpack'
    assert not conn.hexists(record_key, 'id')
    assert not conn.hexists(record_key, 'queue')
    shown = read_task(producer, storage, results[0].id)
    assert shown['id'] == results[0].id and shown['queue'] == 'huey'
    assert shown['result'] == 1


def test_a_record_written_by_the_first_layout_still_reads(producer):
    """Records of the first layout (id and queue fields, listed in
    journal:recent and journal:results) read as before until they
    expire, and count among the results held."""
    import time
    storage, conn, keys = producer.storage, producer.storage.conn, \
        producer.keys
    now = time.time()
    conn.hset(keys.task('old-one'), mapping={
        'id': 'old-one', 'queue': 'huey', 'name': 'sample_tasks.add',
        'state': 'complete', 'finished': now, 'updated': now,
        'result': '3'})
    conn.rpush(keys.task_log('old-one'),
               '{"state": "complete", "at": %r}' % now)
    conn.zadd(keys.journal_results, {'old-one': now})
    shown = read_task(producer, storage, 'old-one')
    assert shown['state'] == 'complete' and shown['result'] == 3
    assert [e['state'] for e in shown['history']] == ['complete']
    assert replies(storage.pool, [results_held_command(storage)]) == [1]


def test_the_enqueue_event_reads_the_same_in_either_layout(producer):
    """The producer's pending is no longer stored as an event (the
    record's `enqueued` says it): a record whose history holds it (written
    before) and one whose history does not read alike, and a history
    that starts waiting (a task with an eta) gets no second one."""
    import json
    import time
    storage, conn, keys = producer.storage, producer.storage.conn, \
        producer.keys
    now = time.time()
    for task_id, stored in (('before', True), ('after', False)):
        conn.hset(keys.task(task_id), mapping={
            'name': 'sample_tasks.add', 'state': 'complete',
            'enqueued': now, 'updated': now + 2})
        events = [{'state': 'running', 'at': now + 1},
                  {'state': 'complete', 'at': now + 2}]
        if stored:
            events.insert(0, {'state': 'pending', 'at': now})
        conn.rpush(keys.task_log(task_id), *map(json.dumps, events))
    before, after = (read_task(producer, storage, task_id)['history']
                     for task_id in ('before', 'after'))
    assert before == after
    assert [e['state'] for e in after] == ['pending', 'running', 'complete']
    assert after[0]['at'] == pytest.approx(now)

    delayed = sample_tasks.add.schedule((1, 2), delay=3600)
    history = read_task(producer, storage, delayed.id)['history']
    assert [e['state'] for e in history] == ['scheduled']
    assert conn.exists(keys.task_log(delayed.id))
    pending = sample_tasks.add(1, 2)
    history = read_task(producer, storage, pending.id)['history']
    assert [e['state'] for e in history] == ['pending']
    assert not conn.exists(keys.task_log(pending.id))


def test_expired_record_answers_from_hueys_result(producer):
    """After [journal] retention the record is gone; Huey's result (kept
    for result_timeout) still answers: the summary kept."""
    storage = producer.storage
    storage.put_data('gone-record', producer.serializer.serialize(42),
                     is_result=True)
    shown = read_task(producer, storage, 'gone-record')
    assert shown['state'] == 'complete' and shown['result'] == 42
    assert shown['queue'] == 'huey'
