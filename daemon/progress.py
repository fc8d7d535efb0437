"""What a running task can ask of the suite: report its progress, read its
delivery count, know its own id.  Public through huey_worker.journal:

    from huey_worker.journal import report_progress

    @huey.task()
    def convert(paths):
        for done, path in enumerate(paths, 1):
            ...
            report_progress(done, len(paths), 'converted %s' % path, pages=12)

The worker marks the task it is about to run (journal hook on_dequeued) in
a context variable, so these calls find it without Huey passing anything to
the task: one per thread in thread mode, per process in process mode, per
greenlet under gevent.  Outside a task every call does nothing.

Cancelling (daemon/actions/cancel.py): a task an operator cancelled gets
TaskCanceled raised at its next report_progress() or check_cancelled()
call (thread, greenlet and process workers alike; process workers also
get SIGTERM, thread workers the exception raised in their thread after a
grace: docs/tasks.md, "Cancelling a running task").
"""
import contextvars
import json
import logging
import numbers
import os
import threading
import time

import redis

from . import context

log = logging.getLogger('huey_worker.journal')

# Journal fields the progress API writes.
PROGRESS_FIELDS = ('progress_current', 'progress_total', 'progress_message',
                   'progress_at', 'metadata')
MESSAGE_MAX_CHARS = 1000
METADATA_MAX_BYTES = 16 << 10

_current = contextvars.ContextVar('huey_worker_task', default=None)

# Reports held back by the interval, written by one flusher thread per
# process so a task that reports and then works a long while still shows
# its latest progress.
_held = set()
_held_lock = threading.Lock()
_flusher_pid = None


def _forget_after_fork():
    # A forked worker starts with no flusher and must not inherit a lock
    # the parent's flusher may have held at the fork.
    global _held, _held_lock
    _held, _held_lock = set(), threading.Lock()


os.register_at_fork(after_in_child=_forget_after_fork)


def _canceled():
    # Defined with the worker's own interrupts (huey_worker.worker), which
    # the task body wrapper lets through; imported on first use only.
    from .worker import TaskCanceled
    return TaskCanceled()


def check_cancelled():
    """Raise TaskCanceled (huey_worker.TaskCanceled, a KeyboardInterrupt:
    `except Exception` does not swallow it, and Huey neither retries the
    task nor stores an error) if an operator cancelled the running task;
    return False otherwise (and outside a task).  Costs no Redis round
    trip (the consumer passes the cancel on in shared memory), so a loop
    may call it per item:

        from huey_worker import check_cancelled

        for row in rows:
            check_cancelled()
            ...
    """
    ctx = _current.get()
    if ctx is not None and ctx.cancel_check is not None and \
            ctx.cancel_check():
        raise _canceled()
    return False


class TaskContext:
    """The task this thread (process, greenlet) is running."""

    def __init__(self, storage, task_id, name, interval, record=True):
        self.storage, self.task_id, self.name = storage, task_id, name
        self.interval = interval
        self.record = record       # False: the journal is switched off
        self.last_write = None     # monotonic time of the last progress write
        self.dirty = False         # progress newer than what Redis has
        self.current = self.total = self.message = None
        self.metadata = {}
        self.delivery = None
        # Set by the worker as the body starts: whether an operator
        # cancelled the task (check_cancelled).
        self.cancel_check = None

    def progress_fields(self):
        fields = {'progress_current': self.current,
                  'progress_at': time.time()}
        if self.total is not None:
            fields['progress_total'] = self.total
        if self.message is not None:
            fields['progress_message'] = self.message
        if self.metadata:
            fields['metadata'] = _metadata_json(self.metadata)
        return fields


def enter(ctx):
    _current.set(ctx)


def leave(task_id=None):
    ctx = _current.get()
    if ctx is not None and (task_id is None or ctx.task_id == task_id):
        _current.set(None)
        with _held_lock:
            _held.discard(ctx)
    return ctx


def current():
    return _current.get()


def current_task_id():
    """The id of the task being run here, or None outside a task."""
    ctx = _current.get()
    return ctx.task_id if ctx is not None else None


