#!/usr/bin/env python3
"""`make install` and `make uninstall` for huey-worker on a VM.

The Makefile passes the GNU directory variables.  Every installed file that
names a path is rendered from a template in the source tree (`@name@`
placeholders, see Layout.variables), so units, Supervisor blocks, logrotate
and tmpfiles entries always name the paths of this install.

Each step compares before it writes: a file is written only when its content
differs, a mode or owner set only when it differs, the package reinstalled
only when its files differ from the wheel's.  Running install twice changes
nothing.  DESTDIR stages the whole tree under another root (for packaging
and tests): nothing outside DESTDIR is touched then, no user is created and
no owner is set (the package's postinst runs systemd-sysusers and
systemd-tmpfiles with the files installed here).

Only the standard library is used: this runs before the venv exists.
"""
import argparse
import grp
import json
import os
import pwd
import re
import secrets
import shutil
import subprocess
import sys
import tempfile
import zipfile

SOURCE = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PROJECT = 'huey-worker'
WHEEL_PREFIX = 'huey_worker-'
MARKER = 'share/huey-worker/installed-by-make-install'  # inside the venv
EX_CONFIG = 78
EX_SOFTWARE = 70

# huey-worker.service is the suite; the daemons are its members.
SUITE = 'huey-worker.service'
MEMBERS = ('huey-worker-consumer.service', 'huey-worker-scheduler.service',
           'huey-worker-status.service')
UNITS = (SUITE,) + MEMBERS + ('huey-worker@.service', 'huey-worker.target')
# What the suite runs for start, stop and reload (under datadir).
SUITE_SCRIPT = 'huey-worker/huey-worker-suite'
# (template in the source tree, directory variable, installed name, mode)
TEMPLATES = tuple(
    ('deploy/systemd/%s.in' % unit, 'unitdir', unit, 0o644)
    for unit in UNITS) + (
    ('deploy/systemd/huey-worker-suite.in', 'datadir', SUITE_SCRIPT, 0o755),
    ('deploy/supervisor/huey-worker.conf.in', 'supervisordir',
     'huey-worker.conf', 0o644),
    ('etc/huey-worker.logrotate.in', 'logrotatedir', 'huey-worker', 0o644),
    ('etc/huey-worker.tmpfiles.in', 'tmpfilesdir', 'huey-worker.conf', 0o644),
    ('etc/huey-worker.sysusers.in', 'sysusersdir', 'huey-worker.conf', 0o644),
    ('deploy/monitoring/prometheus-scrape.example.yml.in', 'monitoringdir',
     'prometheus-scrape.example.yml', 0o644),
)
# Prometheus rules and the Grafana dashboard, copied as they are into
# monitoringdir (docs/operations.md, "Monitoring").
MONITORING = ('deploy/monitoring/alerts.yml',
              'deploy/monitoring/recording.yml',
              'deploy/monitoring/grafana-dashboard.json')
DOCS = ('README.md', 'docs/operations.md', 'docs/configuration.md',
        'docs/exit-codes.md', 'docs/consumer.md')
HARDENING = 'deploy/systemd/hardening.conf.in'

# What logrotate runs after rotating: tell every daemon to reopen its file,
# whichever of systemd or Supervisor runs them (the other command finds
# nothing and fails quietly).  The daemons also notice a rotated file by
# themselves before their next line; the signal makes it immediate.
REOPEN_SYSTEMD = ("systemctl kill --kill-whom=main --signal=USR1 "
                  "'huey-worker-*.service' 'huey-worker@*.service' "
                  ">/dev/null 2>&1 || true")
REOPEN_SUPERVISOR = ("supervisorctl signal USR1 'huey-worker:*' "
                     ">/dev/null 2>&1 || true")


class InstallError(Exception):
    """Something the operator must fix; the text says what and where."""


# --- templates ---------------------------------------------------------------

_PLACEHOLDER = re.compile(r'@([a-z_]+)@')


def render(text, variables, where='template'):
    """Replace every @name@; an unknown name is an error, never left as is."""
    def replace(match):
        name = match.group(1)
        if name not in variables:
            raise InstallError('%s: unknown placeholder @%s@' % (where, name))
        return str(variables[name])
    return _PLACEHOLDER.sub(replace, text)


def render_template(relpath, variables, source=SOURCE):
    with open(os.path.join(source, relpath), encoding='utf-8') as fh:
        return render(fh.read(), variables, relpath)


