"""Expected task rejections (TaskRejected, and the built-in tasks'
InputRejected / PdfRejected): the task ends failed at once with the reason
in the journal and Huey's stored error, is not retried, and the consumer
logs one WARNING line naming the task, its id and the reason, with no
traceback; an unexpected exception keeps its traceback and its retries.
Real consumers, in thread and process mode, and their log output."""
import os
import signal
import subprocess
import sys
import textwrap

import pytest
from huey.exceptions import TaskException

from conftest import ROOT
from task_helpers import wait_terminal

TASKS = '''
from huey_worker.app import huey
from huey_worker.tasks.runtime import TaskRejected


class NoSuchOrder(TaskRejected):
    pass


@huey.task(retries=2, retry_delay=0)
def refuse(order_id):
    raise NoSuchOrder('no order %s' % order_id)


@huey.task(retries=1, retry_delay=0)
def crash(marker):
    with open(marker, 'a') as fh:
        fh.write('x')
    raise ValueError('nobody expected this')
'''


def lines_about(output, task_id):
    return [line for line in output.splitlines() if task_id in line]


def history(record):
    return [event['state'] for event in record['history']]


@pytest.fixture
def env(base_env, tmp_path):
    modules = tmp_path / 'modules'
    modules.mkdir()
    (modules / 'rejecting_tasks.py').write_text(textwrap.dedent(TASKS))
    return dict(base_env,
                PYTHONPATH=str(modules) + os.pathsep + base_env['PYTHONPATH'],
                HUEY_MODULES='sample_tasks,rejecting_tasks',
                HUEY_WORKER_TASKS_BUILTIN='true',
                HUEY_WORKER_PDF_INPUT_ROOT=str(tmp_path / 'no-such-dir'),
                HUEY_WORKER_PDF_OUTPUT_ROOT=str(tmp_path / 'output'))


def submit(env, *args):
    done = subprocess.run([sys.executable, '-m', 'huey_worker', 'submit']
                          + list(args), capture_output=True, text=True,
                          env=env, cwd=ROOT, timeout=60)
    assert done.returncode == 0, done.stderr
    return done.stdout.strip()


@pytest.mark.parametrize('worker_type,task_events', [('thread', 'both'),
                                                     ('process', 'none')])
def test_a_rejection_is_one_warning_line_and_no_retry(
        producer, env, tmp_path, start_daemon, worker_type, task_events):
    from huey_worker.tasks import pdf
    env = dict(env, HUEY_WORKER_TYPE=worker_type, HUEY_WORKERS='1',
               HUEY_WORKER_LOGGING_TASK_EVENTS=task_events)
    consumer = start_daemon(['consumer'], env, 'consumer')
    consumer.wait_for_output('consumer ready')
    missing = str(tmp_path / 'no-such-dir')

    # A built-in task: pdf.extract with its input root missing.
    result = pdf.extract('report.pdf', retries=3, retry_delay=0)
    record = wait_terminal(producer, result.id)
    reason = '[pdf] input_root %s is not a directory' % missing
    assert record['state'] == 'failed', record
    error = dict(record['error'])
    assert error.pop('traceback').rstrip().endswith('PdfRejected: ' + reason)
    assert error == {'type': 'PdfRejected', 'message': reason,
                     'dead_letter': None}
    assert record['attempt'] == 1 and record['retries_left'] == 0
    assert history(record) == ['pending', 'running', 'failed']
    with pytest.raises(TaskException) as stored:
        result.get()
    assert stored.value.metadata['error'] == 'PdfRejected: %s' % reason

    # A task of the user's own, with retries of its own.
    refused = submit(env, 'rejecting_tasks.refuse', '42')
    record = wait_terminal(producer, refused)
    assert record['state'] == 'failed' and record['attempt'] == 1
    assert record['error']['type'] == 'NoSuchOrder'
    assert record['error']['message'] == 'no order 42'

    output = consumer.output()
    assert 'Traceback' not in output and 'ERROR' not in output, output
    for task_id, name, why in (
            (result.id, 'huey_worker.tasks.pdf.extract',
             'PdfRejected: ' + reason),
            (refused, 'rejecting_tasks.refuse', 'NoSuchOrder: no order 42')):
        about = lines_about(output, task_id)
        ends = [line for line in about if ' end ' in line]
        assert len(ends) == 1, about
        assert ' WARNING ' in ends[0]
        assert ends[0].endswith(
            'huey_worker.task: end %s %s failed %s (rejected, not retried: '
            '%s)' % (name, task_id, ends[0].split(' failed ')[1].split()[0],
                     why)), ends[0]
        # Besides it, only the start line that task_events=both asks for.
        assert len(about) == (2 if task_events == 'both' else 1), about
    consumer.signal(signal.SIGTERM)
    assert consumer.wait() == 0


def test_an_unexpected_exception_keeps_its_traceback_and_retries(
        producer, env, tmp_path, start_daemon):
    consumer = start_daemon(['consumer', '--workers', '1'], env, 'consumer')
    consumer.wait_for_output('consumer ready')
    marker = tmp_path / 'runs'
    crashed = submit(env, 'rejecting_tasks.crash', str(marker))
    record = wait_terminal(producer, crashed)
    assert record['state'] == 'failed' and record['attempt'] == 2
    assert record['error']['type'] == 'ValueError'
    assert marker.read_text() == 'xx'   # retried once, as it asked
    output = consumer.output()
    assert output.count('ERROR [MainProcess %d] huey: Unhandled exception in '
                        'task %s.' % (consumer.pid, crashed)) == 2, output
    assert output.count('ValueError: nobody expected this') == 2
    assert output.count('Traceback (most recent call last)') == 2
    assert 'rejected' not in output
    consumer.signal(signal.SIGTERM)
    assert consumer.wait() == 0
