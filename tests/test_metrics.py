"""The queue signals of /metrics (docs/status-endpoint.md): queue latency
from the journal's times (a suite producer's enqueue, a plain producer's
first sighting, a priority message), the paused gauge, Redis memory, a
bounded number of Redis commands per scrape whatever the queue holds, and
the whole set over real HTTP from consumers on two "hosts" (identities)
in process mode."""
import os
import time

import huey
import pytest
from prometheus_client.parser import text_string_to_metric_families

from ops_helpers import (Client, monitored, start_status_server,
                         wait_for_state, wait_until)

import sample_tasks


def families(app, now):
    from huey_worker.status import metrics
    return {f.name: f for f in metrics.queue_signals(app, now=now)}


def value(family, **labels):
    for s in family.samples:
        if s.labels == labels and s.name == family.name:
            return s.value
    return None


def latency(app, now, queue='huey'):
    return value(families(app, now)['huey_worker_queue_latency_seconds'],
                 queue=queue)


def test_latency_is_the_age_of_the_oldest_pending_task(producer):
    assert latency(producer, time.time()) == 0.0   # empty queue
    first = sample_tasks.add(1, 2)
    sample_tasks.add(3, 4)
    conn = producer.storage.conn
    enqueued = float(conn.hget(producer.storage.keys.task(first.id),
                               'enqueued'))
    assert latency(producer, enqueued + 100) == pytest.approx(100)
    # A redelivered task waits from its requeue, not from its enqueue.
    conn.hset(producer.storage.keys.task(first.id), 'requeued_at',
              enqueued + 40)
    assert latency(producer, enqueued + 100) == pytest.approx(60)


def test_latency_of_a_priority_message_waiting_behind_others(producer):
    low = sample_tasks.add(1, 1, priority=-5)
    time.sleep(0.01)
    sample_tasks.add(2, 2, priority=10)
    sample_tasks.add(3, 3)
    keys = producer.storage.keys
    enqueued = float(producer.storage.conn.hget(keys.task(low.id),
                                                'enqueued'))
    # The lowest priority's first message is the oldest here.
    assert latency(producer, enqueued + 30) == pytest.approx(30)


def test_plain_producers_task_is_timed_from_its_first_sighting(
        producer, redis_url):
    plain = huey.RedisHuey('huey', url=redis_url)
    result = plain.enqueue(plain.task()(sample_tasks.add.func).s(1, 2))
    conn = producer.storage.conn
    key = producer.storage.keys.task(result.id)
    assert not conn.exists(key)
    now = time.time()
    assert latency(producer, now) == 0.0
    # Recorded pending, first seen in the queue, so every endpoint and
    # every later scrape time it alike.
    assert conn.hget(key, 'first_seen_in') == b'queue'
    assert float(conn.hget(key, 'first_seen')) == pytest.approx(now)
    assert latency(producer, now + 25) == pytest.approx(25)


def test_paused_gauge_and_redis_memory(producer):
    conn = producer.storage.conn
    fams = families(producer, time.time())
    assert value(fams['huey_worker_queue_paused'], queue='huey') == 0
    conn.set('hw:huey:paused', '1')
    fams = families(producer, time.time())
    assert value(fams['huey_worker_queue_paused'], queue='huey') == 1
    from huey_worker.status.metrics import render_metrics
    body = render_metrics(producer)[0].decode()
    scraped = {s.name: s.value
               for f in text_string_to_metric_families(body)
               for s in f.samples}
    assert scraped['huey_worker_redis_memory_used_bytes'] > 0
    conn.config_set('maxmemory', 512 * 1024 * 1024)
    try:
        body = render_metrics(producer)[0].decode()
    finally:
        conn.config_set('maxmemory', 0)
    scraped = {s.name: s.value
               for f in text_string_to_metric_families(body)
               for s in f.samples}
    assert scraped['huey_worker_redis_memory_max_bytes'] == 512 * 1024 * 1024