class Layout:
    """Where everything goes, from the GNU directory variables."""

    DEFAULTS = {
        'prefix': '/opt/huey-worker',
        'bindir': '{prefix}/bin',
        'datadir': '{prefix}/share',
        'docdir': '{datadir}/doc/huey-worker',
        'sysconfdir': '/etc',
        'localstatedir': '/var',
        'logdir': '{localstatedir}/log',
        'statedir': '{localstatedir}/lib/huey-worker',
        'unitdir': '/usr/local/lib/systemd/system',
        # The administrator's units, drop-ins and enable links (read, and
        # drop-ins moved on an upgrade that renames a unit).
        'systemdconfdir': '{sysconfdir}/systemd/system',
        'tmpfilesdir': '/usr/local/lib/tmpfiles.d',
        'sysusersdir': '/usr/local/lib/sysusers.d',
        'logrotatedir': '{sysconfdir}/logrotate.d',
        'supervisordir': '{datadir}/huey-worker/supervisor',
        'monitoringdir': '{datadir}/huey-worker/monitoring',
        'supervisorlogdir': '{localstatedir}/log/supervisor',
        'linkdir': '/usr/local/bin',
        'user': 'huey-worker',
        'group': 'huey-worker',
        'systemctl': 'systemctl',
        'supervisorctl': 'supervisorctl',
    }

    def __init__(self, destdir='', **given):
        self.destdir = destdir or ''
        values = {k: v for k, v in given.items() if v not in (None, '')}
        resolved = {}
        for name, default in self.DEFAULTS.items():
            raw = values.get(name, default)
            resolved[name] = raw.format(**resolved) if '{' in raw else raw
        for name, value in resolved.items():
            if name.endswith('dir') or name == 'prefix':
                if not os.path.isabs(value):
                    raise InstallError('%s must be an absolute path, got %r'
                                       % (name, value))
                value = os.path.normpath(value)
            setattr(self, name, value)
        self.confdir = os.path.join(self.sysconfdir, 'huey-worker')
        self.configfile = os.path.join(self.confdir, 'huey-worker.ini')

    def staged(self, path):
        """`path` under DESTDIR (GNU: DESTDIR is prepended at install time
        only and never written into a file)."""
        return self.destdir + path if self.destdir else path

    def variables(self):
        names = list(self.DEFAULTS) + ['confdir', 'configfile']
        out = {name: getattr(self, name) for name in names}
        out['python'] = os.path.join(self.prefix, 'bin', 'python')
        out['suite'] = os.path.join(self.datadir, SUITE_SCRIPT)
        out['reopen_logs'] = '\n        '.join([
            REOPEN_SYSTEMD.replace('systemctl', self.systemctl, 1),
            REOPEN_SUPERVISOR.replace('supervisorctl', self.supervisorctl, 1)])
        hardening = render_template(HARDENING, out)
        out['hardening'] = hardening.rstrip('\n')
        return out

    def installed_files(self):
        """(template, final path, mode) of every rendered file."""
        return [(template, os.path.join(getattr(self, dirvar), name), mode)
                for template, dirvar, name, mode in TEMPLATES]


def render_all(layout, source=SOURCE):
    """{final path: text} of every rendered file (tests use this too)."""
    variables = layout.variables()
    return {path: render_template(template, variables, source)
            for template, path, _ in layout.installed_files()}


# --- file operations that change only what differs ----------------------------

