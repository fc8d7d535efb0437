"""Every way the suite reaches Redis, each against a real redis-server:
password (the seeds' URL form and REDIS_PASSWORD), unix socket, TLS
(rediss:// with a CA file), and Sentinel."""
import os
import signal
import subprocess
import time

import pytest
import redis

from huey_worker.devredis import die_with_parent, find_redis_server, free_port


class Server:
    def __init__(self, directory, args, client_kwargs):
        os.makedirs(directory, exist_ok=True)
        self.directory = directory
        self.proc = subprocess.Popen(
            [find_redis_server()] + args + ['--dir', directory, '--save', '',
                                            '--appendonly', 'no'],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
            preexec_fn=die_with_parent)
        client = redis.Redis(socket_connect_timeout=0.3, protocol=2,
                             **client_kwargs)
        deadline = time.monotonic() + 15
        try:
            while True:
                try:
                    client.ping()
                    break
                except redis.exceptions.RedisError:
                    assert self.proc.poll() is None, 'redis-server exited'
                    assert time.monotonic() < deadline, \
                        'redis-server not ready'
                    time.sleep(0.05)
        except BaseException:
            self.stop()   # not handed to the fixture yet: stop it here
            raise
        self.client = client

    def stop(self):
        self.proc.terminate()
        self.proc.wait(10)


@pytest.fixture
def servers():
    started = []
    yield started
    for s in started:
        s.stop()


def run_one_task(start_daemon, base_env, client, **env):
    """Start a consumer with `env`, enqueue a task through `client`, and
    return its result as the consumer stored it."""
    import sample_tasks
    from huey_worker.app import huey
    full_env = dict(base_env)
    for name in ('HUEY_REDIS_URL',):
        full_env.pop(name, None)
    full_env.update(env)
    daemon = start_daemon(['consumer', '--workers', '1'], full_env)
    daemon.wait_for_output('consumer ready', 30)
    task = sample_tasks.add.s(20, 22)
    client.lpush('huey.redis.huey', huey.serialize_task(task))
    deadline = time.monotonic() + 20
    while not client.exists('huey.r.huey.' + task.id):
        assert time.monotonic() < deadline, daemon.output()
        time.sleep(0.05)
    value = huey.serializer.deserialize(client.get('huey.r.huey.' + task.id))
    daemon.signal(signal.SIGTERM)
    assert daemon.wait() == 0
    assert 'Traceback' not in daemon.output()
    return value, daemon.output()


def test_password_in_the_seed_url_form_and_in_redis_password(
        tmp_path, servers, base_env, start_daemon):
    port = free_port()
    server = Server(str(tmp_path / 'pw'), ['--port', str(port), '--bind',
                                           '127.0.0.1', '--requirepass',
                                           's3cret'],
                    {'port': port, 'password': 's3cret'})
    servers.append(server)
    value, out = run_one_task(start_daemon, base_env, server.client,
                              HUEY_REDIS_URL='redis://:s3cret@127.0.0.1:%d'
                              % port)
    assert value == 42
    assert 's3cret' not in out  # the URL is logged without its password
    assert 'redis://:***@127.0.0.1:%d' % port in out
    value, out = run_one_task(start_daemon, base_env, server.client,
                              REDIS_HOST='127.0.0.1', REDIS_PORT=str(port),
                              REDIS_PASSWORD='s3cret')
    assert value == 42 and 's3cret' not in out


def test_unix_socket(tmp_path, servers, base_env, start_daemon):
    sock = str(tmp_path / 'redis.sock')
    server = Server(str(tmp_path / 'unix'), ['--port', '0', '--unixsocket',
                                             sock, '--unixsocketperm', '700'],
                    {'unix_socket_path': sock})
    servers.append(server)
    value, _ = run_one_task(start_daemon, base_env, server.client,
                            HUEY_REDIS_URL='unix://%s' % sock)
    assert value == 42


