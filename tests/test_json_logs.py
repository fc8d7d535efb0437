"""[logging] format = json: a real consumer with process workers and a
real status endpoint write one JSON object per line, with the stable keys
(docs/operations.md), on stderr and in the log file, and keep doing so in
a new file after logrotate's rename (noticed by themselves and on
SIGUSR1)."""
import json
import os
import signal

import pytest

from ops_helpers import start_status_server, wait_for_state, wait_until

import sample_tasks

KEYS = {'time', 'level', 'logger', 'process', 'message'}


def json_lines(text):
    """Every line of `text` parsed; fails on a line that is not one JSON
    object."""
    out = []
    for line in text.splitlines():
        if not line.strip():
            continue
        record = json.loads(line)
        assert isinstance(record, dict), line
        assert KEYS <= set(record), line
        out.append(record)
    return out


@pytest.fixture
def env(base_env, tmp_path):
    return dict(base_env, HUEY_WORKER_LOGGING_FORMAT='json',
                HUEY_WORKER_LOGGING_FILE=str(tmp_path / 'hw.log'),
                HUEY_WORKER_TYPE='process',
                HUEY_WORKER_DELIVERY_HEARTBEAT_INTERVAL='0.3')


def test_json_lines_from_every_process_and_after_rotation(
        producer, env, start_daemon, tmp_path):
    log_path = tmp_path / 'hw.log'
    consumer = start_daemon(['consumer', '--workers', '2'], env, 'consumer')
    consumer.wait_for_output('consumer ready')
    status, _ = start_status_server(start_daemon, env)
    done = sample_tasks.add(1, 2)
    failed = sample_tasks.boom()
    retried = sample_tasks.fail_once(str(tmp_path / 'fail-once'))
    wait_for_state(producer, done.id, 'complete')
    wait_for_state(producer, failed.id, 'failed')
    wait_for_state(producer, retried.id, 'complete')

    def ends_logged():
        records = json_lines(log_path.read_text())
        ends = {r['task_id']: r for r in records
                if r['logger'] == 'huey_worker.task'
                and r['message'].startswith('end ')}
        return records if {done.id, failed.id} <= set(ends) else None
    records = wait_until(ends_logged, what='both end lines in the file')
    end = [r for r in records if r.get('task_id') == done.id
           and r['message'].startswith('end ')][0]
    assert end['task'] == 'sample_tasks.add'
    assert end['outcome'] == 'complete'
    assert isinstance(end['duration'], float) and end['level'] == 'INFO'
    assert end['time'].endswith('Z') and 'T' in end['time']
    start = [r for r in records if r.get('task_id') == done.id
             and r['message'].startswith('start ')][0]
    assert start['outcome'] == 'started'
    # The attempt (the journal's count of runs) on start and end lines.
    assert start['attempt'] == 1 and end['attempt'] == 1
    def retried_ends():
        ends = [r['attempt'] for r in json_lines(log_path.read_text())
                if r.get('task_id') == retried.id and
                r['message'].startswith('end ')]
        return ends if len(ends) == 2 else None
    assert sorted(wait_until(retried_ends, what='the retried ends')) == [1, 2]
    boom = [r for r in records if r.get('task_id') == failed.id
            and r['message'].startswith('end ')][0]
    assert boom['outcome'] == 'failed'
    # The traceback of the failure stays inside one record.
    assert any('ValueError' in r.get('exception', '') + r['message']
               for r in records)
    # The consumer (main process), its process workers, the status server.
    processes = {r['process'] for r in records}
    worker_pids = {r['process'] for r in records
                   if r['logger'] == 'huey_worker.task'}
    assert worker_pids and str(consumer.pid) not in ' '.join(worker_pids)
    assert any(p.endswith(' %d' % consumer.pid) for p in processes)
    assert any(p.endswith(' %d' % status.pid) for p in processes)
    # stderr carries the same format.
    json_lines(consumer.output())

    # logrotate's rename: the next lines go to a new file at the path.
    os.rename(log_path, tmp_path / 'hw.log.1')
    consumer.signal(signal.SIGUSR1)
    again = sample_tasks.add(2, 3)
    wait_for_state(producer, again.id, 'complete')

    def in_new_file():
        if not log_path.exists():
            return None
        return [r for r in json_lines(log_path.read_text())
                if r.get('task_id') == again.id] or None
    wait_until(in_new_file, what='the next task in the new file')
    json_lines((tmp_path / 'hw.log.1').read_text())


def test_formatter_keeps_one_record_per_line():
    import logging
    from huey_worker.logs import JsonFormatter
    record = logging.LogRecord('huey_worker.task', logging.INFO, __file__, 1,
                               'end %s %s %s %.3fs',
                               ('m.t', 'id-1', 'failed', 0.25), None)
    record.attempt = 2
    line = JsonFormatter().format(record)
    assert '\n' not in line
    out = json.loads(line)
    assert (out['task'], out['task_id'], out['outcome'], out['duration'],
            out['attempt']) == ('m.t', 'id-1', 'failed', 0.25, 2)
    assert out['message'] == 'end m.t id-1 failed 0.250s'
    record = logging.LogRecord('x', logging.ERROR, __file__, 1,
                               'two\nlines "quoted"', (), None)
    line = JsonFormatter().format(record)
    assert '\n' not in line
    assert json.loads(line)['message'] == 'two\nlines "quoted"'
    assert 'task' not in json.loads(line)


def test_a_time_out_line_names_its_outcome_and_duration():
    import logging
    from huey_worker.logs import JsonFormatter
    record = logging.LogRecord(
        'huey_worker.task', logging.WARNING, __file__, 1,
        'end %s %s failed %.3fs (TaskTimeout: %s)',
        ('m.t', 'id-2', 1.5, 'over 1s'), None)
    out = json.loads(JsonFormatter().format(record))
    assert (out['task'], out['task_id'], out['outcome'], out['duration']) \
        == ('m.t', 'id-2', 'failed', 1.5)
