"""Named exit codes (sysexits.h where one fits).  docs/exit-codes.md lists
them; systemd units use EX_CONFIG in RestartPreventExitStatus."""
EX_OK = 0            # clean stop
EX_FAILURE = 1       # a task or command failed (CLI: wait on a failed task)
EX_USAGE = 64        # wrong command-line usage (click's usage errors too)
EX_DATAERR = 65      # bad input data given to a CLI command
EX_NOINPUT = 66      # a named task or file does not exist
EX_UNAVAILABLE = 69  # Redis or the status endpoint could not be reached
EX_SOFTWARE = 70     # an internal error (a bug): please report it
EX_IOERR = 74        # the output (stdout, stderr) could not be written
EX_TEMPFAIL = 75     # timed out waiting (CLI wait --timeout)
EX_CONFIG = 78       # configuration error: fix the config, do not restart
# A command stopped by a closed output pipe or Ctrl-C is killed by SIGPIPE
# or SIGINT (huey_worker.cli), as GNU tools are: a shell shows 141 or 130.

DESCRIPTIONS = {
    EX_OK: 'clean stop or success',
    EX_FAILURE: 'the task or operation failed',
    EX_USAGE: 'wrong command-line usage',
    EX_DATAERR: 'bad input data',
    EX_NOINPUT: 'the named task or file does not exist',
    EX_UNAVAILABLE: 'Redis or the status endpoint unreachable',
    EX_SOFTWARE: 'internal error',
    EX_IOERR: 'the output could not be written',
    EX_TEMPFAIL: 'timed out',
    EX_CONFIG: 'configuration error (systemd does not restart on it)',
}
