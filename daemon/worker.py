"""One worker: takes a message, runs it with Huey, acknowledges it.

The round trips of one task:
 1. BRPOPLPUSH: the message moves into this worker's in-flight list (with
    tasks of a priority waiting, the storage's TAKE script instead, which
    moves the best one: SuiteStorage, "Priorities").
 2. One MULTI/EXEC: hooks' staged writes (journal: running), the delivery
    count, and Huey's revocation keys read ahead of Huey asking for them.
 3. One script after the task (delivery.ACK_IF_HELD): the ack (the
    message leaves the in-flight list) and, only if the message was still
    there, the outcome Huey writes (result, retry, on_complete) and hooks'
    writes (journal: final state).  A message a peer took back meanwhile
    (this consumer presumed dead) gets no outcome from this run: the fence
    costs no round trip of its own.  The ack never goes before the
    outcome; if Redis is down the worker keeps retrying, and if it dies
    first the message is still in flight and runs again.
While the consumer runs on, the next task's BRPOPLPUSH (1) goes in the same
write as (3), so a task costs two round trips (huey's own consumer makes
four); the worker keeps one connection of its own for them (see
SuiteStorage.pin_connection and flush_and_prefetch, and docs/benchmarks.md
for what each step cost).
"""
import contextlib
import ctypes
import datetime
import hashlib
import logging
import multiprocessing
import os
import select
import signal
import threading
import time

import redis
from huey import signals as S
from huey.api import PeriodicTask
from huey.exceptions import HueyException, TaskTimeout
from huey.utils import Error

from . import context, delivery, hooks, logs, progress, redisconn, \
    transaction
from .storage import message_data
from .app import hostname
from .journal import counters
from .devredis import dies_with_this_process
from .tasks.runtime import TaskRejected

log = logging.getLogger('huey_worker.worker')
task_log = logging.getLogger('huey_worker.task')

# KEYS: the deliveries hash.  ARGV: task id.  Takes back one delivery
# count; the field goes at 0 (no entry outlives the messages in flight).
UNCOUNT_DELIVERY = """
if redis.call('HINCRBY', KEYS[1], ARGV[1], -1) <= 0 then
  redis.call('HDEL', KEYS[1], ARGV[1])
end
return 1
"""


def _attempt_of(task):
    """The `extra` of a task's log line: its attempt (the journal's count
    of runs, this one included) when the journal told it."""
    attempt = getattr(task, 'hw_attempt', None)
    return {'attempt': attempt} if attempt is not None else None

# The last Huey signal seen in this thread names a delivery's outcome.
_SIGNAL_STATE = {
    S.SIGNAL_COMPLETE: 'complete', S.SIGNAL_ERROR: 'failed',
    S.SIGNAL_RETRYING: 'retrying', S.SIGNAL_REVOKED: 'revoked',
    S.SIGNAL_EXPIRED: 'expired', S.SIGNAL_CANCELED: 'canceled',
    S.SIGNAL_INTERRUPTED: 'interrupted', S.SIGNAL_LOCKED: 'failed',
    S.SIGNAL_TIMEOUT: 'failed',  # RETRYING follows it when retries remain
    S.SIGNAL_SCHEDULED: 'scheduled',
}
_outcome = threading.local()
_receivers_installed = set()


def _remember_signal(signal_name, task, *args, **kwargs):
    state = _SIGNAL_STATE.get(signal_name)
    if state is None:
        return
    # A retry with a delay is announced as retrying, then scheduled: it is
    # a retry all the same.
    if state == 'scheduled' and getattr(_outcome, 'state', None) == 'retrying':
        return
    _outcome.state = state


def install_outcome_receiver(app):
    if id(app) not in _receivers_installed:
        app._signal.connect(_remember_signal)
        _receivers_installed.add(id(app))


class ResultTooLarge(Exception):
    """A task's result, serialized, is over [consumer] max_result_bytes:
    the task fails with it rather than send Redis a write it may refuse
    (proto-max-bulk-len) or that would crowd its memory."""

    def __repr__(self):
        # The stored error result is repr(exception): keep it readable.
        return '%s: %s' % (type(self).__name__, self)


class OutcomeRefused(ResultTooLarge):
    """Redis refused the write of a task's outcome itself (an error reply
    for it, or the connection closed on it twice while Redis answered in
    between): the task fails with it; sending it again cannot help."""


def install_result_limit(app, limit):
    """Make `app.put_result` (Huey's, which stores a task's result or
    error) raise ResultTooLarge for a result over `limit` bytes once
    serialized; 0: no limit.  The worker turns that, as any exception
    from storing an outcome, into the task's failure."""
    if not limit or getattr(app, '_hw_result_limit', None) == limit:
        return

    def put_result(key, data):
        raw = app.serializer.serialize(data)
        if len(raw) > limit:
            raise ResultTooLarge(
                'the result is %d bytes serialized, more than [consumer] '
                'max_result_bytes (%d)' % (len(raw), limit))
        return app.storage.put_data(key, raw, is_result=True)
    app.put_result = put_result
    app._hw_result_limit = limit


def install_retry_jitter(app):
    """Draw the delay of each retry Huey schedules from retry_delay (which
    grows by retry_backoff after each retry) with jitter: uniformly
    between half that delay and the delay itself.  Tasks that failed
    together (a database restart) then come back spread out, not in one
    wave per retry, while a task still waits at least half of what its
    author asked for (full jitter, down to 0, would retry a task written
    to wait out a minute's rate limit within a second).  A delay or eta
    the task asked for itself (RetryTask, rate limits) is kept as it is."""
    if getattr(app, '_hw_retry_jitter', False):
        return
    requeue = app._requeue_task

    def requeue_with_jitter(task, timestamp, retry_eta=None):
        if retry_eta is None and task.retry_delay:
            half = task.retry_delay / 2.0
            retry_eta = timestamp + datetime.timedelta(
                seconds=half + redisconn.jitter(half))
            if task.retry_backoff:
                task.retry_delay *= task.retry_backoff
        return requeue(task, timestamp, retry_eta)
    app._requeue_task = requeue_with_jitter
    app._hw_retry_jitter = True


