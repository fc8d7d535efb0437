"""Simulated hosts for tests/test_multihost.py: Linux network namespaces
joined by veth pairs on one bridge, each with its own loopback and address,
running real redis-server, redis-sentinel and huey-worker processes as the
installed units would (`ip netns exec NS python -m huey_worker ...`).

Needs root (CAP_NET_ADMIN) and iproute2; `available()` says why not when
it cannot run.  Every name carries a random run id, so a crashed run never
collides with the next, and `Cluster.close()` (called from a finally
block by the `cluster` context manager) kills every process it started,
then deletes the namespaces and the bridge, whatever failed before.
SIGTERM (a CI job cancelled) unwinds like Ctrl-C, so that finally block
runs; what a SIGKILLed run left is swept by the next one: each run writes
its id and its owner's pid under RUNS_DIR, and a run whose owner is gone
has its processes killed, its namespaces and links deleted.
"""
import contextlib
import os
import secrets
import shutil
import signal
import subprocess
import sys
import threading
import time

import redis

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# One file per live run, named by its run id, holding its owner's pid.
RUNS_DIR = '/run/huey-worker-multihost'


def available():
    """None when namespaces can be made here, else why not (a skip
    reason)."""
    if os.geteuid() != 0:
        return 'needs root for ip netns'
    for tool in ('ip', 'redis-server', 'redis-sentinel'):
        if shutil.which(tool) is None:
            return '%s not installed' % tool
    return None


def _ip(*args, check=True):
    return subprocess.run(('ip',) + args, check=check, capture_output=True,
                          text=True)


class Process:
    """One process in a namespace, in a process group of its own (so a
    signal reaches its children: forked workers), output in `log_path`."""

    def __init__(self, host, name, argv, env, log_path):
        self.host, self.name, self.log_path = host, name, log_path
        self._log = open(log_path, 'ab')
        self.proc = subprocess.Popen(
            ['ip', 'netns', 'exec', host.ns] + list(argv), env=env,
            cwd=ROOT, stdout=self._log, stderr=subprocess.STDOUT,
            start_new_session=True)

    @property
    def pid(self):
        return self.proc.pid

    def signal(self, signum):
        """`signum` to the whole process group (consumer and workers)."""
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.proc.pid, signum)

    def alive(self):
        return self.proc.poll() is None

    def stop(self, timeout=10):
        if self.proc.poll() is None:
            self.signal(signal.SIGCONT)
            self.signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.signal(signal.SIGKILL)
                self.proc.wait(5)
        # Whatever the leader left behind in its group.
        self.signal(signal.SIGKILL)
        self._log.close()

    def output(self):
        with open(self.log_path, 'rb') as fh:
            return fh.read().decode('utf-8', 'replace')


