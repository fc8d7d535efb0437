"""Issue 14: a web app that enqueues with plain Huey (its own
`RedisHuey('huey', url=...)`, no huey-worker import) has its tasks run by
the suite's consumer, and the journal learns of them when it first sees
them: a reader finds a task still waiting in the queue (pending, not
404), a worker completes the record it takes (name, args, first seen),
and the status endpoint, `huey-worker task` and `huey-worker wait` follow
it to its end.  Real processes throughout: a producer script that imports
only huey, a consumer, a status-server."""
import json
import os
import subprocess
import sys
import time
import uuid

import pytest
import redis

from ops_helpers import (Client, history_states, monitored,
                         start_status_server, wait_for_state, wait_until)

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# The web app's task module, as a plain Huey user has it: its own Huey
# instance.  The suite runs that instance ([huey] app = webapp_tasks:huey).
WEBAPP_TASKS = '''
import os

from huey import RedisExpireHuey, RedisHuey
from huey.serializer import SignedSerializer

options = {}
if os.environ.get('WEBAPP_SECRET'):
    options['serializer'] = SignedSerializer(
        os.environ['WEBAPP_SECRET'], salt=os.environ.get('WEBAPP_SALT',
                                                         'huey-worker'))
kind = RedisExpireHuey if os.environ.get('WEBAPP_EXPIRE') else RedisHuey
huey = kind('huey', url=os.environ['HUEY_REDIS_URL'], **options)


@huey.task()
def add(a, b):
    return a + b


@huey.task(retries=1, retry_delay=0)
def flaky(marker):
    if not os.path.exists(marker):
        open(marker, 'w').close()
        raise RuntimeError('first attempt fails')
    return 'second attempt'


@huey.task(retries=1, retry_delay=0)
def always_fails(word):
    raise RuntimeError('no luck with %s' % word)


@huey.task(sensitive_args=('token',))
def call(url, token=None):
    return url
'''

# The web app enqueueing: plain huey only (asserted), prints the ids; with
# --result ID it reads a result back through Huey.
PRODUCER = '''
import json
import sys

import webapp_tasks

if sys.argv[1] == '--result':
    from huey.api import Result
    found = webapp_tasks.huey.result(sys.argv[2], blocking=True,
                                     timeout=float(sys.argv[3]),
                                     preserve=True)
    print(json.dumps({'result': found}))
else:
    ids = []
    for name, args, kwargs in json.loads(sys.argv[1]):
        ids.append(getattr(webapp_tasks, name)(*args, **kwargs).id)
    print(json.dumps(ids))
leaked = sorted(m for m in sys.modules if m.split('.')[0] in (
    'huey_worker', 'daemon'))
assert not leaked, leaked
'''


@pytest.fixture
def webapp(tmp_path, base_env):
    """(environment of the suite's daemons and CLI, a function running the
    web app's producer script).  The web app's directory holds only its
    own code; the suite loads the same task module."""
    code = tmp_path / ('webapp-%s' % uuid.uuid4().hex[:6])
    code.mkdir()
    (code / 'webapp_tasks.py').write_text(WEBAPP_TASKS)
    (code / 'producer.py').write_text(PRODUCER)
    env = {k: v for k, v in base_env.items() if k != 'HUEY_MODULES'}
    env = dict(env, HUEY_WORKER_HUEY_APP='webapp_tasks:huey',
               PYTHONPATH=os.pathsep.join([str(code), base_env['PYTHONPATH']]),
               HUEY_WORKER_DELIVERY_HEARTBEAT_INTERVAL='0.3')
    web_env = {k: v for k, v in base_env.items()
               if not k.startswith('HUEY_WORKER')}
    web_env['PYTHONPATH'] = str(code)

    def produce(*calls, extra_env=None, result=None, timeout=20):
        argv = ['--result', result, str(timeout)] if result else [
            json.dumps([list(c) for c in calls])]
        run = subprocess.run(
            [sys.executable, str(code / 'producer.py')] + argv,
            env=dict(web_env, **(extra_env or {})), cwd=str(code),
            capture_output=True, text=True, timeout=60)
        assert run.returncode == 0, run.stderr
        return json.loads(run.stdout)
    produce.code = code
    return env, produce


def cli(env, *args, timeout=60):
    return subprocess.run([sys.executable, '-m', 'huey_worker'] + list(args),
                          env=env, cwd=ROOT, capture_output=True, text=True,
                          timeout=timeout)


def conn_of(env):
    return redis.Redis.from_url(env['HUEY_REDIS_URL'])


