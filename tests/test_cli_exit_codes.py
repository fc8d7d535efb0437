"""One exit-code rule for every `huey-worker` command, as a user meets it
(real processes, the private Redis, a port where nothing listens):
Redis unreachable is one line naming the Redis and exit 69; a usage error
is click's message and exit 64; output into a closed pipe ends quietly, as
GNU tools do (killed by SIGPIPE); Ctrl-C ends as killed by SIGINT."""
import json
import os
import signal
import socket
import subprocess
import sys
import time

import pytest

from conftest import ROOT

DOWN_COMMANDS = [
    ('status',),
    ('status', '--json'),
    ('task', 'some-id'),
    ('task', 'some-id', '--json'),
    ('wait', 'some-id', '-q'),
    ('workers',),
    ('submit', 'add', '1', '2'),
    ('submit', 'add', '1', '2', '--wait'),
    ('dead-letters', 'list'),
    ('dead-letters', 'list', '--json'),
    ('dead-letters', 'requeue', '--all'),
    ('dead-letters', 'requeue', 'some-id'),
    ('dead-letters', 'purge', '--all'),
    ('dead-letters', 'purge', 'some-id'),
]


def cli(env, *args, timeout=60, **kwargs):
    kwargs.setdefault('capture_output', True)
    return subprocess.run([sys.executable, '-m', 'huey_worker'] + list(args),
                          env=env, cwd=ROOT, text=True, timeout=timeout,
                          **kwargs)


@pytest.fixture(scope='module')
def dead_port():
    """A port where nothing listens (bound, then closed; nothing else in
    the test binds it)."""
    with socket.socket() as s:
        s.bind(('127.0.0.1', 0))
        return s.getsockname()[1]


@pytest.fixture
def down_env(base_env, dead_port):
    return dict(base_env,
                HUEY_REDIS_URL='redis://:s3cret@127.0.0.1:%d/0' % dead_port,
                HUEY_WORKER_REDIS_CONNECT_TIMEOUT='0.2')


# -- Redis unreachable: one line, the Redis named, exit 69 -------------------

@pytest.mark.parametrize('args', DOWN_COMMANDS, ids=' '.join)
def test_redis_unreachable_is_one_line_naming_it_and_exit_69(down_env,
                                                             dead_port, args):
    run = cli(down_env, *args)
    assert run.returncode == 69, (run.returncode, run.stdout, run.stderr)
    lines = run.stderr.splitlines()
    assert len(lines) == 1, run.stderr
    assert lines[0].startswith(
        'huey-worker: Redis unreachable at redis://:***@127.0.0.1:%d/0 ('
        % dead_port), lines[0]
    assert 's3cret' not in run.stderr
    assert run.stdout == ''


def test_redis_given_by_host_and_port_is_named_too(base_env, dead_port):
    env = {k: v for k, v in base_env.items() if k != 'HUEY_REDIS_URL'}
    env.update(REDIS_HOST='127.0.0.1', REDIS_PORT=str(dead_port),
               REDIS_DB='3', HUEY_WORKER_REDIS_CONNECT_TIMEOUT='0.2')
    run = cli(env, 'workers')
    assert run.returncode == 69
    assert run.stderr.startswith(
        'huey-worker: Redis unreachable at redis://127.0.0.1:%d/3 ('
        % dead_port), run.stderr


def test_config_check_does_not_contact_redis(down_env):
    run = cli(down_env, 'config', '--check')
    assert run.returncode == 0, run.stderr
    assert 'configuration OK' in run.stderr


# -- usage errors: click's message, exit 64 -----------------------------------

USAGE_ERRORS = [
    (('status', '--bogus'), "No such option '--bogus'"),
    (('nosuch',), "No such command 'nosuch'"),
    (('submit',), "Missing argument 'NAME'"),
    (('status', '--recent', '-1'), "Invalid value for '--recent'"),
    (('wait', 'x', '--timeout', 'soon'), "Invalid value for '--timeout'"),
    (('dead-letters', 'bogus'), "No such command 'bogus'"),
    (('dead-letters', 'purge', 'x', '--all'), 'give IDs or --all, not both'),
    (('dead-letters', 'purge'), 'name dead-letter IDs or task IDs, or --all'),
    (('dead-letters', 'requeue'), 'name dead-letter IDs or task IDs, or '
                                  '--all'),
    (('dead-letters',), 'Commands:'),
    ((), 'Commands:'),
]


@pytest.mark.parametrize('args, message', USAGE_ERRORS,
                         ids=[' '.join(a) or '(none)'
                              for a, _ in USAGE_ERRORS])
def test_every_usage_error_exits_64(down_env, args, message):
    run = cli(down_env, *args)
    assert run.returncode == 64, (args, run.returncode, run.stderr)
    assert message in run.stderr
    assert 'Traceback' not in run.stderr and run.stdout == ''


