"""No secret leaves the suite: the Redis password, [huey] secret_key and
[status] token, and a sensitive task argument, appear in no output of a
real run -- the daemons' stderr and log file, the systemd STATUS lines,
their command lines (ps), every operator command (config, status, task,
dead-letters list, workers, submit), every status endpoint route, nor the
journal and dead-letter records in Redis.  A private redis-server with
requirepass, reached through a URL carrying the password, serves the run.
Connection failures (a wrong password, one in the URL's query, no Redis
at all) are checked too: error messages are where URLs get echoed."""
import glob
import json
import os
import secrets
import signal
import subprocess
import sys

import pytest
import redis

from conftest import ROOT
from huey_worker.config import redact_url
from huey_worker.devredis import EmbeddedRedis, free_port
from ops_helpers import (Client, NotifySocket, start_status_server,
                         wait_for_state, wait_until)


def secret(kind):
    # Distinctive and long: a hit is a leak, never a coincidence.
    return '%s-%s' % (kind, secrets.token_hex(12))


@pytest.fixture
def guarded_redis(tmp_path):
    """A private redis-server that wants a password: (server, password)."""
    password = secret('redispw')
    server = EmbeddedRedis(str(tmp_path / 'redis'), persist=False).start()
    client = server.client()
    client.config_set('requirepass', password)
    client.close()
    yield server, password
    server.cleanup()


def run_config(tmp_path, url, **sections):
    """An INI file: [redis] url, [logging] to a file at debug, `sections`
    ({'huey': {'secret_key': ...}})."""
    values = {'redis': {'url': url},
              'logging': {'file': str(tmp_path / 'huey-worker.log'),
                          'level': 'debug', 'task_events': 'both'},
              'tasks': {'builtin': 'false',
                        'modules': 'sample_tasks,secret_tasks'},
              'delivery': {'heartbeat_interval': '0.5'}}
    for section, keys in sections.items():
        values.setdefault(section, {}).update(keys)
    path = tmp_path / 'huey-worker.ini'
    path.write_text(''.join(
        '[%s]\n%s\n' % (section, ''.join('%s = %s\n' % kv
                                          for kv in keys.items()))
        for section, keys in values.items()))
    return path


def clean_env(config_path):
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(('HUEY_', 'REDIS_', 'NOTIFY_SOCKET',
                                'WATCHDOG_', 'PYTHONPATH'))}
    env.update(HUEY_WORKER_CONFIG=str(config_path), PYTHONUNBUFFERED='1',
               PYTHONPATH=os.path.join(ROOT, 'tests'))
    return env


def cli(env, *args, timeout=60):
    """`huey-worker ARGS`: (exit code, stdout + stderr)."""
    out = subprocess.run([sys.executable, '-m', 'huey_worker'] + list(args),
                         cwd=ROOT, env=env, capture_output=True, text=True,
                         timeout=timeout)
    return out.returncode, out.stdout + out.stderr


def cmdlines(pid):
    """The command lines of `pid` and its children, as ps shows them."""
    out = []
    for path in glob.glob('/proc/[0-9]*/stat'):
        try:
            with open(path) as fh:
                fields = fh.read().rpartition(')')[2].split()
            if int(path.split('/')[2]) != pid and int(fields[1]) != pid:
                continue
            with open(os.path.dirname(path) + '/cmdline', 'rb') as fh:
                out.append(fh.read().replace(b'\0', b' ').decode())
        except (OSError, ValueError, IndexError):
            pass
    return out


def redis_dump(client, pattern='*'):
    """Every key matching `pattern` and its value, as text."""
    out = []
    for key in client.scan_iter(pattern):
        kind = client.type(key)
        if kind == b'string':
            value = client.get(key)
        elif kind == b'hash':
            value = client.hgetall(key)
        elif kind == b'list':
            value = client.lrange(key, 0, -1)
        elif kind == b'set':
            value = client.smembers(key)
        elif kind == b'zset':
            value = client.zrange(key, 0, -1, withscores=True)
        else:
            value = kind
        out.append('%r %r' % (key, value))
    return '\n'.join(out)


def assert_nowhere(outputs, needles):
    """`outputs`: {where: text}; no needle in any of them."""
    leaks = ['%s in %s: ...%s...' % (name, where, text[
        max(0, text.find(value) - 120):text.find(value) + 40])
        for where, text in outputs.items()
        for name, value in needles.items() if value in text]
    assert not leaks, '\n'.join(leaks)


