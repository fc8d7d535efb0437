"""Redis that answers but will not serve (issue 13 §1): a read-only replica
(READONLY, the old master after a failover) or a replica without its
master (MASTERDOWN) is Redis unavailable for every daemon: one log line,
backoff, STATUS and health say so, never an exit.  And the reconnect
backoff draws its waits with full jitter (issue 15).

Each test that demotes Redis does it on a private redis-server of its own
(REPLICAOF a port nobody listens on), never the session's."""
import os
import signal
import subprocess
import sys

import pytest
import redis

from ops_helpers import delivery_env, wait_until
from task_helpers import make_cfg
from huey_worker import redisconn
from huey_worker.devredis import EmbeddedRedis

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture
def own_redis(tmp_path):
    server = EmbeddedRedis(str(tmp_path / 'own-redis'), persist=False)
    server.start()
    yield server
    server.cleanup()


def demote(server, masterdown=False):
    """Make `server` a replica of a master that never answers (port 1),
    as the old master is after a failover; with `masterdown`, one that
    serves no stale data either (every read: MASTERDOWN)."""
    with server.client() as admin:
        if masterdown:
            admin.config_set('replica-serve-stale-data', 'no')
        admin.replicaof('127.0.0.1', 1)


def promote(server):
    with server.client() as admin:
        admin.replicaof('NO', 'ONE')
        admin.config_set('replica-serve-stale-data', 'yes')


def cli(env, *args):
    return subprocess.run([sys.executable, '-m', 'huey_worker'] + list(args),
                          env=env, cwd=ROOT, capture_output=True, text=True,
                          timeout=120)


def test_redis_error_replies_are_told_apart(own_redis):
    """unavailable(): the states that pass (replica, no master) against a
    reply refusing one command, from a real server's answers."""
    client = own_redis.client()
    client.set('text', 'v')
    with pytest.raises(redis.exceptions.ResponseError) as wrong:
        client.lpush('text', 1)
    assert not redisconn.unavailable(wrong.value)
    with pytest.raises(redis.exceptions.ConnectionError) as lost:
        redis.Redis(port=1, socket_connect_timeout=1).ping()
    assert redisconn.unavailable(lost.value)
    assert redisconn.outage_word(lost.value) == 'unreachable'
    demote(own_redis)
    try:
        with pytest.raises(redis.exceptions.ResponseError) as readonly:
            client.set('text', 'w')
        assert redisconn.unavailable(readonly.value)
        assert redisconn.outage_word(readonly.value) == 'unavailable'
        pipe = client.pipeline(transaction=True)
        pipe.set('a', 1).lpush('b', 2)
        with pytest.raises(redis.exceptions.ResponseError) as in_pipe:
            pipe.execute()
        assert redisconn.unavailable(in_pipe.value), in_pipe.value
        client.config_set('replica-serve-stale-data', 'no')
        with pytest.raises(redis.exceptions.ResponseError) as down:
            client.get('text')
        assert redisconn.unavailable(down.value), down.value
    finally:
        promote(own_redis)
    assert client.get('text') == b'v'


@pytest.mark.slow
@pytest.mark.parametrize('state', ['readonly', 'masterdown'])
def test_every_daemon_waits_out_a_replica(base_env, start_daemon, own_redis,
                                          state):
    env = delivery_env(base_env, HUEY_REDIS_URL=own_redis.url,
                       HUEY_WORKER_REDIS_RETRY_MAX_DELAY='0.5')
    consumer = start_daemon(['consumer', '--workers', '2'], env, 'consumer')
    scheduler = start_daemon(['scheduler'], env, 'scheduler')
    consumer.wait_for_output('consumer ready')
    scheduler.wait_for_output('scheduler ready')

    demote(own_redis, masterdown=state == 'masterdown')
    # The heartbeat and the workers' queue reads meet the refusal.
    consumer.wait_for_output('Redis unavailable at')
    consumer.wait_for_output('Worker-0: Redis unavailable')
    scheduler.wait_for_output('Redis unavailable at')
    # A start meanwhile (its requeue script is refused) waits too.
    late = start_daemon(['consumer', '--workers', '1'],
                        dict(env, HUEY_WORKER_INSTANCE='late'), 'late')
    late.wait_for_output('Redis unavailable at')
    status = cli(env, 'status')
    assert status.returncode == 69, (status.stdout, status.stderr)
    assert ('READONLY' if state == 'readonly' else 'MASTERDOWN') in \
        status.stderr, status.stderr
    for daemon in (consumer, scheduler, late):
        assert daemon.proc.poll() is None, daemon.output()

    promote(own_redis)
    for daemon in (consumer, scheduler, late):
        daemon.wait_for_output('Redis reachable again')
    late.wait_for_output('consumer ready')
    # A task enqueued afterwards runs (as a producer would enqueue it).
    import sample_tasks
    from huey_worker.app import huey
    task = sample_tasks.add.s(1, 2)
    with own_redis.client() as client:
        client.lpush('huey.redis.huey', huey.serialize_task(task))
    ended = 'end sample_tasks.add %s complete' % task.id
    wait_until(lambda: ended in consumer.output() + late.output(),
               timeout=60, what='the task run after the promotion')
    assert cli(env, 'status').returncode == 0
    for daemon in (consumer, scheduler, late):
        out = daemon.output()
        assert 'Traceback' not in out, out
        # One line per outage and daemon (and worker), not one per retry.
        assert out.count('Redis unavailable at') == 1, out
        daemon.signal(signal.SIGTERM)
        assert daemon.wait() == 0


