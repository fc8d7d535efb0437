"""What every benchmark shares: the consumers under test as real processes
(this suite's, huey's own huey_consumer, the bare redis-py floor), a
NOTIFY_SOCKET to hear READY=1, memory readings from /proc, waiting, and
figures (median, min, max, percentiles)."""
import os
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from contextlib import contextmanager

BENCH = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(BENCH)
PYTHON = sys.executable


class Timeout(RuntimeError):
    pass


def wait_until(condition, timeout, what, interval=0.002):
    """Poll `condition` until it returns something true; its value."""
    deadline = time.monotonic() + timeout
    while True:
        value = condition()
        if value:
            return value
        if time.monotonic() > deadline:
            raise Timeout('no %s within %gs' % (what, timeout))
        time.sleep(interval)


def wait_redis_idle(client, timeout=30):
    """Wait until Redis has no client blocked in a queue read.  A consumer
    killed with SIGKILL leaves its blocking reads registered until Redis
    notices the closed sockets; a message pushed before that is handed to
    the dead process and lost (the at-most-once delivery of plain Huey), so
    every run starts only once the last one's readers are gone."""
    wait_until(lambda: client.info('clients')['blocked_clients'] == 0,
               timeout, 'Redis without blocked clients', interval=0.01)


# --- figures -------------------------------------------------------------------

class Figure:
    """Several runs of one measurement: median with min and max."""

    def __init__(self, values=()):
        self.values = list(values)

    def add(self, value):
        self.values.append(value)

    def __bool__(self):
        return bool(self.values)

    @property
    def median(self):
        return statistics.median(self.values)

    @property
    def low(self):
        return min(self.values)

    @property
    def high(self):
        return max(self.values)


def percentile(samples, fraction):
    """Nearest-rank percentile of `samples` (fraction 0..1)."""
    ordered = sorted(samples)
    rank = max(1, int(round(fraction * len(ordered) + 0.5)))
    return ordered[min(rank, len(ordered)) - 1]


# --- sd_notify ----------------------------------------------------------------

