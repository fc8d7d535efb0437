"""The settings registry and the configuration sources: precedence, the
seeds' environment names, every kind of error, and the generated files."""
import json
import os
import subprocess
import sys

import pytest

from huey_worker import config, sample, settings
from huey_worker.config import ConfigError

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def write(path, text):
    path.write_text(text)
    return str(path)


def load(path=None, env=None, overrides=None):
    return config.load(path, environ=env or {}, overrides=overrides)


def cli(*args, env=None):
    full_env = {k: v for k, v in os.environ.items()
                if not k.startswith(('HUEY_', 'REDIS_'))}
    full_env.update(env or {})
    return subprocess.run([sys.executable, '-m', 'huey_worker'] + list(args),
                          capture_output=True, text=True, env=full_env,
                          cwd=ROOT)


# -- precedence ------------------------------------------------------------

def test_defaults_when_the_default_file_is_absent(tmp_path):
    cfg = load(env={'HUEY_WORKER_CONFIG': ''})
    assert cfg.consumer.workers == 'auto'
    assert cfg.redis.port == 6379
    assert str(cfg.source('redis.port')) == 'default'


def test_file_values_carry_file_and_line(tmp_path):
    path = write(tmp_path / 'hw.ini', '[redis]\nhost = db.local\n\n'
                 '[consumer]\n# comment\nworkers = 3\n')
    cfg = load(path)
    assert cfg.redis.host == 'db.local'
    assert cfg.consumer.workers == 3
    assert str(cfg.source('consumer.workers')) == '%s:6' % path


def test_dropins_are_read_in_name_order_after_the_main_file(tmp_path):
    path = write(tmp_path / 'hw.ini', '[consumer]\nworkers = 1\n')
    (tmp_path / 'conf.d').mkdir()
    write(tmp_path / 'conf.d' / '20-b.ini', '[consumer]\nworkers = 3\n')
    write(tmp_path / 'conf.d' / '10-a.ini', '[consumer]\nworkers = 2\n'
          'worker_type = process\n')
    write(tmp_path / 'conf.d' / 'ignored.txt', '[nonsense]\n')
    cfg = load(path)
    assert cfg.consumer.workers == 3
    assert cfg.consumer.worker_type == 'process'
    assert cfg.files == [path, str(tmp_path / 'conf.d' / '10-a.ini'),
                         str(tmp_path / 'conf.d' / '20-b.ini')]


def test_environment_beats_files_and_command_line_beats_environment(tmp_path):
    path = write(tmp_path / 'hw.ini', '[consumer]\nworkers = 1\n')
    cfg = load(path, env={'HUEY_WORKERS': '5'})
    assert cfg.consumer.workers == 5
    assert str(cfg.source('consumer.workers')) == 'env HUEY_WORKERS'
    cfg = load(path, env={'HUEY_WORKERS': '5'},
               overrides=[('consumer.workers', '7', '--workers')])
    assert cfg.consumer.workers == 7
    assert str(cfg.source('consumer.workers')) == 'cli --workers'


def test_the_seeds_environment_names_work():
    cfg = load(env={
        'REDIS_HOST': 'redis.example', 'REDIS_PORT': '6380', 'REDIS_DB': '2',
        'REDIS_PASSWORD': 's3cret', 'HUEY_QUEUE_NAME': 'pdf-tasks',
        'HUEY_WORKER_COUNT': '4', 'HUEY_WORKER_TYPE': 'gevent',
        'HUEY_TASK_TIMEOUT': '172800', 'HUEY_RESULT_TIMEOUT': '3600',
        'HUEY_IMMEDIATE': 'false'})
    assert (cfg.redis.host, cfg.redis.port, cfg.redis.db) == \
        ('redis.example', 6380, 2)
    assert cfg.redis.password == 's3cret'
    assert cfg.huey.queue == 'pdf-tasks'
    assert cfg.consumer.workers == 4
    assert cfg.consumer.worker_type == 'greenlet'  # seed 000 says gevent
    assert cfg.tasks.timeout == 172800
    assert cfg.huey.result_timeout == 3600
    assert cfg.huey.immediate is False
    cfg = load(env={'HUEY_REDIS_URL': 'redis://:pw@localhost:6379',
                    'HUEY_WORKERS': '5', 'HUEY_IMMEDIATE': 'true'})
    assert cfg.redis.url == 'redis://:pw@localhost:6379'
    assert cfg.consumer.workers == 5
    assert cfg.huey.immediate is True


