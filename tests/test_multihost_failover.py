"""A Redis failover through Sentinel under load, on simulated hosts
(tests/multihost.py): a primary (r1), a replica (r2) and three sentinels;
two consumer hosts (thread workers on one, process workers on the other),
each with a scheduler, a status endpoint on the first, and a producer in
the root namespace.  The primary is killed (SIGKILL) halfway through the
enqueues, then comes back as a replica of the new primary, as a restarted
redis-server reconfigured by Sentinel would.

Nothing is restarted but the primary: every daemon and the producer must
find the new primary through Sentinel themselves.  Replication is
asynchronous, so an enqueue acknowledged just before the kill can vanish:
measured without [redis] durable_writes, none lost with it (asserted).

Printed with pytest -s, and in docs/delivery.md "Across hosts": tasks,
failovers, lost, runs twice against tasks in flight at the fault, times
from the kill.  Only outcomes are asserted, never a duration."""
import itertools
import json
import signal
import threading
import time

import pytest
import redis

import multihost
from multihost import wait_for
from test_multihost import daemon_env, producer_app, report
# Slow, and skipped where namespaces cannot be made, as its neighbour.
from test_multihost import pytestmark  # noqa: F401

TASKS = 160
WORKERS = 3
STATUS_PORT = 8470
INFLIGHT = 'hw:huey:inflight:*'
# Every message in every in-flight list, read in one step.
HELD = ("local out = {} for _, key in ipairs(redis.call('KEYS', ARGV[1])) "
        "do for _, m in ipairs(redis.call('LRANGE', key, 0, -1)) do "
        "out[#out + 1] = m end end return out")


def held_now(client):
    """The messages in flight on `client`'s Redis, as one set."""
    return set(client.eval(HELD, 0, INFLIGHT))


def sentinel_client(address):
    """A client of the sentinel at 'host:port'."""
    host, port = address.rsplit(':', 1)
    return redis.Redis(host, int(port), socket_timeout=2)


def master_named_by(sentinel):
    """(host, port) the sentinel at 'host:port' names as primary, or None."""
    try:
        addr = sentinel_client(sentinel).execute_command(
            'SENTINEL', 'get-master-addr-by-name', 'mymaster')
    except redis.exceptions.RedisError:
        return None
    return tuple(a.decode() for a in addr) if addr else None


def queue_readers(client, address):
    """How many connections from `address` wait in a queue read on
    `client`'s Redis: a consumer's idle workers, each on its own."""
    return sum(1 for c in client.client_list()
               if c['addr'].rsplit(':', 1)[0] == address and
               c['cmd'] == 'brpoplpush')


def role(client):
    try:
        return client.execute_command('ROLE')[0].decode()
    except redis.exceptions.RedisError:
        return None


class Producer(threading.Thread):
    """Enqueues chaos_unit(i) for each i of `indexes` in order, `pause`
    seconds apart, until `stop` is set, as a web app would: an enqueue
    that raises was not acknowledged and is sent again.  `acked`: the
    indexes acknowledged; `in_doubt`: enqueues that raised after being
    sent (each may have landed as well as its retry: a duplicate the
    consumers cannot prevent)."""

    def __init__(self, indexes=range(TASKS), pause=0.01):
        super().__init__(daemon=True)
        self.indexes, self.pause = indexes, pause
        self.stop = threading.Event()
        self.acked, self.refused, self.in_doubt = [], 0, 0
        self.back_at = None   # monotonic time of the first ack after a refusal

    def run(self):
        import delivery_tasks
        for i in self.indexes:
            if self.stop.is_set():
                break
            failed = False
            while True:
                try:
                    delivery_tasks.chaos_unit(i)
                    break
                except Exception:
                    self.refused += 1
                    failed = True
                    time.sleep(0.1)
            self.in_doubt += failed
            if failed and self.back_at is None:
                self.back_at = time.monotonic()
            self.acked.append(i)
            time.sleep(self.pause)


def drained(client, marker):
    """The runs {index: count} recorded on `client`'s Redis once nothing
    is queued, scheduled or in flight there and the delayed task `marker`
    has run; else None."""
    runs = client.hgetall('test:chaos-runs')
    busy = client.llen('huey.redis.huey') or \
        client.zcard('huey.schedule.huey') or held_now(client)
    if busy or b'%d' % marker not in runs:
        return None
    return {int(k): int(v) for k, v in runs.items()}


def health(host):
    """GET /health of the status endpoint on `host`: (status, body)."""
    status, body = multihost.http_get(host, STATUS_PORT, '/health')
    return status, json.loads(body) if body else None


def following(client, hosts, since):
    """Every daemon works on `client`'s Redis, the primary since the
    wall-clock time `since`: each consumer heartbeats there, its workers
    wait in their queue reads there (thread and process workers alike),
    the status endpoint answers healthy from it (the old primary would
    answer READONLY), and no daemon died or raised."""
    wait_for(lambda: all((client.zscore('hw:huey:consumers', n) or 0) >
                         since for n in hosts), 30,
             'consumers heartbeating on the new primary')
    for host in hosts.values():
        wait_for(lambda: queue_readers(client, host.address) == WORKERS, 30,
                 '%s\'s workers reading the queue on the new primary' %
                 host.name)
    status, body = wait_for(
        lambda: (lambda h: h if h[0] == 200 else None)(health(hosts['a'])),
        30, 'status endpoint healthy on the new primary')
    assert body['checks']['redis']['ok'], body
    for host in hosts.values():
        for process in host.processes:
            assert process.alive(), process.output()[-2000:]
            assert 'Traceback' not in process.output(), \
                process.output()[-4000:]


