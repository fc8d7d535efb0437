"""The scheduler daemon: one leader across hosts enqueues periodic slots
and moves due delayed and retrying tasks into the queue; the others stand
by and take over when its lease runs out.

The main loop, each pass: keep the lease (renew as leader, try to take it
as standby), then as leader move due tasks and evaluate any new minute.
Every action checks the lease twice: locally (boot clock deadline) and in
Redis (the action scripts).  Signals only set flags (huey_worker.signals).
"""
import datetime
import logging
import os
import secrets
import sys

import redis
from huey import signals as huey_signals

from .. import __version__, adopt, logs, preflight, redisconn
from .. import clock as clock_module
from ..app import hostname, load_task_modules
from ..mainloop import MainLoop, refuse_immediate, reread_config
from ..notify import Notifier
from ..signals import name as signal_name
from . import periodic
from .delayed import DelayedMover
from .info import InfoWriter
from .lease import Lease

log = logging.getLogger('huey_worker.scheduler')

REDIS_ERRORS = (redis.exceptions.ConnectionError,
                redis.exceptions.TimeoutError,
                # READONLY (a replica after failover), OOM, BUSY: Redis
                # answers but will not do it; same treatment, other words.
                redis.exceptions.ResponseError)
MAX_DELAYED_BATCHES = 20    # per pass; the rest waits for the next pass


def _hhmmss(ts):
    return datetime.datetime.fromtimestamp(
        ts, datetime.timezone.utc).strftime('%H:%M:%S UTC')


def scheduler_connection(cfg):
    """A client of its own: the scheduler sends only short commands, so a
    Redis that hangs is noticed within a third of the lease rather than
    after the long socket_timeout the consumers' blocking reads need."""
    pool = redisconn.connection_pool(cfg)
    pool.connection_kwargs['socket_timeout'] = min(
        cfg.redis.socket_timeout, max(1.0, cfg.scheduler.lease_timeout / 3))
    return redis.Redis(connection_pool=pool)


