"""`huey-worker run`: the whole suite in the foreground for development
(`make run`): a private Redis and every daemon, stopped together by Ctrl-C,
SIGTERM or the closing of the terminal.  Even a SIGKILL of `run` leaves
nothing running: each child is sent SIGTERM by the kernel when `run` dies."""
import fcntl
import os
import select
import signal
import socket
import subprocess
import sys
import time

import click

from .. import config as config_module
from .. import settings as registry
from ..devredis import (EmbeddedRedis, RedisNotFound, dies_with_this_process,
                        remove_run_record, run_record_path, write_run_record)
from ..exitcodes import EX_OK, EX_UNAVAILABLE
from .common import config_options, exits_78_on_config_error, overrides_from

# The daemons `run` starts, as huey-worker subcommands.
DAEMONS = (
    ('consumer', ['consumer']),
    ('scheduler', ['scheduler']),
    ('status-server', ['status-server']),
)
STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)
# Named on run's own command line, these mean "that Redis, not a private one".
EXTERNAL_REDIS = ('redis.url', 'redis.host', 'redis.port', 'redis.sentinels')
# Held by the environment or a config file for another Redis, they would
# break the connection to the private one (AUTH, or url and sentinels both).
PRIVATE_CLEARS = ('redis.sentinels', 'redis.username', 'redis.password')
# The built-in tasks' directories, under the state dir unless set elsewhere:
# the defaults (/var/lib/huey-worker) are an installed VM's.
TASK_DIRS = (('pdf.input_root', ('input',)),
             ('pdf.output_root', ('output', 'pdf')),
             ('collect.output_root', ('output', 'collect')))
STATUS_WAIT = 30     # seconds the summary waits for the status endpoint
CONFIG_TEMPLATE = """\
# huey-worker run: the config file of `make run` (built-in defaults and the
# environment apply).  Add settings here, as in etc/huey-worker.ini; the
# Redis is the private one whatever [redis] says.
"""


def default_state_dir(environ=None):
    """$XDG_STATE_HOME/huey-worker/run, else ~/.local/state/huey-worker/run:
    one per user, kept, so queued tasks, results, inputs and outputs
    outlive a restart of `make run` and no /tmp directory piles up."""
    environ = os.environ if environ is None else environ
    base = environ.get('XDG_STATE_HOME')
    if not base or not os.path.isabs(base):
        base = os.path.join(os.path.expanduser('~'), '.local', 'state')
    return os.path.join(base, 'huey-worker', 'run')


def lock_state_dir(state_dir):
    """(fd, None) holding the state dir's lock, or (None, holder's pid): two
    redis-servers writing one append-only file would ruin it.  The kernel
    drops the lock however `run` ends, SIGKILL included."""
    fd = os.open(os.path.join(state_dir, 'run.lock'),
                 os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        holder = os.read(fd, 32).decode('ascii', 'replace').strip() or '?'
        os.close(fd)
        return None, holder
    os.ftruncate(fd, 0)
    os.write(fd, b'%d\n' % os.getpid())
    return fd, None


def say(text, err=False):
    try:
        click.echo(text, err=err)
    except OSError:
        # The terminal is gone (EIO after SIGHUP): stopping must go on, and
        # the exit must not fail flushing into it either.
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, 1)
        os.dup2(devnull, 2)
        os.close(devnull)


def exit_code(returncode):
    """A child's return code as a shell reports it (killed by N: 128+N)."""
    return returncode if returncode >= 0 else 128 - returncode


