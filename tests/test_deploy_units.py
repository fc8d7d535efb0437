"""Static checks of the rendered systemd units, Supervisor blocks, logrotate
and tmpfiles entries: systemd's own verifier and security rating, and the
settings the daemons rely on (the e2e test runs them in a real systemd)."""
import os
import re
import shutil
import subprocess

import pytest

from huey_worker import settings
from deploy_support import ROOT, install, temp_layout, write_rendered

SERVICES = ('huey-worker.service', 'huey-worker-scheduler.service',
            'huey-worker-status.service', 'huey-worker@.service')
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
        'huey-worker.service', 'huey-worker-scheduler.service',
        'huey-worker-status.service', 'huey-worker@check.service',
        'huey-worker.target')]
    result = subprocess.run(['systemd-analyze', 'verify'] + units,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True)
    assert result.stdout == '' and result.returncode == 0, result.stdout


@analyze
@pytest.mark.parametrize('unit', SERVICES)
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
    assert d[('Unit', 'PartOf')] == ['huey-worker.target']
    assert d[('Install', 'WantedBy')] == ['huey-worker.target']
    assert not re.search(r'@[a-z_]+@', text)
    # Each daemon's own log file, all matching /var/log/huey-worker*.log.
    if 'scheduler' in unit or 'status' in unit:
        assert '--log-file %s/huey-worker-' % layout.logdir in s('ExecStart')


def test_target_groups_the_units(rendered):
    layout, files = rendered
    d = directives(files[os.path.join(layout.unitdir, 'huey-worker.target')])
    assert d[('Install', 'WantedBy')] == ['multi-user.target']


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
    assert "systemctl kill --kill-whom=main --signal=USR1 " \
           "'huey-worker*.service'" in logrotate
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