# -- reconnect backoff: full jitter --------------------------------------------

def test_reconnect_waits_are_spread_with_full_jitter(tmp_path):
    """500 daemons (or worker threads) losing Redis at the same moment:
    the n-th wait of each is drawn from [0, ceiling_n], the ceilings
    doubling from 0.2 s up to [redis] retry_max_delay, so they do not come
    back in lock step."""
    cfg = make_cfg(tmp_path, redis__retry_max_delay=5)
    outages = [redisconn.RedisOutage(cfg) for _ in range(500)]
    lost = redis.exceptions.ConnectionError('Connection refused')
    for ceiling in (0.2, 0.4, 0.8, 1.6, 3.2, 5, 5, 5):
        for outage in outages:
            outage.failed(lost)
        waits = [outage.delay for outage in outages]
        assert all(0 <= w <= ceiling for w in waits), ceiling
        below_half = sum(w < ceiling / 2 for w in waits) / len(waits)
        assert 0.35 < below_half < 0.65, (ceiling, below_half)
        assert min(waits) < ceiling * 0.05 and max(waits) > ceiling * 0.95
    for outage in outages:
        outage.ok()
        outage.failed(lost)
    assert all(0 <= o.delay <= 0.2 for o in outages)


def test_backoff_draws_never_exceed_the_maximum():
    backoff = redisconn.Backoff(0.1, 2.0)
    waits = [backoff.next() for _ in range(2000)]
    assert max(waits) <= 2.0
    assert backoff.ceiling == 2.0
    tail = waits[10:]   # ceilings at the maximum by then
    assert 0.35 < sum(w < 1.0 for w in tail) / len(tail) < 0.65
    backoff.reset()
    assert backoff.next() <= 0.1


def test_a_refused_write_is_tried_five_times_in_all(monkeypatch):
    """retry_readonly: READONLY_TRIES tries, the waits between them drawn
    under 0.2, 0.4, 0.8 and 1.6 s; any other error at once; a write that
    goes through on a later try returns what it returns."""
    waits = []
    monkeypatch.setattr(redisconn.time, 'sleep', waits.append)
    refused = redis.exceptions.ReadOnlyError('READONLY replica')
    tries = []

    def always_refused():
        tries.append(1)
        raise refused
    with pytest.raises(redis.exceptions.ReadOnlyError):
        redisconn.retry_readonly(always_refused)
    assert len(tries) == redisconn.READONLY_TRIES == 5
    assert len(waits) == 4
    assert all(0 <= w <= c for w, c in zip(waits, (0.2, 0.4, 0.8, 1.6)))

    tries.clear()
    waits.clear()

    def third_time_lucky():
        tries.append(1)
        if len(tries) < 3:
            raise refused
        return 'OK'
    assert redisconn.retry_readonly(third_time_lucky) == 'OK'
    assert len(tries) == 3 and len(waits) == 2

    tries.clear()

    def lost():
        tries.append(1)
        raise redis.exceptions.ConnectionError('gone')
    with pytest.raises(redis.exceptions.ConnectionError):
        redisconn.retry_readonly(lost)
    assert len(tries) == 1
    assert redisconn.retry_readonly(lambda: 7) == 7