class Scheduler(MainLoop):
    def __init__(self, cfg, app, reload_config=None, notifier=None,
                 clock=None):
        with logs.config_errors_to_file():
            refuse_immediate(cfg, 'scheduler')
            # Redis's clock: every host's scheduler sees the same minute
            # and the same due tasks, whatever its own clock says.
            self.clock = clock or clock_module.shared_clock()
            self.entries = periodic.load_entries(cfg, app)
            self.conn = scheduler_connection(cfg)
        self.cfg, self.app = cfg, app
        self.reload_config = reload_config
        self.notifier = notifier or Notifier()
        self.storage = app.storage
        self.keys = self.storage.keys
        self.token = '%s:%d:%s' % (hostname(), os.getpid(),
                                   secrets.token_hex(4))
        self.lease = Lease(self.conn, self.keys.scheduler_lease, self.token,
                           cfg.scheduler.lease_timeout)
        self.enqueuer = periodic.SlotEnqueuer(
            self.conn, app, self.keys.scheduler_lease,
            periodic.dedupe_ttl(cfg))
        self.mover = DelayedMover(self.conn, self.storage,
                                  self.keys.scheduler_lease)
        self.info_writer = InfoWriter(self.conn, self.keys)
        self.window = periodic.effective_window(cfg)
        self.info = {}            # what we publish while leading
        self.resume = None        # first minute not yet evaluated (leader)
        self.since = None         # wall time we became leader
        self.next_attempt = 0.0   # boot clock: next standby attempt
        self.last_scan = None     # boot clock: last delayed scan
        self.seen_holder = None   # the leader last logged, as standby
        self.outage = redisconn.RedisOutage(cfg, clock=self.clock)
        self._error_wait = 0.0

    def initialize(self):
        cfg = self.cfg
        log.info('huey-worker %s scheduler %s starting: queue %r on %s, '
                 'lease_timeout %gs', __version__, self.token, self.app.name,
                 redisconn.describe(cfg), cfg.scheduler.lease_timeout)
        if adopt.describe(self.app):
            log.info('running the app %s', adopt.describe(self.app))
        for entry in self.entries:
            log.info('periodic %s -> %s, from %s', entry, entry.task_name,
                     entry.origin)
        if not self.entries:
            log.info('no periodic tasks declared; moving delayed and '
                     'retrying tasks only')
        log.info('missed slots are enqueued up to %gs late (catchup_window '
                 '%ds, at least lease_timeout + %gs)', self.window,
                 cfg.scheduler.catchup_window, periodic.HANDOVER_GRACE)
        clock_module.warn_if_test_clock(self.clock, log)
        if not cfg.huey.secret_key and not adopt.signs(self.app):
            log.warning('[huey] secret_key is not set: anyone who can write '
                        'to this Redis can run code in the workers')
        if not self._wait_for_redis():
            return False
        # Before leading: an evicting Redis is refused (78).
        self.preflight = preflight.Preflight(
            cfg, self.conn.connection_pool, 'scheduler')
        if not preflight.checked_at_start(self, self.preflight):
            return False
        # A queue key another kind of producer owns: ConfigError (78).
        try:
            self.app.storage.check_queue_key(str(cfg.source('huey.queue')))
        except (redis.exceptions.RedisError, OSError):
            pass   # Redis went away again: the loop waits for it as always
        self.notifier.ready(self.status_line())
        log.info('scheduler ready (pid %d)', os.getpid())
        return True

    def loop(self):
        try:
            if self.outage.down:
                # A pass may send nothing but TIME, which a Redis that
                # refuses data (a replica that lost its master: MASTERDOWN)
                # still answers, as it does PING: read the lease before
                # calling Redis back, or each such pass says so.
                self.conn.exists(self.keys.scheduler_lease)
            self._sync_clock()
            self._keep_lease()
            if self.lease.held():
                self._act()
            self.outage.ok()
        except REDIS_ERRORS as exc:
            self.outage.failed(exc)
        except Exception:
            # A bug or a user's validate_datetime gone wrong: log it and go
            # on (the lease runs out if it persists); never die of it.
            self._error_wait = min(max(self._error_wait * 2, 1.0), 60.0)
            log.exception('scheduler pass failed; next try in %gs',
                          self._error_wait)
        else:
            self._error_wait = 0.0
        if self.lease.expired_locally():
            self._step_down()
        self.preflight.recheck()
        self.notifier.status(self.status_line())
        self._feed_watchdog()

    def shutdown(self):
        self.notifier.stopping()
        signum = self.flags.last_stop_signal
        leading = self.lease.held()
        try:
            if leading:
                self._publish(stopped_at=self.clock())
            released = self.lease.release()
        except REDIS_ERRORS as exc:
            released = False
            log.warning('could not release the lease (%s); a standby takes '
                        'over when it runs out', exc)
        if leading and released:
            log.info('lease released: a standby, if any, takes over at '
                     'its next attempt')
        log.info('scheduler %s stopped%s', self.token,
                 ' on %s' % signal_name(signum) if signum else '')

    def next_wait(self):
        now = clock_module.boot_clock()
        if self.outage.down:
            waits = [self.outage.delay]
        else:
            waits = [self.cfg.scheduler.interval]
        if self.lease.held():
            waits.append(self.lease.next_renewal_in())
            # Wake on time to stop trusting a lease we could not renew.
            waits.append(self.lease.valid_until - now)
            wall = self.clock()
            waits.append(periodic.MINUTE - wall % periodic.MINUTE + 0.001)
        else:
            waits.append(self.next_attempt - now)
        if self.notifier.watchdog_interval:
            waits.append(self.notifier.watchdog_interval)
        return max(0.01, self._error_wait, min(waits))

    def _sync_clock(self):
        """Read Redis's clock (TIME) for this pass."""
        if isinstance(self.clock, clock_module.RedisClock):
            self.clock.sync(self.conn)
            self.clock.tell_skew(log, 'scheduler')

    # -- the lease ---------------------------------------------------------

    def _keep_lease(self):
        if self.lease.expired_locally():
            self._step_down()
        if self.lease.held():
            if self.lease.renewal_due():
                if self.lease.renew():
                    self._publish(renewed_at=self.clock())
                else:
                    self._lost()
            return
        if clock_module.boot_clock() < self.next_attempt:
            return
        if self.lease.try_acquire():
            self._became_leader()
        elif self.lease.holder == self.token:
            # Our own lease outlived a renewal we could not send: still ours.
            if self.lease.renew():
                self._became_leader()
        else:
            self.next_attempt = clock_module.boot_clock() + \
                self.lease.next_attempt_in()
            if self.lease.holder != self.seen_holder:
                self.seen_holder = self.lease.holder
                log.info('standby: the leader is %s', self.lease.holder)

    def _became_leader(self):
        try:
            previous = self.info_writer.read()
        except REDIS_ERRORS:
            # Not leading until we know where to resume; the lease is still
            # ours in Redis, so the next attempt renews it and comes back.
            self.lease.drop(self.token)
            raise
        self.since = self.clock()
        self.seen_holder = self.token
        self.info = {k: previous[k] for k in (
            'last_evaluated', 'last_slot', 'last_slot_at', 'last_slot_task',
            'slots_enqueued', 'delayed_moved', 'periodic') if k in previous}
        self.info.pop('stopped_at', None)
        self.info.setdefault('slots_enqueued', 0)
        self.info.setdefault('delayed_moved', 0)
        self.info['periodic'] = {
            e.key: {'task': e.task_name, 'schedule': e.schedule,
                    'last_slot': self.info.get('periodic', {}).get(
                        e.key, {}).get('last_slot')}
            for e in self.entries}
        last = periodic.parse_slot_name(previous.get('last_evaluated'))
        self.resume = None if last is None else last + periodic.MINUTE
        self.last_scan = None
        log.info('became leader (token %s, lease %gs); %s', self.token,
                 self.lease.ttl, 'periodic slots resume after %s (evaluated '
                 'by %s)' % (previous['last_evaluated'],
                             previous.get('leader') or '?')
                 if last is not None else
                 'no earlier slot known: starting with the current minute')
        self._publish(renewed_at=self.since)

    def _lost(self):
        holder = self.lease.holder
        self.lease.drop(holder)
        self.resume = None
        self.next_attempt = 0.0
        log.warning('lost the lease%s: no longer acting as leader',
                    ' to %s' % holder if holder and holder != self.token
                    else ' (it ran out in Redis)')

    def _step_down(self):
        self.lease.drop()
        self.resume = None
        self.next_attempt = 0.0
        log.warning('lease not renewed before its local deadline%s: stopped '
                    'acting as leader before it can run out in Redis',
                    ' (Redis: %s)' % self.outage.error if self.outage.error
                    else ' (this process was paused or too slow)')

    def _publish(self, **changes):
        self.info.update(changes)
        self.info.update({
            'leader': self.token, 'host': hostname(), 'pid': os.getpid(),
            'since': self.since, 'lease_timeout':
                self.cfg.scheduler.lease_timeout,
            'catchup_window': self.cfg.scheduler.catchup_window,
            'version': __version__, 'updated_at': self.clock()})
        if not self.info_writer.write(self.token, self.info):
            self._lost()
            return False
        return True

    # -- leader duties -----------------------------------------------------

    def _act(self):
        self._move_delayed()
        if self.lease.held():
            self._enqueue_periodic()

    def _move_delayed(self):
        now = clock_module.boot_clock()
        if self.last_scan is not None and \
                now - self.last_scan < self.cfg.scheduler.interval:
            return
        self.last_scan = now
        total = 0
        for _ in range(MAX_DELAYED_BATCHES):
            if not self.lease.held() or self.flags.stop_requests:
                break
            moved = self.mover.move_batch(self.token, self.clock())
            if moved is None:
                self._lost()
                break
            total += len(moved)
            self._announce_moved(moved)
            if len(moved) < self.mover.batch:
                break
        if total:
            log.info('moved %d due delayed/retrying task(s) into the queue',
                     total)
            self.info['delayed_moved'] = self.info.get('delayed_moved',
                                                       0) + total
            if self.lease.held():
                self._publish()

    def _announce_moved(self, messages):
        """Huey's scheduler emits 'enqueued' for what it moves: so do we."""
        for raw in messages:
            try:
                task = self.app.deserialize_task(raw)
            except Exception as exc:
                # The worker sets it aside as a dead letter; nothing lost.
                log.warning('moved a message that cannot be read (%s: %s); '
                            'the worker will set it aside',
                            type(exc).__name__, exc)
                continue
            log.debug('moved %s into the queue', task)
            self.app._emit(huey_signals.SIGNAL_ENQUEUED, task)

    def _enqueue_periodic(self):
        now = self.clock()
        current = periodic.minute_of(now)
        if self.resume is not None and \
                self.resume - current > periodic.MAX_WAIT_AHEAD:
            log.warning('the last evaluated minute (%s) is %ds ahead of this '
                        'host\'s clock: check NTP; resuming from the current '
                        'minute (slots already enqueued stay deduplicated)',
                        periodic.slot_name(self.resume - periodic.MINUTE),
                        self.resume - current)
            self.resume = current
        plan = periodic.plan(self.entries, self.resume, now, self.window,
                             on_error=self._match_failed,
                             limit=periodic.PASS_LIMIT)
        if plan is None:
            return  # a leader whose clock ran ahead did this minute already
        if plan.skipped_from is not None:
            log.warning('periodic slots from %s to %s were missed while no '
                        'scheduler led and are older than the catch-up '
                        'window (%gs): skipped', periodic.slot_name(
                            plan.skipped_from),
                        periodic.slot_name(plan.skipped_to), self.window)
        done, still_leader = [], True
        if plan.due and self.lease.held():
            done, still_leader = self.enqueuer.enqueue(self.token, plan.due,
                                                       now)
        elif plan.due:
            return
        # One line per slot, unless a catch-up enqueues many at once.
        each = log.info if len(done) <= 20 else log.debug
        for entry, minute, task in done:
            slot = periodic.slot_name(minute)
            late = now - minute
            each('enqueued periodic %s for slot %s: %s %s%s', entry.key,
                 slot, entry.task_name, task.id,
                 ' (%ds late: catch-up)' % late if late >= 60 else '')
            self.app._emit(huey_signals.SIGNAL_ENQUEUED, task)
            self.info.setdefault('periodic', {}).setdefault(
                entry.key, {})['last_slot'] = slot
            if minute >= (periodic.parse_slot_name(
                    self.info.get('last_slot')) or 0):
                self.info.update(last_slot=slot, last_slot_at=now,
                                 last_slot_task=entry.task_name)
        if len(done) > 20:
            log.info('catch-up: enqueued %d periodic slot(s) from %s to %s',
                     len(done), periodic.slot_name(done[0][1]),
                     periodic.slot_name(done[-1][1]))
        self.info['slots_enqueued'] = self.info.get('slots_enqueued',
                                                    0) + len(done)
        if not still_leader:
            self._lost()
            return
        self.resume = plan.evaluated + periodic.MINUTE
        self._publish(last_evaluated=periodic.slot_name(plan.evaluated))

    def _match_failed(self, entry, minute):
        log.exception('periodic %s: deciding whether slot %s matches '
                      'failed; slot skipped', entry,
                      periodic.slot_name(minute))

    # -- reload ------------------------------------------------------------

    def reload(self):
        def check(new):
            if new.huey.app:
                adopt.load(new)   # the app still imports and is usable
            load_task_modules(new, self.app)
            periodic.config_entries(new, self.app)
        # RELOADING=1 before anything slow: systemd then holds the reload job
        # (and systemctl reload) until the new image's READY=1.
        self.notifier.reloading()
        if reread_config(self.reload_config, self.cfg, check) is None:
            self.notifier.ready(self.status_line())
            return
        try:
            if self.lease.release():
                log.info('lease released for the reload')
        except REDIS_ERRORS as exc:
            log.warning('could not release the lease (%s)', exc)
        # A whole WatchdogSec for the new image to start and feed it again.
        self.notifier.watchdog()
        logging.shutdown()
        # A fresh process image picks up the new configuration and code; the
        # PID stays, so systemd and supervisord keep tracking it.
        os.execv(sys.executable, [sys.executable] + sys.orig_argv[1:])

    # -- Redis trouble -----------------------------------------------------

    def _wait_for_redis(self):
        while not self.flags.stop_requests:
            try:
                self.conn.ping()
                # Now, not in the first pass: a Redis refusing TIME is a
                # ConfigError (78) at start, not an outage logged forever.
                self._sync_clock()
                self.outage.ok()
                return True
            except REDIS_ERRORS as exc:
                self.outage.failed(exc)
                self.notifier.status(self.status_line())
                self.pause(self.outage.delay)
        return False

    def status_line(self):
        if self.lease.held():
            text = 'leader since %s' % _hhmmss(self.since)
            if self.info.get('last_slot'):
                text += '; last slot %s (%s)' % (
                    self.info['last_slot'], self.info.get('last_slot_task'))
            text += '; %d slot(s) enqueued, %d delayed task(s) moved' % (
                self.info.get('slots_enqueued', 0),
                self.info.get('delayed_moved', 0))
        else:
            holder = self.lease.holder
            if holder and holder != self.token:
                text = 'standby; leader is %s' % holder
            else:
                text = 'standby; no leader at the moment'
        if self.outage.down:
            text += '; Redis %s since %s: %s' % (
                self.outage.word, _hhmmss(self.outage.since),
                self.outage.error)
        return text

    def _feed_watchdog(self):
        self.notifier.keep_alive()
