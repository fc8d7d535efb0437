"""The consumer daemon: starts the workers, watches them, heartbeats, and
stops or reloads on signals.

The main loop owns everything that is not running a task: signal flags,
worker health, the heartbeat in Redis (which other consumers use to find
dead ones), recovery of dead consumers' tasks, and sd_notify.
"""
import ctypes
import hashlib
import json
import logging
import multiprocessing
import os
import secrets
import subprocess
import sys
import tempfile
import threading
import time

import redis

from . import __version__, adopt, cpus, delivery, locks, logs, redisconn
from . import preflight
from .app import hostname
from .config import ConfigError
from .mainloop import MainLoop, refuse_immediate, reread_config
from .notify import Notifier
from .journal.layout import ttl_of
from . import clock as clock_module
from .signals import name as signal_name
from .storage import message_data
from .worker import Slot, StopFlag, Worker

log = logging.getLogger('huey_worker.consumer')

# Whatever Redis answers or fails with, the consumer waits and tries again:
# unreachable, or unavailable (a read-only replica after a failover, data
# loading: redisconn.unavailable), or refusing one command.  It never
# exits over it (a crash loop under systemd helps nobody).
REDIS_ERRORS = (redis.exceptions.RedisError,)

# Seconds after our start during which a killed predecessor's blocking read
# may still be served by Redis into its old list; its lists stay indexed
# (and swept each heartbeat) at least this long.
LATE_READ_GRACE = 30
# Seconds a drain may take beyond shutdown_timeout: interrupting process
# workers (3 s, then 1 s to reap), requeueing and unregistering in Redis.
DRAIN_MARGIN = 15
# Seconds a task interrupted at the end of a drain gets to end (and put
# itself back) before its process is killed or its thread fenced off; and
# a cancelled task gets to end before its process is killed (SIGKILL
# after SIGTERM) or TaskCanceled is raised in its thread.
INTERRUPT_GRACE = 3

# KEYS: a task's cancel mark, its message's.  ARGV: ttl.  The message's
# mark is set only while the task's is there: a worker that recorded the
# task canceled meanwhile deleted both (a retry must find neither).
MARK_MESSAGE = """
if redis.call('EXISTS', KEYS[1]) == 0 then return 0 end
redis.call('SET', KEYS[2], '1', 'EX', ARGV[1])
return 1
"""

def consumer_identity(cfg):
    if cfg.consumer.identity:
        return cfg.consumer.identity
    return '%s:%s' % (hostname(), cfg.consumer.instance)


