"""`make install` / `make uninstall` into a DESTDIR: the real Makefile, a
real venv, the package and its dependencies installed offline from a
wheelhouse.  (The same install without DESTDIR, with the system user and
owners, runs inside a booted Debian in test_systemd_e2e.py.)"""
import os
import re
import shutil
import stat
import subprocess
import sys

import pytest

from deploy_support import (OLD_LINKS, OLD_UNITS, ROOT, build_wheelhouse,
                            changed_paths, install, manifest, old_units, read)

PREFIX = '/opt/huey-worker'
CONFIG = '/etc/huey-worker/huey-worker.ini'


def make(*args):
    result = subprocess.run(['make', '-s', '-C', ROOT] + list(args) +
                            ['PYTHON=%s' % sys.executable],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True)
    return result.returncode, result.stdout


@pytest.fixture(scope='module')
def staged(tmp_path_factory):
    base = tmp_path_factory.mktemp('install')
    wheelhouse = build_wheelhouse(str(base / 'wheelhouse'))
    destdir = str(base / 'dest')
    code, out = make('install', 'DESTDIR=%s' % destdir,
                     'WHEELHOUSE=%s' % wheelhouse)
    assert code == 0, out
    print(out)
    return destdir, wheelhouse, out


def secret_of(text):
    match = re.search(r'^\[huey\]\n(?:#.*\n)*secret_key = (\S+)$', text,
                      re.M)
    return match and match.group(1)


def test_install_puts_every_file_in_place(staged):
    destdir, wheelhouse, out = staged
    d = lambda path: destdir + path  # noqa: E731
    mode = lambda path: stat.S_IMODE(os.stat(d(path)).st_mode)  # noqa: E731
    for path in ('/usr/local/lib/systemd/system/huey-worker.service',
                 '/usr/local/lib/systemd/system/huey-worker-consumer.service',
                 '/usr/local/lib/systemd/system/huey-worker-scheduler.service',
                 '/usr/local/lib/systemd/system/huey-worker-status.service',
                 '/usr/local/lib/systemd/system/huey-worker@.service',
                 '/usr/local/lib/systemd/system/huey-worker.target',
                 '/etc/logrotate.d/huey-worker',
                 '/usr/local/lib/tmpfiles.d/huey-worker.conf',
                 '/usr/local/lib/sysusers.d/huey-worker.conf',
                 PREFIX + '/share/huey-worker/supervisor/huey-worker.conf',
                 PREFIX + '/share/doc/huey-worker/operations.md',
                 CONFIG + '.sample'):
        assert mode(path) == 0o644, path
    # The config: the shipped sample plus a random secret, not world-readable.
    assert mode(CONFIG) == 0o640
    # What the suite unit runs for start, stop and reload.
    assert mode(PREFIX + '/share/huey-worker/huey-worker-suite') == 0o755
    assert mode('/etc/huey-worker') == 0o750
    config = read(d(CONFIG))
    with open(os.path.join(ROOT, 'etc', 'huey-worker.ini')) as fh:
        sample = fh.read()
    assert read(d(CONFIG + '.sample')) == sample
    key = secret_of(config)
    assert key and len(key) >= 40, config[:2000]
    assert config.replace(
        '# Written by make install: copy this value to every producer and '
        'consumer.\nsecret_key = %s\n' % key, '') == sample
    # Log files and state directories from the tmpfiles.d entry.
    for log in ('huey-worker.log', 'huey-worker-scheduler.log',
                'huey-worker-status.log'):
        assert mode('/var/log/' + log) == 0o640
    assert mode('/var/lib/huey-worker/input') == 0o2770
    # The launcher execs the venv's python directly (no shell), and the
    # link on PATH points at it.
    launcher = d(PREFIX + '/bin/huey-worker')
    assert read(launcher).startswith('#!%s/bin/python\n' % PREFIX)
    assert mode(PREFIX + '/bin/huey-worker') == 0o755
    assert os.readlink(d('/usr/local/bin/huey-worker')) == \
        PREFIX + '/bin/huey-worker'
    # DESTDIR is never written into an installed file.
    for path in (launcher, d('/etc/logrotate.d/huey-worker'),
                 d(PREFIX + '/share/huey-worker/supervisor/huey-worker.conf'),
                 d('/usr/local/lib/tmpfiles.d/huey-worker.conf')) + tuple(
            d('/usr/local/lib/systemd/system/' + unit)
            for unit in install.UNITS):
        assert destdir not in read(path), path
    # The installed package runs, and the new config is valid.
    python = d(PREFIX + '/bin/python')
    version = subprocess.run([python, launcher, '--version'], cwd='/',
                             stdout=subprocess.PIPE, text=True, check=True)
    assert 'huey-worker, version' in version.stdout
    check = subprocess.run([python, launcher, 'config', '--check', '-c',
                            d(CONFIG)], cwd='/', stdout=subprocess.PIPE,
                           stderr=subprocess.STDOUT, text=True)
    assert check.returncode == 0, check.stdout
    # It tells what to do next, and calls no systemctl itself.
    assert '\n  systemctl enable --now huey-worker\n' in out
    assert 'Upgrade' not in out
    print('installed into DESTDIR; secret_key of %d characters; '
          'config --check: %s' % (len(key), check.stdout.strip()))