def listening_address(pid):
    """(host, port) of the TCP socket `pid` listens on, from /proc: the
    port really bound (with [status] port = 0 too), whatever the log level
    lets the status-server print.  None while it has none, or off Linux."""
    inodes = set()
    try:
        for fd in os.listdir('/proc/%d/fd' % pid):
            try:
                target = os.readlink('/proc/%d/fd/%s' % (pid, fd))
            except OSError:
                continue
            if target.startswith('socket:['):
                inodes.add(target[8:-1])
    except OSError:
        return None
    for table, family in (('tcp', socket.AF_INET), ('tcp6', socket.AF_INET6)):
        try:
            with open('/proc/%d/net/%s' % (pid, table)) as fh:
                rows = [line.split() for line in fh.readlines()[1:]]
        except OSError:
            continue
        for row in rows:
            # 0A is LISTEN.
            if len(row) < 10 or row[3] != '0A' or row[9] not in inodes:
                continue
            address, _, port = row[1].partition(':')
            raw = bytes.fromhex(address)
            if sys.byteorder == 'little':  # printed as 32-bit host words
                raw = b''.join(raw[i:i + 4][::-1]
                               for i in range(0, len(raw), 4))
            return socket.inet_ntop(family, raw), int(port, 16)
    return None


def base_url(host, port):
    host = {'0.0.0.0': '127.0.0.1', '::': '::1'}.get(host, host)
    return 'http://%s:%d/' % (('[%s]' % host) if ':' in host else host, port)


def healthy(status_url):
    """Whether GET /health answers 200 within a second."""
    # Imported here: every daemon loads this module with the CLI, and
    # requests (with urllib3, ssl and email) costs each one some 6 MiB.
    import requests
    try:
        return requests.get(status_url + 'health', timeout=1).status_code \
            == 200
    except requests.RequestException:
        return False


