"""The status endpoint daemon: the listening socket (its own, or the one
systemd passes by socket activation), signals, sd_notify, reload."""
import errno
import logging
import os
import socket

from .. import logs
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


def bind_socket(cfg):
    """A listening socket on [status] bind:port."""
    host, port = cfg.status.bind, cfg.status.port
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM,
                                   flags=socket.AI_PASSIVE)
    except socket.gaierror as exc:
        raise ConfigError('cannot resolve the address (%s)' % exc.strerror,
                          'status', 'bind', host,
                          origin=str(cfg.source('status.bind')))
    family, kind, proto, _, address = infos[0]
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

    def run(self):
        # Immediate mode has no queue, journal or workers to report: refuse
        # it (78) as the consumer and scheduler do, instead of answering 500.
        from ..cli.ops_common import refuse_immediate_mode
        with logs.config_errors_to_file():
            refuse_immediate_mode(self.cfg, 'the status endpoint')
        sock = activated_socket()
        how = 'socket activation'
        if sock is None:
            with logs.config_errors_to_file():
                sock = bind_socket(self.cfg)
            how = '[status] bind/port'
        defer_accept(sock)
        if not self.cfg.status.token:
            log.info('no [status] token: POST /tasks and /tasks/ID/revoke are '
                     'disabled')
        with handled_signals() as flags:
            self.flags = flags
            self.server = HttpServer(sock, self.routes,
                                     self.cfg.status.max_body_bytes,
                                     self.cfg.status.request_timeout)
            host, port = self.server.address
            log.info('status endpoint listening on http://%s:%d/ (%s)', host,
                     port, how)
            self.notifier.ready('serving http://%s:%d/' % (host, port))
            self.server.serve(lambda: flags.stop_requests > 0,
                              tick=self._tick)
            self.notifier.stopping()
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

    def reload(self):
        """SIGHUP: new token, limits and Redis settings; the socket stays
        (a new bind or port needs a restart)."""
        self.notifier.reloading()
        new = reread_config(self.reload_config, self.cfg)
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
        self.notifier.ready('serving http://%s:%d/' % self.server.address)
        log.info('configuration reloaded')
