"""The status endpoint daemon: the listening socket (its own, or the one
systemd passes by socket activation), signals, sd_notify, reload."""
import errno
import ipaddress
import logging
import os
import socket

from .. import logs, preflight
from ..config import ConfigError
from ..exitcodes import EX_OK
from ..mainloop import reread_config
from ..notify import Notifier
from ..signals import handled_signals, name as signal_name
from .httpserver import HttpServer
from .routes import Routes

log = logging.getLogger('huey_worker.status')

SD_LISTEN_FDS_START = 3


class PortInUse(Exception):
    """The configured address is taken (another instance still running?)."""


def activated_socket(environ=None):
    """The socket systemd passed (LISTEN_FDS/LISTEN_PID, fd 3), or None.
    The variables are removed so children do not take them for theirs."""
    environ = os.environ if environ is None else environ
    if environ.get('LISTEN_PID') != str(os.getpid()):
        return None
    try:
        count = int(environ.get('LISTEN_FDS', '0'))
    except ValueError:
        return None
    for name in ('LISTEN_PID', 'LISTEN_FDS', 'LISTEN_FDNAMES'):
        environ.pop(name, None)
    if count < 1:
        return None
    if count > 1:
        log.warning('systemd passed %d sockets; serving the first (fd 3)',
                    count)
    sock = socket.socket(fileno=SD_LISTEN_FDS_START)
    os.set_inheritable(sock.fileno(), False)
    return sock


def _address_info(cfg):
    """getaddrinfo's first answer for [status] bind:port; ConfigError when
    the name does not resolve."""
    host, port = cfg.status.bind, cfg.status.port
    try:
        infos = socket.getaddrinfo(host, port,
                                   type=socket.SOCK_STREAM,
                                   flags=socket.AI_PASSIVE)
    except socket.gaierror as exc:
        raise ConfigError('cannot resolve the address (%s)' % exc.strerror,
                          'status', 'bind', host,
                          origin=str(cfg.source('status.bind')))
    return infos[0]


def is_loopback(address):
    """Whether a socket address (getsockname()'s: a (host, port, ...) tuple,
    or a Unix socket's path) is reachable from this host only."""
    if not isinstance(address, tuple):
        return True   # a Unix socket: its file's permissions guard it
    try:
        ip = ipaddress.ip_address(address[0].partition('%')[0])
    except ValueError:
        return False
    mapped = getattr(ip, 'ipv4_mapped', None)
    return (mapped or ip).is_loopback


# Shorter tokens beyond loopback are warned about (a guessable secret).
MIN_EXPOSED_TOKEN = 16


def _format_address(address):
    if not isinstance(address, tuple):
        return str(address)
    host = address[0]
    return ('[%s]:%d' if ':' in host else '%s:%d') % (host, address[1])


def _exposed_error(cfg, where, setting='bind'):
    value = cfg.status.bind if setting == 'bind' else None
    return ConfigError(
        '%s is beyond loopback and [status] token is not set: anyone who can '
        'connect could read tasks, their arguments and results.  Set [status]'
        ' token (in %s, or HUEY_STATUS_TOKEN), which every route but GET '
        '/health/live then requires, or bind to 127.0.0.1 and put a reverse '
        'proxy in front' % (where, cfg.path), 'status', setting, value,
        origin=str(cfg.source('status.%s' % setting)))


def check_exposure(cfg):
    """Raise ConfigError when [status] bind is beyond loopback and no
    [status] token is set (what `huey-worker config --check` runs; the
    server checks the address it actually listens on, see StatusServer)."""
    if cfg.status.token:
        return
    address = _address_info(cfg)[4]
    if not is_loopback(address):
        raise _exposed_error(cfg, 'the address %s' % _format_address(address))


def bind_socket(cfg):
    """A listening socket on [status] bind:port."""
    host, port = cfg.status.bind, cfg.status.port
    family, kind, proto, _, address = _address_info(cfg)
    sock = socket.socket(family, kind, proto)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind(address)
        sock.listen(128)
    except OSError as exc:
        sock.close()
        if exc.errno == errno.EADDRINUSE:
            raise PortInUse('%s:%d is already in use (another status-server '
                            'running?); [status] port is set in %s' % (
                                host, port, cfg.source('status.port')))
        raise ConfigError('cannot listen there (%s)' % exc.strerror,
                          'status', 'port', str(port),
                          origin=str(cfg.source('status.port')))
    return sock


def defer_accept(sock):
    """Have the kernel hand over a connection only once its first bytes
    are in (or after a second), so the server reads the request straight
    after accept() instead of waiting for it in epoll: two system calls
    and a turn of the loop fewer per request.  Clients that connect and
    say nothing wait in the kernel, not in the server's connection table."""
    option = getattr(socket, 'TCP_DEFER_ACCEPT', None)
    if option is None or sock.family not in (socket.AF_INET,
                                             socket.AF_INET6):
        return
    try:
        sock.setsockopt(socket.IPPROTO_TCP, option, 1)
    except OSError:
        pass