@pytest.mark.parametrize('log_format', ['text', 'json'])
def test_no_secret_in_any_output_of_a_run(guarded_redis, tmp_path,
                                          start_daemon, monkeypatch,
                                          log_format):
    server, password = guarded_redis
    secret_key, token = secret('signkey'), secret('statustoken')
    arg_password, arg_token = secret('argpw'), secret('argtoken')
    url = 'redis://:%s@127.0.0.1:%d/0' % (password, server.port)
    config_path = run_config(tmp_path, url, huey={'secret_key': secret_key},
                             status={'token': token},
                             logging={'format': log_format})
    env = clean_env(config_path)
    notify = NotifySocket(tmp_path / 'notify.sock')
    consumer_env = dict(env, NOTIFY_SOCKET=notify.path)

    consumer = start_daemon(['consumer', '--workers', '2'], consumer_env,
                            'consumer')
    consumer.wait_for_output('consumer ready')
    scheduler = start_daemon(['scheduler'], env, 'scheduler')
    status, port = start_status_server(start_daemon, env)
    http = Client(port, token)

    # The producer: this process, as a web app would be, same config.
    for name in list(os.environ):
        if name.startswith(('HUEY_', 'REDIS_')):
            monkeypatch.delenv(name)
    monkeypatch.setenv('HUEY_WORKER_CONFIG', str(config_path))
    from huey_worker import app as app_module
    from huey_worker import config
    huey = app_module.huey
    huey.configure(config.load())
    import sample_tasks
    import secret_tasks

    # Known only here: the consumer sets its message aside (unknown-task),
    # original bytes kept -- with the sensitive argument inside.
    @huey.task(name='test_secrets.gone_task_%s' % log_format,
               sensitive_args=True)
    def gone_task(password):
        return password

    done = sample_tasks.add(1, 2)
    refused = secret_tasks.sign_in('alice', arg_password)     # by position
    called = secret_tasks.call_api('https://example.invalid/',
                                   token=arg_token)
    dead = gone_task(arg_password)
    outputs = {}
    code, outputs['submit'] = cli(env, 'submit', 'secret_tasks.sign_in',
                                  '"bob"', json.dumps(arg_password))
    assert code == 0, outputs['submit']

    for result, state in ((done, 'complete'), (refused, 'failed'),
                          (called, 'complete'), (dead, 'failed')):
        wait_for_state(huey, result.id, state)
    conn = huey.storage.conn
    wait_until(lambda: conn.get('test:sign-in') == b'2',
               what='both sign-ins to have run')
    assert 'PermissionError' in consumer.output()    # the traceback logged

    ids = [done.id, refused.id, called.id, dead.id]
    for args in (['config'], ['config', '--json'], ['config', '--check'],
                 ['status'], ['status', '--json'], ['workers'],
                 ['dead-letters', 'list'], ['dead-letters', 'list', '--json']
                 ) + tuple(['task', i] for i in ids) \
            + tuple(['task', '--json', i] for i in ids):
        code, outputs[' '.join(args)] = cli(env, *args)
        assert code == 0, (args, outputs[' '.join(args)])
    assert 'unknown-task' in outputs['dead-letters list']
    assert '***' in outputs['config']     # redacted, not left out

    for path in (['/health', '/health/live', '/metrics', '/queue', '/tasks',
                  '/dead-letters', '/workers', '/scheduler']
                 + ['/tasks/%s' % i for i in ids]):
        code, headers, body = http.request('GET', path)
        outputs['GET ' + path] = '%d %r %s' % (code, headers, body.decode(
            'utf-8', 'replace'))
    assert outputs['GET /health'].startswith('200')
    code, headers, body = http.request('GET', '/health', auth=False)
    outputs['GET /health without token'] = body.decode('utf-8', 'replace')

    for daemon in (consumer, scheduler, status):
        for n, line in enumerate(cmdlines(daemon.pid)):
            outputs['cmdline %d.%d' % (daemon.pid, n)] = line
    for daemon in (consumer, scheduler, status):
        daemon.signal(signal.SIGTERM)
        assert daemon.wait() == 0
        outputs[daemon.log_path] = daemon.output()
    outputs['log file'] = (tmp_path / 'huey-worker.log').read_text()
    outputs['STATUS'] = '\n'.join(notify.drain())
    notify.close()
    # Each channel really carried the run (a silent one proves nothing).
    assert 'READY=1' in outputs['STATUS']
    assert 'sign-in refused for bob' in outputs['log file']
    if log_format == 'json':
        # Every line one JSON object ([logging] format = json).
        for line in outputs['log file'].splitlines():
            assert isinstance(json.loads(line), dict), line
    outputs['redis: journal'] = redis_dump(conn, '*journal*') + redis_dump(
        conn, '*task*')
    assert 'args_sensitive' in outputs['redis: journal']

    config_secrets = {'redis password': password, 'secret_key': secret_key,
                      'status token': token}
    assert_nowhere(outputs, dict(config_secrets, **{
        'sensitive argument': arg_password, 'sensitive keyword': arg_token}))
    # The queue's own data holds the messages (their arguments included);
    # the configuration's secrets are nowhere in Redis.
    assert_nowhere({'redis': redis_dump(conn)}, config_secrets)