class Suite:
    def __init__(self, state_dir, config_path, cfg, overrides,
                 redis_overrides, server):
        self.state_dir, self.config_path, self.cfg = \
            state_dir, config_path, cfg
        self.server = server
        self.redis_url = server.url if server else cfg.redis.url
        self.env = dict(os.environ)
        self.daemon_args = ['--config', config_path]
        for name, raw, *_ in overrides + redis_overrides:
            self.daemon_args += ['--set', '%s=%s' % (name, raw)]
        self.task_dirs = []
        for name, parts in TASK_DIRS:
            path = cfg.get(name)
            if cfg.source(name).kind == 'default':
                path = os.path.join(state_dir, *parts)
                self.env[registry.BY_NAME[name].canonical_env] = path
            self.task_dirs.append((name, path))
        self.children = []
        self.requests = []       # stop signals received
        self.record_path = None
        self.status_url = None
        self.healthy = False

    # -- signals -------------------------------------------------------------

    def _install_signals(self):
        # Handlers only note the signal; the wakeup pipe ends the main
        # loop's select at once, for a stop request and a child's exit
        # (SIGCHLD) alike, so nothing waits out a sleep.
        self._wake_r, self._wake_w = os.pipe()
        for fd in (self._wake_r, self._wake_w):
            os.set_blocking(fd, False)
        self._old_wakeup = signal.set_wakeup_fd(self._wake_w)
        self._old_handlers = {s: signal.signal(s, self._on_stop)
                              for s in STOP_SIGNALS}
        self._old_handlers[signal.SIGCHLD] = signal.signal(
            signal.SIGCHLD, lambda signum, frame: None)

    def _restore_signals(self):
        for signum, handler in self._old_handlers.items():
            signal.signal(signum, handler)
        signal.set_wakeup_fd(self._old_wakeup)
        os.close(self._wake_r)
        os.close(self._wake_w)

    def _on_stop(self, signum, frame):
        self.requests.append(signum)

    def _sleep(self, timeout):
        """Until a signal arrives or `timeout` seconds pass."""
        try:
            ready, _, _ = select.select([self._wake_r], [], [],
                                        max(0, timeout))
        except InterruptedError:
            return
        if ready:
            try:
                while os.read(self._wake_r, 512):
                    pass
            except OSError:
                pass

    # -- the run -------------------------------------------------------------

    def run(self):
        self._install_signals()
        failed = None
        try:
            failed = self._start()
            if failed is None and not self.requests:
                self._summary()
            while failed is None and not self.requests:
                failed = self._check_children()
                if failed is None:
                    self._sleep(1.0)
        finally:
            self._stop()
            self._restore_signals()
        say('stopped')
        return EX_OK if failed is None else failed

    def _start(self):
        if self.server is not None:
            try:
                self.server.start()
            except RuntimeError as exc:
                say('huey-worker: private Redis: %s' % exc, err=True)
                return EX_UNAVAILABLE
            say('private Redis at %s (pid %d, dir %s)' % (
                self.server.url, self.server.process.pid,
                self.server.directory))
        if self.cfg.tasks.builtin:
            for name, path in self.task_dirs:
                try:
                    os.makedirs(path, exist_ok=True)
                except OSError as exc:
                    say('huey-worker: cannot create [%s] %s %s: %s' % (
                        *name.split('.'), path, exc.strerror), err=True)
        for name, args in DAEMONS:
            if self.requests:
                return None
            child = subprocess.Popen(
                [sys.executable, '-m', 'huey_worker'] + args +
                self.daemon_args, env=self.env, stdin=subprocess.DEVNULL,
                # Own session: Ctrl-C reaches `run` alone, which stops the
                # daemons before Redis; the terminal's SIGHUP (a reload to
                # a daemon) too.  SIGTERM from the kernel if `run` dies.
                start_new_session=True, preexec_fn=dies_with_this_process())
            self.children.append((name, child))
            say('started %s (pid %d)' % (name, child.pid))
        return self._wait_for_status()

    def _wait_for_status(self):
        """Wait for the status endpoint to listen, to print its real URL."""
        status = dict(self.children).get('status-server')
        if status is None:
            return None
        if not os.path.isdir('/proc/%d/fd' % os.getpid()):
            if self.cfg.status.port:
                self.status_url = base_url(self.cfg.status.bind,
                                           self.cfg.status.port)
            return None
        deadline = time.monotonic() + STATUS_WAIT
        while not self.requests and time.monotonic() < deadline:
            address = listening_address(status.pid)
            if address is not None and self.status_url is None:
                self.status_url = base_url(*address)
            # Ready means /health says ok (the consumer's first heartbeat is
            # in): a curl right after the summary must not get a 503.
            if self.status_url is not None and healthy(self.status_url):
                self.healthy = True
                return None
            failed = self._check_children()
            if failed is not None:
                return failed
            self._sleep(0.05)
        return None

    def _summary(self):
        cfg = self.cfg
        if self.status_url:
            say('status endpoint: %shealth%s' % (
                self.status_url, '' if self.healthy else
                ' (not healthy yet after %ds: see the daemons\' lines above)'
                % STATUS_WAIT))
        else:
            say('status endpoint: not listening yet (see the status-server '
                'log)')
        say('config: %s' % self.config_path)
        say('state dir: %s (kept: the private Redis data, inputs and '
            'outputs)' % self.state_dir)
        if cfg.tasks.builtin:
            dirs = dict(self.task_dirs)
            say('pdf.extract reads files below %s; writes to %s' % (
                dirs['pdf.input_root'], dirs['pdf.output_root']))
            say('collect.* writes to %s' % dirs['collect.output_root'])
        self.record_path = run_record_path()
        if self.redis_url and self.record_path:
            try:
                write_run_record(self.record_path, redis_url=self.redis_url,
                                 status_url=self.status_url,
                                 state_dir=self.state_dir,
                                 config=self.config_path)
                say('huey-worker status/submit/task/... find this Redis '
                    'while this runs (%s); elsewhere:' % self.record_path)
            except OSError as exc:
                self.record_path = None
                say('huey-worker: cannot write %s (%s): other commands '
                    'need:' % (run_record_path(), exc.strerror), err=True)
        if self.redis_url:
            say('  export HUEY_REDIS_URL=%s' % self.redis_url)
        say('Ctrl-C stops everything.')

    def _check_children(self):
        """The exit code `run` ends with when a child ended on its own."""
        for name, child in self.children:
            if child.poll() is not None:
                code = exit_code(child.returncode)
                say('%s exited with %s; stopping' % (name, code), err=True)
                if name == 'status-server' and code == EX_UNAVAILABLE:
                    say("huey-worker: its port is taken (see its log); "
                        "another: --port N, or --port 0 for any free one "
                        "(make run RUN_ARGS='--port 0')", err=True)
                return code
        if self.server is not None and self.server.process.poll() is not None:
            say('private Redis exited with %s; stopping' % exit_code(
                self.server.process.returncode), err=True)
            return EX_UNAVAILABLE
        return None

    def _stop(self):
        if self.requests and self.children:
            say('stopping (Ctrl-C again: at once)')
        living = [c for _, c in self.children if c.poll() is None]
        for child in reversed(living):
            child.send_signal(signal.SIGTERM)
        asked = len(self.requests)
        deadline = time.monotonic() + self.cfg.consumer.shutdown_timeout + 30
        while living:
            if len(self.requests) > asked:
                # A second SIGTERM makes a daemon stop at once.
                asked = len(self.requests)
                for child in living:
                    child.send_signal(signal.SIGTERM)
            if time.monotonic() > deadline:
                for child in living:
                    try:   # the group: process workers of the consumer too
                        os.killpg(child.pid, signal.SIGKILL)
                    except ProcessLookupError:
                        pass
                    child.wait()
                break
            self._sleep(min(1.0, deadline - time.monotonic()))
            living = [c for c in living if c.poll() is None]
        if self.server is not None:
            self.server.stop()
        if self.record_path:
            remove_run_record(self.record_path)