class StatusServer:
    def __init__(self, cfg, app, reload_config=None, notifier=None):
        self.cfg, self.app = cfg, app
        self.reload_config = reload_config
        self.notifier = notifier or Notifier()
        self.routes = Routes(app)
        self.activated = self.exposed = False
        self.sock_address = None

    def run(self):
        # Immediate mode has no queue, journal or workers to report: refuse
        # it (78) as the consumer and scheduler do, instead of answering 500.
        from ..cli.ops_common import refuse_immediate_mode
        with logs.config_errors_to_file():
            refuse_immediate_mode(self.cfg, 'the status endpoint')
        sock = activated_socket()
        how = 'socket activation'
        self.activated = sock is not None
        if sock is None:
            with logs.config_errors_to_file():
                sock = bind_socket(self.cfg)
            how = '[status] bind/port'
        # What the socket really listens on decides, not the setting: a
        # socket from systemd has its own address.
        self.sock_address = sock.getsockname()
        self.exposed = not is_loopback(self.sock_address)
        if self.exposed:
            try:
                with logs.config_errors_to_file():
                    self._check_token(self.cfg)
            except ConfigError:
                sock.close()
                raise
            log.info('listening beyond loopback: every route but GET '
                     '/health/live requires the [status] token')
            if len(self.cfg.status.token) < MIN_EXPOSED_TOKEN:
                log.warning('[status] token (%s) is %d characters long: '
                            'beyond loopback it is all that guards the '
                            'tasks; use %d or more random ones (e.g. '
                            '`openssl rand -hex 32`)',
                            self.cfg.source('status.token'),
                            len(self.cfg.status.token), MIN_EXPOSED_TOKEN)
        elif not self.cfg.status.token:
            log.info('no [status] token: the routes that write (POST '
                     '/tasks, the operator actions) are disabled')
        self.routes.exposed = self.exposed
        defer_accept(sock)
        # An evicting Redis is refused (78) as soon as Redis answers, now
        # or later: /health meanwhile says Redis is unreachable.
        self.preflight = preflight.StartGate(preflight.Preflight(
            lambda: self.cfg, lambda: self.app.storage.pool,
            'status-server'), self.cfg)
        if not self.preflight.attempt():
            sock.close()
            raise self.preflight.refusal
        self.preflight.watch()
        with handled_signals() as flags:
            self.flags = flags
            status = self.cfg.status
            self.server = HttpServer(
                sock, self.routes, status.max_body_bytes,
                status.request_timeout, head_timeout=status.head_timeout,
                max_per_client=status.max_connections_per_client)
            where = _format_address(self.server.address[:2])
            log.info('status endpoint listening on http://%s/ (%s)', where,
                     how)
            self.notifier.ready('serving http://%s/' % where)
            self.server.serve(lambda: flags.stop_requests > 0 or
                              self.preflight.refusal is not None,
                              tick=self._tick)
            self.notifier.stopping()
            if self.preflight.refusal is not None:
                raise self.preflight.refusal
            log.info('status endpoint stopped on %s after %d request(s)',
                     signal_name(flags.last_stop_signal),
                     self.server.requests)
        return EX_OK

    def _tick(self):
        flags = self.flags
        if flags.reopen:
            flags.reopen = False
            logs.reopen()
            log.info('SIGUSR1: log files reopened')
        if flags.reload:
            flags.reload = False
            self.reload()
        self.notifier.keep_alive()

    def _check_token(self, cfg):
        """Listening beyond loopback: ConfigError without a token."""
        if cfg.status.token:
            return
        if self.activated:
            where = 'the socket systemd passed (%s)' % (
                _format_address(self.sock_address))
            raise _exposed_error(cfg, where, setting='token')
        raise _exposed_error(cfg, 'the address %s' % _format_address(
            self.sock_address))

    def reload(self):
        """SIGHUP: new token, limits and Redis settings; the socket stays
        (a new bind or port needs a restart).  Refused, the running
        configuration kept, when it would leave a server listening beyond
        loopback without a token."""
        self.notifier.reloading()
        new = reread_config(self.reload_config, self.cfg,
                            check=self._check_token if self.exposed else None)
        if new is None:
            self.notifier.ready('serving http://%s:%d/' % self.server.address)
            return
        if (new.status.bind, new.status.port) != (self.cfg.status.bind,
                                                  self.cfg.status.port):
            log.warning('[status] bind/port changed: takes effect on restart')
        from .. import app as app_module
        try:
            app = app_module.configure(new, self.app)
        except ConfigError as exc:
            log.error('configuration not fully reloaded: %s', exc)
        else:
            if app is not self.app:
                log.info('now serving the app %s', new.huey.app or 'shared')
                self.app = self.routes.app = app
            new = app.config or new   # with the values an adopted app gives
        self.cfg = new
        self.server.max_body_bytes = new.status.max_body_bytes
        self.server.request_timeout = new.status.request_timeout
        self.server.head_timeout = new.status.head_timeout
        self.server.max_per_client = new.status.max_connections_per_client
        self.notifier.ready('serving http://%s:%d/' % self.server.address)
        log.info('configuration reloaded')
