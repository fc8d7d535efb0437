"""`huey-worker status-server`: the HTTP status endpoint daemon."""
import logging

import click

from ..exitcodes import EX_UNAVAILABLE
from .common import (config_options, exits_78_on_config_error, load_from,
                     prepare_daemon)

log = logging.getLogger('huey_worker.status')


@click.command('status-server')
@config_options('redis', 'huey', 'tasks', 'delivery', 'logging', 'journal',
                'status')
@exits_78_on_config_error
def command(**params):
    """Serve task states, queue depths, workers, health and Prometheus
    metrics over HTTP on 127.0.0.1:[status] port (default 8470).  Accepts a
    socket from systemd socket activation.  SIGTERM/SIGINT stop, SIGHUP
    reloads, SIGUSR1 reopens logs.  Routes: docs/status-endpoint.md."""
    from ..status.server import PortInUse, StatusServer

    cfg, app = prepare_daemon(params)
    server = StatusServer(cfg, app, reload_config=lambda: load_from(params))
    try:
        code = server.run()
    except PortInUse as exc:
        log.error('%s', exc)
        code = EX_UNAVAILABLE
    raise SystemExit(code)