@click.command('run')
@config_options()
@click.option('--state-dir', default=None, metavar='DIR',
              help='Where the private Redis keeps its data, with the '
                   'default config file and the built-in tasks\' inputs '
                   'and outputs; kept (default: $XDG_STATE_HOME or '
                   '~/.local/state, then huey-worker/run).')
@exits_78_on_config_error
def command(state_dir, **params):
    """Run the whole suite in the foreground: a private Redis, the
    consumer, the scheduler and the status endpoint.  Ctrl-C, SIGTERM or
    closing the terminal stops everything.  --config, --set and the flags
    reach every daemon; --redis-url (or --set redis.host=...) uses that
    Redis instead of a private one.  Exit code: a failed daemon's, else 0."""
    overrides = overrides_from(params)
    state_dir = os.path.abspath(state_dir or default_state_dir())
    os.makedirs(state_dir, mode=0o700, exist_ok=True)
    config_path = params.get('opt_config') or \
        os.environ.get(config_module.CONFIG_ENV)
    if not config_path:
        # Never /etc/huey-worker: an installed VM's settings (its Redis,
        # its directories) are not for a development run.
        config_path = os.path.join(state_dir, 'huey-worker.ini')
        if not os.path.exists(config_path):
            with open(config_path, 'w') as fh:
                fh.write(CONFIG_TEMPLATE)
    config_path = os.path.abspath(config_path)
    cfg = config_module.load(config_path, overrides=overrides)

    lock, holder = lock_state_dir(state_dir)
    if lock is None:
        say('huey-worker: %s is in use by another `huey-worker run` (pid %s);'
            ' stop it, or pass --state-dir DIR' % (state_dir, holder),
            err=True)
        raise SystemExit(EX_UNAVAILABLE)
    try:
        server, redis_overrides = None, []
        if not any(name in EXTERNAL_REDIS for name, _, _ in overrides):
            try:
                server = EmbeddedRedis(os.path.join(state_dir, 'redis'))
            except RedisNotFound as exc:
                say('huey-worker: %s' % exc, err=True)
                raise SystemExit(EX_UNAVAILABLE)
            redis_overrides = [('redis.url', server.url)] + [
                (name, '') for name in PRIVATE_CLEARS if cfg.get(name)]
            cfg = config_module.load(config_path,
                                     overrides=overrides + redis_overrides)
        code = Suite(state_dir, config_path, cfg, overrides, redis_overrides,
                     server).run()
    finally:
        os.close(lock)
    raise SystemExit(code)


for _param in command.params:
    if _param.name == 'opt_config':
        _param.help = ('Config file for the daemons (default: '
                       '$HUEY_WORKER_CONFIG, else huey-worker.ini in the '
                       'state dir; never %s).' % config_module.DEFAULT_PATH)