class Consumer(MainLoop):
    def __init__(self, cfg, app, reload_config=None, notifier=None,
                 cpu_roots=None):
        with logs.config_errors_to_file():
            refuse_immediate(cfg, 'consumer')
        self.cfg, self.app = cfg, app
        self.reload_config = reload_config
        self.notifier = notifier or Notifier()
        self.identity = consumer_identity(cfg)
        # This start's own in-flight lists (see Keys.inflight).
        self.incarnation = '%x-%s' % (int(time.time()), secrets.token_hex(3))
        self.storage = app.storage
        self.keys = self.storage.keys
        self.delivery = delivery.Delivery(self.storage, app)
        self.in_process = cfg.consumer.worker_type == 'process'
        self.count, self.count_reason = cpus.worker_count(
            cfg.consumer.workers, cfg.consumer.worker_type,
            cfg.consumer.threads_per_cpu, **(cpu_roots or {}))
        self.slots = multiprocessing.RawArray(Slot, self.count)
        self.stop_flag = None
        self.workers = [None] * self.count      # (Worker, thread/process)
        # The wall times the heartbeat record carries, by Redis's clock
        # (read with each beat): other hosts' tools compare them with theirs.
        self.clock = clock_module.RedisClock(clock_module.from_environment())
        self.started_at = self.clock()
        self._started_mono = time.monotonic()
        self.restarts = 0
        self.recycled = 0
        self.abandoned = 0     # thread workers stuck past a time limit
        self.outage = redisconn.RedisOutage(cfg, clock=self.clock)
        self._last_beat = 0.0
        self._recovery_held_until = 0.0   # time.monotonic()
        self._queue_depth = None
        self._stuck = []
        # Set while the queue is paused (hw:<queue>:paused, read each pass:
        # _read_operator_keys); every worker looks at it before a read.
        self.paused = multiprocessing.RawValue(ctypes.c_int, 0)
        self.pause_info = None
        # Workers running a cancelled task: index -> (Slot id, monotonic
        # time the cancel was passed on).
        self._canceling = {}
        self._mark_message = self.storage.conn.register_script(MARK_MESSAGE)

    def initialize(self):
        cfg = self.cfg
        log.info('huey-worker %s consumer %s starting: queue %r on %s',
                 __version__, self.identity, self.app.name,
                 redisconn.describe(cfg))
        adopted = adopt.describe(self.app)
        if adopted:
            log.info('running the app %s: queue %r (%s), serializer %s',
                     adopted, self.app.name, cfg.source('huey.queue'),
                     type(self.app.serializer).__name__)
        log.info('%d %s worker%s (%s)', self.count, cfg.consumer.worker_type,
                 '' if self.count == 1 else 's', self.count_reason)
        names = self.app.task_names()
        log.info('%d task%s registered: %s', len(names),
                 '' if len(names) == 1 else 's', ', '.join(names) or '-')
        if not cfg.huey.secret_key and not adopt.signs(self.app):
            log.warning('[huey] secret_key is not set: anyone who can write '
                        'to this Redis can run code in the workers')
        clock_module.warn_if_test_clock(self.clock, log)
        if not self._wait_for_redis():
            return False
        # Before any task is taken: an evicting Redis is refused (78).
        self.preflight = preflight.Preflight(cfg, self.storage.pool,
                                             'consumer')
        if not preflight.checked_at_start(self, self.preflight):
            return False
        # A queue key another kind of producer owns is a ConfigError (78).
        if self._with_redis_or_stop(lambda: self.storage.check_queue_key(
                str(cfg.source('huey.queue'))) or True) is None:
            return False
        # Before taking anything over from "a previous run": a live
        # consumer under the same identity is no previous run (78).
        other = self._with_redis_or_stop(lambda: [self._identity_in_use()])
        if other is None:
            return False
        if other[0] is not None:
            raise self._shared_identity_error(other[0])
        moved = self._with_redis_or_stop(
            lambda: self.delivery.requeue_consumer(self.identity, 'lost'))
        if moved is None:
            return False
        if moved:
            log.warning('%d task(s) left in flight by the previous run of %s '
                        'put back in the queue', moved, self.identity)
        # As huey_consumer: naming extra locks flushes them (and the
        # app's) without --flush-locks too.
        if (cfg.consumer.flush_locks or cfg.consumer.extra_locks) and \
                self._with_redis_or_stop(
                lambda: locks.flush(self.app, cfg.consumer.extra_locks)) \
                is None:
            return False
        self._with_redis_or_stop(self._register_lists)
        # A pause outlives restarts: the workers start paused.
        self._read_operator_keys()
        self.stop_flag = StopFlag()
        for index in range(self.count):
            self._start_worker(index)
        self._heartbeat(force=True)
        self.notifier.ready(self.status_line())
        log.info('consumer ready (pid %d)', os.getpid())
        return True

    def loop(self):
        self._check_workers()
        self._read_operator_keys()
        self._enforce_time_limits()
        self._heartbeat()
        self.preflight.recheck()
        self.notifier.status(self.status_line())
        self._feed_watchdog()

    def shutdown(self, for_reload=False):
        if not for_reload:
            self.notifier.stopping()
        timeout = self.cfg.consumer.shutdown_timeout
        # The drain is bounded by shutdown_timeout, not by systemd's
        # TimeoutStopSec (or TimeoutStartSec, which bounds a reload).
        # Beyond INTERRUPT_GRACE, the end of a drain waits for the
        # workers' queue reads (_stop_workers): a long read_timeout adds.
        self.notifier.extend_timeout(timeout + DRAIN_MARGIN + max(
            0, self.cfg.consumer.read_timeout + 1 - INTERRUPT_GRACE))
        signum = self.flags.last_stop_signal
        log.info('%s: finishing running tasks (up to %gs)%s',
                 'reloading' if for_reload else 'stopping', timeout,
                 ' on %s' % signal_name(signum) if signum and not for_reload
                 else '')
        self.stop_flag.set()
        deadline = time.monotonic() + timeout
        stop_seen = self.flags.stop_requests  # one more means: at once
        while any(self._alive(i) for i in range(self.count)):
            if time.monotonic() >= deadline:
                log.warning('shutdown_timeout (%gs) reached with %d task(s) '
                            'still running; they go back to the queue',
                            timeout, self._busy())
                break
            if self.flags.stop_requests > stop_seen:
                log.warning('second stop signal: stopping at once; running '
                            'tasks go back to the queue')
                break
            # Long tasks are no sign of a hang here: the drain has a deadline
            # of its own.  Without this a reload (where systemd's watchdog
            # runs) outlasting WatchdogSec would end in SIGABRT.
            self.notifier.keep_alive()
            self.flags.wait(0.1)
        self.notifier.keep_alive()
        self._stop_workers()
        moved = self._requeue_own('interrupted')
        if moved:
            log.warning('%d task(s) put back in the queue', moved)
        if not for_reload:
            self._unregister(moved is not None)
        done = sum(s.done for s in self.slots)
        failed = sum(s.failed for s in self.slots)
        log.info('consumer %s stopped: %d task(s) done, %d failed',
                 self.identity, done, failed)

    # -- reload and log reopening -----------------------------------------

    def reload(self):
        # RELOADING=1 before anything slow: systemd then holds the reload job
        # (and systemctl reload) until READY=1, after the drain.
        self.notifier.reloading()
        if reread_config(self.reload_config, self.cfg,
                         self._new_image_starts) is None:
            self.notifier.ready(self.status_line())
            return
        self.shutdown(for_reload=True)
        # A whole WatchdogSec for the new image to start and feed it again.
        self.notifier.watchdog()
        logging.shutdown()
        # A fresh process image picks up the new configuration and any new
        # code; the PID stays, so systemd and supervisord keep tracking it.
        os.execv(sys.executable, [sys.executable] + sys.orig_argv[1:])

    def _new_image_starts(self, new_cfg):
        """Raise ConfigError unless the process image a reload execs would
        start: it imports the app and the task modules afresh (new code
        included), which this process cannot check in itself."""
        argv = [sys.executable] + sys.orig_argv[1:] + ['--check-config']
        with tempfile.TemporaryFile() as errors:
            checker = subprocess.Popen(argv, stdin=subprocess.DEVNULL,
                                       stdout=subprocess.DEVNULL,
                                       stderr=errors)
            while checker.poll() is None:
                self.notifier.keep_alive()   # imports may take seconds
                time.sleep(0.1)
            errors.seek(0)
            text = errors.read().decode('utf-8', 'replace').strip()
        if checker.returncode != 0:
            lines = [l for l in text.splitlines() if l.strip()]
            raise ConfigError('the new process would not start (exit %d): %s'
                              % (checker.returncode,
                                 lines[-1] if lines else 'no message'))

    def reopen_logs(self):
        super().reopen_logs()
        if self.in_process:
            for index in range(self.count):
                entry = self.workers[index]
                if entry and entry[1].is_alive():
                    try:
                        os.kill(entry[1].pid, 10)  # SIGUSR1
                    except OSError:
                        pass

    # -- workers -----------------------------------------------------------

    def _start_worker(self, index, settle=None):
        slot = self.slots[index]
        slot.busy = 0
        slot.tick = time.monotonic()
        slot.cancel_id = b''
        worker = Worker(self.app, self.cfg, index, slot, self.stop_flag,
                        self.identity, self.in_process, self.incarnation,
                        settle, paused=self.paused)
        name = 'Worker-%d' % index
        if self.in_process:
            # A process worker gets SIGKILL when the *thread* that forked it
            # ends (PR_SET_PDEATHSIG, see Worker.run), so every fork, the
            # first ones and the replacements after max_tasks or a crash
            # alike, is made by the main loop's thread: the main thread,
            # which lives as long as the consumer.
            if threading.current_thread() is not threading.main_thread():
                raise RuntimeError('process workers must be started from '
                                   'the main thread')
            runner = multiprocessing.get_context('fork').Process(
                target=worker.run, name=name, daemon=True)
        else:
            runner = threading.Thread(target=worker.run, name=name,
                                      daemon=True)
        runner.start()
        self.workers[index] = (worker, runner)

    def _alive(self, index):
        entry = self.workers[index]
        return entry is not None and entry[1].is_alive()

    def _busy(self):
        return sum(1 for i in range(self.count)
                   if self._alive(i) and self.slots[i].busy)

    def _check_workers(self):
        for index in range(self.count):
            if self._alive(index):
                continue
            worker, runner = self.workers[index]
            code = getattr(runner, 'exitcode', None)
            clean = code == 0 if self.in_process else worker.recycled
            canceled = self._canceling.pop(index, None)
            if canceled is not None:
                log.info('%s (pid %s) ended for a cancelled task; a new '
                         'worker takes its place', runner.name,
                         getattr(runner, 'pid', os.getpid()))
            if clean:
                self.recycled += 1
            else:
                self.restarts += 1
                how = ('killed by %s' % signal_name(-code)) if code and \
                    code < 0 else 'exit code %s' % code
                log.error('%s (pid %s) died (%s); restarting it', runner.name,
                          getattr(runner, 'pid', os.getpid()), how)
                key = self.keys.inflight(self.identity, index,
                                         self.incarnation)
                try:
                    moved = self.delivery.requeue_list(key, 'lost')
                    if moved:
                        log.warning('%d task(s) of %s put back in the queue',
                                    moved, runner.name)
                except REDIS_ERRORS as exc:
                    log.warning('could not requeue the tasks of %s yet (%s); '
                                'they stay in flight until Redis answers',
                                runner.name, exc)
            self._start_worker(index)

    def _stop_workers(self):
        """The end of a drain: interrupt the task bodies still running
        (process workers: SIGTERM; thread workers: WorkerInterrupt raised
        in the thread), then wait until no worker can take a message any
        more, each having ended once its queue read was answered (a
        message that read took goes back unstarted), before the caller
        puts back what is still in flight: a read outstanding then would
        take it again.  A task that does not end within INTERRUPT_GRACE
        is killed with its process, or, in a thread, fenced off: whatever
        it does later is not written."""
        live = [(worker, runner) for worker, runner in
                filter(None, self.workers) if runner.is_alive()]
        for worker, runner in live:
            if self.in_process:
                try:
                    os.kill(runner.pid, 15)  # KeyboardInterrupt in a body
                except OSError:
                    pass
            else:
                worker.stop_task()
        started = time.monotonic()
        # An idle worker ends when its read is answered: read_timeout.
        deadline = started + max(INTERRUPT_GRACE,
                                 self.cfg.consumer.read_timeout + 1)
        while True:
            live = [(w, r) for w, r in live if r.is_alive()]
            now = time.monotonic()
            if not live or now >= deadline or (
                    now >= started + INTERRUPT_GRACE and not self.in_process
                    and all(w.in_body() for w, _ in live)):
                break
            self.notifier.keep_alive()
            time.sleep(0.05)
        for worker, runner in live:
            if self.in_process:
                log.warning('%s (pid %d) did not stop, killing it',
                            runner.name, runner.pid)
                runner.kill()
                runner.join(1)
            elif worker.abandon():
                log.warning('%s: its task did not stop when interrupted (a '
                            'call no exception gets into); it goes back to '
                            'the queue, and nothing it does from now on is '
                            'recorded', runner.name)
            else:
                log.warning('%s still waits on Redis; a message it takes '
                            'now stays in flight until the next start',
                            runner.name)

    # -- operator actions: pause and cancel (daemon/actions/) ---------------

    def _read_operator_keys(self):
        """Each pass: whether the queue is paused, and the cancel marks of
        the tasks our workers run, in one round trip; the pause is passed
        on to the workers (shared memory they read before each queue read),
        a cancel to the worker running the task (_pass_cancel).  A Redis
        error leaves both as they were (the heartbeat reports outages, and
        until it finds Redis back this read is not tried: a pass must not
        wait out a socket timeout)."""
        if self.outage.down:
            return
        busy = []
        for index in range(self.count):
            slot = self.slots[index]
            if slot.busy and slot.task_id and self._alive(index):
                busy.append((index, slot.task_id))
        pipe = self.storage.conn.pipeline(transaction=False)
        pipe.get(self.keys.paused)
        if busy:
            pipe.mget([self.keys.cancel(t.decode('utf-8', 'replace'))
                       for _, t in busy])
        try:
            replies = pipe.execute()
        except REDIS_ERRORS as exc:
            log.debug('pause and cancel marks not read: %s', exc)
            return
        self._set_paused(replies[0])
        if busy:
            for (index, token), mark in zip(busy, replies[1]):
                if mark is not None and self.slots[index].cancel_id != token:
                    self._pass_cancel(index, token, mark)
        self._enforce_cancels()

    def _set_paused(self, raw):
        info = None
        if raw is not None:
            try:
                info = json.loads(raw)
            except ValueError:
                info = {}
            if not isinstance(info, dict):
                info = {}
        self.pause_info = info
        paused = info is not None
        if paused == bool(self.paused.value):
            return
        self.paused.value = 1 if paused else 0
        if paused:
            log.warning('queue %s paused (by %s from %s%s): workers finish '
                        'what they run and take nothing new',
                        self.app.name, info.get('by', '?'),
                        info.get('from', '?'), ': %s' % info['reason']
                        if info.get('reason') else '')
        else:
            log.warning('queue %s resumed: workers take tasks again',
                        self.app.name)

    def _pass_cancel(self, index, token, mark):
        """An operator cancelled the task (Slot id `token`) worker `index`
        runs: its message is marked for the put-back scripts, the slot
        names it, and a process worker gets SIGTERM (a thread or greenlet
        worker's task ends at its next check: check_cancelled)."""
        slot = self.slots[index]
        worker, runner = self.workers[index]
        task_id = token.decode('utf-8', 'replace')
        try:
            self._mark_running_message(index, worker, task_id)
        except REDIS_ERRORS as exc:
            log.warning('the message of cancelled task %s not marked (%s); '
                        'a worker that takes it again ends it', task_id, exc)
        slot.cancel_id = token
        self._canceling[index] = (token, time.monotonic())
        try:
            who = json.loads(mark)
        except ValueError:
            who = {}
        how = 'SIGTERM to its process' if self.in_process else             'it ends at its next check (report_progress, check_cancelled)'
        log.warning('%s: task %s %s cancelled by %s from %s: %s',
                    runner.name, slot.task_name.decode('utf-8', 'replace'),
                    task_id, who.get('by', '?') if isinstance(who, dict)
                    else '?', who.get('from', '?') if isinstance(who, dict)
                    else '?', how)
        if self.in_process:
            try:
                os.kill(runner.pid, 15)
            except OSError:
                pass

    def _mark_running_message(self, index, worker, task_id):
        """Mark the message of `task_id`, running on worker `index`, as a
        cancelled task's (Keys.cancel_message): the put-back scripts drop
        it, should the worker die or stop before its end is recorded."""
        raw = None
        current = getattr(worker, '_current', None)   # thread workers
        if current is not None and current[1].id == task_id:
            raw = current[0]
        else:
            key = self.keys.inflight(self.identity, index, self.incarnation)
            for held in self.storage.conn.lrange(key, 0, -1):
                if delivery.peek_message(message_data(held)).task_id == \
                        task_id:
                    raw = held
                    break
        if raw is None:
            return False
        return bool(self._mark_message(
            keys=[self.keys.cancel(task_id), self.keys.cancel_message(
                hashlib.sha1(raw).hexdigest())],
            args=[ttl_of(self.storage)]))

    def _enforce_cancels(self):
        """A cancelled task still running INTERRUPT_GRACE after the cancel
        was passed on: its process is killed (the consumer then puts back
        what its in-flight list holds, which drops the marked message, and
        starts a new worker); in a thread, TaskCanceled is raised in it
        once (as a time limit is)."""
        now = time.monotonic()
        for index, (token, since) in list(self._canceling.items()):
            slot = self.slots[index]
            if not self._alive(index):
                continue   # _check_workers replaces it
            if not slot.busy or slot.task_id != token:
                if self.in_process and slot.task_id == token:
                    # Its task ended and its process is ending (SIGTERM):
                    # _check_workers tells of it and replaces it.
                    continue
                del self._canceling[index]
                continue
            if now - since < INTERRUPT_GRACE:
                continue
            worker, runner = self.workers[index]
            if self.in_process:
                log.warning('%s (pid %d): its cancelled task %s did not end '
                            'within %gs of SIGTERM; killing it', runner.name,
                            runner.pid, token.decode('utf-8', 'replace'),
                            INTERRUPT_GRACE)
                runner.kill()
                runner.join(1)
                continue
            self._canceling[index] = (token, float('inf'))   # once
            if worker.force_cancel(token):
                log.warning('%s: cancelled task %s made no check within %gs: '
                            'TaskCanceled raised in its thread', runner.name,
                            token.decode('utf-8', 'replace'),
                            INTERRUPT_GRACE)

    def _enforce_time_limits(self):
        """Thread workers: a task over its time limit gets TaskTimeout
        raised in its thread; one still running [consumer] timeout_grace
        later is abandoned, and a fresh worker takes its slot (and records
        the time-out).  Process workers enforce their own (SIGALRM),
        greenlet workers theirs (gevent.Timeout)."""
        if self.in_process or self.cfg.consumer.worker_type != 'thread':
            return
        now = time.monotonic()
        grace = self.cfg.consumer.timeout_grace
        for index in range(self.count):
            entry = self.workers[index]
            if entry is None or not entry[1].is_alive():
                continue
            worker, runner = entry
            action = worker.check_time_limit(now, grace)
            if action is None:
                continue
            slot = self.slots[index]
            if action == 'timeout':
                log.warning('%s: %s %s is over its time limit (%gs): '
                            'TaskTimeout raised in its thread', runner.name,
                            slot.task_name.decode(), slot.task_id.decode(),
                            slot.task_timeout)
                continue
            raw, task, ran = action
            self.abandoned += 1
            log.error('%s: %s %s still running %gs after its time limit '
                      '(%gs; in a call no exception gets into); abandoned: '
                      'it fails with TaskTimeout and a new worker takes the '
                      'slot (%d thread(s) abandoned so far)', runner.name,
                      slot.task_name.decode(), task.id, grace,
                      slot.task_timeout, self.abandoned)
            self._start_worker(index, settle=(raw, task, ran))

    # -- Redis: heartbeat, recovery ---------------------------------------

    def _wait_for_redis(self):
        while not self.flags.stop_requests:
            try:
                self.storage.conn.ping()
                self.clock.sync(self.storage.conn)
                self.started_at = self.clock()
                self.outage.ok()
                return True
            except REDIS_ERRORS as exc:
                self._waiting(exc)
        return False

    def _identity_in_use(self):
        """The heartbeat record of another live consumer under this
        identity, or None.  A record left by this process before a reload
        (same pid) or by a dead process of this host is no other; else
        the record must change within two beats to count as alive."""
        key = self.keys.consumer(self.identity)
        conn = self.storage.conn
        try:
            before = json.loads(conn.get(key) or 'null')
        except ValueError:
            return None
        if not isinstance(before, dict):
            return None
        pid = before.get('pid')
        if before.get('host') == hostname() and isinstance(pid, int):
            if pid == os.getpid():
                return None   # this process, before its reload
            try:
                os.kill(pid, 0)
            except ProcessLookupError:
                return None   # its previous run died
            except PermissionError:
                pass
        self.pause(min(2 * self.cfg.delivery.heartbeat_interval,
                       self.cfg.delivery.recovery_timeout))
        try:
            after = json.loads(conn.get(key) or 'null')
        except ValueError:
            return None
        if isinstance(after, dict) and \
                after.get('heartbeat') != before.get('heartbeat'):
            return after
        return None

    def _shared_identity_error(self, other):
        cfg = self.cfg
        setting = 'identity' if cfg.consumer.identity else 'instance'
        return ConfigError(
            'consumer identity %r is in use by a live consumer (pid %s on '
            '%s, started %s): a second one under it would put that one\'s '
            'tasks back as a dead predecessor\'s while they run, and both '
            'would run them.  Give this consumer its own [consumer] '
            'instance (huey-worker@NAME.service does) or identity'
            % (self.identity, other.get('pid'), other.get('host'),
               time.strftime('%Y-%m-%d %H:%M:%S', time.localtime(
                   other.get('started') or 0))),
            'consumer', setting, getattr(cfg.consumer, setting),
            origin=str(cfg.source('consumer.' + setting)))

    def _with_redis_or_stop(self, operation):
        while not self.flags.stop_requests:
            try:
                result = operation()
                self.outage.ok()
                return result
            except REDIS_ERRORS as exc:
                # E.g. READONLY from a replica that answers PING: the
                # start waits as for an unreachable Redis.
                self._waiting(exc)
        return None

    def _waiting(self, exc):
        self.outage.failed(exc)
        self.notifier.status('waiting for Redis at %s: %s' % (
            redisconn.describe(self.cfg), exc))
        self.pause(self.outage.delay)

    def _inflight_keys(self):
        return [self.keys.inflight(self.identity, i, self.incarnation)
                for i in range(self.count)]

    def _sweep_predecessors(self):
        """Requeue what landed in a previous incarnation's lists after our
        start (a blocking read of the killed predecessor that Redis served
        late), and forget those lists once empty."""
        index = self.keys.consumer_lists(self.identity)
        current = set(self._inflight_keys())
        for key in self.storage.conn.smembers(index):
            key = key.decode()
            if key in current:
                continue
            moved = self.delivery.requeue_list(key, 'lost')
            if moved:
                log.warning('%d task(s) found in %s of a previous run put '
                            'back in the queue', moved, key)
            elif time.monotonic() - self._started_mono > LATE_READ_GRACE:
                # A duration: the monotonic clock (a wall-clock step must
                # not cut the grace short).
                self.storage.conn.srem(index, key)

    def _register_lists(self):
        self.storage.conn.sadd(self.keys.consumer_lists(self.identity),
                               *self._inflight_keys())
        return True

    def describe(self):
        now_wall, now_mono = self.clock(), time.monotonic()
        workers = []
        for index in range(self.count):
            slot = self.slots[index]
            busy = bool(slot.busy) and self._alive(index)
            workers.append({
                'worker': index, 'pid': slot.pid, 'busy': busy,
                'alive': self._alive(index),
                'task_id': slot.task_id.decode() if busy else None,
                'task_name': slot.task_name.decode() if busy else None,
                'task_started': (now_wall - (now_mono - slot.task_started))
                if busy else None,
                'last_tick': now_wall - (now_mono - slot.tick),
                'done': slot.done, 'failed': slot.failed})
        return {
            'identity': self.identity, 'host': hostname(), 'pid': os.getpid(),
            'queue': self.app.name, 'worker_type': self.cfg.consumer.worker_type,
            'workers': self.count, 'started': self.started_at,
            'heartbeat': now_wall, 'version': __version__,
            'busy': sum(1 for w in workers if w['busy']),
            'done': sum(w['done'] for w in workers),
            'failed': sum(w['failed'] for w in workers),
            'restarts': self.restarts, 'recycled': self.recycled,
            'abandoned': self.abandoned, 'paused': bool(self.paused.value),
            'worker_list': workers}

    def _heartbeat(self, force=False):
        interval = self.cfg.delivery.heartbeat_interval
        now = time.monotonic()
        if not force and now - self._last_beat < interval:
            return
        self._last_beat = now
        info = self.describe()
        key = self.keys.consumer(self.identity)
        ttl_ms = int(self.cfg.delivery.recovery_timeout * 1000)
        try:
            pipe = self.storage.conn.pipeline(transaction=False)
            pipe.time()
            pipe.set(key, json.dumps(info), px=ttl_ms)
            pipe.zadd(self.keys.consumers, {self.identity: info['heartbeat']})
            # Again each beat: a consumer that stalled past recovery_timeout
            # was recovered (its index deleted) while still alive.
            pipe.sadd(self.keys.consumer_lists(self.identity),
                      *self._inflight_keys())
            sizing = self.storage.queue_size_commands()
            for command in sizing:
                pipe.execute_command(*command)
            sent = clock_module.boot_clock()
            replies = pipe.execute()
            self.clock.note(replies[0], sent, clock_module.boot_clock())
            self.clock.tell_skew(log, 'consumer')
            if self.clock.jump >= clock_module.SKEW_WARNING:
                self._hold_recovery(
                    log.warning, 'Redis\'s clock jumped %+.1fs (a failover '
                    'to a server whose clock differs, or its clock stepped)'
                    % self.clock.jump)
            elif self.outage.down:
                self._hold_recovery(log.info, 'Redis answers again')
            self._queue_depth = self.storage.queue_size_of(
                replies[-len(sizing):])
            if replies[2] and not force:
                # ZADD added us anew: a peer presumed us dead (paused,
                # cut off) and put our tasks back.  Each worker finds its
                # message gone at its ack and fences the outcome
                # (Worker._finish); from this beat on we are registered
                # again and what the workers take is ours.
                log.warning('consumer %s was presumed dead (no heartbeat '
                            'for %gs) and its tasks were put back by a peer:'
                            ' the outcomes of the runs still going here are '
                            'fenced', self.identity,
                            self.cfg.delivery.recovery_timeout)
            if time.monotonic() >= self._recovery_held_until:
                self.delivery.recover_dead(
                    self.cfg.delivery.recovery_timeout)
            self._sweep_predecessors()
            self.outage.ok()
        except REDIS_ERRORS as exc:
            self.outage.failed(exc)

    def _hold_recovery(self, say, why):
        """Recover nobody for one recovery_timeout, time for each live
        consumer to beat again (a dead one is recovered that much later):
        their heartbeats may all have run out at once though they live.
        After an outage or a failover no consumer could beat while Redis
        was out; after a jump of Redis's clock (a failover to a server
        whose clock is ahead, a step of its clock) every heartbeat key,
        whose expiry is an absolute time by that clock, may have run out.
        Taking them for dead would put back the tasks they are running,
        which would run twice.  `say`: the log method; `why`: the cause."""
        timeout = self.cfg.delivery.recovery_timeout
        self._recovery_held_until = max(self._recovery_held_until,
                                        time.monotonic() + timeout)
        say('%s: no consumer is taken for dead for %gs, so that live ones '
            'beat again first', why, timeout)

    def _requeue_own(self, reason):
        try:
            return self.delivery.requeue_consumer(self.identity, reason)
        except REDIS_ERRORS as exc:
            log.error('Redis unreachable (%s): tasks still in flight stay in '
                      'Redis and go back to the queue when %s restarts or '
                      'within %gs via another consumer', exc, self.identity,
                      self.cfg.delivery.recovery_timeout)
            return None

    def _unregister(self, requeued):
        if not requeued:
            return  # leave the record: others must recover our tasks
        try:
            pipe = self.storage.conn.pipeline(transaction=True)
            pipe.delete(self.keys.consumer(self.identity))
            pipe.zrem(self.keys.consumers, self.identity)
            pipe.delete(self.keys.consumer_lists(self.identity))
            pipe.execute()
        except REDIS_ERRORS:
            pass

    # -- systemd -----------------------------------------------------------

    def status_line(self):
        busy = self._busy()
        done = sum(s.done for s in self.slots)
        failed = sum(s.failed for s in self.slots)
        text = '%d %s workers, %d busy, %d done, %d failed, queue %s' % (
            self.count, self.cfg.consumer.worker_type, busy, done, failed,
            '?' if self._queue_depth is None else self._queue_depth)
        if self.paused.value:
            text += '; queue paused'
        if self.outage.down:
            text += '; Redis %s since %s: %s' % (
                self.outage.word, time.strftime(
                    '%H:%M:%S', time.localtime(self.outage.since)),
                self.outage.error)
        return text

    def stuck_workers(self):
        """Indexes of workers that are dead or show no sign of life."""
        now = time.monotonic()
        stuck_timeout = self.cfg.consumer.stuck_timeout
        stuck = []
        for index in range(self.count):
            slot = self.slots[index]
            if not self._alive(index):
                stuck.append(index)
            elif slot.busy:
                limit = slot.task_timeout
                if limit and now - slot.task_started > limit + stuck_timeout:
                    stuck.append(index)
            elif now - slot.tick > stuck_timeout:
                stuck.append(index)
        return stuck

    def _feed_watchdog(self):
        if not self.notifier.watchdog_due():
            return
        stuck = self.stuck_workers()
        if stuck:
            if stuck != self._stuck:
                log.error('watchdog not fed: worker(s) %s stuck or dead',
                          ', '.join(map(str, stuck)))
            self._stuck = stuck
            return
        if self._stuck:
            log.warning('watchdog fed again: every worker shows signs of life')
            self._stuck = []
        self.notifier.watchdog()
