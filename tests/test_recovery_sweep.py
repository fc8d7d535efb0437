"""Recovery finds every in-flight list of a gone consumer, whether or not an
index still names it, and decides who is dead by Redis's clock (the
heartbeat key's expiry), not by a host's.  Issue 13 §5 and §7.

The last test is the whole story with real processes: a process-mode
consumer stalls (SIGSTOP) past recovery_timeout while its workers keep
taking tasks, a peer recovers it (deleting its index and its registration),
then it is killed; what its workers took after the recovery must still run.
"""
import os
import signal
import threading
import time

import pytest

from ops_helpers import delivery_env, wait_until


@pytest.fixture
def delivery(producer):
    from huey_worker.delivery import Delivery
    return Delivery(producer.storage)


def messages(tag, n):
    return [b'%s-%d' % (tag.encode(), i) for i in range(n)]


def queued(app):
    return app.storage.conn.lrange(app.storage.queue_key, 0, -1)


def test_lists_the_index_does_not_name_are_recovered(producer, delivery):
    conn, keys = producer.storage.conn, producer.keys
    indexed = keys.inflight('ghost', 0, 'inc1')
    unindexed = [keys.inflight('ghost', 1, 'inc1'),
                 keys.inflight('ghost', 0, 'inc0')]   # an older start
    conn.sadd(keys.consumer_lists('ghost'), indexed)
    conn.rpush(indexed, *messages('a', 2))
    for n, key in enumerate(unindexed):
        conn.rpush(key, *messages('b%d' % n, 3))
    conn.zadd(keys.consumers, {'ghost': time.time() - 100})
    assert delivery.recover_dead(10) == {'ghost': 8}
    assert sorted(queued(producer)) == sorted(
        messages('a', 2) + messages('b0', 3) + messages('b1', 3))
    for key in [indexed] + unindexed:
        assert conn.llen(key) == 0
    assert not conn.zscore(keys.consumers, 'ghost')


def test_a_restart_puts_back_what_no_index_names(producer, delivery):
    """A consumer's own start (requeue_consumer) finds its lists by their
    name after a peer recovered it and deleted its index."""
    conn, keys = producer.storage.conn, producer.keys
    key = keys.inflight('host:main', 1, 'earlier')
    conn.rpush(key, *messages('m', 2))
    assert not conn.exists(keys.consumer_lists('host:main'))
    assert delivery.requeue_consumer('host:main', 'lost') == 2
    assert sorted(queued(producer)) == sorted(messages('m', 2))


def test_identities_are_matched_literally(producer, delivery):
    """Glob characters in an identity match themselves only: recovering
    `web*` never touches the lists of `web1`."""
    conn, keys = producer.storage.conn, producer.keys
    conn.set(keys.consumer('web1'), '{}', px=60000)     # alive
    conn.zadd(keys.consumers, {'web1': time.time(), 'web*': 0})
    live = keys.inflight('web1', 0, 'x')
    conn.rpush(live, b'running')
    dead = keys.inflight('web*', 0, 'x')
    conn.rpush(dead, b'lost')
    assert delivery.lists_of('web*') == [dead]
    assert delivery.recover_dead(10) == {'web*': 1}
    assert queued(producer) == [b'lost']
    assert conn.lrange(live, 0, -1) == [b'running']
    assert keys.identity_of_inflight(dead) == 'web*'
    assert keys.identity_of_inflight(keys.inflight('h:a:b', 2, 'i')) == \
        'h:a:b'
    assert keys.identity_of_inflight(keys.consumers) is None


def test_who_is_dead_is_decided_by_redis_not_by_host_clocks(producer,
                                                            delivery):
    """The consumers zset holds each consumer's own wall clock.  One whose
    clock runs an hour behind is alive while its heartbeat key lives; one
    whose clock ran a day ahead (then it died) is dead as soon as the key
    expired, not a day later."""
    conn, keys = producer.storage.conn, producer.keys
    now = time.time()
    conn.zadd(keys.consumers, {'behind': now - 3600, 'ahead': now + 86400})
    conn.set(keys.consumer('behind'), '{}', px=60000)
    for identity in ('behind', 'ahead'):
        conn.rpush(keys.inflight(identity, 0, 'i'), identity.encode())
        conn.sadd(keys.consumer_lists(identity),
                  keys.inflight(identity, 0, 'i'))
    assert delivery.recover_dead(15) == {'ahead': 1}
    assert queued(producer) == [b'ahead']
    assert conn.llen(keys.inflight('behind', 0, 'i')) == 1


def test_a_list_of_a_gone_consumer_is_swept_after_the_grace(producer,
                                                            delivery):
    """Lists filled after their consumer was recovered (neither registered
    nor heartbeating): seen once, marked; put back once the grace passed
    on Redis's clock.  A live consumer's lists are never touched, and a
    mark is forgotten when its consumer turns out alive."""
    conn, keys = producer.storage.conn, producer.keys
    gone = keys.inflight('gone', 0, 'i')
    conn.rpush(gone, *messages('g', 3))
    live = keys.inflight('live', 0, 'i')
    conn.rpush(live, b'busy')
    conn.set(keys.consumer('live'), '{}', px=60000)
    back = keys.inflight('back', 0, 'i')
    conn.rpush(back, b'paused')
    grace = 0.5
    assert delivery.sweep_orphans(grace) == {}
    assert conn.llen(gone) == 3
    assert set(conn.hkeys(keys.inflight_orphans)) == {gone.encode(),
                                                      back.encode()}
    # `back` was only starting (or paused): its heartbeat appears.
    conn.set(keys.consumer('back'), '{}', px=60000)
    time.sleep(grace + 0.1)
    delivery._pass_ended = None     # no pacing between the two passes
    assert delivery.sweep_orphans(grace) == {'gone': 3}
    assert sorted(queued(producer)) == sorted(messages('g', 3))
    assert conn.lrange(live, 0, -1) == [b'busy']
    assert conn.lrange(back, 0, -1) == [b'paused']
    assert conn.hlen(keys.inflight_orphans) == 0


