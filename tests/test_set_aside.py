"""Messages set aside as dead letters without running end their task: a
poller of the id (`huey-worker wait`, `huey-worker task`, GET /tasks/ID)
sees `failed` with the reason, for every kind of dead letter whose id can
be known; the id of a message that failed its checks is read off its
bytes, never by unpickling them."""
import base64
import json
import os
import pickle
import signal
import subprocess
import sys
import types
import uuid
import zlib

import pytest
from huey.registry import Message
from huey.serializer import SignedSerializer

from conftest import ROOT
from huey_worker import delivery, journal
from ops_helpers import Client, start_status_server, wait_until

RIGHT_KEY = 'the-consumers-key'
BAD_SIGNATURE = ("set aside: bad signature (the message was not signed "
                 "with this consumer's [huey] secret_key)")


def hw(*args, env, timeout=60):
    return subprocess.run([sys.executable, '-m', 'huey_worker'] + list(args),
                          capture_output=True, text=True, env=env, cwd=ROOT,
                          timeout=timeout)


def dead_letters(app):
    return [json.loads(r) for r in app.storage.conn.lrange(app.keys.dead, 0,
                                                            -1)]


def dead_letter_of(app, task_id):
    for record in dead_letters(app):
        if record.get('task_id') == task_id:
            return record
    return None


def record_of(app, task_id):
    return journal.read_task(app, app.storage, task_id)


def message_of(task_id, name='sample_tasks.add', args=(1, 2)):
    return Message(task_id, name, None, 0, 0, None, args, {}, None, None,
                   None, None, None, None, None)


# -- reading the id without unpickling ---------------------------------------

class Boom:
    """Unpickling it creates a directory: the proof that code ran."""

    def __init__(self, path):
        self.path = path

    def __reduce__(self):
        return (os.mkdir, (self.path,))


@pytest.mark.parametrize('protocol', range(pickle.HIGHEST_PROTOCOL + 1))
def test_the_id_is_read_off_every_pickle_protocol(protocol):
    task_id = str(uuid.uuid4())
    peeked = delivery.peek_message(pickle.dumps(message_of(task_id),
                                                protocol))
    assert (peeked.task_id, peeked.task_name) == (task_id, 'sample_tasks.add')
    assert peeked.unknown is None and not peeked.compressed


def test_signed_and_compressed_messages_and_what_is_not_a_message():
    task_id = str(uuid.uuid4())
    message = message_of(task_id)
    for serializer, compressed in (
            (SignedSerializer('k', salt='huey-worker'), False),
            (SignedSerializer('k', salt='huey-worker', compression=True,
                              use_zlib=True), True),
            (SignedSerializer('k', salt='huey-worker', compression=True),
             True)):   # gzip
        peeked = delivery.peek_message(serializer.serialize(message))
        assert peeked.task_id == task_id and peeked.compressed == compressed
    for raw, why in (
            (b'not a pickle at all', 'not a pickled Huey message'),
            (b'', 'not a pickled Huey message'),
            (pickle.dumps({'id': task_id}), 'not a pickled Huey message'),
            (pickle.dumps(message_of(42)), 'is not readable'),
            (b'\x78garbage', 'neither a pickle nor compressed data')):
        peeked = delivery.peek_message(raw)
        assert peeked.task_id is None and why in peeked.unknown, raw
    # A zip bomb is inflated no further than the id needs.
    bomb = zlib.compress(pickle.dumps(message_of(task_id, args=(
        'x' * (50 << 20),))))
    assert len(bomb) < 100000
    assert delivery.peek_message(bomb).task_id == task_id


def test_peeking_runs_nothing(tmp_path):
    task_id = str(uuid.uuid4())
    inside = tmp_path / 'inside-a-message'
    alone = tmp_path / 'on-its-own'
    raw = pickle.dumps(message_of(task_id, args=(Boom(str(inside)),)))
    assert delivery.peek_message(raw).task_id == task_id
    assert delivery.peek_message(pickle.dumps(Boom(str(alone)))).task_id \
        is None
    assert not inside.exists() and not alone.exists()
    pickle.loads(raw)   # the bytes do what the test says they do
    assert inside.exists()


# -- with real processes -----------------------------------------------------

