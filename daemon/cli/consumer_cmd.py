"""`huey-worker consumer`: the consumer daemon."""
import logging

import click

from .. import app as app_module
from .. import logs
from ..config import ConfigError
from .common import config_options, exits_78_on_config_error, load_from

log = logging.getLogger('huey_worker.consumer')


def _enable_greenlets(cfg):
    try:
        from gevent import monkey
    except ImportError:
        raise ConfigError(
            'gevent is not installed; install it into the same environment '
            '(pip install gevent) or use thread', 'consumer', 'worker_type',
            'greenlet', origin=str(cfg.source('consumer.worker_type')))
    # After patching, threads are greenlets: thread mode runs on gevent.
    monkey.patch_all()


@click.command('consumer')
@config_options('redis', 'huey', 'tasks', 'consumer', 'logging')
@exits_78_on_config_error
def command(**params):
    """Run the consumer daemon (workers executing tasks).  SIGTERM/SIGINT
    stop gracefully (twice: at once), SIGHUP reloads, SIGUSR1 reopens logs."""
    from ..consumer import Consumer

    cfg = load_from(params)
    if cfg.consumer.worker_type == 'greenlet':
        _enable_greenlets(cfg)
    logs.setup(cfg)
    for warning in cfg.warnings:
        log.warning('%s', warning)
    app = app_module.configure(cfg)
    consumer = Consumer(cfg, app, reload_config=lambda: load_from(params))
    raise SystemExit(consumer.run())
