"""`huey-worker consumer`: the consumer daemon."""

import click

from ..config import ConfigError
from .common import (config_options, exits_78_on_config_error, load_from,
                     prepare_daemon)



def _enable_greenlets(cfg):
    if cfg.consumer.worker_type != 'greenlet':
        return
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

    cfg, app = prepare_daemon(params, before_logging=_enable_greenlets)
    consumer = Consumer(cfg, app, reload_config=lambda: load_from(params))
    raise SystemExit(consumer.run())
