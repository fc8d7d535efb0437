"""What the built-in tasks share: defaults from [tasks], errors that must
not be retried, progress reporting and the cooperative timeout.

TaskRejected is for every task, yours too: raise it when the input itself
is wrong and no retry can help.

Each built-in task is a thin Huey wrapper around a plain function taking a
`TaskRun`, so tests and the benchmark can run the same code with a config
of their own and without a queue.
"""
import inspect
import logging

from huey.api import Task

from ..journal import report_progress

log = logging.getLogger('huey_worker.tasks')


class TaskRejected(Exception):
    """An expected end of a task: its input is wrong (a missing file, a
    path outside its root, a record that does not exist...) and running it
    again cannot help.

    A task raises it (or a subclass) with the reason.  The task ends
    `failed` with that reason in the journal (error type: the class name)
    and in Huey's stored error, and is not retried, whatever retries it
    has.  The worker logs one WARNING line naming the task, its id and the
    reason, not a traceback: tracebacks are for the exceptions nobody
    expected, which keep theirs (and their retries).

        from huey_worker.tasks.runtime import TaskRejected

        @huey.task(retries=3)
        def invoice(order_id):
            order = load(order_id)
            if order is None:
                raise TaskRejected('no order %s' % order_id)
    """

    def __repr__(self):
        # The stored error result is repr(exception): keep it readable.
        return '%s: %s' % (type(self).__name__, self)


class InputRejected(TaskRejected):
    """The input of a built-in task is wrong (not a PDF, encrypted, outside
    the root, too big, 404...)."""


def current_config(app=None):
    """The Config the shared app was configured with (loading the file and
    the environment on first use, as the app itself does)."""
    if app is None:
        from ..app import current
        app = current()
    if app.config is None:
        app.storage  # noqa: B018  configures the app from file and env
    return app.config


_TASK_INIT = inspect.signature(Task.__init__)


class BuiltinTask(Task):
    """Retries, retry delay and backoff default to [tasks] retries,
    retry_delay and retry_backoff, read when the task is enqueued (the
    message carries them, so the producer's config decides, as it does for
    a hand-written `@huey.task(retries=3, retry_delay=60)`)."""

    def __init__(self, *args, **kwargs):
        bound = _TASK_INIT.bind(self, *args, **kwargs)
        values = bound.arguments
        if values.get('retries') is None or \
                values.get('retry_delay') is None or \
                values.get('retry_backoff') is None:
            tasks = current_config().tasks
            for name in ('retries', 'retry_delay', 'retry_backoff'):
                if values.get(name) is None:
                    values[name] = getattr(tasks, name)
        super().__init__(*bound.args[1:], **bound.kwargs)


class TaskRun:
    """One run of a built-in task: its config, its Huey task (None when
    called directly) and where progress goes."""

    def __init__(self, cfg, task=None, progress=None):
        self.cfg = cfg
        self.task = task
        self._progress = progress if progress is not None \
            else report_progress

    @classmethod
    def for_task(cls, task):
        return cls(current_config(), task)

    @property
    def task_id(self):
        return getattr(self.task, 'id', None)

    def progress(self, current, total=None, message=None, **metadata):
        try:
            self._progress(current, total, message, **metadata)
        except Exception:
            # Progress is informative; never let it fail the work.
            log.exception('progress report failed')

    def check_timeout(self):
        """Raise TaskTimeout once the task's time limit has passed (the
        cooperative check, for code that may be inside a C call when the
        limit passes: process workers also get SIGALRM, thread workers
        TaskTimeout raised in their thread, which goes off only at the
        next Python line; see docs/operations.md, "Tasks time out")."""
        if self.task is not None:
            self.task.check_timeout()

    def run(self, fn, *args, **kwargs):
        """Call fn(self, ...); a TaskRejected ends the task for good (the
        worker does so for any task; this also holds where another
        consumer runs the built-in tasks)."""
        try:
            return fn(self, *args, **kwargs)
        except TaskRejected:
            if self.task is not None:
                self.task.retries = 0  # Huey stores the error, no retry
            raise
