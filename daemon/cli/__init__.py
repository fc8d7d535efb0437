"""The `huey-worker` command: a click group; each subcommand lives in its
own module, listed here.

Calling main() gives every command the same exits (docs/exit-codes.md):
a usage error is click's message and 64; output into a closed pipe ends the
process quietly as killed by SIGPIPE, and Ctrl-C as killed by SIGINT, like
GNU tools, so a shell sees 141 and 130 and a script stops on Ctrl-C."""
import contextlib
import importlib
import os
import signal
import sys

import click

from .. import __version__
from ..exitcodes import EX_FAILURE, EX_OK, EX_USAGE
from .ops_common import output_closed

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


def die_of(signum):
    """End as if killed by `signum`: what a shell, `set -o pipefail` and a
    parent's wait() expect of a tool stopped by a closed pipe or Ctrl-C."""
    signal.signal(signum, signal.SIG_DFL)
    os.kill(os.getpid(), signum)
    os._exit(128 + signum)   # only if the signal could not end us


@contextlib.contextmanager
def quiet_when_output_closed():
    """Python ignores SIGPIPE, so a write into a pipe whose reader left
    raises instead of ending the process; end it the way the signal would.
    SIGPIPE is not restored for the whole run because redis-py writes to
    sockets, and a dropped Redis connection must be reported, not fatal."""
    try:
        yield
    except BrokenPipeError:
        if not output_closed():
            raise
        die_of(signal.SIGPIPE)


class Group(click.Group):
    """The top-level group: calling it (main()) runs the command and exits
    with the documented code; it never returns."""

    def main(self, args=None, prog_name=None, complete_var=None,
             standalone_mode=True, **extra):
        if not standalone_mode:
            return super().main(args, prog_name, complete_var, False,
                                **extra)
        with quiet_when_output_closed():
            sys.exit(self._exit_code(args, prog_name, complete_var, extra))

    def _exit_code(self, args, prog_name, complete_var, extra):
        try:
            # Not standalone: usage errors and Ctrl-C come back here instead
            # of exiting 2 and 1; --help and --version return (exit 0), and
            # a command's own exit code passes as SystemExit, untouched.
            super().main(args, prog_name, complete_var, False, **extra)
        except click.UsageError as exc:
            exc.show()
            return EX_USAGE
        except click.ClickException as exc:
            exc.show()
            return exc.exit_code
        except click.Abort as exc:
            if isinstance(exc.__cause__, KeyboardInterrupt):
                die_of(signal.SIGINT)
            click.echo('Aborted!', err=True)
            return EX_FAILURE
        except KeyboardInterrupt:
            click.echo('', err=True)
            die_of(signal.SIGINT)
        return EX_OK

    # click turns EPIPE into a plain exit 1 around these two calls (parsing
    # writes --help and --version; invoking runs the command), so a broken
    # pipe must be caught inside them.
    def make_context(self, *args, **kwargs):
        with quiet_when_output_closed():
            return super().make_context(*args, **kwargs)

    def invoke(self, ctx):
        with quiet_when_output_closed():
            return super().invoke(ctx)


@click.group(cls=Group,
             context_settings={'help_option_names': ['-h', '--help'],
                               'max_content_width': 100})
@click.version_option(__version__, prog_name='huey-worker')
def main():
    """Run and operate Huey task queues: consumer, scheduler, status
    endpoint and operator commands.  Exit codes: docs/exit-codes.md."""


for _name in COMMAND_MODULES:
    main.add_command(importlib.import_module(_name).command)