def test_install_twice_changes_nothing(staged):
    destdir, wheelhouse, _ = staged
    before = manifest(destdir)
    code, out = make('install', 'DESTDIR=%s' % destdir,
                     'WHEELHOUSE=%s' % wheelhouse)
    assert code == 0, out
    assert 'nothing to change' in out
    after = manifest(destdir)
    changed = changed_paths(before, after)
    assert changed == [], changed[:20]
    print('second make install: %d paths compared, none changed'
          % len(after))


def test_existing_config_is_kept_and_a_new_one_gets_a_new_secret(staged):
    destdir, wheelhouse, _ = staged
    config = destdir + CONFIG
    original = read(config)
    edited = original + '\n[consumer]\nworkers = 3\n'
    with open(config, 'w') as fh:
        fh.write(edited)
    code, out = make('install', 'DESTDIR=%s' % destdir,
                     'WHEELHOUSE=%s' % wheelhouse)
    assert code == 0, out
    assert read(config) == edited
    # No config at all: install writes a new one, with a new secret.
    os.unlink(config)
    code, out = make('install', 'DESTDIR=%s' % destdir,
                     'WHEELHOUSE=%s' % wheelhouse)
    assert code == 0, out
    fresh = read(config)
    assert secret_of(fresh) and secret_of(fresh) != secret_of(original)
    assert stat.S_IMODE(os.stat(config).st_mode) == 0o640


def test_bad_wheelhouse_is_a_clear_error(tmp_path):
    code, out = make('install', 'DESTDIR=%s' % (tmp_path / 'dest'),
                     'WHEELHOUSE=%s' % (tmp_path / 'absent'))
    assert code != 0
    assert 'WHEELHOUSE=%s is not a directory' % (tmp_path / 'absent') in out
    assert not os.path.exists(tmp_path / 'dest')


