"""End to end in a real systemd: a minimal Debian booted in systemd-nspawn,
redis-server from Debian's packages, `make install WHEELHOUSE=...` from
wheels built on this host, the shipped units started by systemctl.

The Debian tree is made once by debootstrap and kept in
$HUEY_WORKER_TEST_CACHE (default /var/cache/huey-worker-tests), outside the
repo; each run boots a copy.  The test prints what it checked.
"""
import contextlib
import fcntl
import json
import os
import shutil
import signal
import subprocess
import sys
import time

import pytest

from deploy_support import (CACHE, MARKER_ENVIRONMENT_SCRIPT, OLD_LINKS,
                            ROOT, build_wheelhouse, changed_paths,
                            complete_for, install, manifest, old_units, read,
                            wait_for)

# Boots a machine: minutes.  Left out with -m 'not slow'.
pytestmark = [pytest.mark.timeout(1800), pytest.mark.slow]

SUITE = 'bookworm'
MIRROR = os.environ.get('HUEY_WORKER_TEST_MIRROR',
                        'http://deb.debian.org/debian')
PACKAGES = ('systemd', 'systemd-sysv', 'dbus', 'redis-server', 'python3',
            'python3-venv', 'make', 'curl', 'logrotate', 'procps')
IMAGE = os.path.join(CACHE, 'debian-%s' % SUITE)
STAMP = IMAGE + '.json'
PATH = '/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin'
SRC = '/usr/src/huey-worker'
WHEELHOUSE = '/usr/src/wheelhouse'
TASKS_DIR = '/usr/local/lib/huey-worker-e2e'
STATE = '/var/lib/huey-worker'
SUITE_UNIT = 'huey-worker.service'
CONSUMER = 'huey-worker-consumer.service'
MEMBERS = (CONSUMER, 'huey-worker-scheduler.service',
           'huey-worker-status.service')
UNITDIR = '/usr/local/lib/systemd/system'
ETC_UNITS = '/etc/systemd/system'
# Shorter than the shipped 30 s for this test (a drop-in, as an operator
# would), and a task that outlasts it.
WATCHDOG_SEC = 6
LONG_TASK = 10
# What make install owns (for "running it twice changes nothing").
INSTALLED = ('/opt/huey-worker', '/etc/huey-worker', '/etc/logrotate.d',
             '/usr/local/lib/systemd/system', '/usr/local/lib/tmpfiles.d',
             '/usr/local/lib/sysusers.d', '/usr/local/bin', STATE,
             '/var/log/huey-worker.log', '/var/log/huey-worker-status.log',
             '/var/log/huey-worker-scheduler.log', '/etc/passwd',
             '/etc/group')


def why_not():
    """Why this machine cannot boot a container, or None."""
    if sys.platform != 'linux':
        return 'not Linux'
    if os.geteuid() != 0:
        return 'systemd-nspawn and debootstrap need root'
    for tool in ('systemd-nspawn', 'debootstrap', 'nsenter'):
        if not shutil.which(tool):
            return ('%s is not installed (.ci/run installs systemd-container '
                    'and debootstrap)' % tool)
    if not os.access('/sys/fs/cgroup', os.W_OK) and not any(
            os.access('/sys/fs/cgroup/%s' % h, os.W_OK)
            for h in ('unified', 'systemd')):
        return '/sys/fs/cgroup is read-only here: no cgroup for a container'
    return None


# --- the cached Debian tree -----------------------------------------------------