def test_waiting_then_run_then_read(webapp, start_daemon, tmp_path):
    env, produce = webapp
    marker = str(tmp_path / 'flaky-marker')
    add, flaky, fails, secret = produce(
        ('add', [20, 22], {}), ('flaky', [marker], {}),
        ('always_fails', ['plain'], {}),
        ('call', ['https://example.test'], {'token': 't0ps3cret'}))
    conn = conn_of(env)
    assert conn.llen('huey.redis.huey') == 4
    assert not list(conn.scan_iter('hw:*'))   # the producer wrote no record

    server, port = start_status_server(start_daemon, env)
    client = Client(port)

    # Waiting in the queue, no consumer yet: pending, not 404.
    status, body = client.get('/tasks/%s' % add)
    assert status == 200, body
    assert body['state'] == 'pending' and not body['terminal']
    assert body['name'] == 'webapp_tasks.add' and body['queue'] == 'huey'
    assert body['enqueued'] is None and body['first_seen_in'] == 'queue'
    assert body['first_seen'] == pytest.approx(time.time(), abs=30)
    assert history_states(body) == ['pending']
    # ... and recorded: the next poll is a plain read of the journal.
    assert conn.hget('hw:huey:task:%s' % add, 'state') == b'pending'
    assert 0 < conn.ttl('hw:huey:task:%s' % add) <= 604800
    # ... and listed: by state and by task name.
    assert conn.zscore('hw:huey:journal:state:waiting', add)
    assert conn.zscore('hw:huey:journal:name:webapp_tasks.add', add)
    assert client.get('/tasks/%s' % add)[1]['first_seen'] == \
        body['first_seen']
    status, seed = client.get('/api/collect/task/%s' % flaky)
    assert status == 200 and seed['status'] == 'pending'
    assert seed['log']['log_type'] == 'webapp_tasks.flaky'
    shown = cli(env, 'task', fails)
    assert shown.returncode == 0, shown.stderr
    assert 'pending' in shown.stdout
    assert 'unknown (first seen in the queue at' in shown.stdout
    # An id that is nowhere is still unknown.
    assert client.get('/tasks/no-such-task')[0] == 404
    assert cli(env, 'task', 'no-such-task').returncode == 66
    assert conn.llen('huey.redis.huey') == 4   # looking took nothing

    # `wait` follows it from the queue to its end once a consumer runs.
    progress_file = tmp_path / 'wait.err'
    with open(progress_file, 'w') as progress_out:
        waiting = subprocess.Popen(
            [sys.executable, '-m', 'huey_worker', 'wait', add, '--json',
             '--timeout', '60', '--interval', '0.1'], env=env, cwd=ROOT,
            stdout=subprocess.PIPE, stderr=progress_out, text=True)
    # The progress line shows it waiting (before any consumer: a slow
    # start of `wait` must not see it done already).
    wait_until(lambda: 'pending' in progress_file.read_text(),
               what='wait showing the task pending')
    assert waiting.poll() is None   # still pending: no consumer yet
    consumer = start_daemon(['consumer', '--workers', '2'], env, 'consumer')
    consumer.wait_for_output('consumer ready')
    assert 'webapp_tasks:huey' in consumer.output()
    out, _ = waiting.communicate(timeout=60)
    err = progress_file.read_text()
    assert waiting.returncode == 0, err
    record = json.loads(out)
    assert record['state'] == 'complete' and record['result'] == 42
    assert 'complete' in err   # and then its end

    status, body = client.get('/tasks/%s' % add)
    assert body['state'] == 'complete' and body['result'] == 42
    assert body['args'] == {'args': [20, 22], 'kwargs': {}}
    assert history_states(body) == ['pending', 'running', 'complete']
    assert body['first_seen_in'] == 'queue' and body['enqueued'] is None
    assert body['attempt'] == 1 and body['retries_total'] == 0
    assert body['worker']['pid'] == consumer.pid

    # A plain task that fails, is retried by the consumer, then works.
    done = cli(env, 'wait', flaky, '--json', '--timeout', '30')
    assert done.returncode == 0, done.stderr
    record = json.loads(done.stdout)
    assert record['result'] == 'second attempt' and record['attempt'] == 2
    assert record['retries_total'] == 1 and record['retries_left'] == 0
    assert history_states(record)[:3] == ['pending', 'running', 'retrying']
    assert history_states(record)[-2:] == ['running', 'complete']
    assert record['args'] == {'args': [marker], 'kwargs': {}}

    # One that fails on every attempt.
    done = cli(env, 'wait', fails, '--json', '--timeout', '30')
    assert done.returncode == 1, done.stderr
    record = json.loads(done.stdout)
    assert record['state'] == 'failed' and record['attempt'] == 2
    assert record['error']['type'] == 'RuntimeError'
    assert record['error']['message'] == 'no luck with plain'
    assert history_states(record).count('retrying') == 1
    status, seed = client.get('/api/collect/task/%s' % fails)
    assert seed['status'] == 'failed'
    assert seed['log']['message'] == 'no luck with plain'

    # Sensitive keyword arguments stay masked, as for the suite's tasks.
    record = wait_for_state_over_http(client, secret, 'complete')
    assert record['args'] == {'args': ['https://example.test'],
                              'kwargs': {'token': '********'}}
    assert b't0ps3cret' not in b''.join(
        conn.hgetall('hw:huey:task:%s' % secret).values())
    # Listings show them like any task.
    status, listed = client.get('/tasks?limit=10')
    assert {add, flaky, fails, secret} <= {t['id'] for t in listed['tasks']}


