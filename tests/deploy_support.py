"""Helpers of the deployment tests: the installer module, files rendered for
a temporary root by the same templates `make install` uses, a private
supervisord, a wheelhouse cache, and waiting for conditions."""
import getpass
import grp
import importlib.util
import os
import shutil
import signal
import socket
import subprocess
import sys

from ops_helpers import wait_until

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# Kept between runs, outside the repo: Debian images and wheels.
CACHE = os.environ.get('HUEY_WORKER_TEST_CACHE', '/var/cache/huey-worker-tests')


def load_installer():
    spec = importlib.util.spec_from_file_location(
        'huey_worker_install', os.path.join(ROOT, 'deploy', 'install.py'))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


install = load_installer()


def wait_for(condition, timeout=30, interval=0.1, what='condition'):
    """ops_helpers.wait_until with the longer defaults installs need."""
    return wait_until(condition, timeout, interval, what)


def free_port():
    with socket.socket() as sock:
        sock.bind(('127.0.0.1', 0))
        return sock.getsockname()[1]


def current_user_group():
    return getpass.getuser(), grp.getgrgid(os.getgid()).gr_name


def temp_layout(root, **extra):
    """A Layout whose every path lies under `root`, running as the current
    user, with the launcher's python being the one running the tests."""
    user, group = current_user_group()
    values = dict(
        prefix=os.path.dirname(os.path.dirname(sys.executable)),
        bindir=os.path.join(root, 'bin'),
        datadir=os.path.join(root, 'share'),
        sysconfdir=os.path.join(root, 'etc'),
        localstatedir=os.path.join(root, 'var'),
        unitdir=os.path.join(root, 'units'),
        tmpfilesdir=os.path.join(root, 'tmpfiles.d'),
        sysusersdir=os.path.join(root, 'sysusers.d'),
        linkdir=os.path.join(root, 'bin'),
        user=user, group=group)
    values.update(extra)
    return install.Layout('', **values)


def write_launcher(layout):
    """bin/huey-worker as make install writes it (shebang: layout python)."""
    installer = install.Installer(layout, quiet=True)
    installer.ensure_launcher()
    return os.path.join(layout.bindir, 'huey-worker')


def write_rendered(layout):
    """Every rendered file at its path, with its mode; returns {path:
    text}."""
    files = install.render_all(layout)
    for _, path, mode in layout.installed_files():
        os.makedirs(os.path.dirname(path), exist_ok=True)
        with open(path, 'w') as fh:
            fh.write(files[path])
        os.chmod(path, mode)
    return files


def write_config(layout, text):
    os.makedirs(layout.confdir, exist_ok=True)
    with open(layout.configfile, 'w') as fh:
        fh.write(text)


def make_dirs(layout):
    for path in (layout.statedir, layout.logdir, layout.supervisorlogdir):
        os.makedirs(path, exist_ok=True)


class Supervisord:
    """A real supervisord on a private socket, including the rendered
    huey-worker blocks."""

    def __init__(self, directory, blocks_path):
        self.directory = directory
        self.blocks = blocks_path
        self.conf = os.path.join(directory, 'supervisord.conf')
        self.sock = os.path.join(directory, 'supervisor.sock')
        self.log = os.path.join(directory, 'supervisord.log')
        with open(self.conf, 'w') as fh:
            fh.write('\n'.join([
                '[unix_http_server]', 'file=%s' % self.sock, 'chmod=0700', '',
                '[supervisord]', 'logfile=%s' % self.log,
                'pidfile=%s' % os.path.join(directory, 'supervisord.pid'),
                'childlogdir=%s' % directory, 'loglevel=info', '',
                '[rpcinterface:supervisor]',
                'supervisor.rpcinterface_factory = '
                'supervisor.rpcinterface:make_main_rpcinterface', '',
                '[supervisorctl]', 'serverurl=unix://%s' % self.sock, '',
                '[include]', 'files = %s' % blocks_path, '']))
        self.proc = None

    @property
    def ctl_command(self):
        return '%s -c %s' % (self.binary('supervisorctl'), self.conf)

    @staticmethod
    def binary(name):
        path = os.path.join(os.path.dirname(sys.executable), name)
        return path if os.path.exists(path) else shutil.which(name)

    def start(self, env=None):
        out = open(os.path.join(self.directory, 'supervisord.out'), 'ab')
        self.proc = subprocess.Popen(
            [self.binary('supervisord'), '-n', '-c', self.conf], stdout=out,
            stderr=subprocess.STDOUT, env=env, start_new_session=True)
        out.close()
        wait_for(lambda: os.path.exists(self.sock), 20,
                 what='supervisord socket')

    def ctl(self, *args, check=False, timeout=120):
        result = subprocess.run(
            [self.binary('supervisorctl'), '-c', self.conf] + list(args),
            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
            timeout=timeout)
        if check and result.returncode != 0:
            raise AssertionError('supervisorctl %s: %s' % (
                ' '.join(args), result.stdout))
        return result.stdout

    def states(self):
        """{program name: (state, pid or None)}."""
        out = {}
        for line in self.ctl('status').splitlines():
            fields = line.split()
            if len(fields) >= 2:
                pid = None
                if 'pid' in fields:
                    pid = int(fields[fields.index('pid') + 1].rstrip(','))
                out[fields[0]] = (fields[1], pid)
        return out

    def wait_state(self, name, state, timeout=40):
        return wait_for(
            lambda: self.states().get(name, (None,))[0] == state
            and self.states()[name], timeout,
            what='%s to be %s (now %s)' % (name, state, self.states()))

    def supervisord_log(self):
        with open(self.log) as fh:
            return fh.read()

    def stop(self):
        if self.proc is None or self.proc.poll() is not None:
            return
        self.proc.send_signal(signal.SIGTERM)
        try:
            self.proc.wait(60)
        except subprocess.TimeoutExpired:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait(10)