def test_scrape_commands_do_not_grow_with_the_tasks(producer,
                                                    redis_server):
    from huey_worker.status.metrics import render_metrics
    conn = producer.storage.conn

    def commands_of_one_scrape():
        with monitored(redis_server, conn) as entries:
            render_metrics(producer)
        return [e['command'].split()[0].upper() for e in entries
                if not e['command'].startswith(('ECHO', 'PING'))
                and e.get('client_type') != 'lua'
                and 'lua' not in str(e.get('client_address', ''))]

    for i in range(3):
        sample_tasks.add(i, i)
    few = commands_of_one_scrape()
    pipe = conn.pipeline()
    for i in range(500):
        sample_tasks.add(i, i)
    pipe.execute()
    many = commands_of_one_scrape()
    assert few and len(many) == len(few), "\n%s\n%s" % (few, many)


@pytest.fixture
def env(base_env):
    return dict(base_env, HUEY_WORKER_DELIVERY_HEARTBEAT_INTERVAL='0.3',
                HUEY_WORKER_TYPE='process')


def scrape(client):
    status, headers, data = client.request('GET', '/metrics')
    assert status == 200
    out = {}
    for family in text_string_to_metric_families(data.decode()):
        for s in family.samples:
            out[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return out


def test_queue_signals_over_http_from_two_hosts_in_process_mode(
        producer, env, start_daemon, tmp_path):
    a = start_daemon(['consumer', '--workers', '1'],
                     dict(env, HUEY_WORKER_CONSUMER_IDENTITY='host-a:0'), 'a')
    b = start_daemon(['consumer', '--workers', '1'],
                     dict(env, HUEY_WORKER_CONSUMER_IDENTITY='host-b:0'), 'b')
    _, port = start_status_server(start_daemon, env)
    client = Client(port)
    a.wait_for_output('consumer ready')
    b.wait_for_output('consumer ready')
    gate = tmp_path / 'gate'
    held = [sample_tasks.progress_steps(2, str(gate)) for _ in range(2)]
    waiting = sample_tasks.add(1, 2)

    def both_busy():
        s = scrape(client)
        busy = [v for (n, labels), v in s.items()
                if n == 'huey_worker_workers' and ('state', 'busy') in labels]
        return s if sum(busy) == 2 else None
    s = wait_until(both_busy, what='both workers busy')
    assert s[('huey_worker_consumers_live', (('queue', 'huey'),))] == 2
    started = {dict(labels)['consumer'] for (n, labels) in s
               if n == 'huey_worker_consumer_started_timestamp_seconds'}
    assert started == {'host-a:0', 'host-b:0'}
    assert s[('huey_worker_queue_pending', (('queue', 'huey'),))] == 1
    enqueued = float(producer.storage.conn.hget(
        producer.storage.keys.task(waiting.id), 'enqueued'))
    # The endpoint's own clock: the age can only have grown since.
    before = time.time() - enqueued
    age = scrape(client)[('huey_worker_queue_latency_seconds',
                          (('queue', 'huey'),))]
    assert age >= before and age < before + 60
    gate.touch()
    for task in held + [waiting]:
        wait_for_state(producer, task.id, 'complete')
    steps = (('queue', 'huey'), ('task', 'sample_tasks.progress_steps'))
    # The counts are summed in each worker and sent within a second or
    # two (journal.counters).
    add = (('queue', 'huey'), ('task', 'sample_tasks.add'))

    completed = ('huey_worker_tasks_total', (('queue', 'huey'),
                                             ('state', 'complete'),
                                             ('task', 'sample_tasks.add')))

    def counted():
        # One scrape reads the outcome counts and the wait histograms in
        # two round trips: a flush of the counters may fall between.
        s = scrape(client)
        return s if s.get(('huey_worker_task_wait_seconds_count', steps)) \
            == 2 and s.get(('huey_worker_task_wait_seconds_count', add)) \
            == 1 and completed in s else None
    s = wait_until(counted, what='the wait times and outcomes counted')
    assert s[('huey_worker_queue_latency_seconds', (('queue', 'huey'),))] \
        == 0
    assert s[completed] == 1
    # The wait-time histogram: `waiting` waited at least as long as it was
    # seen pending above, at most the whole test.
    assert s[('huey_worker_task_wait_seconds_count', add)] == 1
    assert before <= s[('huey_worker_task_wait_seconds_sum', add)] < 120
    assert os.path.exists(gate)


def test_duration_sums_read_microseconds_and_the_earlier_float_field():
    """Sums are kept in whole microseconds (HINCRBY); a hash written by an
    earlier version holds a float `sum` too, and both add up."""
    from huey_worker.journal import reads
    raw = {b'app.add\t0.1': b'3', b'app.add\tsum_us': b'150000',
           b'app.add\tsum': b'0.25', b'app.other\tsum_us': b'1'}
    stats = reads.parse_duration_stats(raw)
    assert stats['app.add']['count'] == 3
    assert stats['app.add']['sum'] == pytest.approx(0.4)
    assert stats['app.other']['sum'] == pytest.approx(1e-6)


def test_counts_are_summed_and_sent_by_a_thread_of_the_process(
        redis_server):
    """journal.counters: what outcomes add is summed per (client, key,
    field) and sent as one HINCRBY each in one transaction, by a thread
    of the process every FLUSH_EVERY seconds; what Redis did not take is
    summed again, never sent twice."""
    import redis
    from huey_worker.journal import counters as module
    client = redis_server.client()
    client.delete('test:counts', 'test:held')
    counts = module.Counters()
    counts.add_many(client, [('test:counts', 'a\tcomplete', 1),
                             ('test:counts', 'a\tcomplete', 1),
                             ('test:counts', 'a\tsum_us', 250)],
                    expire=('test:held', 90))
    counts.add_many(client, [('test:held', '500000', 1)])
    assert counts._sender is not None and counts._sender.daemon
    wait_until(lambda: client.hget('test:counts', 'a\tcomplete') == b'2',
               what='the sender thread to send', timeout=5)
    assert client.hgetall('test:counts') == {b'a\tcomplete': b'2',
                                             b'a\tsum_us': b'250'}
    assert 0 < client.ttl('test:held') <= 90
    assert not counts
    # Redis refusing: summed again, sent once Redis takes it.
    dead = redis.Redis(port=1, socket_connect_timeout=0.2)
    counts.add_many(dead, [('test:counts', 'x', 5)])
    assert counts.flush() == 0
    assert counts._sums[dead] == {('test:counts', 'x'): 5}
    counts._sums.pop(dead)
    counts.add_many(client, [('test:counts', 'a\tcomplete', 3)])
    assert counts.flush() == 1
    assert client.hget('test:counts', 'a\tcomplete') == b'5'
    assert counts.flush() == 0
    counts._sender = None   # its thread ends at its next wake
    client.delete('test:counts', 'test:held')


def test_a_burst_is_counted_exactly(producer, base_env, start_daemon):
    """Tasks ending faster than once a second per worker: every outcome
    is counted, the last ones when the workers go idle."""
    consumer = start_daemon(['consumer', '--workers', '2',
                             '--worker-type', 'process'], base_env)
    consumer.wait_for_output('consumer ready')
    results = [sample_tasks.add(i, 1) for i in range(40)]
    for result in results:
        wait_for_state(producer, result.id, 'complete')
    conn, keys = producer.storage.conn, producer.keys
    field = 'sample_tasks.add\tcomplete'
    wait_until(lambda: int(conn.hget(keys.metrics_outcomes, field) or 0)
               == 40, what='40 outcomes counted')
    time.sleep(1.5)   # nothing more comes in
    assert int(conn.hget(keys.metrics_outcomes, field)) == 40
