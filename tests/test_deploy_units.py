"""Static checks of the rendered systemd units, Supervisor blocks, logrotate
and tmpfiles entries: systemd's own verifier and security rating, and the
settings the daemons rely on (the e2e test runs them in a real systemd);
and the suite's start/stop/reload script against a stand-in systemctl."""
import json
import os
import re
import shutil
import subprocess
import sys

import pytest

from huey_worker import settings
from deploy_support import ROOT, install, temp_layout, write_rendered

SUITE = 'huey-worker.service'
MEMBERS = ('huey-worker-consumer.service', 'huey-worker-scheduler.service',
           'huey-worker-status.service')
SERVICES = MEMBERS + ('huey-worker@.service',)
SHUTDOWN_TIMEOUT = settings.BY_NAME['consumer.shutdown_timeout'].default
analyze = pytest.mark.skipif(not shutil.which('systemd-analyze'),
                             reason='systemd-analyze is not installed '
                                    '(.ci/run installs systemd)')


@pytest.fixture(scope='module')
def rendered(tmp_path_factory):
    """The units rendered with the repo's bin/huey-worker as the launcher,
    so systemd-analyze finds every command it names."""
    root = str(tmp_path_factory.mktemp('units'))
    layout = temp_layout(root, bindir=os.path.join(ROOT, 'bin'))
    files = write_rendered(layout)
    # An instance of the template, for systemd-analyze.
    os.symlink('huey-worker@.service',
               os.path.join(layout.unitdir, 'huey-worker@check.service'))
    return layout, files


def directives(text):
    """{(section, key): [values]} of a unit or INI-like file."""
    out, section = {}, None
    for line in text.splitlines():
        line = line.strip()
        if not line or line.startswith(('#', ';')):
            continue
        if line.startswith('['):
            section = line.strip('[]')
            continue
        key, _, value = line.partition('=')
        out.setdefault((section, key.strip()), []).append(value.strip())
    return out


def seconds(value):
    match = re.fullmatch(r'(\d+)(s|min)?', value)
    return int(match.group(1)) * (60 if match.group(2) == 'min' else 1)


@analyze
def test_systemd_analyze_verify_prints_nothing(rendered):
    layout, _ = rendered
    units = [os.path.join(layout.unitdir, name) for name in (
        (SUITE,) + MEMBERS + ('huey-worker@check.service',
                              'huey-worker.target'))]
    result = subprocess.run(['systemd-analyze', 'verify'] + units,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True)
    assert result.stdout == '' and result.returncode == 0, result.stdout


