"""The consumer daemon: starts the workers, watches them, heartbeats, and
stops or reloads on signals.

The main loop owns everything that is not running a task: signal flags,
worker health, the heartbeat in Redis (which other consumers use to find
dead ones), recovery of dead consumers' tasks, and sd_notify.
"""
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
from .app import hostname
from .config import ConfigError
from .mainloop import MainLoop, refuse_immediate, reread_config
from .notify import Notifier
from .signals import name as signal_name
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
        self.delivery = delivery.Delivery(self.storage)
        self.in_process = cfg.consumer.worker_type == 'process'
        self.count, self.count_reason = cpus.worker_count(
            cfg.consumer.workers, cfg.consumer.worker_type,
            cfg.consumer.threads_per_cpu, **(cpu_roots or {}))
        self.slots = multiprocessing.RawArray(Slot, self.count)
        self.stop_flag = None
        self.workers = [None] * self.count      # (Worker, thread/process)
        self.started_at = time.time()
        self.restarts = 0
        self.recycled = 0
        self.outage = redisconn.RedisOutage(cfg)
        self._last_beat = 0.0
        self._queue_depth = None
        self._stuck = []

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
        if not self._wait_for_redis():
            return False
        moved = self._with_redis_or_stop(
            lambda: self.delivery.requeue_consumer(self.identity, 'lost'))
        if moved is None:
            return False
        if moved:
            log.warning('%d task(s) left in flight by the previous run of %s '
                        'put back in the queue', moved, self.identity)
        if cfg.consumer.flush_locks and self._with_redis_or_stop(
                lambda: locks.flush(self.app, cfg.consumer.extra_locks)) \
                is None:
            return False
        self._with_redis_or_stop(self._register_lists)
        self.stop_flag = StopFlag()
        for index in range(self.count):
            self._start_worker(index)
        self._heartbeat(force=True)
        self.notifier.ready(self.status_line())
        log.info('consumer ready (pid %d)', os.getpid())
        return True

    def loop(self):
        self._check_workers()
        self._heartbeat()
        self.notifier.status(self.status_line())
        self._feed_watchdog()

    def shutdown(self, for_reload=False):
        if not for_reload:
            self.notifier.stopping()
        timeout = self.cfg.consumer.shutdown_timeout
        # The drain is bounded by shutdown_timeout, not by systemd's
        # TimeoutStopSec (or TimeoutStartSec, which bounds a reload).
        self.notifier.extend_timeout(timeout + DRAIN_MARGIN)
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
        self._interrupt_workers()
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

    def _start_worker(self, index):
        slot = self.slots[index]
        slot.busy = 0
        slot.tick = time.monotonic()
        worker = Worker(self.app, self.cfg, index, slot, self.stop_flag,
                        self.identity, self.in_process, self.incarnation)
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

    def _interrupt_workers(self):
        if not self.in_process:
            return  # threads cannot be interrupted; they die with us
        live = [r for _, r in filter(None, self.workers) if r.is_alive()]
        for runner in live:
            try:
                os.kill(runner.pid, 15)  # SIGTERM: KeyboardInterrupt in task
            except OSError:
                pass
        deadline = time.monotonic() + 3
        for runner in live:
            runner.join(max(0, deadline - time.monotonic()))
        for runner in live:
            if runner.is_alive():
                log.warning('%s (pid %d) did not stop, killing it',
                            runner.name, runner.pid)
                runner.kill()
                runner.join(1)

    # -- Redis: heartbeat, recovery ---------------------------------------

    def _wait_for_redis(self):
        while not self.flags.stop_requests:
            try:
                self.storage.conn.ping()
                self.outage.ok()
                return True
            except REDIS_ERRORS as exc:
                self._waiting(exc)
        return False

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
            elif time.time() - self.started_at > LATE_READ_GRACE:
                self.storage.conn.srem(index, key)

    def _register_lists(self):
        self.storage.conn.sadd(self.keys.consumer_lists(self.identity),
                               *self._inflight_keys())
        return True

    def describe(self):
        now_wall, now_mono = time.time(), time.monotonic()
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
            pipe.set(key, json.dumps(info), px=ttl_ms)
            pipe.zadd(self.keys.consumers, {self.identity: info['heartbeat']})
            # Again each beat: a consumer that stalled past recovery_timeout
            # was recovered (its index deleted) while still alive.
            pipe.sadd(self.keys.consumer_lists(self.identity),
                      *self._inflight_keys())
            sizing = self.storage.queue_size_commands()
            for command in sizing:
                pipe.execute_command(*command)
            self._queue_depth = self.storage.queue_size_of(
                pipe.execute()[-len(sizing):])
            self.delivery.recover_dead(self.cfg.delivery.recovery_timeout)
            self._sweep_predecessors()
            self.outage.ok()
        except REDIS_ERRORS as exc:
            self.outage.failed(exc)

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