class Installer:
    def __init__(self, layout, wheelhouse=None, python=None, quiet=False,
                 source=SOURCE):
        self.layout = layout
        self.wheelhouse = os.path.abspath(wheelhouse) if wheelhouse else None
        self.python = python or sys.executable
        self.quiet = quiet
        self.source = source
        self.changes = []
        self.upgrade = None     # an OlderLayout when install finds one
        # Owners only on a real install run by root: under DESTDIR the user
        # does not exist on this machine.
        self.set_owners = not layout.destdir and os.geteuid() == 0

    def note(self, text):
        self.changes.append(text)
        if not self.quiet:
            print('  %s' % text)

    def ids(self, owner, group):
        if not self.set_owners:
            return None
        try:
            uid = pwd.getpwnam(owner).pw_uid
            gid = grp.getgrnam(group).gr_gid
        except KeyError as exc:
            raise InstallError('user or group missing: %s' % exc)
        return uid, gid

    def ensure_dir(self, path, mode=0o755, owner='root', group='root'):
        staged = self.layout.staged(path)
        if not os.path.isdir(staged):
            os.makedirs(staged, exist_ok=True)
            os.chmod(staged, mode)  # makedirs' mode is cut by the umask
            self.note('created %s/' % staged)
        self.ensure_attrs(staged, mode, owner, group)

    def ensure_attrs(self, staged, mode, owner='root', group='root'):
        st = os.lstat(staged)
        if st.st_mode & 0o7777 != mode:
            os.chmod(staged, mode)
            self.note('mode %o %s' % (mode, staged))
        ids = self.ids(owner, group)
        if ids and (st.st_uid, st.st_gid) != ids:
            os.chown(staged, *ids)
            self.note('owner %s:%s %s' % (owner, group, staged))

    def ensure_file(self, path, text, mode=0o644, owner='root',
                    group='root'):
        """Write `text` to `path` when it differs, atomically, with the mode
        set before the content lands (a secret is never briefly readable)."""
        staged = self.layout.staged(path)
        data = text.encode('utf-8') if isinstance(text, str) else text
        try:
            with open(staged, 'rb') as fh:
                same = fh.read() == data
        except FileNotFoundError:
            same = False
        if not same:
            directory = os.path.dirname(staged)
            os.makedirs(directory, exist_ok=True)
            fd, tmp = tempfile.mkstemp(dir=directory, prefix='.install-')
            try:
                os.fchmod(fd, mode)
                ids = self.ids(owner, group)
                if ids:
                    os.fchown(fd, *ids)
                with os.fdopen(fd, 'wb') as fh:
                    fh.write(data)
                existed = os.path.lexists(staged)
                os.replace(tmp, staged)
            except BaseException:
                if os.path.exists(tmp):
                    os.unlink(tmp)
                raise
            self.note('%s %s' % ('updated' if existed else 'installed',
                                 staged))
        self.ensure_attrs(staged, mode, owner, group)

    def ensure_symlink(self, path, target):
        staged = self.layout.staged(path)
        if os.path.islink(staged) and os.readlink(staged) == target:
            return
        if os.path.lexists(staged):
            if not os.path.islink(staged):
                raise InstallError('%s exists and is not a link; move it '
                                   'away or set linkdir=' % staged)
            os.unlink(staged)
        os.makedirs(os.path.dirname(staged), exist_ok=True)
        os.symlink(target, staged)
        self.note('linked %s -> %s' % (staged, target))

    def run(self, args, what):
        if not self.quiet:
            print('  %s' % what)
        result = subprocess.run(args, stdout=subprocess.PIPE, cwd='/',
                                stderr=subprocess.STDOUT, text=True)
        if result.returncode != 0:
            raise InstallError('%s failed (exit %d): %s\n%s' % (
                what, result.returncode, ' '.join(args),
                result.stdout.strip()))
        return result.stdout

    # -- steps -------------------------------------------------------------

    def install(self):
        L = self.layout
        self.check_python()
        if not L.destdir and os.geteuid() != 0:
            raise InstallError('installing into / needs root: sudo make '
                               'install (or stage it with DESTDIR=dir)')
        if self.wheelhouse and not os.path.isdir(self.wheelhouse):
            raise InstallError('WHEELHOUSE=%s is not a directory' %
                               self.wheelhouse)
        if self.set_owners:
            self.ensure_user()
        self.ensure_venv()
        self.ensure_package()
        self.ensure_launcher()
        self.ensure_config()
        self.upgrade = self.older_layout()
        if self.upgrade is not None and self.upgrade.consumer_unit:
            self.move_consumer_dropins()
        texts = render_all(L, self.source)
        for _, path, mode in L.installed_files():
            self.ensure_file(path, texts[path], mode)
        self.ensure_docs()
        self.apply_tmpfiles()
        return self.changes

    def older_layout(self):
        """What an install from before the suite unit left, or None: then
        huey-worker.service was the consumer and huey-worker.target grouped
        the daemons, enabled through huey-worker.target.wants/.  Found by the
        former consumer unit (the install that replaces it) or, until the
        upgrade steps are run, by those enable links."""
        L = self.layout
        try:
            with open(L.staged(os.path.join(L.unitdir, SUITE)),
                      encoding='utf-8') as fh:
                consumer_unit = bool(re.search(
                    r'^ExecStart=\S*huey-worker consumer', fh.read(), re.M))
        except FileNotFoundError:
            consumer_unit = False
        wants = L.staged(os.path.join(L.systemdconfdir,
                                      'huey-worker.target.wants'))
        links = sorted(n for n in (os.listdir(wants) if os.path.isdir(wants)
                                   else ()) if n.startswith('huey-worker'))
        if not consumer_unit and not links:
            return None
        full = os.path.join(L.systemdconfdir, SUITE)
        hidden = os.path.isfile(L.staged(full)) and \
            not os.path.islink(L.staged(full))
        return OlderLayout(consumer_unit,
                           [n for n in links if n.startswith('huey-worker@')],
                           full if hidden else None)

    def move_consumer_dropins(self):
        """The drop-ins of the former consumer unit (systemctl edit
        huey-worker.service) to the consumer's new name: left in place they
        would apply to the suite and the consumer would lose them."""
        L = self.layout
        old = L.staged(os.path.join(L.systemdconfdir, SUITE + '.d'))
        new = L.staged(os.path.join(L.systemdconfdir, MEMBERS[0] + '.d'))
        if not os.path.isdir(old):
            return
        os.makedirs(new, exist_ok=True)
        for name in sorted(os.listdir(old)):
            if os.path.lexists(os.path.join(new, name)):
                self.note('kept %s: %s already has a %s' % (
                    os.path.join(old, name), new, name))
                continue
            os.rename(os.path.join(old, name), os.path.join(new, name))
            self.note('moved the drop-in %s to %s/ (the consumer\'s unit is '
                      'now %s)' % (os.path.join(old, name), new, MEMBERS[0]))
        if not os.listdir(old):
            os.rmdir(old)

    def check_python(self):
        if sys.version_info < (3, 10):
            raise InstallError('huey-worker needs Python 3.10 or newer; '
                               'this is %s (set PYTHON=...)' % sys.version.split()[0])

    def ensure_user(self):
        L = self.layout
        try:
            pwd.getpwnam(L.user)
            grp.getgrnam(L.group)
            return
        except KeyError:
            pass
        sysusers = shutil.which('systemd-sysusers')
        conf = render_template('etc/huey-worker.sysusers.in', L.variables(),
                               self.source)
        if sysusers and L.user == L.group:
            with tempfile.NamedTemporaryFile('w', suffix='.conf') as fh:
                fh.write(conf)
                fh.flush()
                self.run([sysusers, fh.name], 'creating user %s with '
                         'systemd-sysusers' % L.user)
        else:
            try:
                grp.getgrnam(L.group)
            except KeyError:
                self.run(['groupadd', '--system', L.group],
                         'creating group %s' % L.group)
            self.run(['useradd', '--system', '--gid', L.group,
                      '--home-dir', L.statedir, '--no-create-home',
                      '--shell', '/usr/sbin/nologin',
                      '--comment', 'huey-worker daemons', L.user],
                     'creating user %s' % L.user)
        self.note('user %s, group %s' % (L.user, L.group))

    @property
    def venv_python(self):
        return self.layout.staged(os.path.join(self.layout.prefix, 'bin',
                                               'python'))

    def ensure_venv(self):
        L = self.layout
        prefix = L.staged(L.prefix)
        if os.path.exists(self.venv_python):
            if not os.path.exists(os.path.join(prefix, 'pyvenv.cfg')):
                raise InstallError('%s exists but is not a venv; choose '
                                   'another prefix=' % prefix)
            return
        if os.path.isdir(prefix) and os.listdir(prefix):
            raise InstallError('%s exists, is not empty and is not a venv; '
                               'choose another prefix=' % prefix)
        result = subprocess.run([self.python, '-m', 'venv', prefix],
                                stdout=subprocess.PIPE,
                                stderr=subprocess.STDOUT, text=True)
        if result.returncode != 0:
            shutil.rmtree(prefix, ignore_errors=True)
            raise InstallError(
                'cannot create the venv %s with %s: %s\n(on Debian/Ubuntu: '
                'apt-get install python3-venv)' % (
                    prefix, self.python, result.stdout.strip()))
        self.note('created venv %s' % prefix)
        self.ensure_file(os.path.join(L.prefix, MARKER),
                         'This venv was created by huey-worker make install; '
                         'make uninstall removes it.\n')

    def pip(self, *args):
        return [self.venv_python, '-I', '-m', 'pip',
                '--disable-pip-version-check',
                '--no-input', '-q'] + list(args)

    def index_options(self):
        if self.wheelhouse:
            return ['--no-index', '--find-links', self.wheelhouse]
        return []

    def project_wheel(self, scratch):
        """The huey-worker wheel to install: from WHEELHOUSE, else built
        from this source tree."""
        if self.wheelhouse:
            found = [os.path.join(self.wheelhouse, n)
                     for n in os.listdir(self.wheelhouse)
                     if n.startswith(WHEEL_PREFIX) and n.endswith('.whl')]
            if not found:
                raise InstallError('no %s*.whl in WHEELHOUSE=%s (build one '
                                   'with: make wheelhouse WHEELHOUSE=%s)' % (
                                       WHEEL_PREFIX, self.wheelhouse,
                                       self.wheelhouse))
            return max(found, key=os.path.getmtime)
        # From a clean copy: setuptools' build/ in the tree may hold modules
        # since deleted, and a root-owned build/ would be left in the
        # operator's checkout.
        copy = os.path.join(scratch, 'source')
        shutil.copytree(self.source, copy, ignore=shutil.ignore_patterns(
            '.git', '.venv', 'build', 'dist', '*.egg-info', '__pycache__',
            '.pytest_cache'))
        out = os.path.join(scratch, 'wheel')
        self.run(self.pip('wheel', '--no-deps', '-w', out, copy),
                 'building the huey-worker wheel')
        return [os.path.join(out, n) for n in os.listdir(out)
                if n.startswith(WHEEL_PREFIX)][0]

    def installed_record(self):
        """{path: hash} of the installed huey-worker files, or None."""
        probe = ('import json, importlib.metadata as m\n'
                 'try:\n'
                 '    d = m.distribution(%r)\n'
                 'except m.PackageNotFoundError:\n'
                 '    print("null")\n'
                 'else:\n'
                 '    print(json.dumps({str(f): f.hash and f.hash.value '
                 'for f in d.files or ()}))\n' % PROJECT)
        # -I: not the source tree's egg-info found through the cwd.
        out = subprocess.run([self.venv_python, '-I', '-c', probe], cwd='/',
                             stdout=subprocess.PIPE, text=True, check=True)
        return json.loads(out.stdout)

    def ensure_package(self):
        with tempfile.TemporaryDirectory() as scratch:
            wheel = self.project_wheel(scratch)
            wanted, requires = wheel_record(wheel)
            installed = self.installed_record()
            if installed is None:
                self.run(self.pip('install', *self.index_options(), wheel),
                         'installing %s and its dependencies%s' % (
                             os.path.basename(wheel),
                             ' from %s' % self.wheelhouse
                             if self.wheelhouse else ''))
                self.note('installed %s' % os.path.basename(wheel))
            elif any(installed.get(p) != h for p, h in wanted.items()):
                self.run(self.pip('install', '--force-reinstall', '--no-deps',
                                  *self.index_options(), wheel),
                         'updating huey-worker from %s'
                         % os.path.basename(wheel))
                self.note('updated to %s' % os.path.basename(wheel))
        # Dependencies: pip changes nothing when they are satisfied, and
        # brings new or newer ones after an upgrade.
        if requires:
            self.run(self.pip('install', *self.index_options(), *requires),
                     'checking dependencies')

    def ensure_launcher(self):
        L = self.layout
        with open(os.path.join(self.source, 'bin', 'huey-worker'),
                  encoding='utf-8') as fh:
            body = fh.read().split('\n', 1)[1]
        shebang = '#!%s\n' % os.path.join(L.prefix, 'bin', 'python')
        launcher = os.path.join(L.bindir, 'huey-worker')
        self.ensure_file(launcher, shebang + body, 0o755)
        if L.linkdir != L.bindir:
            self.ensure_symlink(os.path.join(L.linkdir, 'huey-worker'),
                                launcher)

    def ensure_config(self):
        L = self.layout
        self.ensure_dir(L.confdir, 0o750, 'root', L.group)
        for sub in ('conf.d', 'instances'):
            self.ensure_dir(os.path.join(L.confdir, sub), 0o750, 'root',
                            L.group)
        with open(os.path.join(self.source, 'etc', 'huey-worker.ini'),
                  encoding='utf-8') as fh:
            sample = fh.read()
        self.ensure_file(L.configfile + '.sample', sample, 0o644)
        if os.path.lexists(L.staged(L.configfile)):
            return  # the operator's config: never overwritten
        self.ensure_file(L.configfile, with_secret_key(sample), 0o640,
                         'root', L.group)
        self.note('new config with a random [huey] secret_key: %s'
                  % L.staged(L.configfile))

    def ensure_docs(self):
        L = self.layout
        for files, directory in ((DOCS, L.docdir),
                                 (MONITORING, L.monitoringdir)):
            for doc in files:
                path = os.path.join(self.source, doc)
                if os.path.exists(path):
                    with open(path, 'rb') as fh:
                        self.ensure_file(os.path.join(
                            directory, os.path.basename(doc)), fh.read(),
                            0o644)

    def apply_tmpfiles(self):
        """Create the directories and log files the tmpfiles.d entry names,
        with its owners and modes (it is the one list of them)."""
        L = self.layout
        text = render_template('etc/huey-worker.tmpfiles.in', L.variables(),
                               self.source)
        for kind, path, mode, owner, group in tmpfiles_entries(text):
            staged = L.staged(path)
            if kind == 'd':
                self.ensure_dir(path, mode, owner, group)
            elif kind == 'f':
                if not os.path.exists(staged):
                    os.makedirs(os.path.dirname(staged), exist_ok=True)
                    fd = os.open(staged, os.O_CREAT | os.O_WRONLY, mode)
                    os.close(fd)
                    self.note('created %s' % staged)
                self.ensure_attrs(staged, mode, owner, group)

    # -- uninstall ---------------------------------------------------------

    def uninstall(self):
        L = self.layout
        removed = []

        def remove(path):
            staged = L.staged(path)
            if os.path.lexists(staged):
                os.unlink(staged)
                removed.append(staged)
                if not self.quiet:
                    print('  removed %s' % staged)

        for _, path, _ in L.installed_files():
            remove(path)
        remove(L.configfile + '.sample')
        for doc in DOCS:
            remove(os.path.join(L.docdir, os.path.basename(doc)))
        for name in MONITORING:
            remove(os.path.join(L.monitoringdir, os.path.basename(name)))
        link = os.path.join(L.linkdir, 'huey-worker')
        if os.path.islink(L.staged(link)):
            remove(link)
        prefix = L.staged(L.prefix)
        if os.path.exists(os.path.join(prefix, MARKER)):
            shutil.rmtree(prefix)
            removed.append(prefix)
            if not self.quiet:
                print('  removed %s/' % prefix)
        elif os.path.exists(prefix):
            print('  kept %s: not created by make install' % prefix)
        return removed


