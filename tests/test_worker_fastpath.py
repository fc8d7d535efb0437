"""The worker's hot path as made faster in issue 8: its own connection
and the queue read sent with each ack (daemon/storage.py) keep the
connection in step whatever is sent next and take nothing from the queue
that is not handed to the worker; a process worker's time limit keeps
striking with its handler installed once (daemon/worker.py)."""
import signal
import time

import pytest
import redis
from huey.exceptions import TaskTimeout

from huey_worker.storage import SuiteStorage
from huey_worker.worker import AlarmTimeout


def storage_on(redis_url):
    return SuiteStorage('prefetch', connection_pool=redis.ConnectionPool
                        .from_url(redis_url, protocol=2))


def test_the_read_sent_with_a_flush_answers_the_next_dequeue(redis_url):
    storage = storage_on(redis_url)
    storage.pin_connection()
    storage.conn.lpush(storage.queue_key, b'm1')
    storage.stage(lambda c: c.set('acked', 'yes'))
    storage.flush_and_prefetch('inflight', 1)
    assert storage.prefetch_pending()
    assert storage.conn.get('acked') == b'yes'
    assert storage.dequeue_into('inflight', 1) == b'm1'
    assert not storage.prefetch_pending()
    assert storage.conn.lrange('inflight', 0, -1) == [b'm1']
    assert storage.conn.llen(storage.queue_key) == 0


def test_another_command_first_keeps_the_connection_in_step(redis_url):
    storage = storage_on(redis_url)
    storage.pin_connection()
    storage.conn.set('k', 'v')
    storage.conn.lpush(storage.queue_key, b'm1')
    storage.stage(lambda c: c.set('acked', 'yes'))
    storage.flush_and_prefetch('inflight', 1)
    # Anything sent on the worker's connection before its next dequeue
    # must get its own reply, not the queue read's.
    assert storage.flush_all(lambda c: c.get('k'))[-1] == b'v'
    assert storage.dequeue_into('inflight', 1) == b'm1'
    assert storage.dequeue_into('inflight', 1) is None   # empty: timed out


def test_an_abandoned_read_takes_nothing_later(redis_url):
    storage = storage_on(redis_url)
    storage.pin_connection()
    storage.stage(lambda c: c.set('acked', 'yes'))
    storage.flush_and_prefetch('inflight', 2)    # waits on the empty queue
    storage.unpin_connection()                   # e.g. the worker stops
    other = redis.Redis.from_url(redis_url, protocol=2)
    other.lpush(storage.queue_key, b'later')
    time.sleep(2.5)   # past the read's own time-out
    assert other.lrange(storage.queue_key, 0, -1) == [b'later']
    assert other.llen('inflight') == 0
    # The connection went back to the pool usable.
    assert storage.conn.get('acked') == b'yes'


def test_a_thread_without_its_own_connection_just_flushes(redis_url):
    storage = storage_on(redis_url)
    storage.conn.lpush(storage.queue_key, b'm1')
    storage.stage(lambda c: c.set('acked', 'yes'))
    storage.flush_and_prefetch('inflight', 1)
    assert not storage.prefetch_pending()
    assert storage.conn.get('acked') == b'yes'
    assert storage.conn.llen(storage.queue_key) == 1
    assert storage.dequeue_into('inflight', 1) == b'm1'


def test_a_process_workers_time_limit_strikes_task_after_task():
    previous = signal.getsignal(signal.SIGALRM)
    pending = signal.getitimer(signal.ITIMER_REAL)   # pytest-timeout's
    alarm = AlarmTimeout()
    try:
        with pytest.raises(TaskTimeout, match='0.05s'):
            with alarm(0.05):
                time.sleep(5)
        with alarm(5):
            pass                       # finished in time: nothing strikes
        assert signal.getitimer(signal.ITIMER_REAL)[0] == 0
        # A task that installs its own SIGALRM handler does not disarm
        # the limit of the next one.
        signal.signal(signal.SIGALRM, lambda *a: None)
        with pytest.raises(TaskTimeout):
            with alarm(0.05):
                time.sleep(5)
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)
        if pending[0]:
            signal.setitimer(signal.ITIMER_REAL, *pending)