def producer_env(base_env, **extra):
    env = dict(base_env)
    env.pop('HUEY_SECRET_KEY', None)
    env.update({k: str(v) for k, v in extra.items()})
    return env


def submit(env):
    done = hw('submit', 'sample_tasks.add', '1', '2', env=env)
    assert done.returncode == 0, done.stderr
    return done.stdout.strip()


def test_bad_signature_ends_the_task_failed_for_every_poller(
        producer, base_env, start_daemon):
    consumer_env = producer_env(base_env, HUEY_SECRET_KEY=RIGHT_KEY,
                                HUEY_STATUS_TOKEN='t0ken')
    consumer = start_daemon(['consumer', '--workers', '1'], consumer_env,
                            'consumer')
    consumer.wait_for_output('consumer ready')
    # Two real producer processes: one signing with another key, one not
    # signing at all, and that one with its journal off, so no record of
    # the task exists before the consumer sets it aside.
    wrong = submit(producer_env(base_env, HUEY_SECRET_KEY='another-key'))
    unsigned = submit(producer_env(base_env,
                                   HUEY_WORKER_JOURNAL_ENABLED='false'))

    for task_id, states in ((wrong, ['pending', 'failed']),
                            (unsigned, ['failed'])):
        waited = hw('wait', task_id, '--timeout', '30', '--quiet',
                    env=consumer_env)
        assert waited.returncode == 1, (waited.stdout, waited.stderr)
        assert waited.stdout.splitlines() == [
            '%s failed' % task_id, 'error: DeadLetter: %s' % BAD_SIGNATURE]
        shown = hw('task', task_id, '--json', env=consumer_env)
        record = json.loads(shown.stdout)
        assert record['state'] == 'failed' and record['terminal']
        assert record['name'] == 'sample_tasks.add'
        assert record['error'] == {'type': 'DeadLetter',
                                   'message': BAD_SIGNATURE,
                                   'dead_letter': 'bad-signature'}
        assert [e['state'] for e in record['history']] == states
        letter = dead_letter_of(producer, task_id)
        assert letter['reason'] == 'bad-signature'
        assert letter['task_name'] == 'sample_tasks.add'
        assert letter['task_id_verified'] is False
        assert 'message set aside as dead letter (bad-signature), task %s ' \
               '(id unverified)' % task_id in consumer.output()

    server, port = start_status_server(start_daemon, consumer_env)
    status, body = Client(port, token='t0ken').get('/tasks/%s' % unsigned)
    assert status == 200
    assert (body['state'], body['terminal']) == ('failed', True)
    assert body['error']['message'] == BAD_SIGNATURE
    assert len(dead_letters(producer)) == 2
    assert consumer.proc.poll() is None

    # Once the producers have the right key, an operator requeues the
    # dead letter: the task is pending again, runs, and completes.
    requeued = hw('dead-letters', 'requeue', unsigned, env=consumer_env)
    assert '1 requeued' in requeued.stdout
    # Its message is still unsigned: set aside again, failed again.
    record = wait_until(lambda: (lambda r: r if r['state'] == 'failed' and
                                 r['requeues'] == 1 else None)(
        record_of(producer, unsigned)), what='the requeued message set aside '
        'again')
    states = [e['state'] for e in record['history']]
    assert states == ['failed', 'pending', 'failed']
    assert record['requeued_reason'] == 'dead-letter'


def test_a_forged_message_does_not_undo_a_real_outcome(
        producer, base_env, start_daemon):
    import sample_tasks
    env = producer_env(base_env)
    consumer = start_daemon(['consumer', '--workers', '1'], env, 'consumer')
    consumer.wait_for_output('consumer ready')
    done = sample_tasks.add(20, 22)
    assert done.get(blocking=True, timeout=20) == 42
    before = record_of(producer, done.id)
    # The same id in a message that cannot be read: set aside with its id,
    # but the finished task's record stays as it was.
    conn = producer.storage.conn
    conn.lpush(producer.storage.queue_key,
               zlib.compress(pickle.dumps(message_of(done.id))))
    wait_until(lambda: dead_letter_of(producer, done.id),
               what='the forged message set aside')
    assert record_of(producer, done.id) == before
    letter = dead_letter_of(producer, done.id)
    assert letter['reason'] == 'undecodable'
    assert letter['hint'] == ("the message is compressed and this "
                              "consumer's [huey] compression is off")


