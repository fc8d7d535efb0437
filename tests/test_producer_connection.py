"""A producer's enqueue goes on a connection parked between enqueues
(SuiteStorage._check_out / _check_in), a few shared by the process's
threads and made beside the pool, instead of a pool checkout per
enqueue: how many connections that holds, that the pool stays whole for
the app, that reconfiguring closes them, that a parked
connection Redis closed or left dirty is replaced before the next
enqueue, silently, as the pool's checkout would, and that a signal
handler enqueueing in the middle of an enqueue takes its own.  Real
redis-server; no mocks."""
import signal
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


def queued_ids(admin, app):
    return [app.deserialize_task(m).id for m in admin.lrange(QUEUE, 0, -1)]


def assert_recorded(admin, app, task_id):
    assert admin.hget(app.storage.keys.task(task_id), 'state') == b'pending'


def test_one_producer_enqueues_on_one_parked_connection(producer,
                                                        redis_server):
    admin = redis_server.client()
    storage = producer.storage
    sample_tasks.add(0, 0)
    before = producer_clients(admin)
    ids = [sample_tasks.add(i, 1).id for i in range(200)]
    assert len(producer_clients(admin)) == len(before)
    assert len(storage._parked) == 1 and storage._parking == \
        set(storage._parked)
    assert not storage.pool._in_use_connections
    assert set(ids) <= set(queued_ids(admin, producer))
    assert_recorded(admin, producer, ids[-1])


