"""The settings registry and the configuration sources: precedence, the
seeds' environment names, every kind of error, and the generated files."""
import grp
import json
import os
import pwd
import re
import shutil
import subprocess
import sys
import sysconfig
import tempfile

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


def test_a_yes_no_flag_alone_means_yes_and_errors_name_the_flag(tmp_path):
    import click.testing
    from huey_worker.cli import main
    path = write(tmp_path / 'hw.ini', '')
    runner = click.testing.CliRunner()

    def shown(*args):
        done = runner.invoke(main, ['config', '-c', str(path)] + list(args))
        return done.exit_code, done.output
    code, out = shown('--flush-locks', '--workers', '3')
    assert code == 0, out
    assert re.search(r'flush_locks += true +# cli --flush-locks', out), out
    assert re.search(r'workers += 3 +# cli --workers', out), out
    code, out = shown('--flush-locks', 'off')
    assert re.search(r'flush_locks += false +# cli --flush-locks', out), out
    code, out = shown('--flush-locks', 'maybe')
    assert code == 78
    assert "[consumer] flush_locks = 'maybe' (cli --flush-locks)" in out


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
    # Sentinel: the REDIS_ names go together.
    cfg = load(env={'REDIS_SENTINELS': 's1:26379,s2:26379',
                    'REDIS_SENTINEL_MASTER': 'pdf',
                    'REDIS_SENTINEL_PASSWORD': 'sp'})
    assert cfg.redis.sentinels == ('s1:26379', 's2:26379')
    assert (cfg.redis.sentinel_master, cfg.redis.sentinel_password) == \
        ('pdf', 'sp')


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
    # Only separators: never an empty list that falls back to host:port.
    assert error_of(env={'REDIS_SENTINELS': ','}) == \
        "[redis] sentinels = ',' (env REDIS_SENTINELS): expected host:port, " \
        "..., got ','"


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


def test_an_absent_default_file_or_directory_means_defaults(tmp_path,
                                                           monkeypatch):
    monkeypatch.setattr(config, 'DEFAULT_PATH',
                        str(tmp_path / 'no-dir' / 'huey-worker.ini'))
    cfg = load(env={})
    assert cfg.files == [] and cfg.redis.port == 6379


# -- files another user cannot read ---------------------------------------------
# The tests run as root, who reads everything: these run the real command as
# an unprivileged user (nobody, through setpriv or runuser), with the
# venv's packages, on files made 0750/0640 root:root.

# `python -m huey_worker` from the venv's packages, for an interpreter that
# may not be the venv's own (root's venv can sit where nobody may not go);
# the first argument, when not empty, stands in for the default config path
# (/etc/huey-worker/huey-worker.ini).
LAUNCH = """
import asyncio, runpy, site, sys, types
packages = sys.argv.pop(1)
sys.path.insert(0, packages)
site.addsitedir(packages)
try:
    import async_timeout
except ImportError:
    # redis-py wants this package below Python 3.11.3, asyncio.timeout from
    # it on; the venv's packages were installed for the venv's 3.11.x.
    sys.modules['async_timeout'] = types.ModuleType('async_timeout')
    sys.modules['async_timeout'].timeout = asyncio.timeout
default_path = sys.argv.pop(1)
if default_path:
    from huey_worker import config
    config.DEFAULT_PATH = default_path
sys.argv[0] = 'huey-worker'
runpy.run_module('huey_worker', run_name='__main__')
"""


class Unprivileged:
    """Runs huey-worker as another, unprivileged user."""

    def __init__(self, prefix, python, user):
        self.prefix, self.python, self.user = prefix, python, user

    def argv(self, args, default_path=''):
        return self.prefix + [self.python, '-c', LAUNCH,
                              sysconfig.get_paths()['purelib'],
                              default_path] + list(args)

    def run(self, args, env=None, default_path=''):
        full_env = {k: v for k, v in os.environ.items()
                    if not k.startswith(('HUEY_', 'REDIS_'))}
        full_env.update(env or {})
        return subprocess.run(self.argv(args, default_path),
                              capture_output=True, text=True, env=full_env,
                              cwd=ROOT, timeout=120)


@pytest.fixture(scope='module')
def unprivileged():
    if os.geteuid() != 0:
        pytest.skip('needs root, to run the command as another user')
    try:
        nobody = pwd.getpwnam('nobody')
    except KeyError:
        pytest.skip('no user nobody to run the command as')
    if shutil.which('setpriv'):
        prefix = ['setpriv', '--reuid=%d' % nobody.pw_uid,
                  '--regid=%d' % nobody.pw_gid, '--clear-groups']
    elif shutil.which('runuser'):
        prefix = ['runuser', '-u', 'nobody', '--']
    else:
        pytest.skip('neither setpriv nor runuser to run the command as '
                    'nobody')
    version = 'python%d.%d' % sys.version_info[:2]
    candidates = [sys.executable, os.path.realpath(sys.executable),
                  shutil.which(version), '/usr/bin/' + version]
    for python in dict.fromkeys(c for c in candidates if c):
        runner = Unprivileged(prefix, python, 'nobody')
        probe = subprocess.run(runner.argv(['--version']),
                               capture_output=True, text=True, cwd=ROOT)
        if probe.returncode == 0:
            return runner
    pytest.skip('no %s that nobody may run with the venv\'s packages '
                '(tried %s)' % (version, ', '.join(c for c in candidates
                                                   if c)))


@pytest.fixture
def open_dir():
    """A directory anyone may enter (pytest's tmp_path is root's alone)."""
    path = tempfile.mkdtemp(prefix='hw-config-')
    os.chmod(path, 0o755)
    yield path
    shutil.rmtree(path)


