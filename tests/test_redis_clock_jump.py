"""A failover to a replica whose host clock is ahead of the primary's
(NTP broken on one Redis host; the replica runs under tests/skew_clock.c,
an LD_PRELOAD shim that moves its wall clock, as Linux time namespaces do
not).  Heartbeat keys expire at an absolute time by Redis's clock, so on
the new primary they all run out at once: live consumers must not be
taken for dead, nor their running tasks put back and run twice.  The
primary is killed (a manual failover would add its own window, in which
the old primary takes acks that are then lost).  One consumer is paused
(SIGSTOP) across the failover, well within recovery_timeout, so that the
other beats first on the new primary (both at once would hide the
fault).  About 25 s."""
import os
import shutil
import signal
import subprocess

import pytest
import redis

from huey_worker.devredis import find_redis_server, free_port
from test_multihost import producer_app
from test_preflight import OwnRedis, _pings, wait_until

pytestmark = [pytest.mark.slow,
              pytest.mark.skipif(shutil.which('gcc') is None,
                                 reason='needs gcc for the clock shim')]

SKEW = 30
RECOVERY_TIMEOUT = 10


def skew_shim(tmp_path):
    path = str(tmp_path / 'skew_clock.so')
    subprocess.run(['gcc', '-shared', '-fPIC', '-o', path, os.path.join(
        os.path.dirname(__file__), 'skew_clock.c'), '-ldl'], check=True)
    return path


def test_failover_to_a_replica_whose_clock_is_ahead(
        tmp_path, base_env, start_daemon, monkeypatch):
    import delivery_tasks
    primary = OwnRedis(tmp_path / 'primary').start()
    shim = skew_shim(tmp_path)
    replica_port = free_port()
    replica = subprocess.Popen(
        [find_redis_server(), '--port', str(replica_port), '--bind',
         '127.0.0.1', '--save', '', '--dir', str(tmp_path), '--replicaof',
         '127.0.0.1', str(primary.port)],
        env=dict(os.environ, LD_PRELOAD=shim, SKEW_SECONDS=str(SKEW)),
        stdout=subprocess.DEVNULL, start_new_session=True)
    sentinel = None
    try:
        replica_client = redis.Redis('127.0.0.1', replica_port, protocol=2)
        wait_until(lambda: _pings(replica_client) and replica_client.info(
            'replication').get('master_link_status') == 'up',
            what='replica in sync')
        assert replica_client.time()[0] - primary.client().time()[0] >= \
            SKEW - 1, 'the shim did not move the replica\'s clock'
        sentinel_port = free_port()
        conf = tmp_path / 'sentinel.conf'
        conf.write_text('port %d\nbind 127.0.0.1\ndir %s\n'
                        'sentinel monitor mymaster 127.0.0.1 %d 1\n'
                        'sentinel down-after-milliseconds mymaster 1000\n'
                        % (sentinel_port, tmp_path, primary.port))
        sentinel = subprocess.Popen(
            [find_redis_server(), str(conf), '--sentinel'],
            stdout=subprocess.DEVNULL, start_new_session=True)
        sentinel_client = redis.Redis('127.0.0.1', sentinel_port, protocol=2)
        wait_until(lambda: _pings(sentinel_client) and sentinel_client.
                   execute_command('SENTINEL', 'replicas', 'mymaster'),
                   what='sentinel knowing the replica')
        redis_env = {'REDIS_SENTINELS': '127.0.0.1:%d' % sentinel_port}
        env = dict(base_env, **redis_env)
        del env['HUEY_REDIS_URL']
        env.update({'HUEY_MODULES': 'sample_tasks,delivery_tasks',
                    'HUEY_WORKER_DELIVERY_HEARTBEAT_INTERVAL': '0.5',
                    'HUEY_WORKER_DELIVERY_RECOVERY_TIMEOUT':
                        str(RECOVERY_TIMEOUT)})
        consumers = {name: start_daemon(['consumer', '--workers', '2'],
                                        dict(env, HUEY_CONSUMER_ID=name),
                                        name) for name in ('a', 'b')}
        wait_until(lambda: primary.client().zcard('hw:huey:consumers') == 2,
                   what='two consumers')
        producer_app(monkeypatch, tmp_path, redis_env)
        results = [delivery_tasks.slow_counted(12, 't%d' % i)
                   for i in range(4)]
        wait_until(lambda: primary.client().hlen('test:runs') == 4,
                   what='four tasks running, two on each consumer')
        consumers['b'].signal(signal.SIGSTOP)
        try:
            primary.proc.kill()
            primary.proc.wait()
            wait_until(lambda: replica_client.execute_command('ROLE')[0] ==
                       b'master', what='the replica promoted')
            promoted = replica_client.time()[0]
            wait_until(lambda: (replica_client.zscore(
                'hw:huey:consumers', 'a') or 0) > promoted,
                what='consumer a beating on the new primary')
        finally:
            consumers['b'].signal(signal.SIGCONT)
        for result in results:
            result.get(blocking=True, timeout=120)
        runs = replica_client.hgetall('test:runs')
        assert runs == {b't%d' % i: b'1' for i in range(4)}
    finally:
        for process in (sentinel, replica):
            if process is not None:
                process.kill()
                process.wait()
        primary.stop()
