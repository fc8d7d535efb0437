"""Issue 14: `[huey] app = module:attr` runs the user's own Huey instance.

The two seed projects, rebuilt small in tests/seed_apps/, run unchanged
under `python -m huey_worker consumer --app ...` (with the scheduler and
the status endpoint beside it); their producers enqueue through their own
module in a separate process and read results through their own result
handle, and `huey-worker task ID` and GET /tasks/ID show the journal.
Storages the suite cannot make safe, and a module that does not import,
are configuration errors (exit 78).  Real processes and the private Redis
throughout, except the derivation tests at the end."""
import json
import os
import signal
import subprocess
import sys
import uuid

import pytest

from conftest import Daemon
from ops_helpers import Client, start_status_server, wait_until

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SEEDS = os.path.join(ROOT, 'tests', 'seed_apps')
SEED001 = os.path.join(SEEDS, 'seed001')
SEED000 = os.path.join(SEEDS, 'seed000')


def project_env(base_env, **extra):
    """The daemons' environment as a project has it: no test task modules,
    the project's own variables."""
    env = {k: v for k, v in base_env.items()
           if k not in ('HUEY_MODULES', 'PYTHONPATH')}
    env.update(extra)
    return env


class ProjectDaemon(Daemon):
    """A daemon started in a project directory, as `cd project &&
    huey_consumer pipelines.tasks.huey` was run."""

    def __init__(self, args, env, log_path, cwd):
        self.log_path = log_path
        self._log = open(log_path, 'ab')
        self.proc = subprocess.Popen(
            [sys.executable, '-m', 'huey_worker'] + list(args), env=env,
            cwd=cwd, stdout=self._log, stderr=subprocess.STDOUT,
            start_new_session=True)


@pytest.fixture
def start_in(tmp_path):
    started = []

    def start(args, env, cwd, name='daemon'):
        daemon = ProjectDaemon(args, env, str(tmp_path / ('%s-%d.log' % (
            name, len(started)))), cwd)
        started.append(daemon)
        return daemon
    yield start
    for daemon in started:
        daemon.stop()


def run_python(code, env, cwd, timeout=60):
    done = subprocess.run([sys.executable, '-c', code], env=env, cwd=cwd,
                          capture_output=True, text=True, timeout=timeout)
    assert done.returncode == 0, done.stderr
    return done.stdout


def cli(env, cwd, *args):
    return subprocess.run([sys.executable, '-m', 'huey_worker'] + list(args),
                          env=env, cwd=cwd, capture_output=True, text=True,
                          timeout=60)


PRODUCER_001 = '''
import json, sys
from huey.exceptions import TaskException
from pipelines.tasks import pdf_extract_process_task
result = pdf_extract_process_task(sys.argv[1] if len(sys.argv) > 1 else %r)
print(result.id)
# As with huey_consumer, the first attempt's error is stored too (Huey's
# store_intermediate_errors): the producer sees it, then the retry's value.
for attempt in range(4):
    try:
        print(json.dumps(result.get(blocking=True, timeout=45)))
        break
    except TaskException as exc:
        print('error', exc.metadata['error'], file=sys.stderr)
        result.reset()
'''


# --- seed 001: pipelines.tasks:huey, env HUEY_QUEUE_NAME / HUEY_REDIS_URL -