def test_many_threads_hold_no_more_than_they_use_at_once(producer,
                                                         redis_server):
    """150 long-lived threads (a web server's), more than the pool's 100,
    enqueueing in turn: one connection does, and the pool stays free
    for the app's other calls.  Then 12 at once: they take 12, and give
    back all but PARKED_MAX when they are done."""
    admin = redis_server.client()
    storage = producer.storage
    pool = storage.pool
    turn = threading.Lock()
    ids, errors = [], []
    go = threading.Barrier(150)

    def in_turn():
        go.wait()
        for i in range(5):
            try:
                with turn:
                    ids.append(sample_tasks.add(i, 3).id)
            except Exception as exc:   # reported below
                errors.append(exc)

    threads = [threading.Thread(target=in_turn) for _ in range(150)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert not errors
    assert len(ids) == 750
    assert len(storage._parked) == 1
    assert not pool._in_use_connections
    assert producer.pending_count() >= 750   # the app's own pool calls

    def together():
        ids.append(sample_tasks.add(0, 4).id)

    # Redis holds every write for 0.5 s: the 12 enqueues are all in
    # flight at once.
    admin.execute_command('CLIENT', 'PAUSE', 500, 'WRITE')
    threads = [threading.Thread(target=together) for _ in range(12)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    # PARKED_MAX parked; the other 8 came from the pool and went back.
    assert len(storage._parked) == len(storage._parking) == \
        storage.PARKED_MAX
    assert not pool._in_use_connections
    assert len(pool._available_connections) >= 8
    assert set(ids) <= set(queued_ids(admin, producer))


def test_a_small_pool_stays_whole_for_the_app(tmp_path, redis_url):
    """A pool of 3 (`?max_connections=3`): after enqueues, the app can
    still take all 3 at once; the parked connection is not one of them."""
    from huey_worker import config, huey
    ini = tmp_path / 'small.ini'
    ini.touch()
    huey.configure(config.load(str(ini), environ={
        'HUEY_REDIS_URL': redis_url + '?max_connections=3'}))
    try:
        pool = huey.storage.pool
        ids = [sample_tasks.add(i, 2).id for i in range(20)]
        assert len(huey.storage._parked) == 1
        taken = [pool.get_connection() for _ in range(3)]
        for conn in taken:
            pool.release(conn)
        assert huey.pending_count() == 20
        assert huey.storage.conn.hget(huey.storage.keys.task(ids[-1]),
                                      'state') == b'pending'
    finally:
        huey.configure(config.load(str(ini), environ={
            'HUEY_REDIS_URL': redis_url}))


def test_reconfiguring_closes_the_parked_connections(tmp_path, redis_url,
                                                     redis_server):
    from huey_worker import config, huey
    admin = redis_server.client()
    ini = tmp_path / 'again.ini'
    ini.touch()
    cfg = config.load(str(ini), environ={'HUEY_REDIS_URL': redis_url})
    huey.configure(cfg)
    taken = threading.Barrier(4)

    def enqueue_together():
        taken.wait()
        sample_tasks.add(0, 7)
    threads = [threading.Thread(target=enqueue_together) for _ in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    old = huey.storage
    assert len(old._parked) >= 1
    ports = {'127.0.0.1:%d' % conn._sock.getsockname()[1]
             for conn in old._parking}
    assert ports <= {c['addr'] for c in producer_clients(admin)}
    huey.configure(cfg)
    assert all(conn._sock is None for conn in old._parking)
    deadline = time.monotonic() + 5
    while ports & {c['addr'] for c in producer_clients(admin)} and \
            time.monotonic() < deadline:
        time.sleep(0.05)   # Redis notices a closed socket on its next turn
    assert not ports & {c['addr'] for c in producer_clients(admin)}
    task_id = sample_tasks.add(1, 7).id   # the new storage's own
    assert huey.storage is not old and len(huey.storage._parked) == 1
    assert admin.hget(huey.storage.keys.task(task_id), 'state') == \
        b'pending'


@pytest.mark.parametrize('how', ['client kill', 'idle timeout'])
def test_a_parked_connection_redis_closed_is_replaced_silently(
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
    ids = queued_ids(admin, producer)
    assert ids.count(first) == 1 and ids.count(second) == 1
    assert_recorded(admin, producer, second)


def test_a_reply_left_unread_is_not_taken_for_the_enqueues(producer,
                                                           redis_server):
    admin = redis_server.client()
    sample_tasks.add(0, 0)
    [parked] = producer.storage._parked
    # A command whose reply nobody read (a caller interrupted between
    # sending and reading): the next enqueue must not take that reply
    # for its own, which would leave its own unread, every reply after
    # it one behind.
    parked.send_command('PING')
    deadline = time.monotonic() + 5
    while not parked.can_read() and time.monotonic() < deadline:
        time.sleep(0.01)
    assert parked.can_read()
    task_id = sample_tasks.add(3, 3).id
    assert not parked.can_read(timeout=0.5), \
        'a reply is left unread on the connection'
    assert task_id in queued_ids(admin, producer)
    assert_recorded(admin, producer, task_id)


def test_an_enqueue_in_a_signal_handler_during_an_enqueue(producer,
                                                          redis_server):
    """Redis slow to answer (CLIENT PAUSE); a SIGALRM handler enqueues
    while the main thread waits on its own enqueue's reply, on the same
    thread: each gets its own reply, at once."""
    admin = redis_server.client()
    sample_tasks.add(0, 0)
    inner = []
    previous = signal.signal(signal.SIGALRM, lambda *_: inner.append(
        sample_tasks.add(5, 5).id))
    try:
        for _ in range(3):
            admin.execute_command('CLIENT', 'PAUSE', 300, 'WRITE')
            signal.setitimer(signal.ITIMER_REAL, 0.1)
            started = time.monotonic()
            outer = sample_tasks.add(6, 6).id
            # Well under [redis] socket_timeout (30 s): the outer enqueue
            # did not wait on a reply the handler read.
            assert time.monotonic() - started < 5
            ids = queued_ids(admin, producer)
            assert ids.count(outer) == 1 and ids.count(inner[-1]) == 1
            assert_recorded(admin, producer, outer)
            assert_recorded(admin, producer, inner[-1])
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)
    assert len(inner) == 3