def test_click_usage_message_is_kept(down_env):
    run = cli(down_env, 'status', '--bogus')
    assert run.stderr.splitlines()[0].startswith('Usage: ')
    assert "--help' for help." in run.stderr
    assert run.stderr.splitlines()[-1] == "Error: No such option '--bogus'."


@pytest.mark.parametrize('args', [('--help',), ('-h',), ('--version',),
                                  ('status', '--help'),
                                  ('dead-letters', '--help'),
                                  ('dead-letters', 'purge', '--help')],
                         ids=' '.join)
def test_help_and_version_exit_0(down_env, args):
    run = cli(down_env, *args)
    assert run.returncode == 0, run.stderr
    assert run.stdout and run.stderr == ''


# -- a closed stdout ends quietly ---------------------------------------------

def into_closed_pipe(env, *args):
    """Run with stdout a pipe whose reader has already gone (as in
    `huey-worker ... | true`, or `| head -1` once head has its line)."""
    read_end, write_end = os.pipe()
    os.close(read_end)
    try:
        return subprocess.run(
            [sys.executable, '-m', 'huey_worker'] + list(args), env=env,
            cwd=ROOT, stdout=write_end, stderr=subprocess.PIPE, text=True,
            timeout=60)
    finally:
        os.close(write_end)


def test_output_into_a_closed_pipe_ends_as_gnu_tools_do(producer, base_env):
    import sample_tasks
    task_id = sample_tasks.add(1, 2).id
    for args in (('task', task_id, '--json'), ('task', task_id),
                 ('status',), ('workers', '--json'),
                 ('dead-letters', 'list'), ('config',), ('config', '--json'),
                 ('config', '--reference'), ('--help',), ('status', '--help')):
        run = into_closed_pipe(base_env, *args)
        # Killed by SIGPIPE: the shell shows 141, and nothing is printed.
        assert run.returncode == -signal.SIGPIPE, (args, run.returncode,
                                                   run.stderr)
        assert run.stderr == '', (args, run.stderr)


def test_a_shell_pipeline_sees_141(base_env):
    # `true` is long gone when huey-worker starts writing.
    script = ('{ sleep 0.5; exec "$@" config --json; } | true; '
              'echo "status=${PIPESTATUS[0]}"')
    run = subprocess.run(['bash', '-c', script, 'bash', sys.executable, '-m',
                          'huey_worker'], env=base_env, cwd=ROOT,
                         capture_output=True, text=True, timeout=60)
    assert run.stdout.strip() == 'status=141', run.stdout + run.stderr
    assert run.stderr == ''


# -- Ctrl-C -------------------------------------------------------------------