def read(path):
    try:
        with open(path, encoding='utf-8', errors='replace') as fh:
            return fh.read()
    except FileNotFoundError:
        return ''


def build_wheelhouse(dest):
    """Every wheel `make install WHEELHOUSE=` needs: the project's, built
    now, and its dependencies, kept in CACHE/wheels between runs.  One
    build at a time: pip builds the project in its source tree (setuptools'
    build/ and egg-info there) and writes into the shared cache, so two
    xdist workers building at once (this file's tests and the systemd
    e2e) made a wheel without the huey_worker package."""
    import fcntl
    deps = os.path.join(CACHE, 'wheels')
    os.makedirs(deps, exist_ok=True)
    os.makedirs(dest, exist_ok=True)
    with open(os.path.join(CACHE, 'wheels.lock'), 'w') as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        return _build_wheelhouse(deps, dest)


def _build_wheelhouse(deps, dest):
    pip = [sys.executable, '-m', 'pip', 'wheel', '-q',
           '--disable-pip-version-check', '--find-links', deps]
    # Offline first (cached wheels, setuptools and wheel included); online
    # only when something new is needed.
    offline = subprocess.run(pip + ['--no-index', '-w', deps, ROOT],
                             stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                             text=True)
    if offline.returncode != 0:
        subprocess.run([sys.executable, '-m', 'pip', 'download', '-q',
                        '--disable-pip-version-check', '-d', deps,
                        'setuptools', 'wheel'], check=True)
        subprocess.run(pip + ['-w', deps, ROOT], check=True)
    # pip wheel rebuilt the project's own wheel from the current tree just
    # now (a local directory is never taken from a cache).
    for name in os.listdir(deps):
        if name.endswith('.whl'):
            shutil.copy2(os.path.join(deps, name), dest)
    return dest


def manifest(root, only=None):
    """What would show a change under `root` (or the paths `only` below it):
    type, mode, owner, size, mtime and content of each file."""
    import hashlib
    import stat
    out = {}
    starts = [root + p for p in only] if only else [root]
    for start in starts:
        if not os.path.lexists(start):
            continue
        walked = [(os.path.dirname(start), [], [os.path.basename(start)])]
        if os.path.isdir(start) and not os.path.islink(start):
            walked += list(os.walk(start))
        for directory, dirs, files in walked:
            for name in dirs + files:
                path = os.path.join(directory, name)
                st = os.lstat(path)
                digest = None
                if stat.S_ISREG(st.st_mode):
                    with open(path, 'rb') as fh:
                        digest = hashlib.sha256(fh.read()).hexdigest()
                elif stat.S_ISLNK(st.st_mode):
                    digest = os.readlink(path)
                out[path] = (st.st_mode, st.st_uid, st.st_gid, st.st_size,
                             None if stat.S_ISDIR(st.st_mode)
                             else st.st_mtime_ns, digest)
    return out


def changed_paths(before, after):
    return sorted(p for p in set(before) | set(after)
                  if before.get(p) != after.get(p))


# The marker environment of another Python, printed by that Python (stdlib
# only): pip evaluates a requirement's markers with the Python running pip,
# so a wheelhouse for a VM's Python may lack what only that Python needs
# (redis needs async-timeout below 3.11.3, say).
MARKER_ENVIRONMENT_SCRIPT = '''
import json, os, platform, sys
v = sys.implementation.version
print(json.dumps({
    "implementation_name": sys.implementation.name,
    "implementation_version": "%d.%d.%d" % (v.major, v.minor, v.micro),
    "os_name": os.name, "platform_machine": platform.machine(),
    "platform_release": platform.release(),
    "platform_system": platform.system(),
    "platform_version": platform.version(),
    "python_full_version": platform.python_version(),
    "platform_python_implementation": platform.python_implementation(),
    "python_version": ".".join(platform.python_version_tuple()[:2]),
    "sys_platform": sys.platform}))
'''