class NotifySocket:
    """What systemd would receive on NOTIFY_SOCKET: the time READY=1 came."""

    def __init__(self, directory):
        self.path = os.path.join(directory, 'notify-%d.sock' % id(self))
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind(self.path)

    def wait_ready(self, timeout, alive):
        """Monotonic time READY=1 arrived; `alive()` false means the
        process died first."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            self.sock.settimeout(0.05)
            try:
                data = self.sock.recv(65536)
            except socket.timeout:
                if not alive():
                    raise RuntimeError('process exited before READY=1')
                continue
            if b'READY=1' in data.split(b'\n'):
                return time.monotonic()
        raise Timeout('no READY=1 within %gs' % timeout)

    def close(self):
        self.sock.close()
        try:
            os.unlink(self.path)
        except OSError:
            pass


# --- memory --------------------------------------------------------------------

def _children(pid):
    out = []
    try:
        for tid in os.listdir('/proc/%d/task' % pid):
            with open('/proc/%d/task/%s/children' % (pid, tid)) as fh:
                out += [int(c) for c in fh.read().split()]
    except OSError:
        pass
    return out


def process_tree(pid):
    tree, todo = [], [pid]
    while todo:
        current = todo.pop()
        tree.append(current)
        todo += _children(current)
    return tree


def _kib(path, field):
    try:
        with open(path) as fh:
            for line in fh:
                if line.startswith(field):
                    return int(line.split()[1])
    except OSError:
        pass
    return 0


def rss_mib(pid):
    """Resident set of one process (VmRSS), MiB."""
    return _kib('/proc/%d/status' % pid, 'VmRSS:') / 1024.0


def pss_mib(pid):
    """Proportional set size of a process and all its descendants, MiB:
    pages forked workers share with their parent count once in total."""
    return sum(_kib('/proc/%d/smaps_rollup' % p, 'Pss:')
               for p in process_tree(pid)) / 1024.0


_TICKS = os.sysconf('SC_CLK_TCK')


def cpu_seconds(pid):
    """CPU time (user + system) used so far by a process and all its
    living descendants."""
    total = 0
    for p in process_tree(pid):
        try:
            with open('/proc/%d/stat' % p) as fh:
                fields = fh.read().rpartition(')')[2].split()
        except OSError:
            continue
        total += int(fields[11]) + int(fields[12])
    return total / _TICKS


# --- processes under test -------------------------------------------------------

class Contender:
    """A consumer process: started in its own session, output in a file,
    stopped (and its whole group killed) at the end."""
    label = '?'

    def __init__(self, workers, worker_type, redis_url, workdir):
        self.workers, self.worker_type = workers, worker_type
        self.redis_url, self.workdir = redis_url, workdir
        self.proc = None
        self.notify = None
        self.started = None
        self.log_path = None
        # bench/pickup_trace.py's marks file: the consumer is run through
        # that launcher, with clock marks on its delivery path.
        self.trace = None

    def command(self):
        raise NotImplementedError

    def traced(self, marks_path):
        self.trace = marks_path
        return self

    def environment(self):
        env = {k: v for k, v in os.environ.items()
               if not k.startswith(('HUEY_', 'REDIS_', 'NOTIFY_SOCKET',
                                    'WATCHDOG_', 'LISTEN_'))}
        env['PYTHONPATH'] = os.pathsep.join([ROOT, BENCH])
        env['BENCH_REDIS_URL'] = self.redis_url
        return env

    def start(self, notify=False):
        env = self.environment()
        if notify:
            self.notify = NotifySocket(self.workdir)
            env['NOTIFY_SOCKET'] = self.notify.path
        fd, self.log_path = tempfile.mkstemp(
            prefix='%s-' % self.label.replace(' ', '_'), suffix='.log',
            dir=self.workdir)
        self.started = time.monotonic()
        command = self.command()
        if self.trace is not None:
            command = [PYTHON, os.path.join(BENCH, 'pickup_trace.py'),
                       self.trace] + command[1:]
        self.proc = subprocess.Popen(
            command, env=env, cwd=BENCH, stdin=subprocess.DEVNULL,
            stdout=fd, stderr=fd, start_new_session=True)
        os.close(fd)
        return self

    @property
    def pid(self):
        return self.proc.pid

    def alive(self):
        return self.proc is not None and self.proc.poll() is None

    def wait_ready(self, timeout=30):
        """Seconds from spawn to READY=1 (only contenders that speak
        sd_notify)."""
        return self.notify.wait_ready(timeout, self.alive) - self.started

    def output(self):
        with open(self.log_path, 'rb') as fh:
            return fh.read().decode('utf-8', 'replace')

    def kill(self):
        """SIGKILL the whole process group (workers too)."""
        if self.alive():
            try:
                os.killpg(self.proc.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        if self.proc is not None:
            self.proc.wait(10)

    def stop(self, graceful=False, timeout=15):
        """End it: at once by default (what it leaves in Redis is flushed
        before the next run, and a graceful stop waits out the workers'
        queue reads), or with SIGTERM first."""
        if graceful and self.alive():
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                pass
        self.kill()
        if self.notify is not None:
            self.notify.close()
            self.notify = None

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.stop()


class SuiteConsumer(Contender):
    """`huey-worker consumer` with the benchmark's task module."""
    label = 'suite'

    def __init__(self, *args, task_events='end', level='info', identity=None,
                 extra_env=None, builtin=False, **kwargs):
        super().__init__(*args, **kwargs)
        self.task_events, self.level = task_events, level
        self.identity, self.extra_env = identity, extra_env or {}
        self.builtin = builtin

    def command(self):
        return [PYTHON, '-m', 'huey_worker', 'consumer', '--workers',
                str(self.workers), '--worker-type', self.worker_type]

    def environment(self):
        env = super().environment()
        config = os.path.join(self.workdir, 'empty.ini')
        open(config, 'a').close()
        env.update({
            'HUEY_REDIS_URL': self.redis_url,
            'HUEY_WORKER_CONFIG': config,
            'HUEY_MODULES': 'bench_tasks',
            'HUEY_WORKER_TASKS_BUILTIN': 'true' if self.builtin else 'false',
            'HUEY_WORKER_LOGGING_LEVEL': self.level,
            'HUEY_WORKER_LOGGING_TASK_EVENTS': self.task_events,
        })
        if self.identity:
            env['HUEY_CONSUMER_ID'] = self.identity
        env.update(self.extra_env)
        return env


class PlainConsumer(Contender):
    """huey's own consumer (huey_consumer) on bench/plain_tasks.py."""
    label = 'plain'

    def __init__(self, *args, quiet=False, **kwargs):
        super().__init__(*args, **kwargs)
        self.quiet = quiet

    def command(self):
        script = os.path.join(os.path.dirname(PYTHON), 'huey_consumer')
        if not os.path.exists(script):
            import huey.bin.huey_consumer as module
            script = module.__file__
        return [PYTHON, script, 'plain_tasks.huey', '-w', str(self.workers),
                '-k', self.worker_type] + (['-q'] if self.quiet else [])


