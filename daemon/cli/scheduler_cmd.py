"""`huey-worker scheduler`: the scheduler daemon."""

import click

from .common import (config_options, exits_78_on_config_error, load_from,
                     prepare_daemon)



@click.command('scheduler')
@config_options('redis', 'huey', 'tasks', 'scheduler', 'logging')
@exits_78_on_config_error
def command(**params):
    """Run the scheduler daemon: periodic tasks and due delayed/retrying
    tasks, one leader across hosts (run one per host; the others stand by).
    SIGTERM/SIGINT stop (releasing the lease), SIGHUP reloads, SIGUSR1
    reopens logs."""
    from ..scheduler.service import Scheduler

    cfg, app = prepare_daemon(params)
    scheduler = Scheduler(cfg, app, reload_config=lambda: load_from(params))
    raise SystemExit(scheduler.run())