class Host:
    """A namespace with one address on the cluster's bridge."""

    def __init__(self, cluster, name, number):
        self.cluster, self.name, self.number = cluster, name, number
        self.ns = '%s-%s' % (cluster.run_id, name)
        self.address = '%s.%d' % (cluster.net, 10 + number)
        # The root side of the veth pair: taking it down cuts the host off.
        self.outer = 'v%s%d' % (cluster.run_id[2:], number)
        self.processes = []

    def up(self):
        inner = self.outer + 'i'
        _ip('netns', 'add', self.ns)
        _ip('link', 'add', self.outer, 'type', 'veth', 'peer', 'name', inner)
        _ip('link', 'set', inner, 'netns', self.ns)
        _ip('link', 'set', self.outer, 'master', self.cluster.bridge)
        _ip('link', 'set', self.outer, 'up')
        inside = ('netns', 'exec', self.ns, 'ip')
        _ip(*inside, 'link', 'set', 'lo', 'up')
        _ip(*inside, 'link', 'set', inner, 'name', 'eth0')
        _ip(*inside, 'addr', 'add', self.address + '/24', 'dev', 'eth0')
        _ip(*inside, 'link', 'set', 'eth0', 'up')

    def cut(self):
        """A partition: the host's only link goes down.  Its connections
        hang (no reset reaches either side), as when a switch or a VM's
        network dies."""
        _ip('link', 'set', self.outer, 'down')

    def heal(self):
        _ip('link', 'set', self.outer, 'up')

    def start(self, name, argv, env):
        log_path = os.path.join(self.cluster.tmp, '%s-%s-%d.log' % (
            self.name, name, len(self.processes)))
        process = Process(self, name, argv, env, log_path)
        self.processes.append(process)
        return process

    def daemon(self, args, env, name):
        return self.start(name, [sys.executable, '-m', 'huey_worker'] +
                          list(args), env)

    def redis_server(self, port=6379, replica_of=None, name='redis'):
        """A redis-server on this host's address; returns (process,
        client from the root namespace)."""
        data = os.path.join(self.cluster.tmp, '%s-%s' % (self.name, name))
        os.makedirs(data, exist_ok=True)
        argv = ['redis-server', '--bind', '%s 127.0.0.1' % self.address,
                '--port', str(port), '--protected-mode', 'no',
                '--save', '', '--appendonly', 'no', '--dir', data,
                # A replica (re)joining syncs at once, not 5 s later.
                '--repl-diskless-sync-delay', '0', '--daemonize', 'no']
        if replica_of is not None:
            argv += ['--replicaof', replica_of[0], str(replica_of[1])]
        process = self.start(name, argv, dict(os.environ))
        client = redis.Redis(self.address, port, socket_timeout=5,
                             socket_connect_timeout=2)
        wait_for(lambda: _pings(client), 10, 'redis-server on %s:%d' % (
            self.address, port))
        return process, client

    def sentinel(self, master, master_name='mymaster', port=26379,
                 quorum=2, down_after_ms=1000, failover_timeout_ms=6000):
        path = os.path.join(self.cluster.tmp, '%s-sentinel.conf' % self.name)
        with open(path, 'w') as fh:
            fh.write('bind %s 127.0.0.1\nport %d\nprotected-mode no\n'
                     'dir %s\n'
                     'sentinel monitor %s %s %d %d\n'
                     'sentinel down-after-milliseconds %s %d\n'
                     'sentinel failover-timeout %s %d\n'
                     'sentinel parallel-syncs %s 1\n' % (
                         self.address, port, self.cluster.tmp, master_name,
                         master[0], master[1], quorum, master_name,
                         down_after_ms, master_name, failover_timeout_ms,
                         master_name))
        process = self.start('sentinel', ['redis-sentinel', path],
                             dict(os.environ))
        client = redis.Redis(self.address, port, socket_timeout=5,
                             socket_connect_timeout=2)
        wait_for(lambda: _pings(client), 10, 'sentinel on %s' % self.address)
        return process, '%s:%d' % (self.address, port)


def _pings(client):
    try:
        return client.ping()
    except redis.exceptions.RedisError:
        return False


def wait_for(predicate, timeout, what):
    """Poll `predicate` until true; AssertionError naming `what` after
    `timeout` seconds (a generous bound for a hung run, not a figure under
    test)."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError('gave up waiting for %s after %ss' % (
                what, timeout))
        time.sleep(0.1)


class Cluster:
    """A bridge and the hosts on it.  The root namespace reaches every
    host through the bridge's own address (`gateway`)."""

    def __init__(self, tmp):
        self.tmp = str(tmp)
        # 'hw' + 4 hex digits: interface names stay within 15 characters.
        self.run_id = 'hw' + secrets.token_hex(2)
        self.net = '10.%d.%d' % (200 + secrets.randbelow(50),
                                 secrets.randbelow(250))
        self.bridge = self.run_id + 'br'
        self.gateway = self.net + '.1'
        self.hosts = {}

    def up(self):
        sweep_stale_runs()
        os.makedirs(RUNS_DIR, exist_ok=True)
        with open(os.path.join(RUNS_DIR, self.run_id), 'w') as fh:
            fh.write(str(os.getpid()))
        _ip('link', 'add', self.bridge, 'type', 'bridge')
        _ip('addr', 'add', self.gateway + '/24', 'dev', self.bridge)
        _ip('link', 'set', self.bridge, 'up')
        return self

    def host(self, name):
        host = Host(self, name, len(self.hosts))
        self.hosts[name] = host
        host.up()
        return host

    def close(self):
        errors = []
        # Newest hosts first: the daemons go before the Redis they use.
        for host in reversed(list(self.hosts.values())):
            for process in reversed(host.processes):
                try:
                    process.stop()
                except Exception as exc:   # go on: the rest must go too
                    errors.append(exc)
        for host in self.hosts.values():
            _ip('link', 'del', host.outer, check=False)
            _ip('netns', 'del', host.ns, check=False)
        _ip('link', 'del', self.bridge, check=False)
        with contextlib.suppress(FileNotFoundError):
            os.unlink(os.path.join(RUNS_DIR, self.run_id))
        if errors:
            raise errors[0]