def test_revoking_a_queued_plain_task(webapp, start_daemon, producer):
    """POST /tasks/ID/revoke finds a plain producer's waiting task too;
    the consumer then skips it."""
    env, produce = webapp
    env = dict(env, HUEY_STATUS_TOKEN='t0ken')
    doomed, kept = produce(('add', [1, 1], {}), ('add', [2, 2], {}))
    server, port = start_status_server(start_daemon, env)
    client = Client(port, token='t0ken')
    status, body = client.json('POST', '/tasks/%s/revoke' % doomed)
    assert status == 200 and body['revoked'] is True, body
    assert body['state'] == 'pending'
    consumer = start_daemon(['consumer', '--workers', '1'], env, 'consumer')
    consumer.wait_for_output('consumer ready')
    assert wait_for_state(producer, kept, 'complete')['result'] == 4
    record = wait_for_state(producer, doomed, 'revoked')
    assert record['revoke_requested'] and record['first_seen_in'] == 'queue'
    assert history_states(record)[0] == 'pending'


def wait_for_state_over_http(client, task_id, state):
    def check():
        status, body = client.get('/tasks/%s' % task_id)
        return body if status == 200 and body['state'] == state else None
    return wait_until(check, what='%s to be %s' % (task_id, state))


@pytest.mark.parametrize('worker_type', ['thread', 'process'])
def test_first_seen_by_the_worker(webapp, start_daemon, producer,
                                  redis_server, worker_type):
    """Nobody asked while it waited: the worker that takes it writes the
    whole record, in one more round trip for such a task only."""
    env, produce = webapp
    env = dict(env, HUEY_WORKER_TYPE=worker_type)
    consumer = start_daemon(['consumer', '--workers', '1'], env, 'consumer')
    consumer.wait_for_output('consumer ready')
    with monitored(redis_server, producer.storage.conn) as entries:
        task_id, = produce(('add', [1, 2], {}))
        record = wait_for_state(producer, task_id, 'complete')

    assert record['result'] == 3 and record['name'] == 'webapp_tasks.add'
    assert record['args'] == {'args': [1, 2], 'kwargs': {}}
    assert record['first_seen_in'] == 'worker'
    assert record['first_seen'] == pytest.approx(record['started'], abs=1)
    assert record['enqueued'] is None
    assert record['retries_total'] == 0 and record['attempt'] == 1
    assert history_states(record) == ['running', 'complete']
    keys = producer.keys
    conn = producer.storage.conn
    assert conn.zscore(keys.journal_state('complete'), task_id)
    assert 0 < conn.ttl(keys.task(task_id)) <= 604800
    # Run once to its end: the record tells its history, no list.
    assert not conn.exists(keys.task_log(task_id))
    # The worker's transactions touching the record: the start, the rest
    # of the record (this task's only extra round trip), the outcome.
    blocks = _transactions_touching(entries, keys.task(task_id))
    assert len(blocks) == 3, blocks
    assert any('first_seen_in' in c for c in blocks[1]), blocks


def test_suite_tasks_pay_nothing_more(producer, base_env, start_daemon,
                                      redis_server):
    """The suite's own task: its record comes with the enqueue, and the
    worker's start sends no round trip more than before: the HSETNX that
    tells a record from none replaces the one that filled `enqueued`, and
    the read of since when the task was due (for the wait-time histogram)
    rides the same transaction."""
    import sample_tasks
    consumer = start_daemon(['consumer', '--workers', '1'], base_env)
    consumer.wait_for_output('consumer ready')
    # Redis knows the producer's script from then on: sent by SHA alone.
    wait_for_state(producer, sample_tasks.add(0, 0).id, 'complete')
    with monitored(redis_server, producer.storage.conn) as entries:
        result = sample_tasks.add(2, 3)
        record = wait_for_state(producer, result.id, 'complete')
    assert record['first_seen'] is None and record['first_seen_in'] is None
    assert record['enqueued'] is not None
    blocks = _transactions_touching(entries, producer.keys.task(result.id))
    assert len(blocks) == 3, blocks   # enqueue, start, outcome
    start = [c for c in blocks[1] if producer.keys.task(result.id) in c]
    # HMGET of the due times, then HDEL, HSETNX retries_total, HINCRBY
    # attempt, HSET: as before, less the HSETNX of enqueued.
    assert [c.split()[0] for c in start] == ['HMGET', 'HDEL', 'HINCRBY',
                                             'HSET', 'HSETNX'], start
    assert not any('first_seen' in c for b in blocks for c in b
                   if not c.startswith('HMGET'))


