"""The preflight of Redis (issue 16): an evicting maxmemory-policy refused
by every daemon (78) unless allowed, also when Redis comes up after the
daemon; persistence off a warning; /health degraded near maxmemory and not
ready when the policy changes while running; /metrics.  Each test runs
its own redis-server, never the session's or the machine's."""
import logging
import os
import re
import signal
import subprocess
import sys
import time

import pytest
import redis

from redis5_build import redis5_binary
from huey_worker import preflight
from huey_worker.devredis import find_redis_server, free_port
from huey_worker.exitcodes import EX_CONFIG
from ops_helpers import Client, start_status_server, wait_until

pytestmark = pytest.mark.timeout(180)

DAEMONS = (['consumer', '--workers', '1'], ['scheduler'],
           ['status-server', '--port', '0'])
# Where tests/test_redis5.py builds Redis 5.0.6.


class OwnRedis:
    """A redis-server of this test's own, on `port`, with extra args."""

    def __init__(self, directory, port=None, binary=None):
        self.directory, self.port = str(directory), port or free_port()
        self.binary = binary or find_redis_server()
        self.proc = None

    def start(self, *args):
        os.makedirs(self.directory, exist_ok=True)
        self.proc = subprocess.Popen(
            [self.binary, '--port', str(self.port), '--bind', '127.0.0.1',
             '--dir', self.directory, '--save', '', '--appendonly', 'yes',
             '--maxmemory', '64mb', '--logfile',
             os.path.join(self.directory, 'redis.log')] + list(args),
            stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL, start_new_session=True)
        client = self.client()
        wait_until(lambda: _pings(client), what='redis-server to answer')
        return self

    def client(self):
        return redis.Redis(host='127.0.0.1', port=self.port, protocol=2,
                           socket_connect_timeout=0.5)

    @property
    def url(self):
        return 'redis://127.0.0.1:%d/0' % self.port

    def stop(self):
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            self.proc.wait(10)


def _pings(client):
    try:
        return client.ping()
    except redis.exceptions.RedisError:
        return False


@pytest.fixture
def own_redis(tmp_path):
    servers = []

    def make(*args, port=None, binary=None, start=True):
        server = OwnRedis(tmp_path / ('redis-%d' % len(servers)), port,
                          binary)
        servers.append(server)
        return server.start(*args) if start else server
    yield make
    for server in servers:
        server.stop()


def env_for(base_env, server, **settings):
    env = dict(base_env, HUEY_REDIS_URL=server.url if hasattr(
        server, 'url') else server)
    for name, value in settings.items():
        env['HUEY_WORKER_REDIS_%s' % name.upper()] = value
    return env


@pytest.mark.parametrize('args', DAEMONS, ids=lambda a: a[0])
def test_each_daemon_refuses_an_evicting_redis(own_redis, base_env,
                                               start_daemon, args):
    server = own_redis('--maxmemory-policy', 'allkeys-lru')
    daemon = start_daemon(args, env_for(base_env, server))
    assert daemon.wait(60) == EX_CONFIG
    out = daemon.output()
    assert 'config error' in out and '[redis] allow_eviction' in out
    assert 'maxmemory-policy allkeys-lru' in out
    assert 'queued tasks included, which are then lost' in out
    assert 'noeviction' in out


def test_a_volatile_policy_is_refused_naming_what_it_deletes(
        own_redis, base_env, start_daemon):
    server = own_redis('--maxmemory-policy', 'volatile-ttl')
    daemon = start_daemon(['scheduler'], env_for(base_env, server))
    assert daemon.wait(60) == EX_CONFIG
    out = daemon.output()
    assert 'maxmemory-policy volatile-ttl' in out
    assert 'consumer heartbeats' in out and "scheduler's lease" in out


@pytest.mark.parametrize('args', DAEMONS[:2], ids=lambda a: a[0])
def test_a_redis_without_time_is_refused(own_redis, base_env, start_daemon,
                                         args):
    """A managed Redis that renamed TIME away: the daemons that go by
    Redis's clock refuse it (78) naming TIME, rather than wait for it as
    for an outage forever."""
    server = own_redis('--rename-command', 'TIME', '')
    daemon = start_daemon(args, env_for(base_env, server))
    assert daemon.wait(60) == EX_CONFIG
    out = daemon.output()
    assert 'config error' in out and 'Redis refuses TIME' in out


@pytest.mark.parametrize('args', DAEMONS, ids=lambda a: a[0])
def test_redis_down_at_start_waits_then_refuses_when_it_answers(
        own_redis, base_env, start_daemon, args):
    server = own_redis(start=False)
    daemon = start_daemon(args, env_for(base_env, server))
    word = 'checked once it answers' if args[0] == 'status-server' \
        else 'unreachable'
    daemon.wait_for_output(word)
    time.sleep(1)   # backing off, not exiting
    assert daemon.proc.poll() is None
    server.start('--maxmemory-policy', 'allkeys-random')
    assert daemon.wait(60) == EX_CONFIG
    assert 'maxmemory-policy allkeys-random' in daemon.output()


