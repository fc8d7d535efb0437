"""`huey-worker purge-results` (issue 16): finished tasks' records, histories,
index entries and results removed by age and state, in batches, while a
real consumer runs; the queue, the schedule, in-flight lists and tasks
that have not ended are left as they were."""
import time

import pytest

import sample_tasks
from huey_worker.adopt import AdoptedStorage
from huey_worker.journal import TERMINAL
from huey_worker.journal.purge import Purge, parse_duration
from ops_helpers import cli, task_record, wait_for_state, wait_until

DAY = 86400

pytestmark = pytest.mark.timeout(180)


@pytest.fixture
def env(base_env):
    return dict(base_env, HUEY_WORKER_DELIVERY_HEARTBEAT_INTERVAL='0.3')


def make_old(app, task_id, seconds):
    """Make a task look `seconds` older: its end (or last change) and its
    index entries, as if it had been written then."""
    conn, keys = app.storage.conn, app.storage.keys
    old = time.time() - seconds
    fields = {'updated': old}
    if conn.hexists(keys.task(task_id), 'finished'):
        fields['finished'] = old
    conn.hset(keys.task(task_id), mapping=fields)
    indexes = [keys.journal_recent, keys.journal_results]
    indexes += conn.scan_iter(match=keys.journal_state_prefix + '*')
    for index in indexes:
        conn.zadd(index, {task_id: old}, xx=True)


def task_keys(app, task_id):
    storage = app.storage
    return [storage.keys.task(task_id), storage.keys.task_log(task_id),
            storage.result_key(task_id)]


def indexed(app, task_id):
    """Whether the journal's indexes list `task_id`: [any state index, any
    name index, the first layout's listing or results index]."""
    conn, keys = app.storage.conn, app.storage.keys

    def listed(prefix):
        return any(conn.zscore(key, task_id) is not None
                   for key in conn.scan_iter(match=prefix + '*'))
    return [listed(keys.journal_state_prefix),
            listed(keys.journal_name_prefix),
            conn.zscore(keys.journal_recent, task_id) is not None or
            conn.zscore(keys.journal_results, task_id) is not None]


def kept_message(app, task_id):
    keys = app.storage.keys
    return hasattr(keys, 'message') and \
        app.storage.conn.exists(keys.message(task_id)) == 1


def untouchable(app, ids):
    """DUMPs of what purge must never change: the queue, the schedule,
    every in-flight list, dead letters, and the records and histories of
    the tasks `ids` (not ended)."""
    storage, conn = app.storage, app.storage.conn
    keys = [storage.queue_key, storage.schedule_key, storage.keys.dead]
    keys += sorted(conn.scan_iter(match='hw:%s:inflight:*' % app.name))
    for task_id in ids:
        keys += task_keys(app, task_id)[:2]
    return {key: conn.dump(key) for key in keys}


def test_parse_duration():
    assert parse_duration('7d') == 7 * DAY
    assert parse_duration('12h') == 12 * 3600
    assert parse_duration('30m') == 1800
    assert parse_duration('3600') == 3600
    assert parse_duration('1d12h') == 36 * 3600
    assert parse_duration(' 1.5H ') == 5400
    for bad in ('', '7x', 'd', '-1d', '5 3h', '1h5', '3600s5'):
        with pytest.raises(ValueError, match='is not a duration'):
            parse_duration(bad)


def test_purge_results_by_age_and_state(producer, env, start_daemon,
                                        tmp_path):
    conn = producer.storage.conn
    revoked = sample_tasks.add(3, 4)
    producer.revoke_by_id(revoked.id, revoke_once=True)
    consumer = start_daemon(['consumer', '--workers', '1'], env)
    consumer.wait_for_output('consumer ready')
    done = sample_tasks.add(1, 2)
    failed = sample_tasks.boom()
    recent = sample_tasks.add(5, 6)
    for task, state in ((revoked, 'revoked'), (done, 'complete'),
                        (failed, 'failed'), (recent, 'complete')):
        wait_for_state(producer, task.id, state)
    # The only worker held by a running task; one pending behind it, one
    # scheduled for later.
    gate = tmp_path / 'gate'
    held = sample_tasks.hold_until(str(gate))
    wait_for_state(producer, held.id, 'running')
    pending = sample_tasks.add(7, 8)
    scheduled = sample_tasks.add.schedule((1, 1), delay=3600)
    assert task_record(producer, pending.id)['state'] == 'pending'
    assert conn.exists(producer.storage.result_key(done.id))
    assert conn.exists(producer.storage.result_key(failed.id))
    # Everything old but `recent`: tasks that have not ended included.
    for task in (revoked, done, failed, held, pending, scheduled):
        make_old(producer, task.id, 8 * DAY)
    living = (held.id, pending.id, scheduled.id)
    before = untouchable(producer, living)
    assert any(k.startswith(b'hw:huey:inflight:') and v for k, v in
               before.items() if isinstance(k, bytes))

    # One of them in the first layout's index too: a dry run finds it
    # twice, and counts it once, as the real run removes it once.
    keys = producer.storage.keys
    conn.zadd(keys.journal_recent, {done.id: time.time() - 8 * DAY})
    run = cli(env, 'purge-results', '--older-than', '7d', '--dry-run')
    assert run.returncode == 0, run.stderr
    assert 'would remove 3 finished task(s)' in run.stdout
    assert 'complete 1, failed 1, revoked 1' in run.stdout
    # (A task that ran once to its end has no history list: its record
    # tells its running and end.)
    assert all(conn.exists(keys.task(t.id)) for t in (done, failed, revoked))

    run = cli(env, 'purge-results', '--older-than', '7d', '--state',
              'failed')
    assert run.returncode == 0, run.stderr
    assert 'removed 1 finished task(s)' in run.stdout
    assert conn.exists(*task_keys(producer, failed.id)) == 0
    assert not kept_message(producer, failed.id)
    assert indexed(producer, failed.id) == [False, False, False]
    assert conn.exists(keys.task(done.id),
                       producer.storage.result_key(done.id)) == 2

    run = cli(env, 'purge-results', '--older-than', '7d', '--json')
    assert run.returncode == 0, run.stderr
    assert '"complete": 1' in run.stdout and '"revoked": 1' in run.stdout
    assert '"kept": 3' in run.stdout
    for task in (done, revoked):
        assert conn.exists(*task_keys(producer, task.id)) == 0
        assert indexed(producer, task.id) == [False, False, False]
    assert task_record(producer, done.id) is None
    # Newer than the cutoff: kept, result and all.
    assert conn.exists(keys.task(recent.id),
                       producer.storage.result_key(recent.id)) == 2
    assert indexed(producer, recent.id)[:2] == [True, True]
    assert not kept_message(producer, revoked.id)
    assert task_record(producer, recent.id)['result'] == 11
    assert untouchable(producer, living) == before

    # Nothing it left behind was needed: the queue goes on as before.
    gate.touch()
    assert wait_for_state(producer, held.id, 'complete')
    assert wait_for_state(producer, pending.id, 'complete')['result'] == 15
    assert task_record(producer, scheduled.id)['state'] == 'scheduled'

    run = cli(env, 'purge-results', '--older-than', '7y')
    assert run.returncode == 64 and "'7y' is not a duration" in run.stderr
    run = cli(env, 'purge-results', '--older-than', '1d', '--state',
              'running')
    assert run.returncode == 64 and 'not an end state' in run.stderr