@pytest.mark.parametrize('case', ['wrong password', 'password in the query',
                                  'unreachable'])
def test_no_secret_in_connection_errors(case, guarded_redis, tmp_path,
                                        start_daemon):
    server, password = guarded_redis
    given = secret('givenpw')
    if case == 'wrong password':
        url = 'redis://:%s@127.0.0.1:%d/0' % (given, server.port)
    elif case == 'password in the query':   # redis-py takes it there too
        url = 'redis://127.0.0.1:%d/0?password=%s' % (server.port, given)
    else:
        url = 'redis://:%s@127.0.0.1:%d/0' % (given, free_port())
    config_path = run_config(tmp_path, url,
                             huey={'secret_key': secret('signkey')})
    env = clean_env(config_path)
    outputs = {}
    for args in (['status'], ['status', '--json'], ['task', 'x'],
                 ['dead-letters', 'list'], ['workers'],
                 ['submit', 'sample_tasks.add', '1', '2']):
        code, outputs[' '.join(args)] = cli(env, *args)
        assert code == 69, (args, code, outputs[' '.join(args)])
    consumer = start_daemon(['consumer', '--workers', '1'], env, 'consumer')
    consumer.wait_for_output('Redis unreachable at', timeout=30)
    status, port = start_status_server(start_daemon, env)
    code, headers, body = Client(port).request('GET', '/health')
    outputs['GET /health'] = '%d %s' % (code, body.decode())
    assert code == 503, outputs['GET /health']
    for daemon in (consumer, status):
        daemon.signal(signal.SIGTERM)
        assert daemon.wait() == 0
        outputs[daemon.log_path] = daemon.output()
    outputs['log file'] = (tmp_path / 'huey-worker.log').read_text()
    assert '127.0.0.1' in outputs['status'], outputs['status']
    assert_nowhere(outputs, {'the password given': given,
                             "the server's password": password})


@pytest.mark.parametrize('url, shown', [
    ('redis://:pw@h:6379/0', 'redis://:***@h:6379/0'),
    ('rediss://user:pw@h/1', 'rediss://user:***@h/1'),
    ('redis://user@h/0', 'redis://user@h/0'),       # a user name only
    ('redis://h/0?db=1&password=pw', 'redis://h/0?db=1&password=***'),
    ('unix:///run/redis.sock?password=pw',
     'unix:///run/redis.sock?password=***'),
    ('redis://:p@s?s/w@h/0', 'redis://:***@h/0'),   # left unencoded
    ('redis://h/0?password=a@b', 'redis://h/0?password=***'),
    ('redis://h:6379/0', 'redis://h:6379/0'),
])
def test_a_redis_url_is_shown_without_its_password(url, shown):
    assert redact_url(url) == shown


def test_a_config_file_with_a_password_in_its_url_must_not_be_world_readable(
        tmp_path):
    path = run_config(tmp_path, 'redis://:%s@127.0.0.1:9/0' % secret('pw'))
    path.chmod(0o644)
    code, out = cli(clean_env(path), 'config', '--check')
    assert code == 0, out
    assert 'holds a password or secret and is readable by all users' in out