def test_an_allowed_eviction_policy_starts_with_a_warning(
        own_redis, base_env, start_daemon):
    server = own_redis('--maxmemory-policy', 'allkeys-lru')
    consumer = start_daemon(['consumer', '--workers', '1'],
                            env_for(base_env, server, allow_eviction='true'))
    consumer.wait_for_output('consumer ready')
    assert 'allowed by [redis] allow_eviction' in consumer.output()
    status, port = start_status_server(
        start_daemon, env_for(base_env, server, allow_eviction='true'))
    code, body = wait_until(lambda: _ready(port), what='/health ready')
    assert code == 200 and body['status'] == 'ok'
    assert body['checks']['redis']['eviction'] == {'ok': True,
                                                   'allowed': True}
    assert any('allkeys-lru' in w for w in body['warnings'])


def _ready(port):
    code, body = Client(port).get('/health')
    return (code, body) if body['checks'].get('queues', {}) and all(
        q['consumers']['ok'] for q in body['checks']['queues'].values()) \
        else None


def test_persistence_off_is_a_warning(own_redis, base_env, start_daemon):
    server = own_redis('--appendonly', 'no')
    consumer = start_daemon(['consumer', '--workers', '1'],
                            env_for(base_env, server))
    consumer.wait_for_output('consumer ready')
    assert 'Redis keeps nothing on disk' in consumer.output()
    _, port = start_status_server(start_daemon, env_for(base_env, server))
    code, body = wait_until(lambda: _ready(port), what='/health ready')
    assert code == 200 and body['ready'] is True
    assert body['checks']['redis']['persistence'] == {
        'ok': False, 'aof': False, 'rdb': False}
    assert any('keeps nothing on disk' in w for w in body['warnings'])
    metrics = Client(port).request('GET', '/metrics')[2].decode()
    assert 'huey_worker_redis_persistence{kind="aof"} 0.0' in metrics
    assert 'huey_worker_redis_persistence{kind="rdb"} 0.0' in metrics
    # `huey-worker status` shows the warning, and stays healthy (exit 0).
    status = subprocess.run(
        [sys.executable, '-m', 'huey_worker', 'status'],
        env=env_for(base_env, server), capture_output=True, text=True,
        timeout=60)
    assert status.returncode == 0, status.stderr
    assert re.search(r'^  ! .*keeps nothing on disk', status.stdout, re.M), \
        status.stdout


def test_health_degraded_near_maxmemory_then_ok_again(
        own_redis, base_env, start_daemon):
    server = own_redis('--maxmemory', '16mb')
    env = env_for(base_env, server, memory_warning_ratio='0.5')
    consumer = start_daemon(['consumer', '--workers', '1'], env)
    consumer.wait_for_output('consumer ready')
    _, port = start_status_server(start_daemon, env)
    code, body = wait_until(lambda: _ready(port), what='/health ready')
    assert body['status'] == 'ok' and body['checks']['redis']['memory'][
        'ok'] is True
    client = server.client()
    blob = b'x' * 65536
    n = 0
    while True:   # fill to between 60% and 80% of maxmemory
        info = client.info('memory')
        if info['used_memory'] >= 0.6 * info['maxmemory']:
            break
        client.set('filler:%d' % n, blob)
        n += 1
    assert info['used_memory'] < 0.8 * info['maxmemory']
    code, body = Client(port).get('/health')
    assert (code, body['status'], body['ready']) == (200, 'degraded', True)
    memory = body['checks']['redis']['memory']
    assert memory['ok'] is False and memory['threshold'] == 0.5
    assert 0.5 <= memory['ratio'] < 0.8
    assert any('memory_warning_ratio' in w for w in body['warnings'])
    client.delete(*['filler:%d' % i for i in range(n)])
    code, body = Client(port).get('/health')
    assert (code, body['status']) == (200, 'ok')


def test_health_names_a_master_that_refuses_writes_for_want_of_replicas(
        own_redis, base_env, start_daemon):
    """min-replicas-to-write with no replica in sync (an old primary left
    alone after a failover): every write is refused with NOREPLICAS, and
    /health says so instead of blaming the consumers."""
    server = own_redis('--min-replicas-to-write', '1',
                       '--min-replicas-max-lag', '10')
    env = env_for(base_env, server)
    _, port = start_status_server(start_daemon, env)
    code, body = wait_until(
        lambda: (lambda r: r if r[1] and not r[1]['checks']['redis'].get(
            'ok', True) else None)(Client(port).get('/health')),
        what='/health naming the refusal')
    assert code == 503, body
    assert body['checks']['redis']['error'].startswith('NOREPLICAS'), body
    assert any('NOREPLICAS' in r for r in body['reasons']), body
    # With the setting gone the same Redis takes writes: no refusal.
    server.client().config_set('min-replicas-to-write', 0)
    code, body = Client(port).get('/health')
    assert body['checks']['redis'].get('ok') is True, body