def test_install_over_an_older_install_says_how_to_upgrade(staged):
    destdir, wheelhouse, _ = staged
    units = destdir + '/usr/local/lib/systemd/system/'
    etc = destdir + '/etc/systemd/system/'
    for path, text in old_units(install.Layout()).items():
        with open(destdir + path, 'w') as fh:
            fh.write(text)
    os.unlink(units + 'huey-worker-consumer.service')
    # What enable made of them, with an instance; systemctl edit
    # huey-worker.service.
    links = dict(OLD_LINKS, **{'huey-worker.target.wants/huey-worker@pdf.'
                               'service': 'huey-worker@.service'})
    for link, unit in links.items():
        os.makedirs(os.path.dirname(etc + link), exist_ok=True)
        os.symlink('/usr/local/lib/systemd/system/' + unit, etc + link)
    os.makedirs(etc + 'huey-worker.service.d')
    with open(etc + 'huey-worker.service.d/override.conf', 'w') as fh:
        fh.write('[Service]\nTimeoutStopSec=320s\n')
    # systemctl edit --full huey-worker.service: a copy that would hide
    # the suite unit.
    with open(etc + 'huey-worker.service', 'w') as fh:
        fh.write(OLD_UNITS['huey-worker.service'])

    code, out = make('install', 'DESTDIR=%s' % destdir,
                     'WHEELHOUSE=%s' % wheelhouse)
    assert code == 0, out
    # The units are the current ones, the operator's drop-in follows the
    # consumer to its new name.
    assert 'huey-worker-suite start' in read(units + 'huey-worker.service')
    assert 'huey-worker consumer' in read(
        units + 'huey-worker-consumer.service')
    assert not os.path.exists(etc + 'huey-worker.service.d')
    assert read(etc + 'huey-worker-consumer.service.d/override.conf') == \
        '[Service]\nTimeoutStopSec=320s\n'
    # The steps, in order: stop with what systemd has loaded, load the new
    # units, move the enable links from the target to the suite, start.
    steps = [line.strip() for line in out.splitlines()
             if line.startswith('  systemctl ')]
    assert steps == [
        "systemctl stop huey-worker.target huey-worker.service "
        "huey-worker-scheduler.service huey-worker-status.service "
        "'huey-worker@*.service'",
        'systemctl daemon-reload',
        'systemctl disable huey-worker.target',
        'systemctl reenable huey-worker.service huey-worker@pdf.service',
        'systemctl start huey-worker'], out
    assert 'First: /etc/systemd/system/huey-worker.service (from systemctl ' \
        'edit --full) hides the new suite unit' in out, out
    print('\n'.join(line for line in out.splitlines()
                    if 'Upgrade' in line or 'drop-in' in line))
    os.unlink(etc + 'huey-worker.service')

    # Until the links are moved, install says so again (without moving
    # anything); once they are, it prints the usual steps.
    code, out = make('install', 'DESTDIR=%s' % destdir,
                     'WHEELHOUSE=%s' % wheelhouse)
    assert code == 0 and 'nothing to change' in out and \
        'systemctl reenable huey-worker.service' in out, out
    shutil.rmtree(etc + 'huey-worker.target.wants')
    code, out = make('install', 'DESTDIR=%s' % destdir,
                     'WHEELHOUSE=%s' % wheelhouse)
    assert code == 0 and 'Upgrade' not in out and \
        'systemctl enable --now huey-worker\n' in out, out
    shutil.rmtree(destdir + '/etc/systemd')


def test_uninstall_removes_what_install_put_and_keeps_config_and_logs(staged):
    destdir, wheelhouse, _ = staged
    config = read(destdir + CONFIG)
    with open(destdir + '/var/log/huey-worker.log', 'w') as fh:
        fh.write('a line the operator wants to keep\n')
    code, out = make('uninstall', 'DESTDIR=%s' % destdir)
    assert code == 0, out
    for gone in (PREFIX, '/usr/local/bin/huey-worker', CONFIG + '.sample',
                 '/etc/logrotate.d/huey-worker',
                 '/usr/local/lib/tmpfiles.d/huey-worker.conf',
                 '/usr/local/lib/sysusers.d/huey-worker.conf') + tuple(
            '/usr/local/lib/systemd/system/' + u for u in install.UNITS):
        assert not os.path.lexists(destdir + gone), gone
    assert read(destdir + CONFIG) == config
    assert read(destdir + '/var/log/huey-worker.log') == \
        'a line the operator wants to keep\n'
    assert os.path.isdir(destdir + '/var/lib/huey-worker/input')
    code, out = make('uninstall', 'DESTDIR=%s' % destdir)
    assert code == 0 and 'nothing to remove' in out, out
