"""`huey-worker scheduler`: the scheduler daemon."""
import logging

import click

from .. import app as app_module
from .. import logs
from .common import config_options, exits_78_on_config_error, load_from

log = logging.getLogger('huey_worker.scheduler')


@click.command('scheduler')
@config_options('redis', 'huey', 'tasks', 'scheduler', 'logging')
@exits_78_on_config_error
def command(**params):
    """Run the scheduler daemon: periodic tasks and due delayed/retrying
    tasks, one leader across hosts (run one per host; the others stand by).
    SIGTERM/SIGINT stop (releasing the lease), SIGHUP reloads, SIGUSR1
    reopens logs."""
    from ..scheduler.service import Scheduler

    cfg = load_from(params)
    logs.setup(cfg)
    for warning in cfg.warnings:
        log.warning('%s', warning)
    app = app_module.configure(cfg)
    scheduler = Scheduler(cfg, app, reload_config=lambda: load_from(params))
    raise SystemExit(scheduler.run())