def test_first_listed_environment_name_wins():
    cfg = load(env={'HUEY_WORKERS': '5', 'HUEY_WORKER_COUNT': '2',
                    'HUEY_WORKER_CONSUMER_WORKERS': '9'})
    assert cfg.consumer.workers == 9
    cfg = load(env={'HUEY_WORKERS': '5', 'HUEY_WORKER_COUNT': '2'})
    assert cfg.consumer.workers == 5


def test_an_empty_environment_variable_counts_as_unset():
    cfg = load(env={'REDIS_PASSWORD': '', 'REDIS_DB': ''})
    assert cfg.redis.password == ''
    assert cfg.redis.db == 0


def test_unknown_huey_worker_variable_is_a_warning():
    cfg = load(env={'HUEY_WORKER_CONSUMER_WORKRES': '3'})
    assert any('HUEY_WORKER_CONSUMER_WORKRES' in w and 'WORKERS' in w
               for w in cfg.warnings)


# -- errors ----------------------------------------------------------------

def error_of(*args, **kwargs):
    with pytest.raises(ConfigError) as info:
        load(*args, **kwargs)
    return str(info.value)


def test_unknown_section_suggests_the_right_one(tmp_path):
    path = write(tmp_path / 'hw.ini', '[redis]\nport = 1\n[consumr]\n'
                 'workers = 2\n')
    message = error_of(path)
    assert message == '[consumr] (file: %s, line 3): unknown section; did ' \
                      'you mean [consumer]?' % path


def test_unknown_key_suggests_the_right_one(tmp_path):
    path = write(tmp_path / 'hw.ini', '[consumer]\nworker = 2\n')
    assert error_of(path) == "[consumer] worker (file: %s, line 2): unknown" \
                             " key; did you mean 'workers'?" % path


@pytest.mark.parametrize('text, expected', [
    ('[consumer]\nworkers = many\n',
     "[consumer] workers = 'many' (file: {p}, line 2): expected 'auto' or a "
     "whole number >= 1"),
    ('[redis]\nport = 70000\n',
     "[redis] port = '70000' (file: {p}, line 2): expected a whole number "
     "from 1 to 65535"),
    ('[consumer]\nworker_type = fiber\n',
     "[consumer] worker_type = 'fiber' (file: {p}, line 2): expected one of "
     "thread, process, greenlet"),
    ('[huey]\nimmediate = perhaps\n',
     "[huey] immediate = 'perhaps' (file: {p}, line 2): expected true or "
     "false (also yes/no, on/off, 1/0)"),
    ('[redis]\nurl = http://x\n',
     "[redis] url = 'http://x' (file: {p}, line 2): expected a URL starting "
     "with redis://, rediss:// or unix://"),
    ('[redis]\npassword = x\npassword = y\n',
     "[redis] password (file: {p}, line 3): key appears twice in this "
     "section"),
    ('workers = 2\n', '(file: {p}, line 1): a key before any [section] '
                      'header'),
    ('[periodic:nightly]\ntask = a.b\nschedule = 0 25 * * *\n',
     "[periodic:nightly] schedule = '0 25 * * *' (file: {p}, line 3): "
     "expected a valid crontab (25 is not a valid input)"),
    ('[periodic:nightly]\nschedule = 0 2 * * *\n',
     "[periodic:nightly] (file: {p}, line 1): missing required key 'task'"),
])
def test_bad_values_name_file_line_section_key_value(tmp_path, text,
                                                     expected):
    path = write(tmp_path / 'hw.ini', text)
    assert error_of(path) == expected.format(p=path)


def test_bad_environment_value_names_the_variable():
    message = error_of(env={'HUEY_WORKER_COUNT': 'lots'})
    assert message == "[consumer] workers = 'lots' (env " \
                      "HUEY_WORKER_COUNT): expected 'auto' or a whole " \
                      "number >= 1"


def test_secrets_are_redacted_in_the_effective_configuration():
    cfg = load(env={'REDIS_PASSWORD': 'hunter2',
                    'HUEY_WORKER_STATUS_TOKEN': 'tok'})
    assert cfg.display_value('redis.password') == config.REDACTED
    assert cfg.display_value('status.token') == config.REDACTED
    dumped = json.dumps(cfg.as_dict())
    assert 'hunter2' not in dumped and '"tok"' not in dumped


def test_missing_explicit_file_is_an_error(tmp_path):
    path = str(tmp_path / 'nope.ini')
    assert error_of(path) == '(file: %s): file not found' % path
    assert error_of(env={'HUEY_WORKER_CONFIG': path}) == \
        '(file: %s): file not found' % path