def _interrupt(signum, frame):
    raise KeyboardInterrupt('signal %d' % signum)


@contextlib.contextmanager
def cluster(tmp):
    # SIGTERM unwinds as Ctrl-C does (pytest then tears down and stops);
    # only the main thread can take a handler.
    previous = None
    if threading.current_thread() is threading.main_thread():
        previous = signal.signal(signal.SIGTERM, _interrupt)
    made = Cluster(tmp)
    try:
        yield made.up()
    finally:
        if previous is not None:   # a second SIGTERM must not cut close()
            signal.signal(signal.SIGTERM, signal.SIG_IGN)
        try:
            made.close()
        finally:
            if previous is not None:
                signal.signal(signal.SIGTERM, previous)


def _owner_alive(pid):
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass
    return True


def sweep_stale_runs():
    """Remove what runs whose owner died (SIGKILL, a lost CI runner) left:
    their processes (every pid inside their namespaces), namespaces and
    links.  Runs of a live owner -- another test session -- are left
    alone.  Returns the run ids swept."""
    try:
        names = os.listdir(RUNS_DIR)
    except FileNotFoundError:
        return []
    swept = []
    for run_id in names:
        path = os.path.join(RUNS_DIR, run_id)
        try:
            with open(path) as fh:
                owner = int(fh.read().strip() or 0)
        except (OSError, ValueError):
            continue
        if owner and _owner_alive(owner):
            continue
        namespaces = [n for n in _ip('netns', 'list').stdout.split()
                      if n.startswith(run_id + '-')]
        for ns in namespaces:
            for pid in _ip('netns', 'pids', ns, check=False).stdout.split():
                with contextlib.suppress(ProcessLookupError, ValueError):
                    os.kill(int(pid), signal.SIGKILL)
        for name in leftovers(run_id):
            if name in namespaces:
                _ip('netns', 'del', name, check=False)
            else:
                _ip('link', 'del', name.split('@')[0], check=False)
        with contextlib.suppress(FileNotFoundError):
            os.unlink(path)
        swept.append(run_id)
    return swept


def leftovers(run_id):
    """Namespaces and links still named after `run_id` (empty after
    close())."""
    names = _ip('netns', 'list').stdout.split()
    links = _ip('-o', 'link').stdout
    return [n for n in names if n.startswith(run_id)] + \
        [line.split(':')[1].strip() for line in links.splitlines()
         if run_id[2:] in line.split(':')[1] or run_id in line]


_HTTP_GET = '''
import sys, urllib.request, urllib.error
try:
    with urllib.request.urlopen(sys.argv[1], timeout=5) as reply:
        status, body = reply.status, reply.read()
except urllib.error.HTTPError as exc:
    status, body = exc.code, exc.read()
except OSError:
    sys.exit(3)
sys.stdout.write('%d\\n' % status)
sys.stdout.buffer.write(body)
'''


def http_get(host, port, path):
    """GET http://127.0.0.1:`port``path` from inside `host`'s namespace
    (where a daemon bound to loopback listens): (status, body text), or
    (None, None) when nothing answers."""
    done = subprocess.run(
        ['ip', 'netns', 'exec', host.ns, sys.executable, '-c', _HTTP_GET,
         'http://127.0.0.1:%d%s' % (port, path)],
        capture_output=True, text=True, timeout=30)
    if done.returncode:
        return None, None
    status, _, body = done.stdout.partition('\n')
    return int(status), body