def with_secret_key(sample):
    """The sample config with a random secret_key under [huey]."""
    line = ('# Written by make install: copy this value to every producer '
            'and consumer.\nsecret_key = %s\n' % secrets.token_urlsafe(32))
    out, done = [], False
    for text in sample.splitlines(keepends=True):
        out.append(text)
        if not done and text.strip() == '[huey]':
            out.append(line)
            done = True
    if not done:
        out.append('\n[huey]\n' + line)
    return ''.join(out)


def wheel_record(wheel):
    """({path: hash} of the wheel's files, [Requires-Dist without extras])."""
    with zipfile.ZipFile(wheel) as zf:
        names = zf.namelist()
        record = next(n for n in names if n.endswith('.dist-info/RECORD'))
        metadata = next(n for n in names if n.endswith('.dist-info/METADATA'))
        files = {}
        for row in zf.read(record).decode('utf-8').splitlines():
            path, digest = row.split(',')[:2]
            if digest and '.dist-info/' not in path:
                files[path] = digest.split('=', 1)[1]
        requires = []
        for row in zf.read(metadata).decode('utf-8').splitlines():
            if row.startswith('Requires-Dist:'):
                req = row.split(':', 1)[1].strip()
                if 'extra ==' not in req:
                    requires.append(req)
    return files, requires


