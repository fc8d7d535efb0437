"""The record a running `huey-worker run` leaves for the CLI, and the rule
for using it: only while that `run` lives, and only when nothing names a
Redis.  Built here by hand, with this process standing in for `run`."""
import os
import subprocess
import sys
import time

import pytest

from huey_worker import config
from huey_worker.devredis import (EmbeddedRedis, process_start_time,
                                  read_run_record, remove_run_record,
                                  run_record_path, write_run_record)

URL = 'redis://127.0.0.1:1/0'   # never connected to here


@pytest.fixture
def environ(tmp_path):
    (tmp_path / 'empty.ini').touch()
    return {'XDG_RUNTIME_DIR': str(tmp_path / 'runtime'),
            'HOME': str(tmp_path / 'home'),
            'HUEY_WORKER_CONFIG': str(tmp_path / 'empty.ini')}


@pytest.fixture
def record(environ):
    path = run_record_path(environ)
    write_run_record(path, redis_url=URL, status_url=None)
    return path


def test_the_url_of_a_living_run_is_used_and_says_where_from(environ, record):
    cfg = config.load(environ=environ)
    assert cfg.get('redis.url') == URL
    assert str(cfg.source('redis.url')) == \
        'make run (pid %d, file %s)' % (os.getpid(), record)


@pytest.mark.parametrize('named', [
    {'HUEY_REDIS_URL': 'redis://10.0.0.1:6379/0'},
    {'REDIS_URL': 'redis://10.0.0.1:6379/0'},
    {'HUEY_WORKER_REDIS_URL': 'redis://10.0.0.1:6379/0'},
    {'REDIS_HOST': '10.0.0.1'}, {'REDIS_PORT': '6380'}, {'REDIS_DB': '2'},
    {'REDIS_PASSWORD': 'x'}, {'REDIS_SENTINELS': '10.0.0.1:26379'},
])
def test_any_redis_named_in_the_environment_wins(environ, record, named):
    cfg = config.load(environ=dict(environ, **named))
    assert cfg.source('redis.url').kind != 'run'


def test_a_redis_named_in_the_file_or_on_the_command_line_wins(
        tmp_path, environ, record):
    path = tmp_path / 'redis.ini'
    path.write_text('[redis]\nhost = 10.0.0.1\n')
    cfg = config.load(str(path), environ=environ)
    assert (cfg.get('redis.url'), cfg.get('redis.host')) == ('', '10.0.0.1')
    cfg = config.load(environ=environ,
                      overrides={'redis.url': 'redis://10.0.0.2/0'})
    assert str(cfg.source('redis.url')) == \
        'cli --set redis.url=redis://10.0.0.2/0'


def test_a_record_whose_run_is_gone_is_ignored(environ):
    path = run_record_path(environ)
    gone = subprocess.Popen([sys.executable, '-c', 'pass'])
    gone.wait()
    write_run_record(path, redis_url=URL, pid=gone.pid, started=None)
    assert read_run_record(environ) is None
    assert config.load(environ=environ).source('redis.url').kind == 'default'
    # A pid since given to another process: its start time differs.
    write_run_record(path, redis_url=URL,
                     started=process_start_time(os.getpid()) - 1)
    assert read_run_record(environ) is None
    with open(path, 'w') as fh:
        fh.write('{"pid": ')
    assert read_run_record(environ) is None


def test_where_the_record_lives(tmp_path):
    assert run_record_path({'XDG_RUNTIME_DIR': '/run/user/7', 'HOME': '/h'}) \
        == '/run/user/7/huey-worker/run.json'
    assert run_record_path({'XDG_CACHE_HOME': '/c', 'HOME': '/h'}) == \
        '/c/huey-worker/run.json'
    assert run_record_path({'HOME': '/h'}) == '/h/.cache/huey-worker/run.json'
    # An environment made up for a test, with no home: nothing is looked up.
    assert run_record_path({}) is None
    assert config.load(environ={}).source('redis.url').kind == 'default'


def test_only_its_own_record_is_removed(environ, record):
    remove_run_record(record, pid=1)      # a `run` started later took over
    assert read_run_record(environ)['redis_url'] == URL
    remove_run_record(record)
    assert read_run_record(environ) is None


def test_private_redis_stops_at_once_and_keeps_its_data(tmp_path):
    server = EmbeddedRedis(str(tmp_path / 'redis')).start()
    try:
        server.client().set('kept', '1')
        began = time.monotonic()
        server.stop()
        assert time.monotonic() - began < 1.5
        server.start()
        assert server.client().get('kept') == b'1'
    finally:
        server.cleanup()


def test_two_runs_the_later_stops_the_earlier_is_found_again(environ):
    # Run A (a live process of its own), then run B (this process) over
    # it; B stops: the CLI must find A, not fall back to 127.0.0.1:6379.
    path = run_record_path(environ)
    first = subprocess.Popen([sys.executable, '-c',
                              'import time; time.sleep(60)'])
    try:
        write_run_record(path, redis_url='redis://127.0.0.1:1111/0',
                         pid=first.pid)
        write_run_record(path, redis_url=URL)
        assert read_run_record(environ)['redis_url'] == URL
        remove_run_record(path)
        assert read_run_record(environ)['redis_url'] == \
            'redis://127.0.0.1:1111/0'
        assert config.load(environ=environ).get('redis.url') == \
            'redis://127.0.0.1:1111/0'
        # A stopped before B: B's record stands, and when B stops too the
        # file goes (A is dead).
        write_run_record(path, redis_url=URL)
        first.kill()
        first.wait()
        assert read_run_record(environ)['redis_url'] == URL
        remove_run_record(path)
        assert not os.path.exists(path)
    finally:
        first.kill()
        first.wait()
