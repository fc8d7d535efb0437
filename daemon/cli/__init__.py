"""The `huey-worker` command: a click group; each subcommand lives in its
own module, listed here.

Calling main() gives every command the same exits (docs/exit-codes.md):
a usage error is click's message and 64; output into a closed pipe ends the
process quietly as killed by SIGPIPE, and Ctrl-C as killed by SIGINT, like
GNU tools, so a shell sees 141 and 130 and a script stops on Ctrl-C; any
other failure to write stdout or stderr (a full disk, stdout closed) is one
line and 74, never mistaken for Redis being unreachable."""
import contextlib
import errno
import importlib
import io
import os
import signal
import sys

import click

from .. import __version__
from ..exitcodes import EX_FAILURE, EX_IOERR, EX_OK, EX_USAGE

try:   # a redis-py whose internals changed: one line, not a traceback
    from .. import transaction  # noqa: F401
except ImportError as _exc:
    if getattr(_exc, 'exit_code', None) is None:
        raise
    sys.stderr.write('huey-worker: %s\n' % _exc)
    sys.exit(_exc.exit_code)

from .ops_common import output_closed, writing_output  # noqa: E402

COMMAND_MODULES = (
    'huey_worker.cli.cancel_cmd',
    'huey_worker.cli.config_cmd',
    'huey_worker.cli.consumer_cmd',
    'huey_worker.cli.deadletters_cmd',
    'huey_worker.cli.find_cmd',
    'huey_worker.cli.purge_cmd',
    'huey_worker.cli.pause_cmd',
    'huey_worker.cli.purge_queue_cmd',
    'huey_worker.cli.restore_cmd',
    'huey_worker.cli.resume_cmd',
    'huey_worker.cli.retry_cmd',
    'huey_worker.cli.revoke_cmd',
    'huey_worker.cli.run_cmd',
    'huey_worker.cli.scheduler_cmd',
    'huey_worker.cli.status_server_cmd',
    'huey_worker.cli.status_cmd',
    'huey_worker.cli.task_cmd',
    'huey_worker.cli.tasks_cmd',
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


class OutputError(Exception):
    """Writing stdout or stderr failed (the OSError is its __cause__).  Not
    an OSError, so that click does not turn it into exit 1 on the way."""


@contextlib.contextmanager
def quiet_when_output_closed():
    """Python ignores SIGPIPE, so a write into a pipe whose reader left
    raises instead of ending the process; end it the way the signal would.
    SIGPIPE is not restored for the whole run because redis-py writes to
    sockets, and a dropped Redis connection must be reported, not fatal.
    Any other failed write of the output becomes an OutputError."""
    try:
        yield
    except OSError as exc:
        if isinstance(exc, BrokenPipeError) and output_closed():
            die_of(signal.SIGPIPE)
        if writing_output(exc):
            raise OutputError(exc) from exc
        raise


class _ClosedOutput(io.RawIOBase):
    """sys.stdout when the process started with fd 1 closed (`>&-`; Python
    then sets sys.stdout to None and click.echo drops everything): a write
    fails as writing to the closed descriptor does."""
    failing = True

    def writable(self):
        return True

    def write(self, data):
        if self.failing:
            raise OSError(errno.EBADF, os.strerror(errno.EBADF))
        return len(data)


def _closed_stdout():
    return io.TextIOWrapper(_ClosedOutput(), encoding='utf-8',
                            write_through=True)


def report_output_error(exc):
    """One line on stderr (if it still takes one), then exit 74.  What
    could not be written stays in the streams' buffers: the flush at exit
    goes to /dev/null, instead of failing again (exit 120)."""
    error = exc.__cause__ if isinstance(exc, OutputError) else exc
    message = 'huey-worker: cannot write the output: %s' % (
        error.strerror or error)
    note = getattr(error, 'hw_note', None)
    if note:
        message += ' (%s)' % note
    try:
        sys.stderr.write(message + '\n')
        sys.stderr.flush()
    except (OSError, ValueError, AttributeError):
        pass
    for stream in (sys.stdout, sys.stderr):
        if isinstance(getattr(stream, 'raw', None), _ClosedOutput):
            stream.raw.failing = False
    try:
        devnull = os.open(os.devnull, os.O_WRONLY)
        for fd in (1, 2):
            os.dup2(devnull, fd)
    except OSError:
        pass
    return EX_IOERR


class Group(click.Group):
    """The top-level group: calling it (main()) runs the command and exits
    with the documented code; it never returns."""

    def main(self, args=None, prog_name=None, complete_var=None,
             standalone_mode=True, **extra):
        if not standalone_mode:
            return super().main(args, prog_name, complete_var, False,
                                **extra)
        if sys.stdout is None:
            sys.stdout = _closed_stdout()
        try:
            with quiet_when_output_closed():
                code = self._exit_code(args, prog_name, complete_var, extra)
        except OutputError as exc:
            code = report_output_error(exc)
        sys.exit(code)

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