def tmpfiles_entries(text):
    """(type, path, mode, user, group) of each line of a tmpfiles.d file."""
    out = []
    for line in text.splitlines():
        line = line.strip()
        if not line or line.startswith('#'):
            continue
        fields = line.split()
        kind, path, mode, user, group = (fields + ['-'] * 5)[:5]
        out.append((kind, path, int(mode, 8), user, group))
    return out


# --- command line --------------------------------------------------------------

class OlderLayout:
    """An install from before huey-worker.service was the suite."""

    def __init__(self, consumer_unit, instances, full_override):
        self.consumer_unit = consumer_unit    # the former consumer unit file
        self.instances = instances            # enabled huey-worker@NAME
        self.full_override = full_override    # systemctl edit --full's copy


def upgrade_steps(layout, older):
    """The commands that turn an older install into the current one, in
    order: stop with the unit definitions systemd still has loaded (the
    former consumer unit drains its tasks), then load the new ones, move
    the enable links from huey-worker.target to the suite, start."""
    lines = [
        '',
        'Upgrade from an install where huey-worker.service was the consumer:',
        'huey-worker.service is now the whole suite and the consumer is %s.'
        % MEMBERS[0],
        'Run these, in this order (the first still acts on the units systemd '
        'has loaded):',
        "  systemctl stop huey-worker.target %s 'huey-worker@*.service'"
        % ' '.join((SUITE,) + MEMBERS[1:]),
        '  systemctl daemon-reload',
        '  systemctl disable huey-worker.target',
        '  systemctl reenable %s' % ' '.join([SUITE] + older.instances),
        '  systemctl start huey-worker',
    ]
    if older.full_override:
        lines[4:4] = [
            'First: %s (from systemctl edit --full) hides the new suite '
            'unit; move what you changed into a drop-in of %s, then '
            'remove it.' % (older.full_override, MEMBERS[0])]
    return '\n'.join(lines)