def _not_a_rejection(record):
    """Huey logs every exception of a task with its traceback at ERROR; a
    TaskRejected is an expected end, which the worker logs in one line."""
    return record.exc_info is None or \
        not isinstance(record.exc_info[1], TaskRejected)


def install_rejection_filter():
    # On Huey's logger itself, set to WARNING: its per-task INFO lines
    # are never made, so the filter sees failures only.
    huey_log = logging.getLogger('huey')
    if _not_a_rejection not in huey_log.filters:
        huey_log.addFilter(_not_a_rejection)


# Task ids as the slot holds them: the status endpoint accepts ids of up to
# 200 characters, and the consumer looks cancel marks up by this id.
TASK_ID_BYTES = 208
# Seconds an idle worker of a paused queue sleeps between looks at the
# pause flag (the consumer sets it: Consumer._read_operator_keys).
PAUSE_POLL = 0.25


def _slot_id(task_id):
    return task_id.encode()[:TASK_ID_BYTES - 1]


class Slot(ctypes.Structure):
    """What the consumer and the status endpoint see of one worker; shared
    memory, so it works for process workers too."""
    _fields_ = [('pid', ctypes.c_int), ('busy', ctypes.c_int),
                ('tick', ctypes.c_double), ('task_started', ctypes.c_double),
                ('task_timeout', ctypes.c_double),
                ('done', ctypes.c_ulonglong), ('failed', ctypes.c_ulonglong),
                ('task_id', ctypes.c_char * TASK_ID_BYTES),
                ('task_name', ctypes.c_char * 160),
                # Written by the consumer: the id of a task an operator
                # cancelled that runs here (the worker compares it with
                # its own task's id, so a stale one stops nothing).
                ('cancel_id', ctypes.c_char * TASK_ID_BYTES)]


class StopFlag:
    """A flag that works across threads and forked processes alike: a word
    of shared memory to look at (workers look before every message, so no
    system call), and a pipe to sleep on.  Neither can be left locked by a
    dead process."""

    def __init__(self):
        self._r, self._w = os.pipe()
        self._raised = multiprocessing.RawValue(ctypes.c_int, 0)

    def set(self):
        if not self._raised.value:
            self._raised.value = 1
            os.write(self._w, b'x')

    def is_set(self):
        return bool(self._raised.value)

    def wait(self, timeout):
        if self._raised.value:
            return True
        try:
            ready, _, _ = select.select([self._r], [], [], max(0, timeout))
        except InterruptedError:
            return self.is_set()
        return bool(ready)

    def close(self):
        for fd in (self._r, self._w):
            try:
                os.close(fd)
            except OSError:
                pass


class WorkerRecycle(Exception):
    pass


class WorkerInterrupt(KeyboardInterrupt):
    """Raised in a thread worker's task body by the consumer stopping past
    shutdown_timeout (the thread counterpart of a process worker's
    SIGTERM): the task goes back to the queue."""


class TaskCanceled(WorkerInterrupt):
    """Raised inside a task an operator cancelled (huey-worker cancel,
    POST /tasks/<id>/cancel): at its next report_progress() or
    check_cancelled(), by a process worker's SIGTERM, or in a thread
    worker's thread after a grace.  A KeyboardInterrupt, as the worker's
    own interrupts are, so `except Exception` in a task does not swallow
    it and Huey neither retries the task nor stores an error: the task
    ends `canceled`.  Clean up in `finally` (or `with`) blocks and let it
    through.  Public as huey_worker.TaskCanceled."""

    def __init__(self, *args):
        super().__init__(*(args or ('cancelled by an operator',)))


class _CanceledExit(Exception):
    """A process worker whose task was cancelled by SIGTERM ends: the
    consumer starts a fresh one in its place."""


class _Abandoned(BaseException):
    """The consumer abandoned this thread's task (over its time limit and
    the grace after it): whatever the body did, this delivery writes
    nothing.  No Exception, so Huey's execute lets it through untouched."""


def _timeout_class(seconds):
    """A TaskTimeout class whose instances say `seconds`: an exception
    raised in another thread is given as a class (instantiated there
    without arguments)."""
    message = 'timed out after %ss (raised in its thread)' % seconds

    class TaskTimeoutInThread(TaskTimeout):
        def __init__(self, *args):
            super().__init__(*(args or (message,)))
    # The journal and Huey's stored error name the type: the same as
    # process workers' and Huey's own.
    TaskTimeoutInThread.__name__ = TaskTimeoutInThread.__qualname__ = \
        'TaskTimeout'
    return TaskTimeoutInThread


def _raise_in_thread(thread_id, exc_class):
    """Have `exc_class` raised in the thread `thread_id` at its next
    bytecode boundary (CPython's PyThreadState_SetAsyncExc; a thread in a
    C call, time.sleep or a blocking read included, gets it only once the
    call returns).  `exc_class` None withdraws one not yet raised.
    Returns whether the thread was found."""
    found = ctypes.pythonapi.PyThreadState_SetAsyncExc(
        ctypes.c_ulong(thread_id),
        None if exc_class is None else ctypes.py_object(exc_class))
    return found == 1


class AlarmTimeout:
    """A hard time limit for process workers (SIGALRM in the worker).  The
    process is a worker for good, so its SIGALRM handler stays installed
    and a task only arms and disarms the timer (two system calls per task
    instead of four); it is put back if a task replaced it."""

    def __init__(self):
        self.seconds = 0

    def _expire(self, signum, frame):
        raise TaskTimeout('timed out after %ss' % self.seconds)

    def __call__(self, seconds):
        self.seconds = seconds
        if signal.getsignal(signal.SIGALRM) != self._expire:
            signal.signal(signal.SIGALRM, self._expire)
        return self

    def __enter__(self):
        signal.setitimer(signal.ITIMER_REAL, self.seconds)

    def __exit__(self, *exc):
        signal.setitimer(signal.ITIMER_REAL, 0)
        return False


