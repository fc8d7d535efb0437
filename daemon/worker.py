"""One worker: takes a message, runs it with Huey, acknowledges it.

The round trips of one task:
 1. BRPOPLPUSH: the message moves into this worker's in-flight list (with
    tasks of a priority waiting, the storage's TAKE script instead, which
    moves the best one: SuiteStorage, "Priorities").
 2. One MULTI/EXEC: hooks' staged writes (journal: running), the delivery
    count, and Huey's revocation keys read ahead of Huey asking for them.
 3. One MULTI/EXEC after the task: the outcome Huey writes (result, retry,
    on_complete), hooks' writes (journal: final state) and the ack (the
    message leaves the in-flight list).  The ack never goes before the
    outcome; if Redis is down the worker keeps retrying, and if it dies
    first the message is still in flight and runs again.
While the consumer runs on, the next task's BRPOPLPUSH (1) goes in the same
write as (3), so a task costs two round trips (huey's own consumer makes
four); the worker keeps one connection of its own for them (see
SuiteStorage.pin_connection and flush_and_prefetch, and docs/benchmarks.md
for what each step cost).
"""
import ctypes
import datetime
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

from . import context, delivery, hooks, logs, redisconn
from .storage import message_data
from .app import hostname
from .devredis import dies_with_this_process
from .tasks.runtime import TaskRejected

log = logging.getLogger('huey_worker.worker')
task_log = logging.getLogger('huey_worker.task')

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


class Slot(ctypes.Structure):
    """What the consumer and the status endpoint see of one worker; shared
    memory, so it works for process workers too."""
    _fields_ = [('pid', ctypes.c_int), ('busy', ctypes.c_int),
                ('tick', ctypes.c_double), ('task_started', ctypes.c_double),
                ('task_timeout', ctypes.c_double),
                ('done', ctypes.c_ulonglong), ('failed', ctypes.c_ulonglong),
                ('task_id', ctypes.c_char * 40),
                ('task_name', ctypes.c_char * 160)]


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
                 in_process, incarnation):
        self.app, self.cfg, self.index = app, cfg, index
        self.slot, self.stop_flag, self.identity = slot, stop_flag, identity
        self.incarnation = incarnation
        self.in_process = in_process
        self.name = 'Worker-%d' % index
        self.task_count = 0
        self._redis_down_since = None
        self._retry = redisconn.Backoff(0.1, cfg.redis.retry_max_delay)
        self._in_body = False
        self._interrupted = False
        self._rejected = None
        self._reopen_logs = False
        self.recycled = False
        # A new worker may inherit its in-flight list from a predecessor
        # that died while Redis was unreachable: look there first.
        self._orphan_check = True
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
        self.delivery = delivery.Delivery(self.storage)
        self.worker_info = {'host': hostname(), 'pid': os.getpid(),
                            'consumer': self.identity, 'worker': self.index}
        install_outcome_receiver(self.app)
        install_result_limit(self.app, self.max_result_bytes)
        install_retry_jitter(self.app)
        self.slot.pid = os.getpid()
        try:
            self.initialize()
            # A queue read sent with the last ack is answered before
            # stopping: a message it took is run, like any other.
            while not self.stop_flag.is_set() or \
                    self.storage.prefetch_pending():
                self.loop()
        except WorkerRecycle:
            self.recycled = True
            log.info('%s recycled after %d tasks', self.name, self.task_count)
        except KeyboardInterrupt:
            pass
        finally:
            self.slot.busy = 0
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
        if raw is not None:
            self.handle(raw)
            if self.max_tasks and self.task_count >= self.max_tasks:
                raise WorkerRecycle()

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
        try:
            results = self._with_redis(lambda: storage.flush_all(
                ('HINCRBY', self.keys.deliveries, task.id, 1),
                ('MGET', *[storage.result_key(k) for k in revoke_keys])))
        except _Stopped:
            return
        deliveries, revoke_values = results[-2], results[-1]
        hooks.call(hooks.on_started, storage, task, results)
        if deliveries > self.max_deliveries:
            self._poison(raw, task, deliveries)
            return
        storage.prime(dict(zip(revoke_keys, revoke_values)))

        self._start(task)
        context.set_current(task, deliveries, self.worker_info)
        try:
            state, duration = self._run(task)
        finally:
            context.clear_current()
        self._finish(raw, task, state, duration)

    def _start(self, task):
        slot = self.slot
        name = self._name = self.task_name(task)
        slot.task_id = task.id.encode()[:39]
        slot.task_name = name.encode()[:159]
        slot.task_started = time.monotonic()
        slot.task_timeout = float(task.timeout or 0)
        slot.busy = 1
        if self.log_start:
            task_log.info('start %s %s', name, task.id)

    def _run(self, task):
        storage = self.storage
        body = task.execute

        def run_body():
            # Writes made by the task itself (progress, its own keys) go out
            # at once; only what Huey writes after the body is held back.
            storage.deferring = False
            if storage.has_pending():
                self._with_redis(storage.flush)
            self._in_body = True
            try:
                return body()
            except KeyboardInterrupt:
                self._interrupted = True
                raise
            except TaskRejected as exc:
                # Retrying cannot help; _finish logs the reason.
                task.retries = 0
                self._rejected = exc
                raise
            finally:
                self._in_body = False
                storage.deferring = True
        task.execute = run_body

        _outcome.state = None
        self._interrupted = False
        started = time.monotonic()
        storage.deferring = True
        # A delayed or retrying task keeps its priority in the schedule.
        priority = task.priority
        if priority:
            storage.task_priority = priority
        try:
            self.app.execute(task)
            state = _outcome.state or 'complete'
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
        return state, time.monotonic() - started

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

    def _stage_ack(self, raw, task, state, duration):
        storage = self.storage
        storage.stage_command('LREM', self.inflight_key, 1, raw)
        storage.stage_command('HDEL', self.keys.deliveries, task.id)
        hooks.call(hooks.on_outcome, storage, task, state, duration)

    def _finish(self, raw, task, state, duration):
        storage, slot = self.storage, self.slot
        slot.busy = 0
        rejected, self._rejected = self._rejected, None
        putting_back = state in ('interrupted', 'error')
        if putting_back:
            storage.discard_pending()
            storage.stage_put_back(self.inflight_key, raw)
            hooks.call(hooks.on_requeued, storage, [message_data(raw)],
                       'interrupted')
        else:
            self._stage_ack(raw, task, state, duration)
        prefetch = not putting_back and not self.stop_flag.is_set() and \
            not (self.max_tasks and self.task_count >= self.max_tasks)
        try:
            refused = self._ack(raw, prefetch)
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
                             type(rejected).__name__, rejected)
        elif self.log_end:
            task_log.info('end %s %s %s %.3fs', self._name, task.id, state,
                          duration)

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
        # The parent sends SIGTERM when shutdown_timeout has run out: stop
        # now.  A task cut short is put back in the queue (by this worker,
        # or by the consumer from the in-flight list).
        raise KeyboardInterrupt

    def _on_reopen(self, signum, frame):
        self._reopen_logs = True


def _staged_bytes(storage):
    """Bytes in the commands staged on this thread (argument tuples; the
    scripts hooks stage are small), for error messages."""
    total = 0
    for command in getattr(storage._local, 'pending', None) or ():
        if type(command) is tuple:
            total += sum(len(a) for a in command
                         if isinstance(a, (bytes, str)))
    return total


class _Stopped(Exception):
    """Redis stayed down until the consumer was told to stop."""