@pytest.mark.parametrize('worker_type', ['thread', 'process'])
def test_seed001_pipeline_runs_unchanged_under_the_suite(
        tmp_path, base_env, start_in, worker_type):
    queue = 'pdf-tasks-%s' % uuid.uuid4().hex[:6]
    env = project_env(base_env, HUEY_QUEUE_NAME=queue, HUEY_WORKERS='5',
                      HUEY_WORKER_TYPE=worker_type)
    app = ['--app', 'pipelines.tasks:huey']
    consumer = start_in(['consumer'] + app, env, SEED001, 'consumer')
    scheduler = start_in(['scheduler'] + app, env, SEED001, 'scheduler')
    consumer.wait_for_output('consumer ready')
    scheduler.wait_for_output('scheduler ready')
    out = consumer.output()
    assert 'running the app pipelines.tasks:huey (RedisHuey)' in out
    assert 'queue %r' % queue in out
    assert '5 %s workers' % worker_type in out
    assert 'pipelines.tasks.pdf_extract_process_task' in out

    # The producer: the seed's own module, its own result handle.
    marker = str(tmp_path / 'marker')
    printed = run_python(PRODUCER_001 % marker, env, SEED001).splitlines()
    task_id, result = printed[0], json.loads(printed[1])
    assert result['pages'] == 3
    if worker_type == 'process':
        assert result['pid'] != consumer.pid

    shown = cli(env, SEED001, 'task', task_id, '--json', *app)
    assert shown.returncode == 0, shown.stderr
    record = json.loads(shown.stdout)
    assert record['state'] == 'complete'
    assert record['name'] == 'pipelines.tasks.pdf_extract_process_task'
    assert record['queue'] == queue
    assert record['attempt'] == 2            # failed once, retried after 1 s
    assert record['result'] == result

    status, port = start_status_server(
        lambda args, env_, name: start_in(args, env_, SEED001, name),
        env, app)
    code, body = Client(port).json('GET', '/tasks/%s' % task_id)
    assert code == 200, body
    assert body['state'] == 'complete' and body['attempt'] == 2
    assert [e['state'] for e in body['history']].count('retrying') == 1


def test_seed001_kill_9_mid_task_loses_nothing(tmp_path, base_env, start_in):
    queue = 'pdf-tasks-%s' % uuid.uuid4().hex[:6]
    env = project_env(base_env, HUEY_QUEUE_NAME=queue, HUEY_WORKERS='1',
                      HUEY_WORKER_TYPE='thread')
    app = ['--app', 'pipelines.tasks.huey']      # huey_consumer's spelling
    consumer = start_in(['consumer'] + app, env, SEED001, 'consumer')
    consumer.wait_for_output('consumer ready')

    runs = tmp_path / 'runs.log'
    producer = subprocess.Popen(
        [sys.executable, '-c', '''
import sys
from pipelines.tasks import slow_extract
result = slow_extract(sys.argv[1], 3)
print(result.id, flush=True)
print(result.get(blocking=True, timeout=90), flush=True)
''', str(runs)], env=env, cwd=SEED001, stdout=subprocess.PIPE,
        stderr=subprocess.PIPE, text=True)
    try:
        wait_until(lambda: runs.exists() and runs.read_text().count('run'),
                   what='the task to start')
        os.kill(consumer.pid, signal.SIGKILL)
        consumer.wait(10)

        again = start_in(['consumer'] + app, env, SEED001, 'consumer')
        again.wait_for_output('consumer ready')
        out, err = producer.communicate(timeout=90)
    finally:
        if producer.poll() is None:
            producer.kill()
    assert producer.returncode == 0, err
    task_id, value = out.split()
    assert value == 'extracted'
    assert runs.read_text().count('run') == 2     # ran again, to its end
    assert 'put back in the queue' in again.output()
    shown = cli(env, SEED001, 'task', task_id, '--json', *app)
    record = json.loads(shown.stdout)
    assert record['state'] == 'complete'
    assert 'lost' in [e['state'] for e in record['history']]


# --- seed 000: core.huey:huey, its Redis URL from its own Config -----------

