"""The `huey-worker` command: a click group; each subcommand lives in its
own module, listed here."""
import importlib

import click

from .. import __version__

COMMAND_MODULES = (
    'huey_worker.cli.config_cmd',
    'huey_worker.cli.consumer_cmd',
    'huey_worker.cli.deadletters_cmd',
    'huey_worker.cli.run_cmd',
    'huey_worker.cli.scheduler_cmd',
    'huey_worker.cli.status_server_cmd',
    'huey_worker.cli.status_cmd',
    'huey_worker.cli.task_cmd',
    'huey_worker.cli.wait_cmd',
    'huey_worker.cli.workers_cmd',
    'huey_worker.cli.submit_cmd',
)


@click.group(context_settings={'help_option_names': ['-h', '--help'],
                               'max_content_width': 100})
@click.version_option(__version__, prog_name='huey-worker')
def main():
    """Run and operate Huey task queues: consumer, scheduler, status
    endpoint and operator commands.  Exit codes: docs/exit-codes.md."""


for _name in COMMAND_MODULES:
    main.add_command(importlib.import_module(_name).command)