def test_purge_racing_a_consumer(producer, env, start_daemon):
    """Purging everything that ended, over and over, while four workers
    run 300 tasks: only ended records go, each once, and every task runs
    to its end (a record removed mid-way would come back without its
    enqueue fields, or be counted under a state that has not ended)."""
    storage, conn = producer.storage, producer.storage.conn
    tasks = [sample_tasks.add(i, i) for i in range(300)]
    consumer = start_daemon(['consumer', '--workers', '4'], env)
    consumer.wait_for_output('consumer ready')
    removed, rounds = {}, 0

    def purge_round():
        report = Purge(storage, time.time(), batch=7).run()
        for state, n in report['removed'].items():
            removed[state] = removed.get(state, 0) + n
        return report

    def all_done():
        nonlocal rounds
        rounds += 1
        purge_round()
        outcomes = conn.hgetall(storage.keys.metrics_outcomes)
        return sum(int(v) for k, v in outcomes.items()
                   if k.endswith(b'\tcomplete')) == len(tasks)
    wait_until(all_done, timeout=120, interval=0.01, what='300 tasks done')
    purge_round()
    assert rounds > 3   # it did race the workers
    assert set(removed) <= TERMINAL | {''}
    assert removed.get('complete') == len(tasks)
    assert not list(conn.scan_iter(match='hw:huey:task:*'))
    assert not list(conn.scan_iter(match='hw:huey:task-log:*'))
    assert conn.zcard(storage.keys.journal_recent) == 0
    assert conn.zcard(storage.keys.journal_results) == 0
    assert storage.queue_size() == 0


def test_adopted_results_hash_orphans_and_records_beyond_the_index(
        producer, env, start_daemon):
    storage, conn, keys = producer.storage, producer.storage.conn, \
        producer.storage.keys
    consumer = start_daemon(['consumer', '--workers', '1'], env)
    consumer.wait_for_output('consumer ready')
    a, b, c = (sample_tasks.add(i, 1) for i in range(3))
    for task in (a, b, c):
        wait_for_state(producer, task.id, 'complete')
        make_old(producer, task.id, 2 * DAY)
    # As an adopted RedisHuey keeps them: in huey.results.NAME too.
    adopted = AdoptedStorage(producer.name, connection_pool=storage.pool)
    for task in (a, b, c):
        adopted.put_data(task.id, b'result', is_result=True)
    # b's record expired already (its result and index entries did not);
    # c's index entries were trimmed (the listing index at index_max).
    conn.delete(*task_keys(producer, b.id)[:2])
    conn.zrem(keys.journal_state('complete'), c.id)

    report = Purge(adopted, time.time() - DAY, states=('complete',)).run()
    assert report['removed'] == {'complete': 1}     # a; b's state unknown
    assert set(conn.hkeys(adopted.results_hash)) == {b.id.encode(),
                                                     c.id.encode()}
    assert conn.exists(*task_keys(producer, a.id)) == 0

    report = Purge(adopted, time.time() - DAY, index_max=1).run()
    assert report['scanned'] is True
    assert report['removed'] == {'': 1, 'complete': 1}
    assert conn.hlen(adopted.results_hash) == 0
    for task in (b, c):
        assert conn.exists(*task_keys(producer, task.id)) == 0
    assert indexed(producer, c.id) == [False, False, False]
    # b's task name went with its record: an entry of its name index may
    # stay, until that index's own trimming.
    assert indexed(producer, b.id)[0] is False
    assert indexed(producer, b.id)[2] is False