def _transactions_touching(entries, key):
    """The MULTI blocks (lists of commands) that wrote `key`; a script
    sent alone (the producer's enqueue) is a block of its one command,
    the commands it runs (MONITOR's `lua` entries) are left out."""
    open_blocks, out = {}, []
    for entry in entries:
        if entry.get('client_type') == 'lua':
            continue
        client = (entry.get('client_address'), entry.get('client_port'))
        command = entry['command']
        name = command.split(' ', 1)[0]
        if name == 'MULTI':
            open_blocks[client] = []
        elif name in ('EXEC', 'DISCARD'):
            block = open_blocks.pop(client, None)
            if block and any(key in c for c in block):
                out.append(block)
        elif client in open_blocks:
            open_blocks[client].append(command)
        elif key in command and name not in ('HGETALL', 'HGET', 'LRANGE',
                                             'STRLEN'):
            out.append([command])   # a write outside any transaction
    return out


def test_signed_messages(webapp, start_daemon, producer, tmp_path):
    """With [huey] secret_key the producer signs as the suite does:
    SignedSerializer(secret, salt='huey-worker').  An unsigned message, or
    one signed with Huey's default salt, is set aside and its task ends
    failed; a RedisExpireHuey producer reads the result back."""
    env, produce = webapp
    env = dict(env, HUEY_SECRET_KEY='s3cret')
    web = {'WEBAPP_SECRET': 's3cret', 'WEBAPP_EXPIRE': '1'}
    good, = produce(('add', [3, 4], {}), extra_env=web)
    unsigned, = produce(('add', [5, 6], {}), extra_env={'WEBAPP_EXPIRE': '1'})
    salted, = produce(('add', [7, 8], {}),
                      extra_env=dict(web, WEBAPP_SALT='huey'))
    consumer = start_daemon(['consumer', '--workers', '1'], env, 'consumer')
    consumer.wait_for_output('consumer ready')
    assert produce(result=good, extra_env=web) == {'result': 7}
    record = wait_for_state(producer, good, 'complete')
    assert record['result'] == 7 and record['first_seen_in'] == 'worker'
    for task_id in (unsigned, salted):
        record = wait_for_state(producer, task_id, 'failed')
        assert record['error']['type'] == 'DeadLetter'
        assert record['error']['dead_letter'] == 'bad-signature'
    assert producer.storage.conn.llen(producer.keys.dead) == 2


def test_compressed_messages(webapp, start_daemon, producer):
    """[huey] compression: Huey's zlib (use_zlib=True) in the producer
    runs; found while queued too (the id is read off the inflated
    beginning)."""
    env, produce = webapp
    module = produce.code / 'webapp_tasks.py'
    module.write_text(module.read_text().replace(
        "options = {}",
        "from huey.serializer import Serializer\n"
        "options = {'serializer': Serializer(compression=True, "
        "use_zlib=True)}"))
    env = dict(env, HUEY_WORKER_HUEY_COMPRESSION='true')
    task_id, = produce(('add', [1, 1], {}))
    assert producer.storage.conn.lindex('huey.redis.huey', 0)[:1] == b'\x78'
    shown = cli(env, 'task', task_id, '--json')
    assert shown.returncode == 0, shown.stderr
    assert json.loads(shown.stdout)['state'] == 'pending'
    consumer = start_daemon(['consumer', '--workers', '1'], env, 'consumer')
    consumer.wait_for_output('consumer ready')
    record = wait_for_state(producer, task_id, 'complete')
    assert record['result'] == 2 and record['first_seen_in'] == 'queue'


# --- the look into the queue, in this process --------------------------------

def _message(task_id, serializer=None, **options):
    from huey.registry import Message
    from huey.serializer import Serializer
    return (serializer or Serializer(**options)).serialize(Message(
        task_id, 'webapp_tasks.add', None, 0, 0, None, (1, 2), {}, None,
        None, None, None, None, None, None))


