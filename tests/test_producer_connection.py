"""A producer thread keeps one connection for its enqueues
(redisconn.KeptConnection, SuiteStorage._kept_connection) instead of a
pool checkout per enqueue: how many connections that holds, that a thread
ending gives its connection back, and that a kept connection Redis closed
or left dirty is replaced before the next enqueue, silently, as the pool's
checkout would.  Real redis-server; no mocks."""
import threading
import time

import pytest

import sample_tasks

QUEUE = 'huey.redis.huey'


def producer_clients(admin):
    """Connections of this test process to the server, the admin's own
    left out."""
    own = admin.client_id()
    return [c for c in admin.client_list() if int(c['id']) != own]


def in_flight_ids(admin, app):
    return {app.deserialize_task(m).id for m in admin.lrange(QUEUE, 0, -1)}


def test_a_thread_enqueues_on_one_kept_connection(producer, redis_server):
    admin = redis_server.client()
    sample_tasks.add(0, 0)
    before = producer_clients(admin)
    ids = [sample_tasks.add(i, 1).id for i in range(200)]
    after = producer_clients(admin)
    assert len(after) == len(before)
    assert set(ids) <= in_flight_ids(admin, producer)
    # Each enqueue went on the same connection: the one the first used,
    # which Redis saw run the last command (the producer's script).
    kept = producer.storage._local.kept.conn
    assert kept._sock is not None
    assert producer.storage.pool._in_use_connections >= {kept}


def test_threads_that_end_give_their_connections_back(producer,
                                                       redis_server):
    admin = redis_server.client()
    pool = producer.storage.pool
    sample_tasks.add(0, 0)
    in_use = len(pool._in_use_connections)

    def enqueue_some(out):
        out.extend(sample_tasks.add(i, 2).id for i in range(20))

    def one_more_thread_in_use():
        """Connections lent while one more producer thread lives: the
        threads that ended before it gave theirs back when it took its."""
        taken, done = threading.Event(), threading.Event()

        def enqueue_and_wait():
            sample_tasks.add(9, 9)
            taken.set()
            done.wait(10)
        thread = threading.Thread(target=enqueue_and_wait)
        thread.start()
        taken.wait(10)
        lent = len(pool._in_use_connections)
        done.set()
        thread.join()
        return lent

    ids, connections = [], []
    for _ in range(3):
        threads = [threading.Thread(target=enqueue_some, args=(ids,))
                   for _ in range(6)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        assert one_more_thread_in_use() == in_use + 1
        connections.append(len(producer_clients(admin)))
    # The next round's threads took the connections back from the pool:
    # no new ones opened.
    assert connections[0] == connections[1] == connections[2]
    assert len(ids) == 3 * 6 * 20
    assert set(ids) <= in_flight_ids(admin, producer)


@pytest.mark.parametrize('how', ['client kill', 'idle timeout'])
def test_a_kept_connection_redis_closed_is_replaced_silently(
        producer, redis_server, how):
    admin = redis_server.client()
    first = sample_tasks.add(1, 1).id
    if how == 'client kill':
        admin.client_kill_filter(_type='normal', skipme=True)
    else:
        admin.config_set('timeout', 1)
        try:
            deadline = time.monotonic() + 10
            while producer_clients(admin) and time.monotonic() < deadline:
                time.sleep(0.2)
        finally:
            admin.config_set('timeout', 0)
    assert not producer_clients(admin), 'Redis did not close it'
    # The next enqueue finds its connection closed before sending on it
    # and reconnects: no error reaches the producer, the task is queued
    # once, with its record.
    second = sample_tasks.add(2, 2).id
    ids = [producer.deserialize_task(m).id
           for m in admin.lrange(QUEUE, 0, -1)]
    assert ids.count(first) == 1 and ids.count(second) == 1
    assert admin.hget(producer.storage.keys.task(second), 'state') == \
        b'pending'


def test_a_reply_left_unread_is_not_taken_for_the_enqueues(producer,
                                                           redis_server):
    admin = redis_server.client()
    sample_tasks.add(0, 0)
    kept = producer.storage._local.kept.conn
    # A command whose reply nobody read (a caller interrupted between
    # sending and reading): the next enqueue must not take that reply
    # for its own, which would leave its own unread, every reply after
    # it one behind.
    kept.send_command('PING')
    deadline = time.monotonic() + 5
    while not kept.can_read() and time.monotonic() < deadline:
        time.sleep(0.01)
    assert kept.can_read()
    task_id = sample_tasks.add(3, 3).id
    assert not kept.can_read(timeout=0.5), \
        'a reply is left unread on the connection'
    assert task_id in in_flight_ids(admin, producer)
    assert admin.hget(producer.storage.keys.task(task_id), 'state') == \
        b'pending'