def test_a_script_in_a_transaction_survives_a_flushed_script_cache(redis_url):
    storage = storage_on(redis_url)
    storage.pin_connection()
    script = storage.conn.register_script(
        "redis.call('SET', KEYS[1], ARGV[1]) return ARGV[1]")
    storage.conn.script_flush()   # as after a Redis restart
    replies = storage.flush_all(
        lambda c: c.set('before', 1),
        lambda c: script(keys=['k'], args=['v'], client=c),
        lambda c: c.get('k'))
    assert replies == [True, b'v', b'v']
    assert storage.conn.get('before') == b'1'


def test_command_errors_in_a_transaction_are_raised_like_redis_py(redis_url):
    storage = storage_on(redis_url)
    storage.pin_connection()
    storage.conn.set('text', 'x')
    with pytest.raises(redis.exceptions.ResponseError, match='HINCRBY'):
        storage.flush_all(lambda c: c.set('a', 1),
                          lambda c: c.hincrby('text', 'f', 1),
                          lambda c: c.set('b', 2))
    # Like MULTI/EXEC through redis-py: the other commands ran, and the
    # connection is still in step.
    assert storage.flush_all(lambda c: c.mget(['a', 'b']))[-1] == [b'1', b'2']


@pytest.mark.parametrize('decode', [False, True])
def test_staged_argument_tuples_go_as_redis_py_would_send_them(redis_url,
                                                              decode):
    storage = SuiteStorage('raw', connection_pool=redis.ConnectionPool
                           .from_url(redis_url, decode_responses=decode,
                                     protocol=2))
    storage.pin_connection()
    storage.stage_command('HSET', 'rec', 'when', 1795379904.3978827,
                          'count', 7, 'name', 'x')
    storage.stage_commands([('RPUSH', 'log', b'\x00raw'),
                            ('HINCRBYFLOAT', 'rec', 'sum', 1e-05)])
    replies = storage.flush_all(('HGETALL', 'rec'), ('LRANGE', 'log', 0, -1))
    record, log = replies[-2], replies[-1]
    if decode:
        assert record == {'when': '1795379904.3978827', 'count': '7',
                          'name': 'x', 'sum': '0.00001'}
    else:
        assert record[b'when'] == b'1795379904.3978827'
        assert log == [b'\x00raw']
    assert not storage.has_pending()


def test_a_command_refused_before_exec_aborts_the_transaction(redis_url):
    storage = storage_on(redis_url)
    storage.pin_connection()
    storage.stage_command('SET', 'a', 1)
    storage.stage_command('SET', 'b')            # wrong number of arguments
    storage.stage_command('SET', 'c', 3)
    with pytest.raises(redis.exceptions.ResponseError, match="'set'"):
        storage.flush()
    assert storage.has_pending()    # kept for the caller to decide
    storage.discard_pending()
    # Redis discarded the whole transaction; the connection is in step.
    assert storage.flush_all(('MGET', 'a', 'b', 'c'))[-1] == [None] * 3
    assert storage.flush_all(('SET', 'a', 1), ('GET', 'a')) == [True, b'1']


def test_an_outcome_whose_message_a_peer_took_back_is_not_written(producer):
    """The fence on the ack (delivery.ACK_IF_HELD): while the body runs, a
    peer that presumed this consumer dead puts its message back in the
    queue; the outcome is then written nowhere, in the same write as the
    ack (the message stays where the peer put it)."""
    import multiprocessing

    from huey_worker import config
    from huey_worker.worker import Slot, StopFlag, Worker
    app, storage = producer, producer.storage
    stop = StopFlag()

    @app.task(name='test_worker_fastpath.taken_back')
    def taken_back():
        conn = storage.conn
        for key in conn.scan_iter(storage.keys.prefix + 'inflight:*'):
            while conn.rpoplpush(key, storage.queue_key):
                pass
        stop.set()   # this worker takes nothing after it
        return 'stale'

    result = taken_back()
    slot = multiprocessing.RawArray(Slot, 1)[0]
    Worker(app, config.load(), 0, slot, stop, 'fence-test', False,
           'one').run()
    assert storage.conn.exists(storage.result_key(result.id)) == 0
    assert [app.deserialize_task(m).id for m in storage.enqueued_items()] \
        == [result.id]
    assert slot.done == 0 and slot.failed == 0