@analyze
@pytest.mark.parametrize('unit', (SUITE,) + SERVICES)
def test_security_exposure_at_most_1_5(rendered, unit):
    layout, _ = rendered
    name = unit.replace('@.', '@check.')
    result = subprocess.run(
        ['systemd-analyze', 'security', '--offline=yes',
         os.path.join(layout.unitdir, name)],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    match = re.search(r'Overall exposure level for \S+: ([\d.]+)',
                      result.stdout)
    assert match, result.stdout
    assert float(match.group(1)) <= 1.5, result.stdout
    print('%s: exposure %s' % (unit, match.group(1)))


@pytest.mark.parametrize('unit', SERVICES)
def test_units_have_what_the_daemons_rely_on(rendered, unit):
    layout, files = rendered
    text = files[os.path.join(layout.unitdir, unit)]
    d = directives(text)
    s = lambda key: d.get(('Service', key), [None])[-1]  # noqa: E731
    assert s('Type') == 'notify' and s('NotifyAccess') == 'main'
    assert seconds(s('WatchdogSec')) > 0
    stop = seconds(s('TimeoutStopSec'))
    if 'scheduler' not in unit and 'status' not in unit:
        assert stop > SHUTDOWN_TIMEOUT + 3, 'TimeoutStopSec %s' % stop
    assert s('KillMode') == 'mixed'
    assert s('Restart') == 'on-failure'
    assert s('RestartPreventExitStatus') == '78'
    assert s('ExecReload') == '/bin/kill -HUP $MAINPID'
    assert s('User') == layout.user and s('Group') == layout.group
    assert s('ExecStart').startswith(os.path.join(layout.bindir,
                                                  'huey-worker '))
    assert 'HUEY_WORKER_CONFIG=%s' % layout.configfile in ' '.join(
        d[('Service', 'Environment')])
    for key in ('After', 'Wants'):
        assert 'redis-server.service' in d[('Unit', key)][0].split()
    # Members of the suite: its stop, restart and reload reach them; they
    # start with it (enabled or not: the suite's Wants=, and enable's links).
    assert d[('Unit', 'PartOf')] == [SUITE]
    assert d[('Unit', 'ReloadPropagatedFrom')] == [SUITE]
    assert d[('Install', 'WantedBy')] == [SUITE]
    # Not ordered against the suite (its stop must wait for theirs).
    for key in ('After', 'Before'):
        assert SUITE not in ' '.join(d.get(('Unit', key), [])).split()
    assert not re.search(r'@[a-z_]+@', text)
    # Each daemon's own log file, all matching /var/log/huey-worker*.log.
    if 'scheduler' in unit or 'status' in unit:
        assert '--log-file %s/huey-worker-' % layout.logdir in s('ExecStart')


def test_suite_unit_is_the_whole_suite(rendered):
    layout, files = rendered
    d = directives(files[os.path.join(layout.unitdir, SUITE)])
    s = lambda key: d.get(('Service', key), [None])[-1]  # noqa: E731
    # Starting it starts every member, enabled or not.
    assert d[('Unit', 'Wants')][0].split() == list(MEMBERS)
    # No order against the members: after them, a stop would return before
    # theirs even began; the script waits for their jobs instead.
    for key in ('After', 'Before', 'Requires', 'BindsTo'):
        assert not set(MEMBERS) & set(' '.join(d.get(('Unit', key),
                                                     [])).split()), key
    assert (s('Type'), s('RemainAfterExit')) == ('oneshot', 'yes')
    script = os.path.join(layout.datadir, install.SUITE_SCRIPT)
    for key, action in (('ExecStart', 'start'), ('ExecStop', 'stop'),
                        ('ExecReload', 'reload')):
        assert s(key) == '%s %s' % (script, action)
    assert s('TimeoutStartSec') == s('TimeoutStopSec') == 'infinity'
    assert d[('Install', 'WantedBy')] == ['multi-user.target']
    assert d[('Install', 'Also')][0].split() == list(MEMBERS)
    assert os.stat(script).st_mode & 0o777 == 0o755


def test_target_starts_the_suite_without_enable(rendered):
    layout, files = rendered
    d = directives(files[os.path.join(layout.unitdir, 'huey-worker.target')])
    # In [Unit]: no enable needed.  BindsTo: the target fails when the
    # suite does, and stops with it.
    assert d[('Unit', 'BindsTo')] == [SUITE]
    assert d[('Unit', 'After')] == [SUITE]
    assert d[('Install', 'WantedBy')] == ['multi-user.target']
    suite = directives(files[os.path.join(layout.unitdir, SUITE)])
    assert suite[('Unit', 'PartOf')] == ['huey-worker.target']


def test_supervisor_blocks_match_the_daemons(rendered):
    layout, files = rendered
    text = files[os.path.join(layout.supervisordir, 'huey-worker.conf')]
    d = directives(text)
    programs = d[('group:huey-worker', 'programs')][0].split(',')
    assert programs == ['huey-worker-consumer', 'huey-worker-scheduler',
                        'huey-worker-status']
    for program in programs:
        p = lambda key: d[('program:' + program, key)][0]  # noqa: E731
        assert p('command').startswith(os.path.join(layout.bindir,
                                                    'huey-worker '))
        assert p('stopsignal') == 'TERM'
        assert p('autorestart') == 'unexpected'
        assert '78' in p('exitcodes').split(',')
        assert p('stopasgroup') == 'false' and p('killasgroup') == 'true'
        assert 'HUEY_WORKER_CONFIG="%s"' % layout.configfile in \
            p('environment')
        assert p('stdout_logfile').startswith(layout.supervisorlogdir)
    consumer = d[('program:huey-worker-consumer', 'stopwaitsecs')][0]
    assert int(consumer) > SHUTDOWN_TIMEOUT + 3


def test_logrotate_and_tmpfiles_name_the_same_log_files(rendered):
    layout, files = rendered
    logrotate = files[os.path.join(layout.logrotatedir, 'huey-worker')]
    assert '%s/huey-worker*.log {' % layout.logdir in logrotate
    assert 'copytruncate' not in re.sub(r'#.*', '', logrotate)
    assert 'create 0640 %s %s' % (layout.user, layout.group) in logrotate
    # The daemons (not the suite unit, which has no process to signal).
    assert "systemctl kill --kill-whom=main --signal=USR1 " \
           "'huey-worker-*.service' 'huey-worker@*.service'" in logrotate
    assert "supervisorctl signal USR1 'huey-worker:*'" in logrotate
    entries = install.tmpfiles_entries(
        files[os.path.join(layout.tmpfilesdir, 'huey-worker.conf')])
    logs = [path for kind, path, mode, _, _ in entries if kind == 'f']
    assert logs == [os.path.join(layout.logdir, name) for name in (
        'huey-worker.log', 'huey-worker-scheduler.log',
        'huey-worker-status.log')]
    # The shipped config logs the consumer to the first of them.
    assert settings.BY_NAME['logging.file'].sample == '/var/log/huey-worker.log'


def test_every_template_placeholder_is_known():
    layout = install.Layout()
    variables = layout.variables()
    for template, _, _ in layout.installed_files():
        with open(os.path.join(ROOT, template)) as fh:
            names = set(re.findall(r'@([a-z_]+)@', fh.read()))
        assert names <= set(variables), (template, names - set(variables))
    with pytest.raises(install.InstallError, match='unknown placeholder'):
        install.render('x @nope@', variables)


# --- the suite's script, against a stand-in systemctl -----------------------

FAKE_SYSTEMCTL = """#!%s
# Answers the calls huey-worker-suite makes from a JSON state; each
# list-jobs call counts one poll off every pending job, each show of a
# reloading unit one poll off its reload.
import json, os, sys
path = os.environ['FAKE_SYSTEMCTL_STATE']
with open(path) as fh:
    state = json.load(fh)
args = sys.argv[1:]
state.setdefault('calls', []).append(args)
if args[0] == 'list-jobs':
    names = [a for a in args[1:] if not a.startswith('-')]
    for name in names:
        if state['jobs'].get(name, 0) > 0:
            print('1 %%s %%s running' %% (name, state['job_types'].get(
                name, 'start')))
            state['jobs'][name] -= 1
elif args[0] == 'show':
    prop = [a for a in args if a.startswith('--property=')][0][11:]
    name = [a for a in args[1:] if not a.startswith('-')][0]
    if '--value' in args:
        print(' '.join(state[prop]))
    else:
        unit = state['units'][name]
        if unit.get('reloading', 0) > 0:
            unit['reloading'] -= 1
            unit = dict(unit, ActiveState='reloading', SubState='reload')
        for key in prop.split(','):
            print('%%s=%%s' %% (key, unit.get(key, '')))
with open(path, 'w') as fh:
    json.dump(state, fh)
""" % sys.executable

ACTIVE = {'LoadState': 'loaded', 'ActiveState': 'active',
          'SubState': 'running', 'Result': 'success', 'ExecMainStatus': '0'}


@pytest.fixture
def suite_script(tmp_path):
    """Run the rendered huey-worker-suite with a stand-in systemctl."""
    fake = tmp_path / 'systemctl'
    fake.write_text(FAKE_SYSTEMCTL)
    fake.chmod(0o755)
    layout = temp_layout(str(tmp_path / 'root'), systemctl=str(fake))
    script = write_rendered(layout) and os.path.join(layout.datadir,
                                                     install.SUITE_SCRIPT)
    state_path = tmp_path / 'state.json'

    def run(action, units, jobs=None, job_types=None, wants=None):
        state = {'Wants': list(wants or units) + ['unrelated.service'],
                 'ConsistsOf': list(units), 'jobs': jobs or {},
                 'job_types': job_types or {},
                 'units': {name: dict(ACTIVE, **units[name])
                           for name in units}}
        state_path.write_text(json.dumps(state))
        result = subprocess.run(
            [script, action], stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT, text=True, timeout=60,
            env=dict(os.environ, FAKE_SYSTEMCTL_STATE=str(state_path)))
        return result, json.loads(state_path.read_text())
    return run


def test_suite_start_waits_for_the_members_and_reports_them(suite_script):
    units = {name: {} for name in MEMBERS}
    result, state = suite_script('start', units, jobs={MEMBERS[0]: 3})
    assert result.returncode == 0, result.stdout
    lines = result.stdout.splitlines()
    assert lines[:3] == ['%s active (running)' % name for name in MEMBERS]
    assert 'started' in lines[-1]
    # Polled until the consumer's job was done, then read the states.
    polls = [c for c in state['calls'] if c[0] == 'list-jobs']
    assert len(polls) == 4 and state['jobs'][MEMBERS[0]] == 0
    assert not any('unrelated.service' in c for c in state['calls'])


def test_suite_start_fails_naming_the_member_that_did_not_start(
        suite_script):
    units = {name: {} for name in MEMBERS}
    units[MEMBERS[0]] = {'ActiveState': 'failed', 'SubState': 'failed',
                         'Result': 'exit-code', 'ExecMainStatus': '78'}
    units[MEMBERS[2]] = {'ActiveState': 'activating',
                         'SubState': 'auto-restart', 'Result': 'exit-code',
                         'ExecMainStatus': '1'}
    result, _ = suite_script('start', units)
    assert result.returncode == 1
    out = result.stdout
    assert '%s failed (failed; exit-code, exit status 78): see systemctl ' \
           'status %s' % (MEMBERS[0], MEMBERS[0]) in out
    assert '%s activating (auto-restart; exit-code, exit status 1)' % \
        MEMBERS[2] in out
    assert out.splitlines()[-1] == 'huey-worker: start failed for %s %s' % (
        MEMBERS[0], MEMBERS[2])


def test_suite_start_leaves_out_a_masked_member(suite_script):
    units = {name: {} for name in MEMBERS}
    units[MEMBERS[2]] = {'LoadState': 'masked', 'ActiveState': 'inactive',
                         'SubState': 'dead'}
    result, _ = suite_script('start', units)
    assert result.returncode == 0, result.stdout
    assert '%s masked' % MEMBERS[2] in result.stdout


def test_suite_reload_returns_once_the_members_are_back(suite_script):
    instance = 'huey-worker@pdf.service'
    units = {name: {} for name in MEMBERS + (instance,)}
    units[MEMBERS[0]] = {'reloading': 5}    # draining, then READY=1
    units[MEMBERS[2]] = {'ActiveState': 'inactive', 'SubState': 'dead'}
    result, state = suite_script('reload', units)
    assert result.returncode == 0, result.stdout
    assert state['units'][MEMBERS[0]]['reloading'] == 0
    assert '%s active (running)' % instance in result.stdout
    units[MEMBERS[0]] = {'ActiveState': 'failed', 'SubState': 'failed',
                         'Result': 'exit-code', 'ExecMainStatus': '1'}
    result, _ = suite_script('reload', units)
    assert result.returncode == 1 and MEMBERS[0] in \
        result.stdout.splitlines()[-1]


def test_suite_stop_waits_for_the_members_and_never_fails(suite_script):
    units = {name: {'ActiveState': 'inactive', 'SubState': 'dead'}
             for name in MEMBERS}
    units[MEMBERS[1]] = {'ActiveState': 'failed', 'SubState': 'failed',
                         'Result': 'exit-code', 'ExecMainStatus': '78'}
    result, state = suite_script('stop', units, jobs={MEMBERS[0]: 2})
    assert result.returncode == 0, result.stdout
    assert state['jobs'][MEMBERS[0]] == 0
    assert result.stdout.splitlines()[-1] == 'huey-worker: stopped'
    # In a restart of the suite the members' jobs are restarts.
    units = {name: {} for name in MEMBERS}
    result, _ = suite_script('stop', units, jobs={SUITE: 1},
                             job_types={SUITE: 'restart'})
    assert result.stdout.splitlines()[-1] == 'huey-worker: members restarted'