def test_unreadable_file_is_an_error(tmp_path):
    (tmp_path / 'dir.ini').mkdir()
    assert 'is a directory' in error_of(str(tmp_path / 'dir.ini'))
    bad = tmp_path / 'latin1.ini'
    bad.write_bytes(b'[redis]\nhost = caf\xe9\n')
    assert 'not UTF-8 text' in error_of(str(bad))


def test_cross_setting_checks(tmp_path):
    message = error_of(env={'HUEY_WORKER_REDIS_SOCKET_TIMEOUT': '1.5'})
    assert message.startswith("[redis] socket_timeout = '1.5'")
    assert 'read_timeout' in message
    message = error_of(env={'HUEY_REDIS_URL': 'redis://a:1',
                            'REDIS_SENTINELS': 'b:26379'})
    assert 'set either url or sentinels' in message


def test_world_readable_file_with_a_secret_warns(tmp_path):
    path = write(tmp_path / 'hw.ini', '[huey]\nsecret_key = abc\n')
    os.chmod(path, 0o644)
    assert any('readable by all' in w for w in load(path).warnings)
    os.chmod(path, 0o640)
    assert load(path).warnings == []
    path2 = write(tmp_path / 'plain.ini', '[consumer]\nworkers = 2\n')
    os.chmod(path2, 0o644)
    assert load(path2).warnings == []


# -- the command -------------------------------------------------------------

def test_config_check_exit_codes(tmp_path):
    good = write(tmp_path / 'good.ini', '[consumer]\nworkers = 2\n')
    bad = write(tmp_path / 'bad.ini', '[consumer]\nworkers = zero\n')
    ok = cli('config', '--check', '--config', good)
    assert ok.returncode == 0, ok.stderr
    failed = cli('config', '--check', '--config', bad)
    assert failed.returncode == 78
    assert failed.stderr.strip() == (
        "huey-worker: config error: [consumer] workers = 'zero' (file: %s, "
        "line 2): expected 'auto' or a whole number >= 1" % bad)
    unknown = cli('config', '--check', '--set', 'consumer.wrkers=2')
    assert unknown.returncode == 78
    assert "did you mean 'consumer.workers'" in unknown.stderr


def test_config_prints_sources_and_redacts(tmp_path):
    path = write(tmp_path / 'hw.ini', '[redis]\npassword = topsecret\n')
    os.chmod(path, 0o600)
    out = cli('config', '--config', path, '--workers', '3',
              env={'REDIS_HOST': 'h1'})
    assert out.returncode == 0, out.stderr
    assert 'topsecret' not in out.stdout
    lines = {line.split('=')[0].strip(): line for line in
             out.stdout.splitlines() if '=' in line}
    assert lines['password'].endswith('# %s:2' % path)
    assert config.REDACTED in lines['password']
    assert lines['host'].endswith('# env REDIS_HOST')
    assert lines['workers'].endswith('# cli --workers')
    assert lines['port'].endswith('# default')
    as_json = json.loads(cli('config', '--json', '--config', path).stdout)
    assert as_json['settings']['redis']['password'] == {
        'value': config.REDACTED, 'source': '%s:2' % path}


# -- generated files ----------------------------------------------------------

def test_shipped_sample_config_matches_the_registry():
    with open(os.path.join(ROOT, 'etc', 'huey-worker.ini')) as fh:
        assert fh.read() == sample.render_ini(), \
            'regenerate: huey-worker config --sample > etc/huey-worker.ini'


def test_settings_reference_matches_the_registry():
    with open(os.path.join(ROOT, 'docs', 'configuration.md')) as fh:
        assert fh.read() == sample.render_markdown(), \
            'regenerate: huey-worker config --reference > docs/configuration.md'


def test_shipped_sample_parses_and_sets_only_what_it_says():
    cfg = load(os.path.join(ROOT, 'etc', 'huey-worker.ini'))
    for s in settings.SETTINGS:
        expected = s.type.parse(s.sample) if s.sample is not None \
            else s.default
        assert cfg.get(s.name) == expected, s.name


def test_every_setting_is_complete():
    names = set()
    for s in settings.SETTINGS:
        assert s.section in settings.SECTION_HELP
        assert s.help and s.help.endswith(('.', ')')), s.name
        assert s.name not in names
        names.add(s.name)
        # the default round-trips through the type's own text form
        assert s.type.parse(s.type.format(s.default)) == s.default, s.name