def test_ctrl_c_ends_as_killed_by_sigint(producer, base_env):
    import sample_tasks
    task_id = sample_tasks.add(1, 2).id   # no consumer: it stays pending
    proc = subprocess.Popen(
        [sys.executable, '-m', 'huey_worker', 'wait', task_id], env=base_env,
        cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        assert proc.stderr.readline().startswith('pending')
        time.sleep(0.2)
        proc.send_signal(signal.SIGINT)
        out, err = proc.communicate(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == -signal.SIGINT, (proc.returncode, err)
    assert 'Traceback' not in err and 'Aborted' not in err
    assert out == ''
    assert json.loads(cli(base_env, 'task', task_id, '--json').stdout)[
        'state'] == 'pending'


# -- immediate mode: no queue to operate on, a config error (78) ---------------

IMMEDIATE_COMMANDS = [
    ('status',), ('status', '--json'), ('task', 'some-id'),
    ('wait', 'some-id'), ('workers',), ('dead-letters', 'list'),
    ('dead-letters', 'purge', '--all'), ('dead-letters', 'requeue', '--all'),
    ('submit', 'add', '1', '2'), ('submit', 'add', '1', '2', '--wait'),
]


@pytest.mark.parametrize('args', IMMEDIATE_COMMANDS, ids=' '.join)
def test_operator_commands_refuse_immediate_mode(base_env, args):
    run = cli(dict(base_env, HUEY_IMMEDIATE='1'), *args)
    assert run.returncode == 78, (run.returncode, run.stderr)
    lines = run.stderr.splitlines()
    assert len(lines) == 1, run.stderr
    assert lines[0].startswith("huey-worker: config error: [huey] immediate "
                               "= 'true' (env HUEY_IMMEDIATE): immediate "
                               "mode runs tasks in the producer, so there is "
                               "no queue for `huey-worker "), lines[0]
    assert run.stdout == ''


def test_submit_in_immediate_mode_runs_nothing(base_env, tmp_path):
    marker = tmp_path / 'ran'
    code = tmp_path / 'mods'
    code.mkdir()
    (code / 'touching.py').write_text(
        'from huey_worker import huey\n\n\n@huey.task()\n'
        'def touch(path):\n    open(path, "w").close()\n')
    env = dict(base_env, HUEY_IMMEDIATE='1', HUEY_MODULES='touching',
               PYTHONPATH=str(code))
    run = cli(env, 'submit', 'touch', str(marker))
    assert run.returncode == 78, run.stderr
    assert 'to enqueue into: it would run the task in this command' in \
        run.stderr
    assert not marker.exists()


def test_status_server_refuses_immediate_mode(base_env):
    run = cli(dict(base_env, HUEY_IMMEDIATE='true'), 'status-server',
              '--port', '0', timeout=30)
    assert run.returncode == 78, (run.returncode, run.stderr)
    assert ("[huey] immediate = 'true' (env HUEY_IMMEDIATE): immediate mode "
            "runs tasks in the producer, so there is no queue for the status "
            "endpoint to report") in run.stderr
    assert 'Traceback' not in run.stderr


# -- a task module that exits at import: a config error (78) -----------------

@pytest.mark.parametrize('body, did', [
    ('import sys\nsys.exit(3)\n', 'called sys.exit(3)'),
    ('raise SystemExit\n', 'called sys.exit()'),
    ('raise KeyboardInterrupt\n', 'raised KeyboardInterrupt'),
], ids=['sys.exit(3)', 'SystemExit', 'KeyboardInterrupt'])
def test_task_module_exiting_at_import_is_a_config_error(base_env, tmp_path,
                                                         body, did):
    (tmp_path / 'quitter.py').write_text(body)
    env = dict(base_env, HUEY_MODULES='quitter', PYTHONPATH=str(tmp_path))
    for args in (('config', '--check'), ('submit', 'add', '1')):
        run = cli(env, *args)
        assert run.returncode == 78, (args, run.returncode, run.stderr)
        assert run.stderr.splitlines() == [
            "huey-worker: config error: [tasks] modules = 'quitter' (env "
            "HUEY_MODULES): cannot import task module 'quitter': %s" % did]


# -- output that cannot be written: 74, never 69 -------------------------------

FULL = '/dev/full'


def into_full_disk(env, *args):
    with open(FULL, 'w') as full:
        return cli(env, *args, capture_output=False, stdout=full,
                   stderr=subprocess.PIPE)


@pytest.mark.skipif(not os.path.exists(FULL), reason='no /dev/full')
@pytest.mark.parametrize('args', [
    ('config',), ('config', '--json'), ('--help',), ('--version',),
    ('status',), ('status', '--json'), ('workers',),
    ('dead-letters', 'list', '--json'),
], ids=' '.join)
def test_output_to_a_full_disk_is_74_not_69(producer, base_env, args):
    run = into_full_disk(base_env, *args)
    assert run.returncode == 74, (run.returncode, run.stderr)
    assert run.stderr.splitlines() == [
        'huey-worker: cannot write the output: No space left on device']


@pytest.mark.skipif(not os.path.exists(FULL), reason='no /dev/full')
def test_task_wait_to_a_full_disk_is_74(producer, base_env):
    import sample_tasks
    task_id = sample_tasks.add(1, 2).id
    for args in (('task', task_id), ('task', task_id, '--json'),
                 ('wait', task_id, '--timeout', '0.1', '--json')):
        run = into_full_disk(base_env, *args)
        assert run.returncode == 74, (args, run.returncode, run.stderr)
        assert run.stderr.splitlines()[-1] == (
            'huey-worker: cannot write the output: No space left on device')


@pytest.mark.skipif(not os.path.exists(FULL), reason='no /dev/full')
def test_submit_to_a_full_disk_says_the_task_was_enqueued(producer,
                                                          base_env):
    import sample_tasks
    run = into_full_disk(base_env, 'submit', 'add', '1', '2')
    assert run.returncode == 74, (run.returncode, run.stderr)
    lines = run.stderr.splitlines()
    assert len(lines) == 1, run.stderr
    assert lines[0].startswith('huey-worker: cannot write the output: No '
                               'space left on device (the task '), lines[0]
    assert 'WAS enqueued, id ' in lines[0]
    task_id = lines[0].split('WAS enqueued, id ')[1].split(';')[0]
    # It is in the queue: nobody needs to submit it again.
    assert sample_tasks.huey.pending_count() == 1
    shown = json.loads(cli(base_env, 'task', task_id, '--json').stdout)
    assert shown['state'] == 'pending'


def test_closed_stdout_is_74_too(base_env):
    run = cli(base_env, 'config', capture_output=False,
              stderr=subprocess.PIPE, close_fds=True,
              preexec_fn=lambda: os.close(1))
    assert run.returncode == 74, (run.returncode, run.stderr)
    assert run.stderr.splitlines() == [
        'huey-worker: cannot write the output: Bad file descriptor']