def test_seed000_collector_runs_with_the_apps_own_name_and_redis(
        base_env, start_in, redis_url):
    env = project_env(base_env, PIXCOLLECTOR_REDIS_URL=redis_url,
                      HUEY_WORKER_TASKS_BUILTIN='true')
    del env['HUEY_REDIS_URL']     # the suite learns the Redis from the app
    args = ['--app', 'core.huey:huey', '--module', 'core.tasks']
    consumer = start_in(['consumer'] + args, env, SEED000, 'consumer')
    consumer.wait_for_output('consumer ready')
    out = consumer.output()
    assert "queue 'pixcollector' on %s" % redis_url in out
    assert 'core.tasks.collect_task' in out
    assert 'huey_worker.tasks.pdf.extract' in out   # [tasks] builtin

    printed = run_python('''
import json
from core.tasks import collect_task
result = collect_task('job-7', ['https://a.example/', 'https://b.example/'])
print(result.id)
print(json.dumps(result.get(blocking=True, timeout=30)))
''', env, SEED000).splitlines()
    task_id, result = printed[0], json.loads(printed[1])
    assert result == {'job': 'job-7', 'collected': 2}

    shown = cli(env, SEED000, 'task', task_id, '--json', '--app',
                'core.huey:huey')
    assert shown.returncode == 0, shown.stderr
    record = json.loads(shown.stdout)
    assert record['state'] == 'complete' and record['queue'] == 'pixcollector'
    assert record['name'] == 'core.tasks.collect_task'

    # Submitting by name from the CLI goes through the same app.
    done = cli(env, SEED000, 'submit', 'collect_task', 'job-8', '["x"]',
               '--wait', '--json', *args)
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout)['result'] == {'job': 'job-8',
                                                 'collected': 1}

    # The status endpoint, before and after a reload (SIGHUP).
    status, port = start_status_server(
        lambda args, env_, name: start_in(args, env_, SEED000, name),
        env, ['--app', 'core.huey:huey'])
    assert Client(port).json('GET', '/tasks/%s' % task_id)[0] == 200
    status.signal(signal.SIGHUP)
    status.wait_for_output('configuration reloaded')
    code, body = Client(port).json('GET', '/tasks/%s' % task_id)
    assert code == 200 and body['state'] == 'complete', body
    assert body['queue'] == 'pixcollector'


def test_seed000_immediate_app_is_refused_by_the_daemons(base_env, start_in,
                                                         redis_url):
    env = project_env(base_env, PIXCOLLECTOR_REDIS_URL=redis_url,
                      HUEY_IMMEDIATE='true')
    consumer = start_in(['consumer', '--app', 'core.huey:huey'], env,
                        SEED000, 'consumer')
    assert consumer.wait(30) == 78
    assert 'immediate mode runs tasks in the producer' in consumer.output()


# --- refused apps ------------------------------------------------------------

@pytest.mark.parametrize('attr,why', [
    ('sqlite_app', 'crash-safe delivery needs Redis: SqliteHuey keeps its '
                   'queue in a local file'),
    ('memory_app', 'crash-safe delivery needs Redis: MemoryHuey keeps its '
                   'queue in the memory of one process'),
])
def test_apps_the_suite_cannot_make_safe_are_config_errors(
        tmp_path, base_env, start_in, attr, why):
    env = project_env(base_env, UNSAFE_APPS_DIR=str(tmp_path))
    consumer = start_in(['consumer', '--app', 'unsafe_apps:%s' % attr], env,
                        SEEDS, 'consumer')
    assert consumer.wait(30) == 78
    out = consumer.output()
    assert "[huey] app = 'unsafe_apps:%s' (cli --app)" % attr in out
    assert why in out
    shown = cli(dict(env, HUEY_WORKER_HUEY_APP='unsafe_apps:%s' % attr),
                SEEDS, 'status')
    assert shown.returncode == 78
    assert 'env HUEY_WORKER_HUEY_APP' in shown.stderr and why in shown.stderr


def test_an_app_module_that_does_not_import_is_a_config_error(
        tmp_path, base_env, start_in):
    config = tmp_path / 'huey-worker.ini'
    config.write_text('[huey]\napp = broken_app:huey\n')
    env = project_env(base_env, HUEY_WORKER_CONFIG=str(config))
    for command in ('consumer', 'scheduler', 'status-server'):
        daemon = start_in([command], env, SEEDS, command)
        assert daemon.wait(30) == 78, daemon.output()
        out = daemon.output()
        assert "[huey] app = 'broken_app:huey'" in out
        assert "cannot import module 'broken_app'" in out
        assert 'no_such_dependency_for_adoption' in out