def make_certificates(directory):
    def openssl(*args):
        subprocess.run(['openssl'] + list(args), check=True, cwd=directory,
                       capture_output=True)
    openssl('req', '-x509', '-newkey', 'rsa:2048', '-nodes', '-days', '2',
            '-subj', '/CN=test-ca', '-keyout', 'ca.key', '-out', 'ca.crt')
    openssl('req', '-newkey', 'rsa:2048', '-nodes', '-subj', '/CN=localhost',
            '-keyout', 'server.key', '-out', 'server.csr')
    with open(os.path.join(directory, 'san.ext'), 'w') as fh:
        fh.write('subjectAltName=DNS:localhost,IP:127.0.0.1\n')
    openssl('x509', '-req', '-in', 'server.csr', '-CA', 'ca.crt', '-CAkey',
            'ca.key', '-CAcreateserial', '-days', '2', '-out', 'server.crt',
            '-extfile', 'san.ext')
    return {name: os.path.join(directory, name)
            for name in ('ca.crt', 'server.crt', 'server.key')}


def test_tls_with_a_ca_file(tmp_path, servers, base_env, start_daemon):
    certs = make_certificates(str(tmp_path))
    port = free_port()
    server = Server(str(tmp_path / 'tls'), [
        '--port', '0', '--tls-port', str(port), '--bind', '127.0.0.1',
        '--tls-cert-file', certs['server.crt'], '--tls-key-file',
        certs['server.key'], '--tls-ca-cert-file', certs['ca.crt'],
        '--tls-auth-clients', 'no'],
        {'port': port, 'ssl': True, 'ssl_ca_certs': certs['ca.crt']})
    servers.append(server)
    value, _ = run_one_task(
        start_daemon, base_env, server.client,
        HUEY_REDIS_URL='rediss://127.0.0.1:%d/0' % port,
        HUEY_WORKER_REDIS_TLS_CA_FILE=certs['ca.crt'])
    assert value == 42


def master_and_sentinel(tmp_path, servers):
    """A redis-server and a sentinel watching it as 'mymaster': (master
    Server, the sentinel's port)."""
    port, sentinel_port = free_port(), free_port()
    master = Server(str(tmp_path / 'master'), ['--port', str(port), '--bind',
                                               '127.0.0.1'], {'port': port})
    servers.append(master)
    conf = tmp_path / 'sentinel.conf'
    conf.write_text('port %d\nbind 127.0.0.1\nsentinel monitor mymaster '
                    '127.0.0.1 %d 1\n' % (sentinel_port, port))
    servers.append(Server(str(tmp_path / 'sentinel'),
                          [str(conf), '--sentinel'], {'port': sentinel_port}))
    return master, sentinel_port


def test_sentinel_finds_the_master(tmp_path, servers, base_env,
                                   start_daemon):
    master, sentinel_port = master_and_sentinel(tmp_path, servers)
    value, out = run_one_task(
        start_daemon, base_env, master.client,
        REDIS_SENTINELS='127.0.0.1:%d' % sentinel_port,
        REDIS_SENTINEL_MASTER='mymaster')
    assert value == 42
    assert 'sentinel master mymaster via 127.0.0.1:%d' % sentinel_port in out


def test_a_sentinel_that_drops_connections_is_asked_once(tmp_path, servers):
    """A sentinel whose host is going down (here: a socket that accepts and
    closes) is tried once per lookup, then the next one is asked: redis-py
    by itself retries it 10 times with backoff, which for a paused host's
    sentinel first in the list kept every daemon and producer from the new
    primary for a minute or more after a failover."""
    import socket
    import threading
    from huey_worker import config, redisconn
    _, sentinel_port = master_and_sentinel(tmp_path, servers)
    dropper = socket.create_server(('127.0.0.1', 0))
    accepted = []

    def drop():
        while True:
            try:
                conn, _ = dropper.accept()
            except OSError:
                return
            accepted.append(1)
            conn.close()
    threading.Thread(target=drop, daemon=True).start()
    ini = tmp_path / 'hw.ini'
    ini.write_text('[redis]\nsentinels = 127.0.0.1:%d, 127.0.0.1:%d\n' % (
        dropper.getsockname()[1], sentinel_port))
    try:
        pool = redisconn.connection_pool(config.load(str(ini), environ={}))
        assert redis.Redis(connection_pool=pool).ping()
    finally:
        dropper.close()
    assert len(accepted) == 1


