"""A user's own task module, outside the package and named in the config
([tasks] python_path + modules), runs the same way as the built-in tasks:
loaded by a real consumer, submitted by name from the command line, with
progress in the journal."""
import json
import os
import subprocess
import sys
import textwrap
import uuid

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

USER_MODULE = '''
"""Somebody's own tasks, written against the shared app."""
import os

from huey_worker import huey
from huey_worker.journal import report_progress


@huey.task(retries=2, retry_delay=0)
def shout(words):
    for done, word in enumerate(words, 1):
        report_progress(done, len(words), 'shouting %s' % word,
                        last_word=word)
    return {'text': ' '.join(w.upper() for w in words), 'pid': os.getpid()}


@huey.task(retries=1, retry_delay=0)
def fails_once(marker):
    if not os.path.exists(marker):
        open(marker, 'w').close()
        raise RuntimeError('first attempt fails on purpose')
    return 'second attempt worked'
'''


def user_setup(base_env, tmp_path, worker_type):
    module = 'acme_tasks_%s' % uuid.uuid4().hex[:8]
    code_dir = tmp_path / 'somewhere-else'
    code_dir.mkdir()
    (code_dir / (module + '.py')).write_text(USER_MODULE)
    config_path = base_env['HUEY_WORKER_CONFIG']
    with open(config_path, 'w') as fh:
        fh.write(textwrap.dedent('''\
            [tasks]
            python_path = %s
            modules = %s
            builtin = true

            [consumer]
            worker_type = %s
            workers = 2
            ''' % (code_dir, module, worker_type)))
    env = {k: v for k, v in base_env.items()
           if k not in ('HUEY_MODULES', 'HUEY_WORKER_TASKS_BUILTIN')}
    env.pop('PYTHONPATH', None)  # the user's directory comes from the config
    return env, module


def cli(env, *args):
    return subprocess.run([sys.executable, '-m', 'huey_worker'] + list(args),
                          env=env, cwd=ROOT, capture_output=True, text=True,
                          timeout=60)


@pytest.mark.parametrize('worker_type', ['thread', 'process'])
def test_a_user_module_named_in_the_config_runs_like_the_builtins(
        tmp_path, base_env, start_daemon, worker_type):
    env, module = user_setup(base_env, tmp_path, worker_type)
    consumer = start_daemon(['consumer'], env, 'consumer')
    consumer.wait_for_output('consumer ready')
    registered = consumer.output()
    assert '%s.shout' % module in registered
    assert 'huey_worker.tasks.pdf.extract' in registered

    done = cli(env, 'submit', 'shout', '["huey", "worker"]', '--wait')
    assert done.returncode == 0, done.stderr
    result = json.loads(done.stdout.strip().splitlines()[-1])
    assert result['text'] == 'HUEY WORKER'
    if worker_type == 'process':
        assert result['pid'] != consumer.pid
    assert '2/2' in done.stderr

    task_id = done.stdout.split()[0]
    shown = cli(env, 'task', task_id, '--json')
    assert shown.returncode == 0, shown.stderr
    record = json.loads(shown.stdout)
    assert record['name'] == '%s.shout' % module
    assert record['metadata'] == {'last_word': 'worker'}
    assert record['progress']['message'] == 'shouting worker'

    marker = str(tmp_path / 'marker')
    retried = cli(env, 'submit', 'fails_once', marker, '--wait', '--json')
    assert retried.returncode == 0, retried.stderr
    record = json.loads(retried.stdout)
    assert record['state'] == 'complete' and record['attempt'] == 2
    assert record['result'] == 'second attempt worked'


def test_a_user_module_that_does_not_import_is_a_config_error(
        tmp_path, base_env, start_daemon):
    env, module = user_setup(base_env, tmp_path, 'thread')
    broken = tmp_path / 'somewhere-else' / (module + '.py')
    broken.write_text('import no_such_dependency_here\n')
    consumer = start_daemon(['consumer'], env, 'consumer')
    assert consumer.wait(30) == 78
    assert "cannot import task module '%s'" % module in consumer.output()
    assert 'no_such_dependency_here' in consumer.output()