def test_a_malformed_app_value_is_a_config_error(base_env):
    done = cli(dict(base_env, HUEY_WORKER_HUEY_APP='not an app'), ROOT,
               'config', '--check')
    assert done.returncode == 78
    assert 'expected module:attribute' in done.stderr


# --- derivation (in-process, nothing adopted) ---------------------------

def _config(tmp_path, environ=None, text=''):
    from huey_worker import config
    path = tmp_path / 'c.ini'
    path.write_text(text)
    env = {'HUEY_WORKER_CONFIG': str(path), 'HOME': str(tmp_path)}
    env.update(environ or {})
    return config.load(environ=env)


def test_derive_takes_name_expiry_and_redis_from_the_app(tmp_path):
    from huey import RedisExpireHuey
    from huey_worker import adopt
    app = RedisExpireHuey('reports', url='redis://:pw@10.1.2.3:6390/4',
                          expire_time=3600, store_none=True)
    cfg = _config(tmp_path, text='[huey]\napp = x:huey\n')
    derived, notes = adopt.derive(cfg, app)
    assert derived.huey.queue == 'reports'
    assert derived.huey.result_timeout == 3600
    assert derived.huey.store_none is True
    assert derived.redis.url == 'redis://10.1.2.3:6390/4'
    assert derived.redis.password == 'pw'
    assert str(derived.source('huey.queue')) == 'app x:huey'
    assert notes == []
    assert cfg.huey.queue == 'huey'           # the loaded config is untouched


def test_derive_lets_values_the_config_sets_win(tmp_path, redis_url):
    from huey import RedisHuey
    from huey_worker import adopt
    app = RedisHuey('reports', url='redis://10.1.2.3:6390/4')
    cfg = _config(tmp_path, {'HUEY_QUEUE_NAME': 'other',
                             'HUEY_REDIS_URL': redis_url},
                  '[huey]\napp = x:huey\nresult_timeout = 60\n')
    derived, notes = adopt.derive(cfg, app)
    assert derived.huey.queue == 'other'
    assert derived.redis.url == redis_url
    assert derived.huey.result_timeout == 60
    assert any('huey.queue' in n for n in notes)


def test_a_configured_secret_key_replacing_the_apps_signer_is_noted(
        tmp_path):
    from huey import RedisHuey
    from huey.serializer import SignedSerializer
    from huey_worker import adopt
    app = RedisHuey('reports', url='redis://10.1.2.3:6390/4',
                    serializer=SignedSerializer('app-own-key'))
    cfg = _config(tmp_path, {'HUEY_WORKER_HUEY_SECRET_KEY': 's3cr3t-value'},
                  '[huey]\napp = x:huey\n')
    derived, notes = adopt.derive(cfg, app)
    note, = [n for n in notes if 'serializer' in n]
    assert '[huey] secret_key (env HUEY_WORKER_HUEY_SECRET_KEY)' in note
    assert 'SignedSerializer' in note and "salt='huey-worker'" in note
    assert 's3cr3t-value' not in note
    assert not [n for n in adopt.derive(_config(
        tmp_path, text='[huey]\napp = x:huey\n'), app)[1]
        if 'serializer' in n]


def test_derive_treats_an_immediate_app_as_immediate(tmp_path):
    from huey import RedisHuey
    from huey_worker import adopt
    app = RedisHuey('eager', url='redis://127.0.0.1:1/0', immediate=True)
    cfg = _config(tmp_path, text='[huey]\napp = core.huey:huey\n')
    derived, _ = adopt.derive(cfg, app)
    assert derived.huey.immediate is True
    assert 'built with immediate=True' in str(derived.source(
        'huey.immediate'))
    # Set false explicitly (the consumer's own environment): it wins, noted.
    cfg = _config(tmp_path, {'HUEY_WORKER_HUEY_IMMEDIATE': 'false'},
                  '[huey]\napp = core.huey:huey\n')
    derived, notes = adopt.derive(cfg, app)
    assert derived.huey.immediate is False
    assert any('built with immediate=True' in n and
               'env HUEY_WORKER_HUEY_IMMEDIATE' in n for n in notes), notes