def test_an_ipv6_sentinel_is_given_bracketed(tmp_path):
    """[::1]:26379, the form host:port takes for an IPv6 address, reaches
    ::1: the brackets went to the resolver, which knows no such host."""
    from huey_worker import config, redisconn
    ini = tmp_path / 'hw.ini'
    ini.write_text('[redis]\nsentinels = [::1]:26379, 10.0.0.2:26380\n')
    pool = redisconn.connection_pool(config.load(str(ini), environ={}))
    assert [(s.connection_pool.connection_kwargs['host'],
             s.connection_pool.connection_kwargs['port'])
            for s in pool.sentinel_manager.sentinels] == [
        ('::1', 26379), ('10.0.0.2', 26380)]


def test_durable_writes_refuse_an_enqueue_no_replica_confirms(
        tmp_path, servers, base_env, start_daemon):
    """[redis] durable_writes with no replica in sync (a primary demoted
    while alive has none): an enqueue is not acknowledged (NotReplicated,
    NOREPLICAS), a result read is not held up by it, and the consumer
    still runs and acks (a warning).  With a replica in sync the same
    enqueue goes through."""
    from huey_worker import config, redisconn
    from huey_worker.app import huey
    import sample_tasks
    port = free_port()
    primary = Server(str(tmp_path / 'primary'),
                     ['--port', str(port), '--bind', '127.0.0.1'],
                     {'port': port})
    servers.append(primary)
    url = 'redis://127.0.0.1:%d/0' % port
    empty = tmp_path / 'empty.ini'
    empty.touch()
    huey.configure(config.load(str(empty), environ={
        'HUEY_REDIS_URL': url, 'HUEY_WORKER_REDIS_DURABLE_WRITES': '1'}))
    with pytest.raises(redisconn.NotReplicated) as refused:
        sample_tasks.add(1, 2)
    assert redisconn.error_code(refused.value) == 'NOREPLICAS'
    assert 'no replica confirmed' in str(refused.value)
    assert redisconn.unavailable(refused.value)
    # Taken by the primary all the same (not acknowledged: it may run).
    assert primary.client.llen('huey.redis.huey') == 1
    # A read waits for no replica (it would raise NotReplicated if it did).
    from huey.constants import EmptyData
    assert huey.storage.peek_data('no-such-result') is EmptyData
    env = dict(base_env, HUEY_REDIS_URL=url,
               HUEY_WORKER_REDIS_DURABLE_WRITES='1')
    daemon = start_daemon(['consumer', '--workers', '1'], env)
    daemon.wait_for_output('end sample_tasks.add', 30)
    assert 'no replica confirmed a write within 1000ms' in daemon.output()

    replica_port = free_port()
    servers.append(Server(str(tmp_path / 'replica'),
                          ['--port', str(replica_port), '--bind', '127.0.0.1',
                           '--replicaof', '127.0.0.1', str(port)],
                          {'port': replica_port}))
    deadline = time.monotonic() + 20
    while (primary.client.info('replication').get('slave0') or {}).get(
            'state') != 'online':
        assert time.monotonic() < deadline, 'replica not in sync'
        time.sleep(0.05)
    assert sample_tasks.add(2, 3).get(blocking=True, timeout=20) == 5
    daemon.signal(signal.SIGTERM)
    assert daemon.wait() == 0
    huey.configure(config.load(str(empty), environ={'HUEY_REDIS_URL': url}))


def test_sentinels_that_do_not_answer_are_named_host_port():
    """redis-py names each sentinel by its client's repr (hundreds of
    characters, once per sentinel): the line the CLI, the logs and STATUS
    show names them host:port."""
    from redis.sentinel import Sentinel
    from huey_worker import redisconn
    ports = [free_port(), free_port()]   # nothing listens there
    sentinel = Sentinel([('127.0.0.1', p) for p in ports],
                        sentinel_kwargs={'socket_connect_timeout': 0.2})
    with pytest.raises(redis.exceptions.RedisError) as failed:
        sentinel.discover_master('mymaster')
    assert len(str(failed.value)) > 400      # what redis-py says
    text = redisconn.error_text(failed.value)
    assert text == ("No master found for 'mymaster' : " + ', '.join(
        'sentinel 127.0.0.1:%d - network:ConnectionError' % p
        for p in ports)), text
