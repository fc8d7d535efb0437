"""Issue 17, purge: a queue's pending tasks (plain and priority messages,
an adopted PriorityRedisHuey's own set) or its schedule, with explicit
confirmation; the records end revoked (reason: purged) and a purged task
can be retried; never a message a worker took.  Real Redis, real
consumers, the CLI and HTTP."""
import datetime
import signal

import pytest
import redis

from ops_helpers import (Client, cli, history_states, start_status_server,
                         task_record, wait_for_state, wait_until)


@pytest.fixture
def env(base_env):
    return dict(base_env, HUEY_MODULES='sample_tasks,actions_tasks',
                HUEY_STATUS_TOKEN='t0ken')


def test_purge_queue_and_schedule(producer, env, start_daemon, tmp_path):
    import actions_tasks as t
    from huey_worker.storage import MARKER
    log = str(tmp_path / 'log')
    storage = producer.storage
    plain = [t.note(log, 'p%d' % i).id for i in range(150)]
    urgent = [t.note.s(log, 'u%d' % i, priority=5) for i in range(30)]
    urgent = [producer.enqueue(task).id for task in urgent]
    # In the schedule, as the worker files a task not due yet.
    later = []
    for i in range(5):
        task = t.note.s(log, 'l%d' % i)
        task.eta = datetime.datetime.utcnow() + datetime.timedelta(hours=1)
        storage.add_to_schedule(producer.serialize_task(task), task.eta)
        later.append(task.id)
    assert storage.queue_size() == 180
    assert storage.conn.lindex(storage.queue_key, -1) == MARKER

    run = cli(env, 'purge-queue')
    assert run.returncode == 64 and '180 task(s)' in run.stderr
    assert storage.queue_size() == 180
    run = cli(env, 'purge-queue', '--yes')
    assert run.returncode == 0, run.stderr
    assert run.stdout.startswith('180 purged from the queue')
    assert storage.queue_size() == 0
    assert storage.conn.llen(storage.queue_key) == 0   # no marker left
    for task_id in plain + urgent:
        record = task_record(producer, task_id)
        assert record['state'] == 'revoked', record
        assert record['revoked_reason'] == 'purged'
        assert record['history'][-1]['reason'] == 'purged'
    assert cli(env, 'purge-queue', '--yes').stdout.startswith('0 purged')

    _, port = start_status_server(start_daemon, env)
    client = Client(port, token='t0ken')
    status, body = client.json('POST', '/queue/purge', {'schedule': True})
    assert status == 400 and '5 task(s)' in body['detail']
    status, body = client.json('POST', '/queue/purge',
                               {'schedule': True, 'confirm': True})
    assert status == 200 and body['purged'] == 5, body
    assert storage.conn.zcard(storage.schedule_key) == 0
    assert {task_record(producer, i)['state'] for i in later} == {'revoked'}

    # A purged task keeps its message: a retry runs it, priority and all.
    run = cli(env, 'retry', urgent[0], plain[0], later[0])
    assert run.returncode == 0, run.stdout + run.stderr
    assert storage.conn.zcard(storage.priority_key) == 1
    consumer = start_daemon(['consumer', '--workers', '1'], env, 'consumer')
    consumer.wait_for_output('consumer ready')
    for task_id in (urgent[0], plain[0], later[0]):
        wait_for_state(producer, task_id, 'complete')
    assert open(log).read().split() == ['u0', 'p0', 'l0']
    consumer.signal(signal.SIGTERM)
    assert consumer.wait() == 0


@pytest.mark.parametrize('workers', ['thread', 'process'])
def test_purge_while_workers_read(workers, producer, env, start_daemon,
                                  tmp_path):
    """Every task either ran or was purged, never both, and the count
    printed is the number purged."""
    import actions_tasks as t
    ids = [t.paced(i).id for i in range(600)]
    consumer = start_daemon(['consumer', '--workers', '3', '--set',
                             'consumer.worker_type=%s' % workers], env,
                            'consumer')
    consumer.wait_for_output('consumer ready')
    wait_until(lambda: any(task_record(producer, i)['state'] == 'complete'
                           for i in ids[:20]))
    run = cli(env, 'purge-queue', '--yes', '--json')
    assert run.returncode == 0, run.stderr
    purged = __import__('json').loads(run.stdout)['purged']
    assert purged > 0
    wait_until(lambda: producer.storage.queue_size() == 0)

    def settled():
        records = [task_record(producer, i) for i in ids]
        return records if all(r['state'] in ('complete', 'revoked')
                              for r in records) else None
    records = wait_until(settled, timeout=60)
    ran = [r for r in records if r['state'] == 'complete']
    dropped = [r for r in records if r['state'] == 'revoked']
    assert len(dropped) == purged and len(ran) + purged == 600
    for r in dropped:
        assert 'running' not in history_states(r), r
        assert r['revoked_reason'] == 'purged'
    for r in ran:
        assert 'revoked' not in history_states(r), r
    consumer.signal(signal.SIGTERM)
    assert consumer.wait() == 0


def test_purge_an_adopted_priority_queue(redis_url):
    """PriorityRedisHuey's own sorted set: plain Huey producers' tasks
    (no journal record) are purged and recorded revoked; the kept message
    keeps its priority in the suite's form."""
    from huey import PriorityRedisHuey
    from huey_worker import actions
    from huey_worker.storage import NativePriorityStorage, message_priority
    pool = redis.ConnectionPool.from_url(redis_url, protocol=2)
    web = PriorityRedisHuey('nat', connection_pool=pool)

    @web.task()
    def job(n):
        return n
    ids = [job.s(i, priority=i % 3).id for i in range(7)]
    tasks = [job.s(i, priority=i % 3) for i in range(7)]
    ids = [web.enqueue(task).id for task in tasks]
    storage = NativePriorityStorage('nat', connection_pool=pool)
    assert storage.queue_size() == 7
    removed = actions.purge_queue(storage, actions.Actor.cli())
    assert removed == 7 and storage.queue_size() == 0
    conn = storage.conn
    for i, task_id in enumerate(ids):
        assert conn.hget(storage.keys.task(task_id), 'state') == b'revoked'
        kept = conn.get(storage.keys.message(task_id))
        assert message_priority(kept) == i % 3