def next_steps(layout, older=None):
    if older is not None:
        start = [upgrade_steps(layout, older),
                 '  curl -s http://127.0.0.1:8470/health']
    else:
        start = ['',
                 'Installed.  Review %s, then start the suite:'
                 % layout.configfile,
                 '  systemctl daemon-reload',
                 '  systemctl enable --now huey-worker',
                 '  curl -s http://127.0.0.1:8470/health']
    return '\n'.join(start + [
        'Under Supervisor instead of systemd:',
        '  ln -s %s /etc/supervisor/conf.d/huey-worker.conf' % os.path.join(
            layout.supervisordir, 'huey-worker.conf'),
        '  supervisorctl reread && supervisorctl update',
        'Logs: %s/huey-worker*.log   Guide: %s/operations.md' % (
            layout.logdir, layout.docdir),
    ])


def parse_args(argv):
    parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    parser.add_argument('action', choices=('install', 'uninstall', 'render'))
    parser.add_argument('--destdir', default=os.environ.get('DESTDIR', ''))
    parser.add_argument('--wheelhouse', default=None)
    parser.add_argument('--python', default=None,
                        help='Python that creates the venv.')
    parser.add_argument('--quiet', action='store_true')
    for name in Layout.DEFAULTS:
        parser.add_argument('--' + name, default=None)
    return parser.parse_args(argv)