def test_the_look_is_bounded_incremental_and_takes_nothing(producer,
                                                           monkeypatch):
    from huey_worker.journal import seen
    monkeypatch.setattr(seen, 'SCAN_MAX', 300)
    storage = producer.storage
    conn = storage.conn
    index = seen.QueueIndex()
    ids = ['t-%04d' % i for i in range(400)]
    for task_id in ids:               # t-0399 ends up newest, at position 0
        conn.lpush(storage.queue_key, _message(task_id))
    assert index.find(storage, 't-0399') == 'webapp_tasks.add'
    assert index.find(storage, 't-0100') == 'webapp_tasks.add'
    assert index.find(storage, 't-0099') is None    # beyond the newest 300
    assert len(index.ids) == 300
    assert conn.llen(storage.queue_key) == 400

    # Only what was pushed since is read: the newest entry seen stops it.
    calls = []
    real = seen.script_for

    def counting(storage_, text):
        script = real(storage_, text)
        return lambda **kw: (calls.append(kw['args'][:2]), script(**kw))[1]
    monkeypatch.setattr(seen, 'script_for', counting)
    assert index.find(storage, 'nothing-like-it') is None
    assert calls == [[0, 7]]
    calls.clear()
    for i in range(20):
        conn.lpush(storage.queue_key, _message('new-%d' % i))
    assert index.find(storage, 'new-0') == 'webapp_tasks.add'
    assert calls == [[0, 7], [8, 135]]
    assert index.find(storage, 't-0200') == 'webapp_tasks.add'

    # A compressed, a signed, an old-protocol message; garbage is skipped.
    from huey.serializer import SignedSerializer
    conn.lpush(storage.queue_key, _message('zipped', compression=True,
                                           use_zlib=True))
    conn.lpush(storage.queue_key, _message(
        'signed', SignedSerializer('k', salt='huey-worker')))
    conn.lpush(storage.queue_key, _message('proto2',
                                           pickle_protocol=2))
    conn.lpush(storage.queue_key, b'not a pickle at all')
    conn.rpush(storage.queue_key, b'\x00priority')   # the priority marker
    for task_id in ('zipped', 'signed', 'proto2'):
        assert index.find(storage, task_id) == 'webapp_tasks.add'

    # The queue emptied (all taken): forgotten at the next full look.
    conn.delete(storage.queue_key)
    monkeypatch.setattr(seen, 'REFRESH_AFTER', 0.0)
    assert index.find(storage, 't-0399') is None and index.ids == {}


def test_a_record_written_meanwhile_is_never_overwritten(producer):
    """The reader's note is guarded: a worker that took the task between
    the look and the note has written the record, which stays as it is."""
    from huey_worker import journal
    storage = producer.storage
    storage.conn.lpush(storage.queue_key, _message('raced'))
    assert journal.find_queued(storage, 'raced') is not None
    storage.conn.hset(storage.keys.task('raced'),
                      mapping={'state': 'running', 'id': 'raced'})
    record = journal.seen_queued(producer, storage, 'raced')
    assert record['state'] == 'running' and record['first_seen'] is None


def test_with_the_journal_off_a_queued_task_is_shown_not_recorded(
        producer, monkeypatch):
    from huey_worker import config, overview
    monkeypatch.setenv('HUEY_WORKER_JOURNAL_ENABLED', 'false')
    producer.configure(config.load())
    try:
        storage = producer.storage
        storage.conn.lpush(storage.queue_key, _message('unrecorded'))
        found, record = overview.find_task(producer, 'unrecorded')
        assert found is storage
        assert record['state'] == 'pending' and record['enqueued'] is None
        assert record['name'] == 'webapp_tasks.add'
        assert record['first_seen_in'] == 'queue'
        assert not storage.conn.exists(storage.keys.task('unrecorded'))
        assert overview.find_task(producer, 'elsewhere') == (None, None)
    finally:
        monkeypatch.delenv('HUEY_WORKER_JOURNAL_ENABLED')
        producer.configure(config.load())


def test_a_task_module_with_its_own_huey_is_named_as_the_app(webapp,
                                                          tmp_path):
    env, _ = webapp
    env = {k: v for k, v in env.items() if k != 'HUEY_WORKER_HUEY_APP'}
    env['HUEY_MODULES'] = 'webapp_tasks'
    out = cli(env, 'submit', 'add', '1', '2')
    assert out.returncode == 78, out.stderr
    assert "task module 'webapp_tasks' declares its tasks on a RedisHuey " \
           "of its own (webapp_tasks.huey)" in out.stderr
    assert '[huey] app = webapp_tasks:huey' in out.stderr