def report_progress(current, total=None, message=None, **metadata):
    """Record how far the running task is: `current` of `total` items, an
    optional message, and free-form JSON-able metadata (merged across
    calls).  Cheap enough per item: Redis is written at most every
    [journal] progress_interval seconds, and always when current reaches
    total; the last report is written with the task's outcome in any case.
    Returns False (and does nothing) outside a running task.  A Redis
    failure never breaks the task: the report is kept for the next write.
    Raises TaskCanceled when an operator cancelled the task
    (check_cancelled).
    """
    ctx = _current.get()
    if ctx is None:
        return False
    if ctx.cancel_check is not None and ctx.cancel_check():
        raise _canceled()
    if not isinstance(current, numbers.Real) or isinstance(current, bool):
        raise TypeError('report_progress: current must be a number, got %r'
                        % (current,))
    if total is not None and (not isinstance(total, numbers.Real)
                              or isinstance(total, bool)):
        raise TypeError('report_progress: total must be a number or None, '
                        'got %r' % (total,))
    ctx.current, ctx.total = current, total
    if message is not None:
        ctx.message = str(message)[:MESSAGE_MAX_CHARS]
    if metadata:
        ctx.metadata.update(metadata)
    ctx.dirty = True
    if not ctx.record:
        return True
    now = time.monotonic()
    finished = total is not None and current >= total
    if ctx.last_write is None or finished or \
            now - ctx.last_write >= ctx.interval:
        _write(ctx, now)
    else:
        _hold(ctx)
    return True


def _hold(ctx):
    global _flusher_pid
    with _held_lock:
        _held.add(ctx)
        if _flusher_pid != os.getpid():   # none yet, or we were forked
            _flusher_pid = os.getpid()
            threading.Thread(target=_flush_held, name='progress-flusher',
                             daemon=True).start()


def _flush_held():
    while True:
        with _held_lock:
            waiting = list(_held)
        now = time.monotonic()
        pause = 0.5
        for ctx in waiting:
            due = (ctx.last_write or 0) + ctx.interval
            if ctx.dirty and now >= due:
                _write(ctx, now)
            if not ctx.dirty:
                with _held_lock:
                    _held.discard(ctx)
            else:
                pause = min(pause, max(0.01, due - now))
        time.sleep(pause)


def _write(ctx, now):
    try:
        ctx.storage.conn.hset(ctx.storage.keys.task(ctx.task_id),
                              mapping={k: _text(v) for k, v in
                                       ctx.progress_fields().items()})
    except redis.exceptions.RedisError as exc:
        log.debug('progress of %s not written (%s); kept for the next write',
                  ctx.task_id, exc)
        return
    ctx.last_write = now
    ctx.dirty = False


def current_delivery():
    """How many times the running task's message has been delivered in its
    current attempt: 1 normally, more after a worker died holding it.  None
    outside a task.  One Redis read the first time, then cached."""
    ctx = _current.get()
    if ctx is None:
        return None
    if ctx.delivery is None:
        running = context.current_task()
        if running is not None and running.id == ctx.task_id:
            ctx.delivery = context.delivery_count()  # the worker knows it
        else:
            value = ctx.storage.conn.hget(ctx.storage.keys.deliveries,
                                          ctx.task_id)
            ctx.delivery = int(value) if value is not None else 1
    return ctx.delivery


def sensitive(task=None, *, kwargs=None):
    """Mark a task's arguments sensitive: the journal then never stores or
    shows them.  On top of @huey.task (or give the task the setting
    directly: @huey.task(sensitive_args=True)):

        @sensitive
        @huey.task()
        def login(user, password): ...

        @sensitive(kwargs=('password',))     # only these keyword arguments
        @huey.task()
        def fetch(url, password=None): ...
    """
    def mark(wrapper):
        target = getattr(wrapper, 'task_class', wrapper)
        target.sensitive_args = tuple(kwargs) if kwargs else True
        return wrapper
    return mark(task) if task is not None else mark


def sensitivity(task):
    """True (all arguments hidden), a tuple of hidden keyword names, or
    False."""
    value = getattr(task, 'sensitive_args', False)
    if isinstance(value, str):
        return (value,)
    if isinstance(value, (list, tuple, set, frozenset)):
        return tuple(value)
    return bool(value)


def _metadata_json(metadata):
    text = json.dumps(metadata, default=repr, sort_keys=True)
    if len(text) > METADATA_MAX_BYTES:
        text = json.dumps({'_truncated': True, '_size': len(text)})
    return text


def _text(value):
    if isinstance(value, float):
        return repr(value)
    return str(value)