def test_file_apps_are_refused_with_the_reason_priority_apps_taken(
        tmp_path):
    from huey import FileHuey, PriorityRedisExpireHuey, PriorityRedisHuey
    from huey_worker import adopt
    from huey_worker.storage import NativePriorityQueue
    for kind in (PriorityRedisHuey, PriorityRedisExpireHuey):
        app = kind('p', url='redis://127.0.0.1:1/0')
        assert adopt.refusal(app, adopt.storage_class_of(app)) is None
        original = adopt._original(app)
        assert original['native_priority'] is True
        storage_class = adopt._STORAGES[original['hash_results'], True]
        assert issubclass(storage_class, NativePriorityQueue)
        assert issubclass(storage_class, adopt.AdoptedStorage) == (
            kind is PriorityRedisHuey)
    files = FileHuey('f', path=str(tmp_path / 'queue'))
    assert 'files in a local directory' in adopt.refusal(
        files, adopt.storage_class_of(files))


def test_redis_values_cover_tls_and_unix_sockets():
    import redis
    from huey_worker import adopt
    tls = redis.ConnectionPool.from_url(
        'rediss://u:p@cache.example:6380/2?ssl_cert_reqs=none')
    values = adopt.redis_values(tls)
    assert values['redis.url'] == 'rediss://cache.example:6380/2'
    assert values['redis.username'] == 'u' and values['redis.password'] == 'p'
    assert values['redis.tls_verify'] is False
    unix = redis.ConnectionPool.from_url('unix:///run/redis/redis.sock?db=3')
    assert adopt.redis_values(unix)['redis.url'] == \
        'unix:///run/redis/redis.sock?db=3'


# --- config --check does what the daemons do before they start ---------------

def test_config_check_imports_the_app_and_modules_and_config_shows_its_values(
        base_env):
    queue = 'pipes-%s' % os.getpid()
    env = project_env(base_env, HUEY_QUEUE_NAME=queue)
    env.pop('HUEY_WORKER_HUEY_APP', None)
    app = ['--app', 'pipelines.tasks:huey']
    good = cli(env, SEED001, 'config', '--check', *app)
    assert good.returncode == 0, good.stderr
    assert 'app pipelines.tasks:huey' in good.stderr
    shown = cli(env, SEED001, 'config', *app)
    # HUEY_QUEUE_NAME is the suite's variable too, so the queue is the
    # environment's; what only the app says is shown as the app's.
    assert any(line.endswith('# app pipelines.tasks:huey')
               for line in shown.stdout.splitlines()), shown.stdout
    # What the consumer would refuse, --check refuses too (it used to say
    # "configuration OK (defaults only)").
    for args, named in ((['--app', 'nosuch_project.tasks:huey'],
                         'nosuch_project'),
                        (app + ['--module', 'nosuch_module'],
                         'nosuch_module')):
        bad = cli(env, SEED001, 'config', '--check', *args)
        assert bad.returncode == 78, bad.stderr
        assert named in bad.stderr and 'configuration OK' not in bad.stderr


def test_a_producer_of_the_shared_app_fills_the_adopted_apps_queue(
        base_env, start_in, redis_url, tmp_path):
    # A web app whose tasks are written against `from huey_worker import
    # huey`, with [huey] app naming the project's app (queue pixcollector):
    # its enqueues must land where the consumers of that app read.
    code = tmp_path / 'shared_tasks_mod'
    code.mkdir()
    (code / 'shared_tasks.py').write_text(
        'from huey_worker import huey\n\n\n@huey.task()\n'
        'def triple(x):\n    return 3 * x\n')
    env = project_env(base_env, PIXCOLLECTOR_REDIS_URL=redis_url,
                      HUEY_WORKER_HUEY_APP='core.huey:huey',
                      HUEY_WORKER_TASKS_PYTHON_PATH=str(code),
                      HUEY_MODULES='shared_tasks')
    del env['HUEY_REDIS_URL']
    consumer = start_in(['consumer'], env, SEED000, 'consumer')
    consumer.wait_for_output('consumer ready')
    printed = run_python('''
import sys
sys.path.insert(0, %r)
from huey_worker import huey
import shared_tasks
result = shared_tasks.triple(14)
print(huey.name)
print(result.get(blocking=True, timeout=30))
''' % str(code), env, SEED000).split()
    assert printed == ['pixcollector', '42']