def debian_image():
    """The debootstrapped tree; built when absent or made for other
    packages.  Returns its marker environment (its Python)."""
    wanted = {'suite': SUITE, 'packages': list(PACKAGES)}
    os.makedirs(CACHE, exist_ok=True)
    with open(os.path.join(CACHE, '.lock'), 'w') as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # one builder at a time
        try:
            with open(STAMP) as fh:
                stamp = json.load(fh)
            if stamp.get('image') == wanted and os.path.isdir(IMAGE):
                return stamp['python']
        except (OSError, ValueError):
            pass
        building = IMAGE + '.new'
        shutil.rmtree(building, ignore_errors=True)
        started = time.monotonic()
        result = subprocess.run(
            ['debootstrap', '--variant=minbase',
             '--include=' + ','.join(PACKAGES), SUITE, building, MIRROR],
            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        assert result.returncode == 0, 'debootstrap failed:\n' + \
            result.stdout[-3000:]
        for junk in ('var/cache/apt/archives', 'var/lib/apt/lists'):
            for name in os.listdir(os.path.join(building, junk)):
                path = os.path.join(building, junk, name)
                if os.path.isfile(path):
                    os.unlink(path)
        python = json.loads(subprocess.run(
            ['chroot', building, '/usr/bin/python3', '-c',
             MARKER_ENVIRONMENT_SCRIPT], stdout=subprocess.PIPE, text=True,
            check=True).stdout)
        shutil.rmtree(IMAGE, ignore_errors=True)
        os.rename(building, IMAGE)
        with open(STAMP, 'w') as fh:
            json.dump({'image': wanted, 'python': python,
                       'built_seconds': round(time.monotonic() - started)},
                      fh)
        return python


# --- a booted container -----------------------------------------------------------

def cgroup_dirs(name):
    if os.path.exists('/sys/fs/cgroup/cgroup.controllers'):
        return ['/sys/fs/cgroup/' + name]          # cgroup v2 only
    return ['/sys/fs/cgroup/%s/%s' % (h, name) for h in ('unified', 'systemd')
            if os.path.isdir('/sys/fs/cgroup/' + h)]


class Machine:
    def __init__(self, directory, name):
        self.dir = directory
        self.name = name
        self.cgroups = cgroup_dirs(name)
        self.nspawn = None
        self.leader = None

    def path(self, path):
        return self.dir + path

    def boot(self, log_path):
        for directory in self.cgroups:
            os.makedirs(directory, exist_ok=True)

        def own_cgroup():
            # nspawn and the container get a cgroup of their own, so the
            # container's systemd manages only its subtree.
            for directory in self.cgroups:
                with open(directory + '/cgroup.procs', 'w') as fh:
                    fh.write('0')

        with open(log_path, 'wb') as out:
            self.nspawn = subprocess.Popen(
                ['systemd-nspawn', '--boot', '--register=no', '--keep-unit',
                 '--private-network', '--machine', self.name, '-D', self.dir],
                stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT,
                preexec_fn=own_cgroup)
        self.leader = wait_for(self._find_leader, 30,
                               what='the container init process')
        # Until the container's systemd listens, systemctl cannot connect.
        return wait_for(lambda: self.run(
            'systemctl is-system-running --wait', check=False,
            timeout=120).stdout.strip() in ('running', 'degraded') and
            self.run('systemctl is-system-running', check=False).stdout.strip(),
            120, interval=0.5, what='boot to finish')

    def _find_leader(self):
        """The nspawn child that is PID 1 in its namespace."""
        if self.nspawn.poll() is not None:
            raise AssertionError('systemd-nspawn exited with %s'
                                 % self.nspawn.returncode)
        for pid in os.listdir('/proc'):
            if not pid.isdigit():
                continue
            try:
                with open('/proc/%s/status' % pid) as fh:
                    status = fh.read()
            except OSError:
                continue
            fields = dict(line.split(':', 1) for line in status.splitlines()
                          if ':' in line)
            if fields.get('PPid', '').strip() == str(self.nspawn.pid) and \
                    fields.get('NSpid', '').split()[-1:] == ['1']:
                return int(pid)
        return None

    def run(self, command, check=True, timeout=180):
        result = subprocess.run(
            ['nsenter', '-t', str(self.leader), '-a', 'env', '-i',
             'PATH=' + PATH, 'HOME=/root', 'LANG=C.UTF-8', 'sh', '-c',
             command], stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
            text=True, timeout=timeout)
        if check and result.returncode != 0:
            raise AssertionError('in the container, %r exited %d:\n%s' % (
                command, result.returncode, result.stdout[-4000:]))
        return result

    def show(self, unit, *props):
        out = self.run('systemctl show %s %s' % (
            unit, ' '.join('-p ' + p for p in props))).stdout
        return dict(line.split('=', 1) for line in out.splitlines()
                    if '=' in line)

    def journal(self, unit, lines=40):
        return self.run('journalctl --no-pager -n %d -u %s' % (lines, unit),
                        check=False).stdout

    def shutdown(self):
        if self.nspawn is not None and self.nspawn.poll() is None:
            if self.leader:
                with contextlib.suppress(OSError):
                    os.kill(self.leader, signal.SIGRTMIN + 4)  # poweroff
            try:
                self.nspawn.wait(60)
            except subprocess.TimeoutExpired:
                self.nspawn.kill()
                self.nspawn.wait(10)
        for top in self.cgroups:
            for directory, _, _ in sorted(os.walk(top), reverse=True,
                                          key=lambda w: w[0].count('/')):
                with contextlib.suppress(OSError):
                    os.rmdir(directory)
        shutil.rmtree(self.dir, ignore_errors=True)


class Report:
    """What the test checked, printed as it goes (also when it passes)."""

    def __init__(self, capsys):
        self.capsys = capsys
        self.started = time.monotonic()

    def __call__(self, text):
        with self.capsys.disabled():
            print('  e2e [%5.1fs] %s' % (time.monotonic() - self.started,
                                         text), flush=True)


@pytest.fixture
def machine(tmp_path):
    reason = why_not()
    if reason:
        print('test_systemd_e2e skipped: %s' % reason)
        pytest.skip(reason)
    python = debian_image()
    name = 'hw-e2e-%d' % os.getpid()
    directory = str(tmp_path / 'machine')
    subprocess.run(['cp', '-a', '--reflink=auto', IMAGE, directory],
                   check=True)
    m = Machine(directory, name)
    m.python = python
    m.boot_log = str(tmp_path / 'nspawn.log')
    yield m
    m.shutdown()


def copy_source(machine, wheelhouse):
    target = machine.path(SRC)
    os.makedirs(target)
    tar = subprocess.Popen(
        ['tar', '-C', ROOT, '--exclude=./.venv', '--exclude=./.git',
         '--exclude=./build', '--exclude=*.egg-info', '--exclude=__pycache__',
         '--exclude=.pytest_cache', '-cf', '-', '.'], stdout=subprocess.PIPE)
    subprocess.run(['tar', '-C', target, '-xf', '-'], stdin=tar.stdout,
                   check=True)
    assert tar.wait() == 0
    shutil.copytree(wheelhouse, machine.path(WHEELHOUSE))


def write(machine, path, text, mode=0o644):
    with open(machine.path(path), 'w') as fh:
        fh.write(text)
    os.chmod(machine.path(path), mode)


def task_state(machine, task_id):
    result = machine.run('curl -sf http://127.0.0.1:8470/tasks/%s' % task_id,
                         check=False)
    if result.returncode != 0:
        return None
    return json.loads(result.stdout)


def wait_task(machine, task_id, states=('complete',), timeout=90):
    return wait_for(lambda: (task_state(machine, task_id) or {}).get(
        'state') in states and task_state(machine, task_id), timeout,
        interval=0.5, what='task %s to be %s' % (task_id, states))


def submit(machine, *args):
    out = machine.run('huey-worker submit %s' % ' '.join(args)).stdout
    return out.strip().splitlines()[-1].strip()


def consumer_log(machine):
    return read(machine.path('/var/log/huey-worker.log'))


def wait_started(machine, task_id):
    wait_for(lambda: 'start sample_tasks.touch_after %s' % task_id
             in consumer_log(machine), 60,
             what='task %s to start' % task_id)


def main_pid(machine, unit=CONSUMER):
    return int(machine.show(unit, 'MainPID')['MainPID'])


def active_states(machine, units):
    return [machine.show(u, 'ActiveState')['ActiveState'] for u in units]


def consumer_processes(machine):
    return machine.run("pgrep -f '^/opt/huey-worker/bin/python "
                       "/opt/huey-worker/bin/huey-worker consumer'",
                       check=False).stdout.split()


def health(machine):
    """GET /health once, at once: no retry.  An answer, 200 or 503 (the
    scheduler takes the lease just after it is ready)."""
    return json.loads(machine.run('curl -s http://127.0.0.1:8470/health')
                      .stdout)


def test_deployment_in_a_booted_debian(machine, tmp_path, capsys):
    report = Report(capsys)
    report('Debian %s image ready (%s); Python %s inside' % (
        SUITE, IMAGE, machine.python['python_full_version']))

    wheelhouse = build_wheelhouse(str(tmp_path / 'wheelhouse'))
    added = complete_for(wheelhouse, machine.python)
    report('wheelhouse built on the host: %d wheels%s' % (
        len(os.listdir(wheelhouse)), ' (+ %s for the container\'s Python)'
        % ', '.join(added) if added else ''))
    copy_source(machine, wheelhouse)
    shutil.rmtree(wheelhouse)  # the container has its copy

    state = machine.boot(machine.boot_log)
    assert state in ('running', 'degraded'), state
    assert machine.show('redis-server.service', 'ActiveState')[
        'ActiveState'] == 'active'
    report('booted systemd in systemd-nspawn (%s); redis-server from Debian '
           'is active' % state)

    # -- make install, twice ----------------------------------------------
    started = time.monotonic()
    out = machine.run('make -C %s install WHEELHOUSE=%s' % (
        SRC, WHEELHOUSE)).stdout
    assert '\n  systemctl enable --now huey-worker\n' in out, out
    report('make install WHEELHOUSE=... (offline) in %.1fs'
           % (time.monotonic() - started))
    before = manifest(machine.dir, INSTALLED)
    out = machine.run('make -C %s install WHEELHOUSE=%s' % (
        SRC, WHEELHOUSE)).stdout
    assert 'nothing to change' in out, out
    changed = changed_paths(before, manifest(machine.dir, INSTALLED))
    assert changed == [], changed[:20]
    report('second make install changed nothing (%d paths compared)'
           % len(before))
    machine.run('id huey-worker')
    perms = machine.run(
        "stat -c '%n %U:%G %a' /etc/huey-worker/huey-worker.ini "
        "/var/log/huey-worker.log /var/log/huey-worker-scheduler.log "
        "/var/log/huey-worker-status.log " + STATE).stdout.split('\n')
    assert perms[0].endswith(' root:huey-worker 640'), perms
    for line in perms[1:4]:
        assert line.endswith(' huey-worker:huey-worker 640'), perms
    assert perms[4].endswith(' huey-worker:huey-worker 750'), perms
    assert 'secret_key = ' in read(machine.path(
        '/etc/huey-worker/huey-worker.ini'))
    report('user huey-worker; config root:huey-worker 0640 with a secret_key; '
           'logs huey-worker 0640')

    # The tests' task module, named in a conf.d drop-in as an operator would.
    os.makedirs(machine.path(TASKS_DIR))
    shutil.copy(os.path.join(ROOT, 'tests', 'sample_tasks.py'),
                machine.path(TASKS_DIR))
    # 'start' lines tell the test a task began (the default logs ends only).
    write(machine, '/etc/huey-worker/conf.d/50-e2e.ini',
          '[tasks]\nmodules = sample_tasks\npython_path = %s\n'
          '[logging]\ntask_events = both\n' % TASKS_DIR)
    # systemd drop-ins: a short watchdog for the three daemons (the
    # "huey-worker-" prefix), and a consumer stop timeout far below
    # shutdown_timeout, which the consumer must extend by itself.  Names
    # differ: a drop-in of the unit's own hides a same-named prefix one.
    os.makedirs(machine.path(ETC_UNITS + '/huey-worker-.service.d'))
    write(machine, ETC_UNITS + '/huey-worker-.service.d/40-e2e-watchdog.conf',
          '[Service]\nWatchdogSec=%ds\n' % WATCHDOG_SEC)
    os.makedirs(machine.path(ETC_UNITS + '/%s.d' % CONSUMER))
    write(machine, ETC_UNITS + '/%s.d/50-e2e-stop.conf' % CONSUMER,
          '[Service]\nTimeoutStopSec=4s\n')

    # -- start the target on a fresh install, nothing enabled --------------
    machine.run('systemctl daemon-reload && '
                'systemctl start huey-worker.target')
    units = (SUITE_UNIT,) + MEMBERS + ('huey-worker.target',)
    assert active_states(machine, units) == ['active'] * 5, \
        machine.journal(SUITE_UNIT)
    assert machine.run('systemctl is-enabled %s' % SUITE_UNIT,
                       check=False).stdout.strip() == 'disabled'
    assert health(machine)['live']
    report('systemctl start huey-worker.target before any enable: the suite '
           'and its three members active, /health answers')

    # -- stop and start by the plain name -----------------------------------
    machine.run('systemctl stop huey-worker')
    # Already stopped when the command returns (and the target with it).
    assert active_states(machine, units) == ['inactive'] * 5
    started = time.monotonic()
    machine.run('systemctl start huey-worker')
    took = time.monotonic() - started
    answer = health(machine)
    assert answer['live'], answer
    assert active_states(machine, (SUITE_UNIT,) + MEMBERS) == ['active'] * 4
    machine.run('systemctl enable huey-worker')
    enabled = machine.run('systemctl is-enabled %s %s' % (
        SUITE_UNIT, ' '.join(MEMBERS))).stdout.split()
    assert enabled == ['enabled'] * 4, enabled
    status = machine.run('systemctl status --full --no-pager -n 20 %s'
                         % SUITE_UNIT).stdout
    for unit in MEMBERS:
        assert '%s active (running)' % unit in status, status
    exposure = machine.run('for u in %s %s; do systemd-analyze security $u '
                           '| tail -1; done' % (SUITE_UNIT, ' '.join(MEMBERS))
                           ).stdout
    levels = [float(word) for word in exposure.split() if
              word.replace('.', '', 1).isdigit()]
    assert len(levels) == 4 and max(levels) <= 1.5, exposure
    report('systemctl stop huey-worker: all stopped when it returned; '
           'systemctl start huey-worker (%.1fs): curl /health answered at '
           'once (%s); enable huey-worker enabled the members too; systemctl '
           'status huey-worker lists each member active; systemd-analyze '
           'security of suite and members: %s' % (took, answer['status'],
                                                  levels))

    # -- a PDF extraction submitted with the CLI, polled with curl ----------
    import pymupdf
    pdf = pymupdf.open()
    pdf.new_page().insert_text((72, 72), 'Hello from a booted Debian')
    pdf.save(machine.path(STATE + '/input/e2e.pdf'))
    os.chmod(machine.path(STATE + '/input/e2e.pdf'), 0o644)
    task_id = submit(machine, 'pdf.extract', 'e2e.pdf')
    record = wait_task(machine, task_id)
    output = record['result']['output']
    assert 'Hello from a booted Debian' in read(machine.path(output))
    log = consumer_log(machine)
    assert 'end huey_worker.tasks.pdf.extract %s complete' % task_id in log, log
    for name in ('huey-worker-scheduler.log', 'huey-worker-status.log'):
        assert read(machine.path('/var/log/' + name)).strip(), name
    report('huey-worker submit pdf.extract -> %s; curl /tasks/ID: complete, '
           '%s written; its start/end lines in /var/log/huey-worker.log; '
           'scheduler and status logs written' % (task_id, output))

    # -- reload with a task longer than WatchdogSec ------------------------
    pid = main_pid(machine)
    restarts = machine.show(CONSUMER, 'NRestarts')['NRestarts']
    marker = STATE + '/e2e-reload'
    task_id = submit(machine, 'sample_tasks.touch_after', str(LONG_TASK),
                     marker)
    wait_started(machine, task_id)
    started = time.monotonic()
    machine.run('systemctl reload huey-worker')
    took = time.monotonic() - started
    # It returned once the consumer was back: the task finished first.
    assert os.path.exists(machine.path(marker))
    assert wait_task(machine, task_id)['state'] == 'complete'
    assert main_pid(machine) == pid
    assert machine.show(CONSUMER, 'NRestarts')['NRestarts'] == restarts
    assert 'Watchdog timeout' not in machine.journal(CONSUMER, 200)
    assert submit(machine, '--wait', '--timeout', '60', 'sample_tasks.add',
                  '2', '3') == '5'
    report('systemctl reload huey-worker with a %ds task (WatchdogSec=%ds): '
           'returned after %.1fs, the task finished; no watchdog kill, same '
           'MainPID %d, tasks run after it' % (LONG_TASK, WATCHDOG_SEC, took,
                                               pid))

    # -- stop with a task longer than WatchdogSec and TimeoutStopSec ---------
    marker = STATE + '/e2e-stop'
    task_id = submit(machine, 'sample_tasks.touch_after', str(LONG_TASK),
                     marker)
    wait_started(machine, task_id)
    started = time.monotonic()
    machine.run('systemctl stop huey-worker')
    took = time.monotonic() - started
    assert os.path.exists(machine.path(marker))
    assert 'end sample_tasks.touch_after %s complete' % task_id in \
        consumer_log(machine)
    assert machine.show(CONSUMER, 'Result')['Result'] == 'success'
    assert consumer_processes(machine) == []
    report('systemctl stop huey-worker with a %ds task (TimeoutStopSec=4s, '
           'extended by shutdown_timeout): returned after %.1fs, the task '
           'finished first; no consumer process left' % (LONG_TASK, took))

    # -- stop with a task longer than shutdown_timeout: requeued -----------
    write(machine, '/etc/huey-worker/conf.d/60-e2e-short-stop.ini',
          '[consumer]\nshutdown_timeout = 1\n')
    machine.run('systemctl start huey-worker')
    marker = STATE + '/e2e-requeue'
    task_id = submit(machine, 'sample_tasks.touch_after', '6', marker)
    wait_started(machine, task_id)
    # The members stay addressable one by one.
    machine.run('systemctl stop %s' % CONSUMER)
    assert not os.path.exists(machine.path(marker))
    requeued = task_state(machine, task_id)
    assert requeued['state'] != 'complete', requeued
    os.unlink(machine.path('/etc/huey-worker/conf.d/60-e2e-short-stop.ini'))
    machine.run('systemctl start %s' % CONSUMER)
    record = wait_task(machine, task_id)
    assert os.path.exists(machine.path(marker))
    assert record.get('requeues'), record
    report('systemctl stop %s with a task longer than shutdown_timeout: put '
           'back in the queue (state %r after the stop), completed after '
           'start (%d requeue)' % (CONSUMER, requeued['state'],
                                    record['requeues']))

    # -- a hung consumer is restarted by the watchdog ----------------------
    pid = main_pid(machine)
    restarts = int(machine.show(CONSUMER, 'NRestarts')['NRestarts'])
    machine.run('kill -STOP %d' % pid)
    hung = time.monotonic()
    wait_for(lambda: int(machine.show(CONSUMER, 'NRestarts')[
        'NRestarts']) > restarts and machine.show(
        CONSUMER, 'ActiveState')['ActiveState'] == 'active',
        120, interval=1, what='the watchdog to restart the consumer')
    assert main_pid(machine) != pid
    assert 'Watchdog timeout' in machine.journal(CONSUMER, 200)
    assert submit(machine, '--wait', '--timeout', '60', 'sample_tasks.add',
                  '20', '22') == '42'
    report('SIGSTOP of the consumer: watchdog timeout, restarted in %.0fs '
           '(new MainPID %d), tasks run' % (time.monotonic() - hung,
                                           main_pid(machine)))

    # -- logrotate: the postrotate reaches every daemon --------------------
    machine.run('logrotate -f /etc/logrotate.d/huey-worker')
    for name in ('huey-worker.log', 'huey-worker-scheduler.log',
                 'huey-worker-status.log'):
        wait_for(lambda: 'log files reopened' in read(
            machine.path('/var/log/' + name)), 30,
            what='%s reopened after rotation' % name)
        assert os.path.exists(machine.path('/var/log/%s.1' % name))
    report('logrotate -f: each daemon got SIGUSR1 (systemctl kill) and wrote '
           'to its new file')

    # -- an extra instance: huey-worker@NAME consumes queue NAME -------------
    machine.run('systemctl enable --now huey-worker@e2e.service')
    assert submit(machine, '--queue', 'e2e', '--wait', '--timeout', '60',
                  'sample_tasks.add', '1', '2') == '3'
    instance_log = read(machine.path('/var/log/huey-worker-e2e.log'))
    assert 'start sample_tasks.add' in instance_log, instance_log
    assert machine.run("stat -c '%U %a' /var/log/huey-worker-e2e.log").stdout \
        .split() == ['huey-worker', '640']
    pid = main_pid(machine, 'huey-worker@e2e.service')
    machine.run('systemctl restart huey-worker')
    assert main_pid(machine, 'huey-worker@e2e.service') not in (0, pid)
    machine.run('systemctl disable --now huey-worker@e2e.service')
    # A member this host must not run: masked, the suite leaves it out.
    machine.run('systemctl stop huey-worker && systemctl mask '
                'huey-worker-status.service && systemctl start huey-worker')
    status = machine.run('systemctl status --full --no-pager -n 20 %s'
                         % SUITE_UNIT).stdout
    assert 'huey-worker-status.service masked' in status, status
    assert active_states(machine, MEMBERS) == ['active', 'active',
                                                'inactive']
    machine.run('systemctl unmask huey-worker-status.service && '
                'systemctl start huey-worker-status.service')
    report('huey-worker@e2e.service ran a task of queue "e2e", logging to '
           '/var/log/huey-worker-e2e.log; systemctl restart huey-worker '
           'restarted it too, and left out a masked member')

    # -- a broken config: failed with 78, no restart loop, in the log file --
    write(machine, '/etc/huey-worker/conf.d/99-broken.ini',
          '[consumer]\nworkers = many\n')
    result = machine.run('systemctl restart huey-worker', check=False)
    assert result.returncode != 0
    assert 'Job for huey-worker.service failed' in result.stdout, \
        result.stdout
    props = ('ActiveState', 'Result', 'ExecMainStatus', 'NRestarts',
             'ExecMainPID')
    first = machine.show(CONSUMER, *props)
    time.sleep(5)  # a restart loop would show within RestartSec (2 s)
    shown = machine.show(CONSUMER, *props)
    assert shown == first, (first, shown)
    assert (shown['ActiveState'], shown['Result'], shown['ExecMainStatus']) \
        == ('failed', 'exit-code', '78'), shown
    assert "workers = 'many'" in machine.journal(CONSUMER)
    # systemctl status huey-worker names the member that did not start.
    status = machine.run('systemctl status --full --no-pager -n 20 %s'
                         % SUITE_UNIT, check=False).stdout
    assert '%s failed (failed; exit-code, exit status 78): see systemctl ' \
           'status %s' % (CONSUMER, CONSUMER) in status, status
    # The operator's log files say it too (all three read [consumer]).
    for name in ('huey-worker.log', 'huey-worker-scheduler.log',
                 'huey-worker-status.log'):
        lines = [line for line in read(machine.path('/var/log/' + name))
                 .splitlines() if 'config error' in line]
        assert lines and "workers = 'many'" in lines[-1] and \
            '99-broken.ini' in lines[-1], (name, lines)
    os.unlink(machine.path('/etc/huey-worker/conf.d/99-broken.ini'))
    result = machine.run('systemctl start huey-worker', check=False)
    assert result.returncode == 0, machine.journal(SUITE_UNIT)
    assert active_states(machine, (SUITE_UNIT,) + MEMBERS) == ['active'] * 4
    report('broken config: systemctl restart huey-worker failed, systemctl '
           'status huey-worker names %s (status 78, NRestarts unchanged '
           'after 5 s); the journal and /var/log/huey-worker*.log name the '
           'file and key; starts once fixed' % CONSUMER)

    # -- a user outside the service group: an error, never silent defaults --
    machine.run('useradd --create-home alice')
    denied = machine.run('runuser -u alice -- huey-worker submit '
                         'sample_tasks.add 2 3', check=False)
    assert denied.returncode == 78, denied.stdout
    assert '/etc/huey-worker' in denied.stdout and \
        'usermod -aG huey-worker alice' in denied.stdout, denied.stdout
    # Once in the group (a new login), the same command works.
    machine.run('usermod -aG huey-worker alice')
    assert machine.run('runuser -u alice -- huey-worker submit --wait '
                       '--timeout 60 sample_tasks.add 2 3').stdout \
        .strip().splitlines()[-1] == '5'
    # A message the consumer must set aside (not signed with its
    # secret_key): a poller of its id sees it end, with the reason.
    write(machine, '/home/alice/unsigned.ini',
          '[tasks]\nmodules = sample_tasks\npython_path = %s\n' % TASKS_DIR)
    unsigned = machine.run('runuser -u alice -- env HUEY_WORKER_CONFIG='
                           '/home/alice/unsigned.ini huey-worker submit '
                           'sample_tasks.add 1 1').stdout.strip() \
        .splitlines()[-1].strip()
    record = wait_task(machine, unsigned, states=('failed',))
    assert 'signature' in json.dumps(record), record
    report('a user outside group huey-worker: huey-worker submit exits 78 '
           'naming /etc/huey-worker and usermod -aG huey-worker alice; after '
           'it, submit --wait works; an unsigned message ends failed on '
           '/tasks/ID (%s)' % record.get('error', {}))

    # -- upgrade from an install where huey-worker.service was the consumer -
    machine.run('systemctl disable --now huey-worker')
    layout = install.Layout()
    for path, text in old_units(layout).items():
        write(machine, path, text)
    os.unlink(machine.path('%s/%s' % (UNITDIR, CONSUMER)))
    for link, unit in OLD_LINKS.items():
        os.makedirs(machine.path(os.path.dirname(ETC_UNITS + '/' + link)),
                    exist_ok=True)
        os.symlink('%s/%s' % (UNITDIR, unit),
                   machine.path(ETC_UNITS + '/' + link))
    # systemctl edit huey-worker.service, when it was the consumer.
    os.makedirs(machine.path(ETC_UNITS + '/huey-worker.service.d'))
    write(machine, ETC_UNITS + '/huey-worker.service.d/override.conf',
          '[Service]\nEnvironment=HUEY_WORKERS=3\n')
    machine.run('systemctl daemon-reload && systemctl start '
                'huey-worker.target')
    assert machine.show(SUITE_UNIT, 'StatusText')['StatusText'].startswith(
        '3 thread workers')
    old_pid = main_pid(machine, SUITE_UNIT)
    out = machine.run('make -C %s install WHEELHOUSE=%s' % (
        SRC, WHEELHOUSE)).stdout
    steps = [line.strip() for line in out.splitlines()
             if line.startswith('  systemctl ')]
    assert steps and 'Upgrade' in out, out
    for step in steps:     # as printed, in order
        machine.run(step)
    assert active_states(machine, (SUITE_UNIT,) + MEMBERS) == ['active'] * 4
    # One consumer, the new unit's: the old one was stopped first.
    assert consumer_processes(machine) == [str(main_pid(machine))]
    assert main_pid(machine) != old_pid
    assert machine.show(CONSUMER, 'StatusText')['StatusText'].startswith(
        '3 thread workers')
    links = sorted(machine.run('find %s -path "*huey-worker*"' % ETC_UNITS
                               ).stdout.split())
    assert links == sorted(ETC_UNITS + '/' + p for p in (
        '%s.d' % CONSUMER, '%s.d/50-e2e-stop.conf' % CONSUMER,
        '%s.d/override.conf' % CONSUMER, 'huey-worker-.service.d',
        'huey-worker-.service.d/40-e2e-watchdog.conf',
        'huey-worker.service.wants',
        'huey-worker.service.wants/' + MEMBERS[0],
        'huey-worker.service.wants/' + MEMBERS[1],
        'huey-worker.service.wants/' + MEMBERS[2],
        'multi-user.target.wants/' + SUITE_UNIT)), links
    assert health(machine)['live']
    out = machine.run('make -C %s install WHEELHOUSE=%s' % (
        SRC, WHEELHOUSE)).stdout
    assert 'nothing to change' in out and 'Upgrade' not in out, out
    report('make install over an install where huey-worker.service was the '
           'consumer: its drop-in moved to %s; the %d printed steps, run as '
           'printed, left the suite enabled and active with one consumer, '
           'the links as a fresh enable makes them' % (CONSUMER, len(steps)))

    # -- stop the suite, uninstall -----------------------------------------
    machine.run('systemctl disable --now huey-worker')
    assert active_states(machine, (SUITE_UNIT,) + MEMBERS) == ['inactive'] * 4
    out = machine.run('make -C %s uninstall' % SRC).stdout
    assert not os.path.exists(machine.path('/opt/huey-worker'))
    assert not os.path.exists(machine.path(UNITDIR + '/' + SUITE_UNIT))
    assert 'secret_key' in read(machine.path(
        '/etc/huey-worker/huey-worker.ini'))
    assert read(machine.path('/var/log/huey-worker.log')).strip()
    report('systemctl disable --now huey-worker stopped all three; make '
           'uninstall removed the venv and units, kept config and logs')
