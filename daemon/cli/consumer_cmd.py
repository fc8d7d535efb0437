"""`huey-worker consumer`: the consumer daemon."""

import click

from ..config import ConfigError
from .common import (config_options, exits_78_on_config_error, load_from,
                     prepare_daemon)



def _enable_greenlets(cfg, patch=True):
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
    if patch:
        monkey.patch_all()


@click.command('consumer')
@config_options('redis', 'huey', 'tasks', 'consumer', 'logging')
@click.option('--check-config', is_flag=True, hidden=True,
              help='Exit 0 when this command line and config would start, '
                   '78 (the error on stderr) when not; Redis is not asked.')
@exits_78_on_config_error
def command(check_config, **params):
    """Run the consumer daemon (workers executing tasks).  SIGTERM/SIGINT
    stop gracefully (twice: at once), SIGHUP reloads, SIGUSR1 reopens logs."""
    from ..consumer import Consumer

    if check_config:
        # What a reload checks before the consumer re-executes itself with
        # this command line: the new image must not stop at a config error.
        from .. import app as app_module
        from ..mainloop import refuse_immediate
        cfg = load_from(params)
        _enable_greenlets(cfg, patch=False)
        refuse_immediate(app_module.configure(cfg).config, 'consumer')
        raise SystemExit(0)
    cfg, app = prepare_daemon(params, before_logging=_enable_greenlets)
    consumer = Consumer(cfg, app, reload_config=lambda: load_from(params))
    raise SystemExit(consumer.run())