def main(argv=None):
    args = parse_args(sys.argv[1:] if argv is None else argv)
    given = {name: getattr(args, name) for name in Layout.DEFAULTS}
    try:
        layout = Layout(args.destdir, **given)
        installer = Installer(layout, args.wheelhouse, args.python,
                              args.quiet)
        if args.action == 'render':
            for path, text in render_all(layout).items():
                print('### %s\n%s' % (path, text))
            return 0
        if args.action == 'install':
            where = ' into DESTDIR=%s' % layout.destdir if layout.destdir \
                else ''
            print('huey-worker: installing%s' % where)
            changes = installer.install()
            if not changes:
                print('  nothing to change: already installed')
            if layout.destdir:
                print('(DESTDIR: no user created and no owner set; on the '
                      'target run systemd-sysusers and systemd-tmpfiles '
                      '--create)')
            print(next_steps(layout, installer.upgrade))
        else:
            print('huey-worker: uninstalling')
            removed = installer.uninstall()
            if not removed:
                print('  nothing to remove')
            print('Kept: %s, %s/huey-worker*.log, %s and the user %s.' % (
                layout.confdir, layout.logdir, layout.statedir, layout.user))
            print("Before: systemctl disable --now huey-worker "
                  "'huey-worker@*.service'; after: systemctl daemon-reload")
        return 0
    except InstallError as exc:
        print('huey-worker install: %s' % exc, file=sys.stderr)
        return EX_CONFIG
    except (OSError, subprocess.CalledProcessError) as exc:
        print('huey-worker install: %s' % exc, file=sys.stderr)
        return EX_SOFTWARE


if __name__ == '__main__':
    sys.exit(main())