class FloorConsumer(Contender):
    """bench/floor.py: BRPOP + SET and nothing else."""
    label = 'floor'

    def command(self):
        return [PYTHON, os.path.join(BENCH, 'floor.py'), self.redis_url,
                str(self.workers), self.worker_type]


class StatusServer(Contender):
    """`huey-worker status-server` on a free loopback port."""
    label = 'status'

    def __init__(self, port, redis_url, workdir):
        super().__init__(0, '-', redis_url, workdir)
        self.port = port

    def command(self):
        return [PYTHON, '-m', 'huey_worker', 'status-server', '--port',
                str(self.port)]

    def environment(self):
        env = super().environment()
        config = os.path.join(self.workdir, 'empty.ini')
        open(config, 'a').close()
        env.update({'HUEY_REDIS_URL': self.redis_url,
                    'HUEY_WORKER_CONFIG': config,
                    'HUEY_MODULES': 'bench_tasks',
                    'HUEY_WORKER_TASKS_BUILTIN': 'false'})
        return env


def parses_with_hiredis(contender):
    """Whether redis-py parses with hiredis in the process `contender`
    starts: asked of the same interpreter, environment and directory."""
    done = subprocess.run(
        [contender.command()[0], '-c', 'import redis.utils; '
         'print(redis.utils.HIREDIS_AVAILABLE)'],
        env=contender.environment(), cwd=BENCH, capture_output=True,
        text=True, timeout=60)
    return done.stdout.strip() == 'True'


def hiredis_line(redis_url, workdir):
    """The header line saying whether both consumers parse with hiredis.
    huey's consumer without it is 1.2 to 1.4 times slower, which would
    flatter the suite: a warning then."""
    found = {label: parses_with_hiredis(kind(1, 'thread', redis_url, workdir))
             for label, kind in (('suite', SuiteConsumer),
                                 ('huey_consumer', PlainConsumer))}
    line = 'hiredis: %s (both run by %s)' % (', '.join(
        '%s %s' % (label, 'yes' if yes else 'NO')
        for label, yes in found.items()), PYTHON)
    if not all(found.values()):
        line += '; WARNING: the ratios compare unlike parsers'
    return line


@contextmanager
def private_redis(prefix):
    """A throwaway Redis server for one benchmark: HUEY_* and REDIS_*
    dropped from this process's environment first (the benchmark's settings
    only, never the caller's), a fresh temporary directory named
    `prefix`..., and an EmbeddedRedis without persistence in it; yields
    (server, workdir) and stops the server after.  The directory stays
    (consumer logs are in it); removing it is the caller's choice."""
    for name in list(os.environ):
        if name.startswith(('HUEY_', 'REDIS_')):
            del os.environ[name]
    from huey_worker.devredis import EmbeddedRedis
    workdir = tempfile.mkdtemp(prefix=prefix)
    server = EmbeddedRedis(os.path.join(workdir, 'redis'), persist=False)
    server.start()
    try:
        yield server, workdir
    finally:
        server.cleanup()


STAGING = 'bench:staging'   # where batches wait before they are released
CHUNK = 500                 # staged writes sent per round trip


@contextmanager
def held_writes(storage):
    """The producer's writes held back on `storage` (this thread) for a
    later flush(), journal records included.  storage.deferring alone
    would lose them: the journal stages an enqueue's record as a callable
    that writes it only while that enqueue is under way (it is dropped
    when the enqueue fails), and a plain deferred flush runs it after.
    So each held write turns the callables staged before it into their
    commands at once."""
    from huey_worker import transaction
    pending = storage._pending()
    done = [0]   # how much of `pending` is plain commands already

    def write(*args):
        start = done[0] if done[0] <= len(pending) else 0   # flushed since
        tail = pending[start:]
        del pending[start:]
        for command in tail:
            if type(command) is tuple:
                pending.append(command)
            else:   # scripts as EVAL with their text, as sent in a MULTI
                pipe = storage._record([command])
                pending.extend(transaction.as_sent(pipe,
                                                    pipe.command_stack))
        pending.append(args)
        done[0] = len(pending)
    storage._write = write
    storage.deferring = True
    try:
        yield
    finally:
        storage.deferring = False
        del storage._write


@contextmanager
def staged_enqueue(storage):
    """Enqueue through the suite's producer path (journal records included)
    into STAGING, with writes held back and sent CHUNK messages at a time;
    yields the function to call after each message."""
    queue_key = storage.queue_key
    storage.queue_key = STAGING
    sent = [0]

    def one_more():
        sent[0] += 1
        if sent[0] % CHUNK == 0:
            storage.flush()
    try:
        with held_writes(storage):
            yield one_more
            storage.flush()
    finally:
        storage.queue_key = queue_key
