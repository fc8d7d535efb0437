"""The `huey-worker` command: a click group; each subcommand lives in its
own module, listed here."""
import importlib

import click

from .. import __version__

COMMAND_MODULES = (
    'daemon.cli.config_cmd',
    'daemon.cli.consumer_cmd',
    'daemon.cli.deadletters_cmd',
    'daemon.cli.run_cmd',
    'daemon.cli.scheduler_cmd',
    'daemon.cli.status_server_cmd',
    'daemon.cli.status_cmd',
    'daemon.cli.task_cmd',
    'daemon.cli.wait_cmd',
    'daemon.cli.workers_cmd',
    'daemon.cli.submit_cmd',
)


@click.group(context_settings={'help_option_names': ['-h', '--help'],
                               'max_content_width': 100})
@click.version_option(__version__, prog_name='huey-worker')
def main():
    """Run and operate Huey task queues: consumer, scheduler, status
    endpoint and operator commands.  Exit codes: docs/exit-codes.md."""


for _name in COMMAND_MODULES:
    main.add_command(importlib.import_module(_name).command)