def complete_for(wheelhouse, environment):
    """Add to `wheelhouse` the wheels its requirements need under another
    Python's marker `environment` (fetched through the wheel cache)."""
    import zipfile
    from pip._vendor.packaging.requirements import Requirement
    from pip._vendor.packaging.utils import canonicalize_name
    deps = os.path.join(CACHE, 'wheels')
    added = []
    for _ in range(10):
        have, needed = set(), {}
        wheels = [n for n in os.listdir(wheelhouse) if n.endswith('.whl')]
        for name in wheels:
            have.add(canonicalize_name(name.split('-')[0]))
        for name in wheels:
            with zipfile.ZipFile(os.path.join(wheelhouse, name)) as zf:
                meta = next(n for n in zf.namelist()
                            if n.endswith('.dist-info/METADATA'))
                text = zf.read(meta).decode('utf-8')
            for line in text.splitlines():
                if not line.startswith('Requires-Dist:'):
                    continue
                req = Requirement(line.split(':', 1)[1].strip())
                env = dict(environment, extra='')
                if req.marker is not None and not req.marker.evaluate(env):
                    continue
                key = canonicalize_name(req.name)
                if key not in have:
                    needed[key] = '%s%s' % (req.name, req.specifier)
        if not needed:
            return added
        subprocess.run([sys.executable, '-m', 'pip', 'download', '-q',
                        '--disable-pip-version-check', '--only-binary=:all:',
                        '--no-deps', '--find-links', deps, '-d', deps]
                       + sorted(needed.values()), check=True)
        for name in os.listdir(deps):
            if canonicalize_name(name.split('-')[0]) in needed:
                shutil.copy2(os.path.join(deps, name), wheelhouse)
                added.append(name)
    raise AssertionError('wheelhouse requirements do not converge: %s'
                         % needed)


# The units as installed before huey-worker.service became the suite
# (up to commit 3f7ca67), comments left out: huey-worker.service was the
# consumer and huey-worker.target grouped the daemons, which joined it on
# enable (WantedBy=) and followed its stop (PartOf=).  The e2e test
# upgrades from them.
_OLD_DAEMON = """[Unit]
Description=%(description)s
Documentation=file:@docdir@/operations.md
After=network-online.target redis-server.service
Wants=network-online.target redis-server.service
PartOf=huey-worker.target
Before=huey-worker.target
StartLimitIntervalSec=60
StartLimitBurst=10

[Service]
Type=notify
NotifyAccess=main
Environment=HUEY_WORKER_CONFIG=@configfile@ PYTHONUNBUFFERED=1
ExecStart=@bindir@/huey-worker %(command)s
ExecReload=/bin/kill -HUP $MAINPID
User=@user@
Group=@group@
WorkingDirectory=-@statedir@
WatchdogSec=30s
TimeoutStartSec=infinity
TimeoutStopSec=%(stop)s
KillMode=mixed
Restart=on-failure
RestartSec=2s
RestartPreventExitStatus=78
@hardening@

[Install]
WantedBy=huey-worker.target
"""
OLD_UNITS = {
    'huey-worker.service': _OLD_DAEMON % dict(
        description='huey-worker consumer (runs Huey tasks)',
        command='consumer', stop='45s'),
    'huey-worker-scheduler.service': _OLD_DAEMON % dict(
        description='huey-worker scheduler (periodic and delayed tasks)',
        command='scheduler --log-file @logdir@/huey-worker-scheduler.log',
        stop='30s'),
    'huey-worker-status.service': _OLD_DAEMON % dict(
        description='huey-worker status endpoint (HTTP on loopback)',
        command='status-server --log-file @logdir@/huey-worker-status.log',
        stop='30s'),
    'huey-worker.target': """[Unit]
Description=huey-worker task queue daemons
Documentation=file:@docdir@/operations.md

[Install]
WantedBy=multi-user.target
""",
}
# What `systemctl enable --now huey-worker.target huey-worker.service
# huey-worker-scheduler.service huey-worker-status.service` made of them.
OLD_LINKS = {
    'multi-user.target.wants/huey-worker.target': 'huey-worker.target',
    'huey-worker.target.wants/huey-worker.service': 'huey-worker.service',
    'huey-worker.target.wants/huey-worker-scheduler.service':
        'huey-worker-scheduler.service',
    'huey-worker.target.wants/huey-worker-status.service':
        'huey-worker-status.service',
}


def old_units(layout):
    """{unit file path: text} of the older install, for `layout`."""
    variables = layout.variables()
    return {os.path.join(layout.unitdir, name): install.render(text,
                                                               variables)
            for name, text in OLD_UNITS.items()}