def locked(path, mode, group='root'):
    os.chown(path, 0, grp.getgrnam(group).gr_gid)
    os.chmod(path, mode)
    return str(path)


def make_config_dir(parent, mode=0o750, group='root'):
    etc = os.path.join(parent, 'etc')
    os.mkdir(etc)
    ini = os.path.join(etc, 'huey-worker.ini')
    with open(ini, 'w') as fh:
        fh.write('[huey]\nsecret_key = only-the-service-group-knows\n')
    os.chmod(ini, 0o640)
    locked(etc, mode, group)
    return etc, ini


def one_line(run):
    assert run.stdout == '', run.stdout
    lines = run.stderr.splitlines()
    assert len(lines) == 1, run.stderr
    return lines[0]


def test_unreadable_default_config_is_an_error_not_defaults(
        unprivileged, open_dir, redis_url, redis_server):
    etc, ini = make_config_dir(open_dir)
    # What a user outside the service group ran, with the default path: it
    # used to fall back to the defaults (no secret_key) and enqueue.
    run = unprivileged.run(['submit', 'pdf.extract', 'x.pdf'],
                           env={'HUEY_REDIS_URL': redis_url},
                           default_path=ini)
    assert run.returncode == 78, (run.returncode, run.stdout, run.stderr)
    assert one_line(run) == (
        'huey-worker: config error: (file: %s): permission denied: the '
        'directory %s (0750 root:root) is closed to user nobody; run the '
        'command with sudo' % (ini, etc))
    client = redis_server.client()
    assert client.keys('*') == []   # nothing was enqueued
    client.close()


def test_unreadable_named_config_says_how_to_get_in(unprivileged, open_dir):
    group = next((g for g in grp.getgrall() if g.gr_gid not in (
        0, pwd.getpwnam('nobody').pw_gid) and 'nobody' not in g.gr_mem),
        None)
    if group is None:
        pytest.skip('no group to make the config directory belong to')
    etc, ini = make_config_dir(open_dir, group=group.gr_name)
    run = unprivileged.run(['config', '--check'],
                           env={'HUEY_WORKER_CONFIG': ini})
    assert run.returncode == 78
    hint = ('add nobody to the group {g} (sudo usermod -aG {g} nobody, then '
            'log in again)'.format(g=group.gr_name))
    try:
        service_user = pwd.getpwnam(group.gr_name).pw_gid == group.gr_gid
    except KeyError:
        service_user = False
    hint += (', or run the command as sudo -u %s huey-worker ...'
             % group.gr_name) if service_user else \
        ', or run the command with sudo'
    assert one_line(run) == (
        'huey-worker: config error: (file: %s): permission denied: the '
        'directory %s (0750 root:%s) is closed to user nobody; %s' % (
            ini, etc, group.gr_name, hint))


def test_unreadable_file_in_a_readable_directory(unprivileged, open_dir):
    etc, ini = make_config_dir(open_dir, mode=0o755)
    run = unprivileged.run(['config'], env={'HUEY_WORKER_CONFIG': ini})
    assert run.returncode == 78
    assert one_line(run) == (
        'huey-worker: config error: (file: %s): permission denied: the '
        'file (0640 root:root) is closed to user nobody; run the command '
        'with sudo' % ini)


def test_unreadable_conf_d_is_an_error_not_skipped(unprivileged, open_dir):
    etc, ini = make_config_dir(open_dir, mode=0o755)
    os.chmod(ini, 0o644)
    conf_d = os.path.join(etc, 'conf.d')
    os.mkdir(conf_d)
    with open(os.path.join(conf_d, '10-redis.ini'), 'w') as fh:
        fh.write('[redis]\nhost = redis.internal\n')
    locked(conf_d, 0o750)
    run = unprivileged.run(['config', '--check'],
                           env={'HUEY_WORKER_CONFIG': ini})
    assert run.returncode == 78, run.stderr
    assert one_line(run) == (
        'huey-worker: config error: (file: %s): permission denied: the '
        'directory (0750 root:root) is closed to user nobody; run the '
        'command with sudo' % conf_d)
    # A drop-in that cannot be read, in a directory that can.
    os.chmod(conf_d, 0o755)
    dropin = locked(os.path.join(conf_d, '10-redis.ini'), 0o640)
    run = unprivileged.run(['config', '--check'],
                           env={'HUEY_WORKER_CONFIG': ini})
    assert run.returncode == 78
    assert one_line(run) == (
        'huey-worker: config error: (file: %s): permission denied: the '
        'file (0640 root:root) is closed to user nobody; run the command '
        'with sudo' % dropin)


def test_absent_default_config_still_means_defaults(unprivileged, open_dir):
    run = unprivileged.run(['config', '--check'], default_path=os.path.join(
        open_dir, 'etc', 'huey-worker.ini'))
    assert run.returncode == 0, run.stderr
    assert 'configuration OK (defaults only; ' in run.stderr


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
    assert '# Redis: redis://h1:6379/0' in out.stdout.splitlines()
    # With sentinels, where the master is comes from them.
    out = cli('config', '--config', path,
              env={'REDIS_SENTINELS': '10.0.0.1:26379'}).stdout
    lines = {line.split('=')[0].strip(): line for line in
             out.splitlines() if '=' in line}
    assert '# Redis: sentinel master mymaster via 10.0.0.1:26379' in out
    assert lines['host'].endswith('# default, unused: [redis] sentinels is '
                                  'set')
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