def test_a_registered_consumer_is_left_to_recovery(producer, delivery):
    """A consumer still in the zset (dead, not yet recovered) is
    recover_dead's: the sweep does not mark its lists."""
    conn, keys = producer.storage.conn, producer.keys
    conn.zadd(keys.consumers, {'dying': time.time()})
    conn.rpush(keys.inflight('dying', 0, 'i'), b'x')
    assert delivery.sweep_orphans(0) == {}
    assert conn.hlen(keys.inflight_orphans) == 0


def test_concurrent_sweeps_move_each_message_once(producer):
    from huey_worker.delivery import Delivery
    conn, keys = producer.storage.conn, producer.keys
    lists = [keys.inflight('orphan', i, 'i') for i in range(4)]
    for n, key in enumerate(lists):
        conn.rpush(key, *messages('o%d' % n, 25))
    Delivery(producer.storage).sweep_orphans(0.2)     # marks them
    time.sleep(0.3)
    barrier = threading.Barrier(8)
    results = []

    def sweep():
        barrier.wait()
        results.append(Delivery(producer.storage).sweep_orphans(0.2))
    threads = [threading.Thread(target=sweep) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sum(r.get('orphan', 0) for r in results) == 100
    assert conn.llen(producer.storage.queue_key) == 100
    assert len(set(queued(producer))) == 100


# -- real processes ---------------------------------------------------------

def _children(pid):
    found = []
    for entry in os.listdir('/proc'):
        if entry.isdigit():
            try:
                with open('/proc/%s/stat' % entry) as fh:
                    text = fh.read()
            except OSError:
                continue
            fields = text[text.rindex(')') + 2:].split()
            if int(fields[1]) == pid and fields[0] != 'Z':
                found.append(int(entry))
    return sorted(found)


def _alive(pid):
    try:
        with open('/proc/%d/stat' % pid) as fh:
            text = fh.read()
    except OSError:
        return False
    return text[text.rindex(')') + 2:].split()[0] != 'Z'


@pytest.mark.slow
def test_tasks_taken_after_a_stalled_consumer_was_recovered_still_run(
        producer, base_env, start_daemon):
    """The consumer's main process stops (SIGSTOP: swapping, a debugger, a
    hung main loop) for longer than recovery_timeout; its process workers
    run on and keep taking tasks.  A peer recovers it (its index and
    registration go), then it is killed and its workers with it.  The
    tasks its workers took after the recovery sit in lists nothing names:
    they must still be put back and run."""
    import delivery_tasks
    conn, keys = producer.storage.conn, producer.keys
    stalled = start_daemon(['consumer', '--workers', '2', '--worker-type',
                            'process'], delivery_env(
                                base_env, HUEY_WORKER_CONSUMER_IDENTITY=
                                'stalled'), 'stalled')
    stalled.wait_for_output('consumer ready')
    workers = _children(stalled.pid)
    assert len(workers) == 2
    results = [delivery_tasks.slow_counted(1, str(i)) for i in range(20)]
    wait_until(lambda: conn.hlen('test:runs') >= 2, what='tasks running')
    stalled.signal(signal.SIGSTOP)
    peer = start_daemon(['consumer', '--workers', '1'], delivery_env(
        base_env, HUEY_WORKER_CONSUMER_IDENTITY='peer'), 'peer')
    peer.wait_for_output('consumer ready')
    # The peer recovers `stalled` (recovery_timeout 3 s): its registration
    # and its index go ...
    wait_until(lambda: conn.zscore(keys.consumers, 'stalled') is None and
               not conn.exists(keys.consumer_lists('stalled')),
               what='the stalled consumer recovered')

    # ... and its workers go on taking tasks into lists nothing names (not
    # only the ones it was running, which the recovery put back and which
    # a worker may take again once it finished them: wait for a task not
    # run before).
    def taken_unnamed():
        held = {}
        for key in conn.scan_iter(match=keys.inflight_prefix('stalled') +
                                  '*'):
            for raw in conn.lrange(key, 0, -1):
                task = producer.deserialize_task(raw)
                if not producer.storage.has_data_for_key(task.id):
                    held[key] = task.id
        return held
    held = wait_until(taken_unnamed, what='a task taken after the recovery',
                      timeout=30)
    os.kill(stalled.pid, signal.SIGKILL)    # its workers die with it
    stalled.proc.wait(10)
    wait_until(lambda: not any(_alive(p) for p in workers),
               what='the workers gone')
    unnamed = sum(conn.llen(k) for k in held)
    # Everything runs, the tasks left in the unnamed lists included.
    for r in results:
        r.get(blocking=True, timeout=90)
    assert sorted(k.decode() for k in conn.hkeys('test:runs')) == \
        sorted(str(i) for i in range(20))
    wait_until(lambda: not any(conn.llen(k) for k in conn.scan_iter(
        match=keys.inflight_prefix('stalled') + '*')),
        what='every list of the stalled consumer swept')
    if unnamed:
        peer.wait_for_output('a list of the consumer stalled that is gone, '
                             'put back in the queue', 30)
    print('%d task(s) were in lists nothing named when the stalled '
          'consumer died' % unnamed)
    peer.signal(signal.SIGTERM)
    assert peer.wait() == 0