def test_policy_changed_while_running(own_redis, base_env, start_daemon):
    server = own_redis()
    env = env_for(base_env, server)
    consumer = start_daemon(['consumer', '--workers', '1'], env)
    consumer.wait_for_output('consumer ready')
    _, port = start_status_server(start_daemon, env)
    code, body = wait_until(lambda: _ready(port), what='/health ready')
    assert code == 200 and body['status'] == 'ok'
    assert body['checks']['redis']['maxmemory_policy'] == 'noeviction'
    metrics = Client(port).request('GET', '/metrics')[2].decode()
    assert 'huey_worker_redis_evicting_policy 0.0' in metrics

    server.client().config_set('maxmemory-policy', 'allkeys-lru')
    code, body = Client(port).get('/health')
    assert (code, body['status'], body['ready']) == (503, 'unhealthy', False)
    assert body['checks']['redis']['ok'] is True   # it answers
    assert body['checks']['redis']['eviction'] == {'ok': False,
                                                   'allowed': False}
    assert any('maxmemory-policy allkeys-lru' in r for r in body['reasons'])
    metrics = Client(port).request('GET', '/metrics')[2].decode()
    assert 'huey_worker_redis_evicting_policy 1.0' in metrics
    assert 'huey_worker_redis_maxmemory_policy_info{policy="allkeys-lru"} ' \
        '1.0' in metrics
    # Running daemons go on (a task may be mid-way); a restart is refused.
    assert consumer.proc.poll() is None
    consumer.signal(signal.SIGTERM)
    assert consumer.wait(60) == 0
    again = start_daemon(['consumer', '--workers', '1'], env)
    assert again.wait(60) == EX_CONFIG


def test_daemons_log_a_change_once(own_redis, tmp_path, caplog):
    from task_helpers import make_cfg
    server = own_redis()
    cfg = make_cfg(tmp_path, redis__url=server.url)
    pool = redis.ConnectionPool.from_url(server.url, protocol=2)
    check = preflight.Preflight(cfg, pool, 'consumer')
    assert check.at_start() and check.problems == {}
    client = server.client()
    caplog.set_level(logging.INFO, logger='huey_worker.redis')

    def recheck():
        check.next_check = 0.0   # due now, not RECHECK_INTERVAL later
        check.recheck()
    client.config_set('maxmemory-policy', 'allkeys-lfu')
    recheck()
    recheck()
    errors = [r for r in caplog.records if r.levelno == logging.ERROR]
    assert len(errors) == 1 and 'allkeys-lfu' in errors[0].getMessage()
    client.config_set('maxmemory-policy', 'noeviction')
    recheck()
    recheck()
    fine = [r for r in caplog.records if 'fine again' in r.getMessage()]
    assert len(fine) == 1
    server.stop()
    recheck()   # Redis gone: nothing raised, nothing logged
    assert len(caplog.records) == 2
    pool.disconnect()


def _binaries():
    # Redis 5 is built on first use (tests/redis5_build.py): a system test.
    return [pytest.param(find_redis_server, id='system'),
            pytest.param(redis5_binary, id='redis5', marks=pytest.mark.slow)]


@pytest.mark.parametrize('server_binary', _binaries())
def test_info_fields_on_each_redis_and_without_config(own_redis,
                                                      server_binary):
    binary = server_binary()
    server = own_redis('--maxmemory-policy', 'volatile-lru',
                       '--appendonly', 'no', binary=binary)
    pool = redis.ConnectionPool.from_url(server.url, protocol=2)
    state = preflight.redis_state(pool)
    assert state['policy'] == 'volatile-lru'
    assert state['maxmemory'] == 64 << 20 and state['used_memory'] > 0
    assert (state['aof'], state['rdb']) == (False, False)
    server.client().config_set('save', '900 1')
    assert preflight.redis_state(pool)['rdb'] is True
    pool.disconnect()
    # A managed Redis: CONFIG renamed away.  INFO still tells the policy
    # and AOF; RDB cannot be told (no warning then).
    managed = own_redis('--rename-command', 'CONFIG', '""',
                        '--appendonly', 'no', binary=binary)
    pool = redis.ConnectionPool.from_url(managed.url, protocol=2)
    state = preflight.redis_state(pool)
    assert state['policy'] == 'noeviction' and state['rdb'] is None
    assert preflight.persistence_off(state) is False
    pool.disconnect()