# --- an app that exits at import, or is built immediate ----------------------

@pytest.mark.parametrize('body, did', [
    ('import sys\nsys.exit(3)\nhuey = None\n', 'called sys.exit(3)'),
    ('raise KeyboardInterrupt\n', 'raised KeyboardInterrupt'),
    ('import sys, types\n\n\nclass M(types.ModuleType):\n    @property\n'
     '    def huey(self):\n        raise RuntimeError("no app here")\n\n\n'
     'sys.modules[__name__].__class__ = M\n',
     "getting its attribute 'huey' raised RuntimeError: no app here"),
], ids=['sys.exit', 'KeyboardInterrupt', 'property'])
def test_an_app_module_that_exits_or_raises_is_a_config_error(
        base_env, tmp_path, body, did):
    (tmp_path / 'leaving.py').write_text(body)
    env = project_env(base_env)
    for args in (('config', '--check', '--app', 'leaving:huey'),
                 ('status', '--app', 'leaving:huey')):
        run = cli(env, str(tmp_path), *args)
        assert run.returncode == 78, (args, run.returncode, run.stderr)
        lines = run.stderr.splitlines()
        assert len(lines) == 1, run.stderr
        assert lines[0].startswith(
            "huey-worker: config error: [huey] app = 'leaving:huey' (cli "
            "--app): cannot import module 'leaving': %s" % did), lines[0]


def test_operator_commands_refuse_an_app_built_immediate(base_env, tmp_path,
                                                         redis_url):
    (tmp_path / 'eager.py').write_text(
        'from huey import RedisHuey\n\n'
        'huey = RedisHuey("eager", url=%r, immediate=True)\n\n\n'
        '@huey.task()\ndef echo(x):\n    return x\n' % redis_url)
    env = project_env(base_env, HUEY_WORKER_HUEY_APP='eager:huey')
    del env['HUEY_REDIS_URL']
    for args in (('status',), ('task', 'x'), ('workers',),
                 ('dead-letters', 'list'), ('submit', 'echo', '1'),
                 ('status-server', '--port', '0')):
        run = cli(env, str(tmp_path), *args)
        assert run.returncode == 78, (args, run.returncode, run.stderr)
        assert run.stderr.splitlines()[-1].startswith(
            "huey-worker: config error: [huey] immediate = 'true' (app "
            "eager:huey (built with immediate=True)): immediate mode runs "
            "tasks in the producer, so there is no queue for "), run.stderr


def test_an_app_stamping_local_times_is_scored_in_local_time(
        tmp_path, redis_url, monkeypatch):
    """Huey built with utc=False stamps naive local etas; the suite's
    storage scores them as local time, others as UTC (on a host whose
    zone is not UTC, or the two would agree)."""
    import datetime
    import time
    from huey import RedisHuey
    from huey_worker import adopt
    monkeypatch.setenv('TZ', 'America/New_York')
    time.tzset()
    naive = datetime.datetime(2030, 6, 1, 12)
    utc_score = datetime.datetime(2030, 6, 1, 12, tzinfo=datetime.timezone.utc
                                  ).timestamp()
    try:
        local_score = time.mktime(naive.timetuple())
        assert local_score == utc_score + 4 * 3600   # EDT
        for utc, expected in ((False, local_score), (True, utc_score)):
            app = RedisHuey('loc', url=redis_url, utc=utc)
            app._hw_original = adopt._original(app)
            derived, _ = adopt.derive(_config(
                tmp_path, text='[huey]\napp = localapp:huey\n'), app)
            adopt._apply(app, derived)
            assert app.storage.utc is utc
            assert app.storage.convert_ts(naive) == expected
    finally:
        monkeypatch.undo()
        time.tzset()