@pytest.mark.parametrize('durable', [0.0, 1.0], ids=['async', 'durable'])
def test_redis_failover_through_sentinel(tmp_path, monkeypatch, durable):
    import delivery_tasks
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
        hosts = {'a': cluster.host('a'), 'b': cluster.host('b')}
        for name, kind in (('a', 'thread'), ('b', 'process')):
            env = daemon_env(tmp_path, redis_env, name)
            hosts[name].daemon(['consumer', '--workers', str(WORKERS),
                                '--worker-type', kind], env, 'consumer')
            hosts[name].daemon(['scheduler'], env, 'scheduler')
        hosts['a'].daemon(['status-server', '--port', str(STATUS_PORT)],
                          daemon_env(tmp_path, redis_env, 'a'), 'status')
        producer_app(monkeypatch, tmp_path, redis_env)
        wait_for(lambda: primary_client.zcard('hw:huey:consumers') == 2, 30,
                 'two consumers registered')
        wait_for(lambda: health(hosts['a'])[0] == 200, 30,
                 'status endpoint healthy')

        producer = Producer()
        producer.start()
        wait_for(lambda: len(producer.acked) >= TASKS // 2, 60,
                 'half the tasks enqueued')
        exposed = held_now(primary_client)
        primary.signal(signal.SIGKILL)
        killed_at, killed_wall = time.monotonic(), time.time()
        # What the replica holds is what the new primary starts from.
        exposed |= held_now(replica_client)
        ran_before = replica_client.hlen('test:chaos-runs')

        wait_for(lambda: master_named_by(sentinels[2]) == (r2.address,
                                                           '6379'),
                 30, 'sentinels naming r2 the primary')
        failover_s = time.monotonic() - killed_at
        wait_for(lambda: role(replica_client) == 'master', 30,
                 'r2 promoted')
        # The killed primary restarts, as systemd would, and follows the
        # new one (durable_writes waits for a replica to confirm).
        r1.redis_server(replica_of=(r2.address, 6379))
        wait_for(lambda: replica_client.hlen('test:chaos-runs') > ran_before,
                 30, 'a task run on the new primary')
        workers_back_s = time.monotonic() - killed_at
        producer.join(120)
        assert not producer.is_alive()

        # Delayed: only a scheduler on the new primary makes it due.
        delivery_tasks.chaos_unit.schedule(args=(TASKS,), delay=1)
        wait_for(lambda: drained(replica_client, TASKS), 60,
                 'queue drained on the new primary')
        time.sleep(2)   # room for a straggler's recovery and run
        runs = drained(replica_client, TASKS)
        runs.pop(TASKS)
        lost = [i for i in producer.acked if i not in runs]
        duplicates = sum(v - 1 for v in runs.values())

        mode = 'durable' if durable else 'async'
        report('failover-%s' % mode, tasks=len(producer.acked),
               failovers=1, lost=len(lost), in_flight_at_fault=len(exposed),
               duplicates=duplicates, enqueues_in_doubt=producer.in_doubt,
               refused_enqueues=producer.refused,
               failover_s='%.1f' % failover_s,
               producer_back_s='%.1f' % (producer.back_at - killed_at
                                         if producer.back_at else 0),
               workers_back_s='%.1f' % workers_back_s)
        if durable:
            assert lost == []
        assert duplicates <= len(exposed) + producer.in_doubt
        following(replica_client, hosts, killed_wall)

        # Second: the new primary demoted while alive (a manual failover)
        # under load.  Sentinel promotes r1 at once but reconfigures r2
        # only some seconds later: until then r2 takes the writes of the
        # connections still open to it, and drops them when it syncs from
        # r1.  Without durable_writes those enqueues were acknowledged and
        # are lost; with it no replica confirms them, so none is.
        wait_for(lambda: primary_client.info('replication').get(
            'master_link_status') == 'up', 20, 'r1 in sync with r2')
        second = Producer(itertools.count(TASKS + 1), pause=0.05)
        second.start()
        wait_for(lambda: len(second.acked) >= 5, 30, 'enqueues resumed')
        switched_at, switched_wall = time.monotonic(), time.time()
        sentinel_client(sentinels[0]).execute_command(
            'SENTINEL', 'FAILOVER', 'mymaster')
        wait_for(lambda: master_named_by(sentinels[2]) == (r1.address,
                                                           '6379'),
                 30, 'sentinels naming r1 the primary again')
        wait_for(lambda: role(replica_client) == 'slave', 30,
                 'Sentinel demoting r2')
        window_s = time.monotonic() - switched_at
        time.sleep(1)   # enqueues acknowledged by r1 as well
        second.stop.set()
        second.join(30)
        assert not second.is_alive()

        marker = -1
        delivery_tasks.chaos_unit.schedule(args=(marker,), delay=1)
        wait_for(lambda: drained(primary_client, marker), 60,
                 'queue drained on r1')
        time.sleep(2)   # room for a straggler's recovery and run
        runs = drained(primary_client, marker)
        lost = [i for i in second.acked if i not in runs]
        duplicates = sum(v - 1 for i, v in runs.items() if i > TASKS)
        report('demotion-%s' % mode, tasks=len(second.acked), lost=len(lost),
               duplicates=duplicates, enqueues_in_doubt=second.in_doubt,
               refused_enqueues=second.refused, window_s='%.1f' % window_s)
        if durable:
            assert lost == [], lost
        # Sentinel demotes r2 with CLIENT KILL TYPE normal: the daemons
        # see their connections closed, not READONLY, and ask Sentinel.
        following(primary_client, hosts, switched_wall)