class Worker:
    def __init__(self, app, cfg, index, slot, stop_flag, identity,
                 in_process, incarnation, settle=None, paused=None):
        self.app, self.cfg, self.index = app, cfg, index
        # Shared memory the consumer sets while the queue is paused (a
        # multiprocessing.RawValue; None: never paused): looked at before
        # each queue read, no system call.
        self.paused = paused
        self.slot, self.stop_flag, self.identity = slot, stop_flag, identity
        self.incarnation = incarnation
        self.in_process = in_process
        # Exceptions can be raised in a real thread's task body only
        # (greenlets share one thread; process workers get signals).
        self.in_thread = not in_process and \
            cfg.consumer.worker_type == 'thread'
        self.name = 'Worker-%d' % index
        self.task_count = 0
        self._redis_down_since = None
        self._retry = redisconn.Backoff(0.1, cfg.redis.retry_max_delay)
        self._in_body = False
        # What the consumer's thread may do to this worker's task body
        # (raise in it, fence it off) it does holding _guard, and only
        # while _in_body: never in the worker's own writes.
        self._guard = threading.Lock()
        self._thread_id = None
        self._body_started = 0.0
        self._limit = 0.0
        self._raised = None         # what was raised in this body, when
        self._stop_tasks = False    # stopping: start no task body
        self._current = None        # (raw, task) of the running delivery
        self._progress = None
        self.abandoned = False
        # (raw, task, seconds): the delivery a predecessor on this slot
        # was abandoned in; this worker records its time-out first.
        self.settle = settle
        self._interrupted = False
        self._canceled = False      # this body ended by TaskCanceled
        self._cancel_token = None   # _slot_id of the running task
        self._exit_after_cancel = False
        self._rejected = None
        self._reopen_logs = False
        self.recycled = False
        # A new worker may inherit its in-flight list from a predecessor
        # that died while Redis was unreachable: look there first.
        self._orphan_check = True
        self._master_changes = redisconn.master_changes()
        # Read once: the hot path runs per task, and the configuration of a
        # running worker never changes (a reload starts new workers).
        self.read_timeout = cfg.consumer.read_timeout
        self.max_tasks = cfg.consumer.max_tasks
        self.default_timeout = cfg.tasks.timeout
        self.max_deliveries = cfg.delivery.max_deliveries
        self.max_result_bytes = cfg.consumer.max_result_bytes
        self.log_start = cfg.logging.task_events == 'both'
        self.log_end = cfg.logging.task_events != 'none'
        # Here, in the consumer's main thread: process workers inherit it.
        install_rejection_filter()
        # Made here, in the consumer just before the fork, so it holds the
        # consumer's pid: the child compares its parent with it (run()).
        self._die_with_consumer = \
            dies_with_this_process(signal.SIGKILL) if in_process else None

    # -- lifecycle (initialize / loop / shutdown, as in Huey) --------------

    def run(self):
        if self.in_process:
            # First thing in the child: a worker must not outlive its
            # consumer (kill -9, OOM killer), or it goes on taking tasks
            # while the next consumer puts back the ones it is running, and
            # they run twice.  SIGKILL, not SIGTERM: the orphan must not
            # finish and ack its task in a race with that recovery (the
            # at-least-once design runs it again).  A consumer that died
            # between the fork and this is noticed too (the child exits).
            self._die_with_consumer()
            self._init_child()
        self.storage = self.app.storage
        self.storage.pin_connection()
        self.keys = self.storage.keys
        self.inflight_key = self.keys.inflight(self.identity, self.index,
                                               self.incarnation)
        self.delivery = delivery.Delivery(self.storage, self.app)
        self.worker_info = {'host': hostname(), 'pid': os.getpid(),
                            'consumer': self.identity, 'worker': self.index}
        install_outcome_receiver(self.app)
        install_result_limit(self.app, self.max_result_bytes)
        install_retry_jitter(self.app)
        if self.cfg.consumer.worker_type == 'greenlet':
            self.app._timeout_handler = _greenlet_timeout
        self._thread_id = threading.get_ident()
        self.slot.pid = os.getpid()
        try:
            self.initialize()
            if self.settle is not None:
                self._settle_abandoned(*self.settle)
                self.settle = None
            # A queue read sent with the last ack is answered before
            # stopping (the connection must be clear), but a message it
            # took is not run: loop() puts it back.
            while not self.stop_flag.is_set() or \
                    self.storage.prefetch_pending():
                self.loop()
                if self.abandoned:
                    break
        except WorkerRecycle:
            self.recycled = True
            log.info('%s recycled after %d tasks', self.name, self.task_count)
        except _CanceledExit:
            self.recycled = True
            log.info('%s (pid %d) ends after its task was cancelled; a new '
                     'worker takes its place', self.name, os.getpid())
        except KeyboardInterrupt:
            pass
        finally:
            if not self.abandoned:
                # The slot belongs to this worker's replacement otherwise.
                self.slot.busy = 0
            # What this worker's outcomes summed for /metrics (its
            # process's sender sends every second; a process worker ends
            # right after this).
            counters.SHARED.flush()
            self.storage.unpin_connection()
            self.shutdown()

    def initialize(self):
        for name, hook in self.app._startup.items():
            try:
                hook()
            except Exception:
                log.exception('startup hook %r failed', name)

    def shutdown(self):
        for name, hook in self.app._shutdown.items():
            try:
                hook()
            except Exception:
                log.exception('shutdown hook %r failed', name)

    def loop(self):
        self.slot.tick = time.monotonic()
        if self._reopen_logs:
            self._reopen_logs = False
            logs.reopen()
        if self._orphan_check and not self._requeue_orphan():
            return
        paused = self.paused
        if paused is not None and paused.value and \
                not self.storage.prefetch_pending():
            # The queue is paused: no queue read until it is resumed.
            self.stop_flag.wait(PAUSE_POLL)
            return
        try:
            raw = self.storage.dequeue_into(self.inflight_key,
                                            self.read_timeout)
        except redis.exceptions.RedisError as exc:
            if redisconn.unavailable(exc):
                # The move may have happened with its reply lost: look in
                # our in-flight list once Redis answers again.
                self._orphan_check = True
                self._redis_failed(exc)
                return
            if not isinstance(exc, redis.exceptions.ResponseError):
                raise
            log.error('%s: Redis refused the queue read: %s', self.name, exc)
            self.stop_flag.wait(self._retry.next())
            return
        self._redis_ok()
        changes = redisconn.master_changes()
        if changes != self._master_changes:
            # A failover since the last read: an ack this worker sent to
            # the old primary (demoted alive, it drops what it took since
            # the promotion) may be lost, its message still in our
            # in-flight list on the new one, where nobody would put it
            # back while we live.  What this read took goes back too:
            # then the whole list (the next loop), to run again.
            self._master_changes = changes
            self._orphan_check = True
            if raw is not None:
                self._put_back_untaken(raw, 'Redis failed over')
            return
        if raw is None:
            return
        if self.stop_flag.is_set() or (paused is not None and paused.value):
            # A read sent before stopping (or the pause) began (a prefetch
            # with the last ack, or an idle worker's blocking read) that
            # took a message since: the message goes back untouched, not
            # run.
            self._put_back_untaken(raw, 'stopping' if self.stop_flag.is_set()
                                   else 'the queue is paused')
            return
        self.handle(raw)
        if self._exit_after_cancel:
            raise _CanceledExit()
        if self.max_tasks and self.task_count >= self.max_tasks:
            raise WorkerRecycle()

    def _put_back_untaken(self, raw, why='stopping'):
        """Put `raw`, taken by a queue read that was answered after
        stopping (or a pause) began, back where it was in the queue: no
        delivery counted, no journal event (it never started).  If Redis
        does not take the write before we stop, the message stays in our
        in-flight list, which the consumer puts back once every worker's
        read is over (or its next start does).  The message of a task an
        operator cancelled meanwhile is dropped and the task recorded
        canceled."""
        storage = self.storage
        storage.discard_pending()
        storage.stage_put_back(self.inflight_key, raw)
        try:
            reply = self._with_redis(storage.flush)
        except (_Stopped, redis.exceptions.RedisError) as exc:
            storage.discard_pending()
            log.warning('%s: a message its last queue read took (%s) '
                        'stays in flight for the consumer to put back (%s)',
                        self.name, why, 'Redis unavailable until the stop'
                        if isinstance(exc, _Stopped) else exc)
            return
        if reply == 0:
            self.delivery.record_canceled([raw])
            return
        log.info('%s: %s; a message its last queue read took went back to '
                 'the queue unstarted', self.name, why)

    def _requeue_orphan(self):
        """Put back a message moved into our in-flight list by a queue read
        whose reply was lost; safe because this idle worker owns the list."""
        try:
            moved = self.delivery.requeue_list(self.inflight_key, 'lost')
        except redis.exceptions.RedisError as exc:
            # A refusal other than a Redis state (unavailable()) repeats
            # too: waiting with backoff is all that is left either way.
            self._redis_failed(exc)
            return False
        self._orphan_check = False
        if moved:
            log.warning('%s: %d message(s) taken during a Redis failure put '
                        'back in the queue', self.name, moved)
        return True

    # -- one message -------------------------------------------------------

    def task_name(self, task):
        """The registered name (module.function), as producers know it."""
        return self.app._registry.task_to_string(type(task))

    def handle(self, raw):
        storage, app = self.storage, self.app
        try:
            task = app.deserialize_task(message_data(raw))
        except Exception as exc:
            self._dead_letter(raw, exc)
            return
        if task.timeout is None and self.default_timeout:
            task.timeout = self.default_timeout
        self.task_count += 1

        hooks.call(hooks.on_dequeued, storage, task, self.worker_info)
        revoke_keys = app._revoke_keys(task)
        # The task's cancel mark rides the same read (a message put back
        # before its cancel reached a put-back script: it ends here).
        try:
            # The in-flight list too: a message a peer took back while
            # this consumer could not reach Redis (cut off, paused past
            # recovery_timeout) is no longer ours to run.
            results = self._with_redis(lambda: storage.flush_all(
                ('LRANGE', self.inflight_key, 0, -1),
                ('HINCRBY', self.keys.deliveries, task.id, 1),
                ('MGET', *[storage.result_key(k) for k in revoke_keys],
                 self.keys.cancel(task.id)),
                # durable_writes: the ack's WAIT covers this write too.
                durable=False))
        except _Stopped:
            return
        deliveries, revoke_values = results[-2], results[-1]
        if raw not in (results[-3] or ()):
            self._not_ours(task)
            return
        canceled = revoke_values[-1]
        hooks.call(hooks.on_started, storage, task, results)
        if deliveries > self.max_deliveries:
            self._poison(raw, task, deliveries)
            return
        if canceled is not None:
            self._cancel_unstarted(raw, task)
            return
        storage.prime(dict(zip(revoke_keys, revoke_values)))

        self._start(task)
        context.set_current(task, deliveries, self.worker_info)
        self._current = (raw, task)
        try:
            state, duration = self._run(task)
        finally:
            context.clear_current()
        if state == 'abandoned':
            # The consumer recorded the time-out; a replacement worker
            # holds this slot.  Nothing of this delivery is written.
            self.storage.discard_pending()
            log.warning('%s (abandoned): %s %s ended after %.1fs; its '
                        'outcome is not recorded (it timed out)', self.name,
                        self._name, task.id, duration)
            return
        self._current = None
        self._finish(raw, task, state, duration)

    def _not_ours(self, task):
        """The message left this worker's in-flight list before its run
        began: a peer recovered it and runs it.  Its delivery is not
        counted (the count goes when it reaches 0: the peer's ack may
        have removed it already), nothing else is written."""
        self.storage.discard_pending()
        try:
            self._with_redis(lambda: self.storage.conn.eval(
                UNCOUNT_DELIVERY, 1, self.keys.deliveries, task.id))
        except _Stopped:
            pass
        log.warning('%s: %s %s was put back by a peer before it started '
                    'here (this consumer was presumed dead): not run',
                    self.name, self.task_name(task), task.id)

    def _start(self, task):
        slot = self.slot
        name = self._name = self.task_name(task)
        # A cancel passed on for an earlier run of the same id (a retry of
        # a cancelled task) is not this run's: the consumer passes a new
        # one on only once this slot shows busy.
        slot.cancel_id = b''
        slot.task_id = self._cancel_token = _slot_id(task.id)
        slot.task_name = name.encode()[:159]
        slot.task_started = time.monotonic()
        slot.task_timeout = float(task.timeout or 0)
        slot.busy = 1
        if self.log_start:
            task_log.info('start %s %s', name, task.id,
                          extra=_attempt_of(task))

    def _run(self, task):
        storage = self.storage
        body = task.execute

        def run_body():
            # Writes made by the task itself (progress, its own keys) go out
            # at once; only what Huey writes after the body is held back.
            storage.deferring = False
            if storage.has_pending():
                self._with_redis(storage.flush)
            try:
                self._enter_body(task)
                return body()
            except TaskCanceled:
                # An operator cancelled it (daemon/actions/cancel.py).
                self._canceled = True
                raise
            except KeyboardInterrupt:
                self._interrupted = True
                raise
            except TaskRejected as exc:
                # Retrying cannot help; _finish logs the reason.
                task.retries = 0
                self._rejected = exc
                raise
            finally:
                storage.deferring = True
                if self._leave_body():
                    raise _Abandoned()
        task.execute = run_body

        _outcome.state = None
        self._interrupted = self._canceled = False
        started = time.monotonic()
        storage.deferring = True
        # A delayed or retrying task keeps its priority in the schedule.
        priority = task.priority
        if priority:
            storage.task_priority = priority
        try:
            self.app.execute(task)
            state = _outcome.state or 'complete'
        except _Abandoned:
            state = 'abandoned'
        except KeyboardInterrupt:
            state = 'interrupted'
        except Exception as exc:
            # Only the outcome's own failures escape Huey.execute: the body
            # is over.  Redis gone meanwhile: the outcome may be half
            # written, so the task runs again rather than be lost.
            if redisconn.unavailable(exc):
                log.warning('%s: could not record the outcome of %s %s '
                            '(Redis %s: %s); it goes back to the queue',
                            self.name, self.task_name(task), task.id,
                            redisconn.outage_word(exc), exc)
                state = 'error'
            else:
                # Anything else (a result pickle cannot serialize, one over
                # max_result_bytes, a reply refusing a write) would fail
                # the same way in every run: the task's failure, once.
                log.error('%s: the outcome of %s %s cannot be stored; the '
                          'task fails (%s: %s)', self.name,
                          self.task_name(task), task.id, type(exc).__name__,
                          exc, exc_info=not isinstance(exc, ResultTooLarge))
                storage.discard_pending()   # Huey's half-staged outcome
                self._record_failure(task, exc)
                state = 'failed'
        finally:
            storage.deferring = False
            if priority:
                storage.task_priority = None
        if self._interrupted:
            state = 'interrupted'
        if self._canceled or (state == 'interrupted' and
                              self.cancel_requested()):
            state = 'canceled'
        # Again, out here: an exception raised in the body may have cut
        # run_body's own _leave_body short.
        if self._leave_body():
            state = 'abandoned'
        return state, time.monotonic() - started

    # -- the task body and the consumer's thread ---------------------------

    def _enter_body(self, task):
        with self._guard:
            self._in_body = True
            self._raised = None
            self._body_started = time.monotonic()
            self._limit = float(task.timeout or 0)
            ctx = self._progress = progress.current()
            if ctx is not None:
                ctx.cancel_check = self.cancel_requested
            stop = self._stop_tasks
            canceled = self.slot.cancel_id == self._cancel_token
        if canceled:
            # Cancelled between its queue read and here.
            raise TaskCanceled()
        if stop:
            # Stopping past shutdown_timeout: this body is not started.
            raise WorkerInterrupt()

    def _leave_body(self):
        """Mark the body over (the consumer's thread raises nothing in
        this thread from now on, and one it raised that has not gone off
        yet is withdrawn); returns whether the delivery was abandoned."""
        with self._guard:
            if self._in_body:
                self._in_body = False
                if self._raised is not None and self.in_thread:
                    _raise_in_thread(self._thread_id, None)
            return self.abandoned

    def in_body(self):
        """Whether a task body runs on this worker now."""
        return self._in_body

    def cancel_requested(self):
        """Whether the consumer passed on an operator's cancel of the task
        running here (Slot.cancel_id): what check_cancelled() asks."""
        token = self._cancel_token
        return token is not None and self.slot.cancel_id == token

    def force_cancel(self, token):
        """From the consumer's thread (thread workers), a cancel the task
        did not act on within the grace: TaskCanceled raised in its thread,
        where no check_cancelled() or report_progress() call came.  Only
        while the body of the task `token` (its Slot id) runs and nothing
        else was raised in it.  Returns whether it was raised."""
        with self._guard:
            if not (self.in_thread and self._in_body and
                    self._raised is None and self._cancel_token == token
                    and self.slot.cancel_id == token):
                return False
            self._raised = ('cancel', time.monotonic())
            _raise_in_thread(self._thread_id, TaskCanceled)
            return True

    def stop_task(self):
        """From the consumer's thread, stopping past shutdown_timeout: the
        task body running on this worker is interrupted (WorkerInterrupt
        raised in its thread, thread workers only) and no other starts.
        Returns whether a body was running."""
        with self._guard:
            self._stop_tasks = True
            if not self._in_body:
                return False
            if self.in_thread and self._raised is None:
                self._raised = ('interrupt', time.monotonic())
                _raise_in_thread(self._thread_id, WorkerInterrupt)
            return True

    def check_time_limit(self, now, grace):
        """From the consumer's thread (thread workers): enforce the time
        limit of the task body running here at monotonic time `now`.  Over
        its limit, TaskTimeout is raised in the thread: 'timeout'.  Still
        in the body `grace` seconds after that: the delivery is abandoned
        (fenced: it writes nothing more) and (raw message, task, seconds
        run) returned for a replacement worker to record.  None
        otherwise."""
        with self._guard:
            if not self._in_body or not self._limit or self.abandoned:
                return None
            if self._raised is None:
                if now - self._body_started < self._limit:
                    return None
                self._raised = ('timeout', now)
                _raise_in_thread(self._thread_id,
                                 _timeout_class(_seconds(self._limit)))
                return 'timeout'
            if self._raised[0] != 'timeout' or now - self._raised[1] < grace:
                return None
            return self._abandon(now)

    def abandon(self):
        """From the consumer's thread, stopping: fence off a task body that
        did not end when interrupted, so nothing it does later is written
        (its message goes back with the consumer's requeue).  Returns
        whether a body was running."""
        with self._guard:
            return self._in_body and bool(self._abandon(time.monotonic()))

    def _abandon(self, now):
        # Under _guard, in the body.
        self.abandoned = True
        ctx = self._progress
        if ctx is not None:
            # Its later progress reports stay in memory.
            ctx.record = False
            ctx.dirty = False
            with progress._held_lock:
                progress._held.discard(ctx)
        raw, task = self._current
        return raw, task, now - self._body_started

    def _record_failure(self, task, exc):
        """Stage what Huey records of a task that failed with `exc` (its
        error result) and tell the post-execute hooks (the journal) and
        signal receivers, for an outcome that could not be stored."""
        app = self.app
        deferring, self.storage.deferring = self.storage.deferring, True
        try:
            if app.results and not isinstance(task, PeriodicTask):
                try:
                    app.put_result(task.id, Error(
                        app.build_error_result(task, exc)))
                except Exception:
                    log.exception('%s: the error of %s cannot be stored '
                                  'either', self.name, task.id)
            app._run_post_execute(task, None, exc)
            app._emit(S.SIGNAL_ERROR, task, exc)
        finally:
            self.storage.deferring = deferring

    def _settle_abandoned(self, raw, task, duration):
        """Record the end of a delivery the consumer abandoned on this slot
        (its thread stuck in the task past time limit and grace): the task
        fails with TaskTimeout, as it would have if the exception raised
        in it had gone off, and its message leaves the in-flight list
        (ours: same slot, same incarnation).  Not retried, whatever its
        retries: its body may still be running, and a retry would run it
        twice at once.  The locks it holds are released (the moment its
        call returns, the TaskTimeout waiting in its thread goes off)."""
        from . import locks
        app, storage = self.app, self.storage
        name = self._name = self.task_name(task)
        exc = _timeout_class(_seconds(task.timeout or 0))(
            'timed out after %ss; abandoned %gs later, still running '
            '(stuck where no exception can get in: a C call or a blocking '
            'read without a timeout)' % (
                _seconds(task.timeout or 0),
                self.cfg.consumer.timeout_grace))
        task.retries = 0
        storage.discard_pending()
        storage.deferring = True
        try:
            if app.results and not isinstance(task, PeriodicTask):
                try:
                    app.put_result(task.id, Error(
                        app.build_error_result(task, exc)))
                except Exception:
                    log.exception('%s: the error of %s cannot be stored',
                                  self.name, task.id)
            app._run_post_execute(task, None, exc)
            app._emit(S.SIGNAL_TIMEOUT, task)
        finally:
            storage.deferring = False
        locks.stage_release(storage, task.id)
        self._stage_ack(raw, task, 'failed', duration)
        refused = self._send_ack(raw)
        if refused is not None:
            # Left in flight, it would be put back and run again while
            # its body may still be running: acknowledged bare instead.
            storage.discard_pending()
            log.error('%s: Redis refused the time-out of %s (%s); '
                      'acknowledged without an outcome', self.name, task.id,
                      refused)
            storage.stage_command('LREM', self.inflight_key, 1, raw)
            storage.stage_command('HDEL', self.keys.deliveries, task.id)
            if self._send_ack(raw) is not None:
                storage.discard_pending()
                log.error('%s: %s stays in flight', self.name, task.id)
            return
        self.slot.failed += 1
        task_log.warning('end %s %s failed %.3fs (TaskTimeout: %s)', name,
                         task.id, duration, exc)

    def _stage_ack(self, raw, task, state, duration):
        storage = self.storage
        storage.stage_command('LREM', self.inflight_key, 1, raw)
        storage.stage_command('HDEL', self.keys.deliveries, task.id)
        if state == 'canceled':
            # Its end is recorded: the marks have done their work (a retry
            # must not find them).
            storage.stage_command(
                'DEL', self.keys.cancel(task.id), self.keys.cancel_message(
                    hashlib.sha1(raw).hexdigest()))
        hooks.call(hooks.on_outcome, storage, task, state, duration)

    def _cancel_unstarted(self, raw, task):
        """`task`, just taken, was cancelled by an operator (its cancel
        mark was read with the delivery count): it ends canceled without
        its body running."""
        self._name = self.task_name(task)
        self._stage_ack(raw, task, 'canceled', 0.0)
        if self._send_ack(raw) is not None:
            self.storage.discard_pending()
            log.error('%s: Redis refused the end of cancelled %s; it stays '
                      'in flight', self.name, task.id)
            return
        self.slot.done += 1
        if self.log_end:
            task_log.info('end %s %s canceled 0.000s (cancelled before it '
                          'started)', self._name, task.id)

    def _finish(self, raw, task, state, duration):
        storage, slot = self.storage, self.slot
        slot.busy = 0
        rejected, self._rejected = self._rejected, None
        if state in ('interrupted', 'error') and self.cancel_requested():
            state = 'canceled'   # stopping too: the cancel wins
        putting_back = state in ('interrupted', 'error')
        if putting_back:
            storage.discard_pending()
            storage.stage_put_back(self.inflight_key, raw)
            hooks.call(hooks.on_requeued, storage, [message_data(raw)],
                       'interrupted')
        else:
            self._stage_ack(raw, task, state, duration)
        paused = self.paused
        prefetch = not putting_back and not self.stop_flag.is_set() and \
            not (self.max_tasks and self.task_count >= self.max_tasks) and \
            not (paused is not None and paused.value) and \
            not self._exit_after_cancel
        try:
            # Fencing: a peer that presumed this consumer dead (paused,
            # cut off) put the message back and another run owns the task
            # now; this run's outcome must not land over that one's.  The
            # ack's own script checks (no round trip of its own); an
            # outcome that holds a script is checked first instead.
            if not putting_back and not self._guard_ack(raw) and \
                    not self._with_redis(
                        lambda: storage.watch_in_flight(self.inflight_key,
                                                        raw),
                        give_up_on_stop=False):
                refused = _FENCED
            else:
                refused = self._ack(raw, prefetch)
            if isinstance(refused, redis.exceptions.WatchError) or \
                    refused is _FENCED or delivery.fenced(refused):
                storage.discard_pending()
                # Our list here is not what this worker thought it held:
                # after a failover it can still hold a message whose ack
                # the old primary took and lost; put back what it holds.
                self._orphan_check = True
                log.warning('%s: %s %s was put back by a peer while it ran '
                            'here (this consumer was presumed dead): its '
                            'outcome (%s) is fenced, not written', self.name,
                            self._name, task.id, state)
                return
            if refused is not None:
                state = self._outcome_refused(raw, task, state, duration,
                                              refused)
        except _Stopped:
            return
        if state == 'failed':
            slot.failed += 1
        elif state in ('complete', 'retrying', 'revoked', 'expired',
                       'canceled', 'scheduled'):
            slot.done += 1
        if rejected is not None and state == 'failed':
            # Whatever [logging] task_events says: it stands for the
            # traceback Huey would have logged.
            task_log.warning('end %s %s %s %.3fs (rejected, not retried: '
                             '%s: %s)', self._name, task.id, state, duration,
                             type(rejected).__name__, rejected,
                             extra=_attempt_of(task))
        elif self.log_end:
            task_log.info('end %s %s %s %.3fs', self._name, task.id, state,
                          duration, extra=_attempt_of(task))

    def _guard_ack(self, raw):
        """Make the staged ack of `raw` (_stage_ack's, with the outcome)
        one delivery.ACK_IF_HELD call, which writes nothing if a peer
        took the message back.  False, leaving the commands as they are
        sent (callables made commands), when one of them is a script."""
        pending = self.storage._pending()
        guarded = delivery.guarded_ack(self.inflight_key, raw, pending)
        if guarded is None and any(type(c) is not tuple for c in pending):
            pipe = self.storage._record(pending)
            pending[:] = transaction.as_sent(pipe, pipe.command_stack)
            guarded = delivery.guarded_ack(self.inflight_key, raw, pending)
        if guarded is None:
            return False
        pending[:] = [guarded]
        return True

    def _ack(self, raw, prefetch):
        """Send the outcome and the ack of `raw`; with `prefetch`, the next
        queue read goes in the same write (one round trip less per task).
        If that fails, the read may have moved a message into our in-flight
        list with its reply lost: it is looked for there once Redis
        answers, and the ack is retried alone (_send_ack).  Returns None,
        or the error with which Redis refuses this write itself."""
        storage = self.storage
        error = None
        if prefetch:
            try:
                storage.flush_and_prefetch(self.inflight_key,
                                           self.read_timeout)
                self._redis_ok()
                return None
            except redis.exceptions.RedisError as exc:
                self._orphan_check = True
                error = exc
            except BaseException:
                self._orphan_check = True
                raise
        return self._send_ack(raw, error)

    def _send_ack(self, raw, error=None):
        """Send what is staged, a write that takes `raw` out of our
        in-flight list, until it went through: Redis unreachable or
        unavailable is waited out (never given up, not even on stop: the
        outcome is written before the message is let go).  `error`: how
        a first attempt failed.  Returns None once sent, or the error with
        which Redis refuses this write itself: an error reply that is no
        Redis state (redisconn.unavailable), or the connection dropped on
        it twice while Redis answered in between (a value over Redis's
        proto-max-bulk-len: Redis closes the connection on it).  The
        staged commands are kept then, for the caller to discard."""
        dropped = 0
        while True:
            if error is not None:
                if not redisconn.unavailable(error):
                    return error
                if redisconn.unreachable(error):
                    held = self._still_in_flight(raw)
                    if held is False:
                        # The write went through, its reply was lost.
                        self.storage.discard_pending()
                        self._redis_ok()
                        return None
                    if held:
                        dropped += 1
                        if dropped >= 2:
                            return error
                    else:
                        self._redis_failed(error)
                else:
                    self._redis_failed(error)
            try:
                self.storage.flush()
            except redis.exceptions.RedisError as exc:
                error = exc
                continue
            self._redis_ok()
            return None

    def _still_in_flight(self, raw):
        """Whether `raw` is still in our in-flight list (None: Redis does
        not answer).  On a connection of the pool: ours was dropped with
        the failed write.  The list holds one or two messages."""
        try:
            return raw in self.storage.conn.lrange(self.inflight_key, 0, -1)
        except redis.exceptions.RedisError:
            return None

    def _outcome_refused(self, raw, task, state, duration, error):
        """Redis refused the write of `task`'s outcome (still staged) with
        `error`: the task fails with OutcomeRefused instead, recorded in a
        small write.  Returns the state the delivery ended in."""
        storage = self.storage
        size = _staged_bytes(storage)
        storage.discard_pending()
        if state in ('interrupted', 'error'):
            # Only a put-back was staged: leave the message in flight; it
            # goes back with the next start of this consumer.
            log.error('%s: Redis refused to put %s back in the queue (%s); '
                      'it stays in flight', self.name, task.id, error)
            return state
        exc = OutcomeRefused(
            'Redis refused the write of the outcome (%s, %d bytes): %s; '
            'results over [consumer] max_result_bytes are refused before '
            'they reach Redis' % (state, size, error))
        log.error('%s: the outcome of %s %s cannot be stored; the task '
                  'fails (%s)', self.name, self._name, task.id, exc)
        self._record_failure(task, exc)
        self._stage_ack(raw, task, 'failed', duration)
        refused = self._send_ack(raw)
        if refused is not None:
            log.error('%s: even the failure of %s could not be stored (%s); '
                      'acknowledged without an outcome', self.name, task.id,
                      refused)
            storage.discard_pending()
            storage.stage_command('LREM', self.inflight_key, 1, raw)
            storage.stage_command('HDEL', self.keys.deliveries, task.id)
            if self._send_ack(raw) is not None:
                storage.discard_pending()
                log.error('%s: %s stays in flight', self.name, task.id)
        return 'failed'

    def _dead_letter(self, raw, exc):
        if isinstance(exc, HueyException) and 'not found' in str(exc):
            reason = 'unknown-task'
        elif isinstance(exc, ValueError) and ('ignature' in str(exc)
                                              or 'eparator' in str(exc)):
            reason = 'bad-signature'
        else:
            reason = 'undecodable'
        detail = '%s: %s' % (type(exc).__name__, exc)
        task_id = task_name = hint = None
        verified = True
        if reason == 'unknown-task':
            # The message itself is fine: keep its id and name so operators
            # can find it and requeue it once the task is deployed.
            try:
                message = self.app.serializer.deserialize(message_data(raw))
                task_id, task_name = message.id, message.name
            except Exception:
                pass
        if task_id is None:
            # Never unpickled again: the id is read off the bytes, so a
            # poller of the task sees it end.
            peeked = delivery.peek_message(message_data(raw))
            task_id, task_name = peeked.task_id, peeked.task_name
            verified = False
            if task_id is None:
                detail += '; the task id cannot be known: %s' % \
                    peeked.unknown
            if peeked.compressed and not self.app.serializer.comp:
                hint = ('the message is compressed and this consumer\'s '
                        '[huey] compression is off')
        log.error('%s: message set aside as dead letter (%s), task %s%s: %s%s',
                  self.name, reason, task_id or '(id unknown)',
                  '' if verified or task_id is None else ' (id unverified)',
                  detail, '; ' + hint if hint else '')
        record = delivery.dead_letter_record(raw, reason, detail,
                                             where=self.worker_info,
                                             task_name=task_name)
        record['task_id'] = task_id
        record['task_id_verified'] = verified if task_id else None
        if hint:
            record['hint'] = hint
        delivery.stage_dead_letter(self.storage, raw, record,
                                   self.inflight_key)
        self._send_dead_letter(raw)

    def _poison(self, raw, task, deliveries):
        detail = 'delivered %d times without an outcome (its worker died ' \
                 'each time); max_deliveries is %d' % (
                     deliveries - 1, self.cfg.delivery.max_deliveries)
        log.error('%s: %s %s is a poison message: %s', self.name,
                  self.task_name(task), task.id, detail)
        record = delivery.dead_letter_record(raw, 'poison', detail, task,
                                             self.worker_info,
                                             self.task_name(task))
        delivery.stage_dead_letter(self.storage, raw, record,
                                   self.inflight_key)
        self._send_dead_letter(raw)

    def _send_dead_letter(self, raw):
        refused = self._send_ack(raw)
        if refused is not None:
            # A record too large for Redis (it holds the message): the
            # message stays in flight, for the next start of this consumer.
            self.storage.discard_pending()
            log.error('%s: Redis refused the dead letter (%s); the message '
                      'stays in flight', self.name, refused)

    # -- Redis trouble -----------------------------------------------------

    def _with_redis(self, operation, give_up_on_stop=True):
        """Run `operation` until Redis answers: unreachable or unavailable
        (redisconn.unavailable) is waited out with backoff; any other
        Redis error is raised.  Staged commands survive a failed attempt,
        so a retry sends them again."""
        while True:
            try:
                result = operation()
            except redis.exceptions.RedisError as exc:
                if not redisconn.unavailable(exc):
                    raise
                self._redis_failed(exc)
                if give_up_on_stop and self.stop_flag.is_set():
                    raise _Stopped()
                continue
            self._redis_ok()
            return result

    def _redis_failed(self, exc):
        if self._redis_down_since is None:
            self._redis_down_since = time.monotonic()
            log.warning('%s: Redis %s (%s); retrying with backoff up to %gs',
                        self.name, redisconn.outage_word(exc),
                        redisconn.error_text(exc),
                        self.cfg.redis.retry_max_delay)
        self.slot.tick = time.monotonic()
        self.stop_flag.wait(self._retry.next())

    def _redis_ok(self):
        if self._redis_down_since is not None:
            log.warning('%s: Redis reachable again after %.1fs', self.name,
                        time.monotonic() - self._redis_down_since)
            self._redis_down_since = None
        self._retry.reset()

    # -- process workers ---------------------------------------------------

    def _init_child(self):
        import multiprocessing
        multiprocessing.current_process().name = self.name
        # Ctrl-C reaches the whole process group: the parent decides.
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        signal.signal(signal.SIGHUP, signal.SIG_IGN)
        signal.signal(signal.SIGTERM, self._on_interrupt)
        signal.signal(signal.SIGUSR1, self._on_reopen)
        os.environ.pop('NOTIFY_SOCKET', None)  # only the main process speaks
        self.app._timeout_handler = AlarmTimeout()

    def _on_interrupt(self, signum, frame):
        # SIGTERM for a cancel (the consumer wrote the task's id in the
        # slot first): TaskCanceled in the body, or before it starts
        # (_enter_body), and the process ends after that delivery.  One
        # that comes after its task ended stops nothing.
        token = self._cancel_token
        if self.slot.cancel_id and not self.stop_flag.is_set():
            if token is not None and self.slot.cancel_id == token and \
                    self._current is not None:
                self._exit_after_cancel = True
                if self._in_body:
                    raise TaskCanceled()
            return
        # The parent sends SIGTERM when shutdown_timeout has run out: a
        # task body running is cut short and put back in the queue (by
        # this worker, or by the consumer from the in-flight list), and
        # none starts after it (_enter_body).  Outside a body the stop
        # flag ends the worker once its queue read is answered: a read
        # cut short here would stay outstanding in Redis and could take
        # a message the consumer's requeue puts back.
        self._stop_tasks = True
        if self._in_body:
            raise KeyboardInterrupt

    def _on_reopen(self, signum, frame):
        self._reopen_logs = True


def _seconds(value):
    """A time limit as written: 2, not 2.0."""
    return int(value) if float(value).is_integer() else value


@contextlib.contextmanager
def _greenlet_timeout(seconds):
    # Huey's GreenletEnvironment.timeout: the time limit of greenlet
    # workers, which goes off where the task yields to gevent (I/O,
    # gevent.sleep), not in a loop that never yields.
    import gevent
    timer = gevent.Timeout(seconds, TaskTimeout(
        'timed out after %ss' % _seconds(seconds)))
    timer.start()
    try:
        yield
    finally:
        timer.cancel()


def _staged_bytes(storage):
    """Bytes in the commands staged on this thread (argument tuples; the
    scripts hooks stage are small), for error messages."""
    total = 0
    for command in getattr(storage._local, 'pending', None) or ():
        if type(command) is tuple:
            total += sum(len(a) for a in command
                         if isinstance(a, (bytes, str)))
    return total


# What _finish's guard answers for a delivery a peer took back.
_FENCED = object()


class _Stopped(Exception):
    """Redis stayed down until the consumer was told to stop."""