def test_undecodable_messages_end_failed_when_their_id_is_readable(
        producer, base_env, start_daemon, monkeypatch):
    env = producer_env(base_env, HUEY_STATUS_TOKEN='t0ken')
    # Arguments of a class the consumer cannot import: the message is a
    # sound pickle that does not unpickle there.
    module = types.ModuleType('only_in_the_producer')

    class Thing:
        pass
    Thing.__module__ = module.__name__
    Thing.__qualname__ = 'Thing'
    module.Thing = Thing
    monkeypatch.setitem(sys.modules, module.__name__, module)
    task_id = str(uuid.uuid4())
    conn = producer.storage.conn
    conn.lpush(producer.storage.queue_key,
               producer.serializer.serialize(message_of(task_id,
                                                        args=(Thing(),))))
    conn.lpush(producer.storage.queue_key, b'not a pickle at all')
    consumer = start_daemon(['consumer', '--workers', '1'], env, 'consumer')
    wait_until(lambda: len(dead_letters(producer)) == 2,
               what='two dead letters')

    waited = hw('wait', task_id, '--timeout', '30', '--quiet', '--json',
                env=env)
    assert waited.returncode == 1, waited.stderr
    record = json.loads(waited.stdout)
    assert record['state'] == 'failed'
    assert record['error'] == {
        'type': 'DeadLetter', 'dead_letter': 'undecodable',
        'message': "set aside: undecodable message (ModuleNotFoundError: No "
                   "module named 'only_in_the_producer')"}
    garbage = [r for r in dead_letters(producer) if r['task_id'] is None]
    assert len(garbage) == 1 and garbage[0]['task_id_verified'] is None
    assert garbage[0]['detail'] == (
        "UnpicklingError: invalid load key, 'n'.; the task id cannot be "
        "known: the message is not a pickled Huey message")
    assert 'dead letter (undecodable), task (id unknown)' in consumer.output()
    listed = hw('dead-letters', 'list', env=env).stdout
    assert 'the task id cannot be known' in listed

    server, port = start_status_server(start_daemon, env)
    status, body = Client(port, token='t0ken').get('/tasks/%s' % task_id)
    assert status == 200 and body['state'] == 'failed'


def test_unknown_task_ends_failed_and_runs_after_a_requeue(
        producer, base_env, start_daemon):
    import sample_tasks
    env = producer_env(base_env)
    without = start_daemon(['consumer', '--workers', '1'],
                           dict(env, HUEY_MODULES='delivery_tasks'),
                           'without-the-module')
    without.wait_for_output('consumer ready')
    result = sample_tasks.add(2, 3)
    waited = hw('wait', result.id, '--timeout', '30', '--quiet', env=env)
    assert waited.returncode == 1, waited.stderr
    assert waited.stdout.splitlines()[1] == (
        'error: DeadLetter: set aside: unknown task (HueyException: '
        'sample_tasks.add not found in TaskRegistry)')
    letter = dead_letter_of(producer, result.id)
    assert letter['reason'] == 'unknown-task'
    assert letter['task_id_verified'] is True
    without.signal(signal.SIGTERM)
    assert without.wait() == 0

    # Deployed: requeued, the record is pending again, then complete.
    assert '1 requeued' in hw('dead-letters', 'requeue', result.id,
                              env=env).stdout
    record = record_of(producer, result.id)
    assert record['state'] == 'pending' and not record['terminal']
    assert record['error'] is None and record['finished'] is None
    start_daemon(['consumer', '--workers', '1'], env, 'with-the-module')
    assert result.get(blocking=True, timeout=30) == 5
    record = wait_until(lambda: (lambda r: r if r['terminal'] else None)(
        record_of(producer, result.id)), what='the requeued task to end')
    assert record['state'] == 'complete'
    assert [e['state'] for e in record['history']] == \
        ['pending', 'failed', 'pending', 'running', 'complete']


def test_a_dead_letter_record_carries_the_message_whole():
    raw = SignedSerializer('x', salt='huey-worker').serialize(
        message_of('abc'))
    record = delivery.dead_letter_record(raw, 'bad-signature', 'detail')
    assert base64.b64decode(record['message']) == raw
    assert record['task_id'] is None and record['task_id_verified'] is None
