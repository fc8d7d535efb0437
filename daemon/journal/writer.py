"""Writing the journal: Huey's SIGNAL_ENQUEUED and post_execute hook, and
the delivery hooks (daemon/hooks.py).  Every change is staged on the
storage, so it rides the round trip its writer makes anyway."""
import base64
import collections
import json
import logging
import sys
import threading
import time

from huey import Huey
from huey import signals as S
from huey.api import ResultGroup, chord as TaskChord, group as TaskGroup

from .. import deadletters, hooks, progress
from ..storage import tag_message
from .layout import (DUE_FIELDS, DURATION_BUCKETS, ERROR_MAX_CHARS,
                     EXECUTED, INDEX_GROUPS, INDEX_OF, KEEPS_MESSAGE,
                     LOG_LENGTH, RUN_PREFIX, TERMINAL, TRIM_EVERY,
                     args_summary, encode,
                     epoch, error_fields, field_pairs, result_json,
                     result_ttl_of, text, ttl_of)
from .counters import SHARED
from .scripts import (ENQUEUE_RECORDED, ENQUEUE_RECORDED_SHA, FOLD,
                      GUARDED_DEAD_LETTER, GUARDED_ENQUEUE, GUARDED_REQUEUE,
                      NOTE_UNNOTED_LOSS, TRIM_HELD, script_for)


log = logging.getLogger('huey_worker.journal')

# One encoder made once: json.dumps with an argument builds a new one each
# call, a third of the cost of a small event.
_event_json = json.JSONEncoder(default=repr).encode

_Settings = collections.namedtuple(
    '_Settings', 'enabled progress_interval args_max_bytes result_max_bytes '
    'index_max retention')


class Journal:
    """The journal of one Huey app: its Huey receivers and delivery hooks."""

    def __init__(self, app):
        self.app = app
        self._stash = threading.local()
        self._outcomes = 0
        self._cached_settings = None

    # settings: the [journal] section of the app's current configuration,
    # looked up again whenever the app is reconfigured

    def _settings(self):
        cfg = self.app.config
        cached = self._cached_settings
        if cached is None or cached[0] is not cfg:
            section = cfg.journal if cfg is not None else None
            cached = self._cached_settings = (cfg, section and _Settings(
                section.enabled, section.progress_interval,
                section.args_max_bytes, section.result_max_bytes,
                section.index_max, section.retention))
        return cached[1]

    def _active(self, storage):
        settings = self._settings()
        if settings is None or not settings.enabled or \
                not hasattr(storage, 'stage') or not hasattr(storage, 'keys'):
            return False
        # For layout.ttl_of: this app's retention, whoever asks.
        storage.journal_retention = settings.retention
        return True

    def task_name(self, task):
        return self.app._registry.task_to_string(type(task))

    def _stage_change(self, storage, task_id, fields, event, **options):
        """Stage one state change of `task_id` (_change_commands); returns
        the event as pushed on the history (JSON text)."""
        commands, encoded = self._change_commands(storage, task_id, fields,
                                                  event, **options)
        storage.stage_commands(commands)
        return encoded

    def _change_commands(self, storage, task_id, fields, event, drop=(),
                         setnx=None, incr=None, extra=None, index=True,
                         trim=True, expire=True, pairs=(), reindex=None,
                         before=False):
        """The commands of one state change of `task_id`: a fixed set.
        `event`: what the history gets (a dict, its `at` set here), or
        None for a change the record's own fields tell (reads.
        unlogged_events: a delivery's running, its end); `before`: true
        when what the record tells goes into the history first (FOLD: a
        change that ends the delivery otherwise, a retry or a requeue).
        `pairs`: more field/value arguments for the HSET, ready encoded;
        `index`: unused (the listing reads the state indexes); `trim`: cut the
        history to LOG_LENGTH (skipped where it cannot have grown much);
        `expire`: renew the record's time to live (skipped where a later
        change of the same delivery renews it anyway); `reindex`: (state
        index groups it leaves, the state it enters or None), for the
        state indexes (layout.INDEX_OF).  Returns (the commands, the event
        as pushed on the history: JSON text, or None)."""
        keys = storage.keys
        key, log_key = keys.task(task_id), keys.task_log(task_id)
        now = time.time()
        commands = []
        if drop:
            commands.append(('HDEL', key) + tuple(drop))
        if setnx:
            commands += [('HSETNX', key, field, encode(value))
                         for field, value in setnx.items()]
        if incr:
            commands += [('HINCRBY', key, field, amount)
                         for field, amount in incr.items()]
        commands.append(('HSET', key, 'updated', now, *pairs,
                         *field_pairs(fields)))
        encoded = None
        if before:
            # The running (and any end) the record told goes into the
            # history first, placed as reads place it: a script, as a
            # request made while the task ran may be there already.
            commands.append(('EVAL', FOLD, 2, key, log_key, LOG_LENGTH))
        if event is not None:
            event['at'] = now
            encoded = _event_json(event)
            commands.append(('RPUSH', log_key, encoded))
            if trim:
                commands.append(('LTRIM', log_key, -LOG_LENGTH, -1))
        if expire:
            ttl = ttl_of(storage)
            commands.append(('EXPIRE', key, ttl))
            # The history may exist from an earlier change (a retry, a
            # requeue, an operator's action): it lives as long as the
            # record; EXPIRE of a missing key is a no-op.
            commands.append(('EXPIRE', log_key, ttl))
        if reindex is not None:
            leave, state = reindex
            for group in leave:
                commands.append(('ZREM', keys.journal_state(group), task_id))
            if state is not None:
                commands.append(('ZADD', keys.journal_state(INDEX_OF[state]),
                                 now, task_id))
        if extra is not None:
            extra(commands.append)
        return commands, encoded

    @staticmethod
    def _round_trip_follows():
        """Staged commands ride the worker's round trips.  A hook called
        where none follows (the consumer's main thread recovering a dead
        worker's tasks) sends them itself: that thread runs no task."""
        return progress.current() is not None

    # producer: SIGNAL_ENQUEUED

    def enqueue_recorded(self, task):
        """Huey.enqueue of `task` with its record, for the common call (a
        task without eta or priority, by a producer with nothing staged):
        the signal, the message, then the record and the LPUSH as one
        script (scripts.ENQUEUE_RECORDED) sent straight on the storage's
        connection.  The general path (the signal staging the record, the
        storage's enqueue finding it) writes the same, with 5 to 10 us
        more of Python a web request waits on (docs/benchmarks.md).
        Returns what Huey's enqueue returns (a Result, or None without
        results), or NOT_TAKEN when the call is not the common one.
        Raises as Huey's enqueue does; nothing is written then."""
        app = self.app
        if isinstance(task, (TaskGroup, TaskChord)) or app._immediate or \
                task.eta is not None or task.priority or \
                getattr(self._stash, 'enqueues', None):
            # An enqueue from a handler of another's signal: that one's
            # record waits for it (_stage_enqueue_record).
            return NOT_TAKEN
        storage = app.storage   # configures a producer's app on first use
        if not getattr(storage, 'enqueue_is_lpush', False) or \
                not self._active(storage) or storage.deferring or \
                storage.has_pending() or \
                progress.current_task_id() == task.id:
            return NOT_TAKEN
        if task.expires:
            task.resolve_expires(app.utc)
        # Other receivers of the signal see it as from Huey's enqueue; this
        # journal's own skips it (on_enqueued), nested enqueues included.
        outer = getattr(self._stash, 'recording', None)
        self._stash.recording = task
        try:
            app._emit(S.SIGNAL_ENQUEUED, task)
        finally:
            self._stash.recording = outer
        if task.priority or task.eta is not None:
            # A handler of the signal gave the task a priority or an eta:
            # Huey's enqueue from here, the record staged as it would be.
            with self.enqueueing(task):
                self.on_enqueued(S.SIGNAL_ENQUEUED, task)
                storage.enqueue(app.serialize_task(task), task.priority)
            return _result_of(app, task)
        message = app.serialize_task(task)
        settings = self._settings()
        args_text, hidden = args_summary(task, settings.args_max_bytes)
        keys, task_id, name = storage.keys, task.id, self.task_name(task)
        storage.send_enqueue(*_enqueue_recorded(
            keys, task_id, name, keys.journal_state(INDEX_OF['pending']),
            storage.queue_key, message, repr(time.time()),
            self._ttl_text(storage, settings), str(task.retries),
            _record_extra(None, epoch(task.expires_resolved), args_text,
                          hidden)))
        return _result_of(app, task)

    def _ttl_text(self, storage, settings):
        """ttl_of(storage) as text, worked out again only when the storage
        or the settings change."""
        cached = getattr(self._stash, 'ttl', None)
        if cached is None or cached[0] is not storage or \
                cached[1] is not settings:
            cached = self._stash.ttl = (storage, settings,
                                        str(ttl_of(storage)))
        return cached[2]

    def on_enqueued(self, signal, task, *args, **kwargs):
        if getattr(self._stash, 'recording', None) is task:
            return   # enqueue_recorded writes its record
        storage = self.app.storage   # configures a producer's app on first use
        if not self._active(storage):
            return
        if progress.current_task_id() == task.id:
            return  # the worker re-enqueues a retry: on_outcome records it
        now = time.time()
        eta = epoch(task.eta)
        state = 'scheduled' if eta is not None and eta > now else 'pending'
        args_text, hidden = args_summary(task,
                                         self._settings().args_max_bytes)
        name = self.task_name(task)
        expires = epoch(task.expires_resolved)
        entry = self._enqueue_entry(task)
        if entry is not None or _inside_huey_enqueue():
            # The LPUSH follows in this thread: the record rides with it,
            # in the same round trip (one script, or the MULTI of what is
            # staged), so no worker can see the task first.
            self._stage_enqueue_record(
                storage, entry, task.id, name, state, repr(now),
                str(task.retries), eta,
                _record_extra(eta, expires, args_text, hidden))
            return
        # Emitted for a message already in the queue (the scheduler moving
        # due or periodic tasks): a worker may have taken it already, so
        # the record only fills what is missing and becomes pending only
        # from scheduled or retrying; sent now, as no write of ours follows.
        first = {'enqueued': now, 'retries_total': task.retries,
                 'name': name, 'retries_left': task.retries, 'eta': eta,
                 'expires': expires, 'args': args_text,
                 'args_sensitive': hidden or None}
        self._stage_guarded_enqueue(
            storage, task.id,
            {k: v for k, v in first.items() if v is not None}, now)
        if not storage.deferring:
            storage.flush()

    def enqueueing(self, task):
        """Context manager around Huey's enqueue of `task` (SuiteApp.enqueue):
        the record staged by the enqueue signal is sent with the enqueue's
        own write, or dropped when the enqueue raises."""
        stack = getattr(self._stash, 'enqueues', None)
        if stack is None:
            stack = self._stash.enqueues = []
        return _Enqueueing(stack, task)

    def _enqueue_entry(self, task):
        stack = getattr(self._stash, 'enqueues', None)
        if stack and stack[-1]['task'] is task:
            return stack[-1]
        return None

    def _stage_enqueue_record(self, storage, entry, task_id, name, state,
                              now, retries, eta, extra):
        """Stage the producer's record of `task_id` (`now`: the enqueue
        time and `retries` as text, `extra`: its optional fields as
        name/value pairs) to ride the enqueue's LPUSH: as one script with
        it (storage.enqueue takes with_lpush) or, with other writes
        staged, in the same MULTI; a web request waits on this round
        trip.  Its first event (pending at `enqueued`) is not pushed:
        reads put it first (reads.with_enqueue_event), so a task without
        an eta has no history list until a worker takes it.  With
        `entry` (SuiteApp.enqueue's), only while that enqueue is under
        way: when it fails instead (an argument that cannot be pickled,
        Redis down) there is no record, and nothing left staged."""
        keys = storage.keys
        key, name_index = keys.task(task_id), keys.journal_name(name)
        state_index = keys.journal_state(INDEX_OF[state])
        ttl = str(ttl_of(storage))

        def commands():
            listed = [('HSET', key, 'updated', now, 'name', name,
                       'state', state, 'enqueued', now,
                       'retries_total', retries, 'retries_left', retries,
                       *extra),
                      ('EXPIRE', key, ttl),
                      ('ZADD', state_index, now, task_id),
                      ('ZADD', name_index, now, task_id),
                      ('EXPIRE', name_index, ttl)]
            if eta is not None:
                log_key = keys.task_log(task_id)
                listed += [('RPUSH', log_key, _event_json(
                    {'state': state, 'eta': eta, 'at': float(now)})),
                    ('EXPIRE', log_key, ttl)]
            return listed
        if entry is None:
            storage.stage_commands(commands())
            return
        stack = self._stash.enqueues

        def write(pipe):
            if stack and stack[-1] is entry:
                pipe.command_stack.extend((c, {}) for c in commands())
            elif any(e is entry for e in stack):
                # An enqueue nested in this one (from a handler of the
                # enqueue signal) writes first: this record waits for its
                # own LPUSH, staged again when the nested one ends, so an
                # enqueue that then fails (its pickling) leaves none.
                entry['skipped'] = True
            # Else recorded into the transaction of a later write of this
            # thread (the enqueue failed after staging): nothing goes out.
        if eta is None:
            def with_lpush(queue_key, message):
                # storage.enqueue's LPUSH and this record as one script,
                # when nothing else is staged.
                return _enqueue_recorded(keys, task_id, name, state_index,
                                         queue_key, message, now, ttl,
                                         retries, extra)
            write.with_lpush = with_lpush
        entry['storage'], entry['staged'] = storage, write
        storage.stage(write)

    @staticmethod
    def _drop_staged(entry):
        write, storage = entry['staged'], entry['storage']
        entry['staged'] = None
        if write is None:
            return
        # Still staged when the failure came before the write (pickling)
        # or Redis refused it (flush keeps what is staged for a retry).
        storage.unstage(write)

    def _stage_guarded_enqueue(self, storage, task_id, fields, now):
        keys = storage.keys
        script = script_for(storage, GUARDED_ENQUEUE)
        pairs = [x for k, v in fields.items() for x in (k, text(v))]
        event = json.dumps({'state': 'pending', 'at': now})

        indexes = [keys.journal_state('waiting')]
        if fields.get('name'):
            indexes.append(keys.journal_name(fields['name']))

        def write(pipe):
            script(keys=[keys.task(task_id), keys.task_log(task_id),
                         keys.journal_recent] + indexes,
                   args=[text(now), ttl_of(storage), LOG_LENGTH, task_id,
                         event] + pairs, client=pipe)
        storage.stage(write)

    # worker: Huey's post_execute (value and exception of the body)

    def after_execute(self, task, value, exception):
        self._stash.outcome = (task.id, value, exception)

    def _take_outcome(self, task_id):
        outcome = getattr(self._stash, 'outcome', None)
        self._stash.outcome = None
        if outcome is None or outcome[0] != task_id:
            return None, None, False
        return outcome[1], outcome[2], True

    # worker: delivery hooks

    def on_dequeued(self, storage, task, worker_info):
        if not hasattr(storage, 'keys'):
            return
        name = self.task_name(task)
        # The task context serves current_delivery() even with the journal
        # off; progress is then kept in memory only.
        recording = self._active(storage)
        progress.enter(progress.TaskContext(
            storage, task.id, name, self._settings().progress_interval,
            record=recording))
        if not recording:
            return
        self._stash.outcome = None
        now = time.time()
        if task.eta is not None and epoch(task.eta) > now:
            return  # not due: Huey moves it to the schedule (outcome below)
        pairs, label = self._worker_fields(worker_info)
        # Since when the task was due, for the wait-time histogram: read in
        # the same transaction, before the running change drops next_retry.
        stash, task_id = self._stash, task.id
        due = ('HMGET', storage.keys.task(task_id)) + DUE_FIELDS

        def due_probe(pipe):
            stash.due_probe = (task_id, len(pipe.command_stack))
            pipe.command_stack.append((due, {}))
        storage.stage(due_probe)
        # Fewest commands on the hot path: the listing index, history trim
        # and time to live wait for the outcome (or the requeue of a
        # delivery that never gets one).
        # The running event is not pushed: the record's field run:<when>
        # (the worker's label) tells it (reads.unlogged_events) until the
        # outcome or a change that ends the delivery pushes it.  One field
        # per delivery: a delivery that takes over from one that died
        # unnoted leaves the dead one's in place.
        commands, _ = self._change_commands(
            storage, task.id,
            {'name': name, 'state': 'running',
             'started': now, 'retries_left': task.retries,
             RUN_PREFIX + repr(now): label},
            None,
            drop=RUNNING_DROPS,
            incr={'attempt': 1}, index=False, trim=False, expire=False,
            pairs=pairs, reindex=(WAITING_GROUPS, 'running'))
        stash.running = task_id
        # Where the reply of the attempt's HINCRBY will be: on_started
        # hands the attempt to the worker's log lines.
        attempt_at = next(i for i, c in enumerate(commands)
                          if c[0] == 'HINCRBY' and c[2] == 'attempt')

        def attempt_probe(pipe):
            stash.attempt_probe = (task_id, len(pipe.command_stack) +
                                   attempt_at)
            pipe.command_stack.extend((c, {}) for c in commands)
        storage.stage(attempt_probe)
        # Whether the record was made at enqueue: every producer of the
        # suite writes retries_total then, so the HSETNX that fills it for
        # the others answers 1 only for a task first seen here (a plain
        # Huey producer's, or one enqueued with the journal off).
        # on_started reads that reply and completes the record.
        command = ('HSETNX', storage.keys.task(task_id), 'retries_total',
                   task.retries)

        def probe(pipe):
            stack = pipe.command_stack
            stash.probe = (task_id, len(stack), now)
            stack.append((command, {}))
        storage.stage(probe)

    def on_started(self, storage, task, replies):
        """The worker's first transaction went through.  For a redelivery,
        the loss of the delivery before, where the consumer that put the
        message back left it unnoted (a worker had taken the message again
        first): in the history before this delivery's running.  For a
        task the journal first sees now, the rest of its record: the
        arguments (as at enqueue), its expiry, when and where it was first
        seen, the listing index and the time to live.  Sent before the
        task body runs: one round trip, only for such tasks."""
        self._stash.wait = None
        attempt_probe = getattr(self._stash, 'attempt_probe', None)
        self._stash.attempt_probe = None
        if attempt_probe is not None and attempt_probe[0] == task.id and \
                attempt_probe[1] < len(replies):
            attempt = replies[attempt_probe[1]]
            if isinstance(attempt, int):
                # Read by the worker's log lines (the JSON format's attempt).
                task.hw_attempt = attempt
        due_probe = getattr(self._stash, 'due_probe', None)
        probe = getattr(self._stash, 'probe', None)
        self._stash.due_probe = None
        if probe is None:
            return
        self._stash.probe = None
        task_id, index, seen = probe
        if task_id != task.id or index >= len(replies):
            return
        if due_probe is not None and due_probe[0] == task_id:
            self._stash.wait = (task_id, _waited(replies[due_probe[1]], seen))
        keys = storage.keys
        key, log_key = keys.task(task_id), keys.task_log(task_id)
        deliveries = hooks.delivery_count(replies)
        if deliveries is not None and deliveries > 1:
            self._stage_unnoted_loss(storage, key, log_key, seen)
        if replies[index] != 1:
            return
        args_text, hidden = args_summary(task,
                                         self._settings().args_max_bytes)
        ttl = ttl_of(storage)
        name_index = keys.journal_name(self.task_name(task))
        pairs = field_pairs({'args': args_text,
                             'args_sensitive': hidden or None,
                             'expires': epoch(task.expires_resolved)})
        commands = [('HSETNX', key, 'first_seen', seen),
                    ('HSETNX', key, 'first_seen_in', 'worker'),
                    *([('HSET', key) + tuple(pairs)] if pairs else []),
                    ('EXPIRE', key, ttl), ('EXPIRE', log_key, ttl),
                    ('ZADD', name_index, seen, task_id),
                    ('EXPIRE', name_index, ttl)]
        storage.stage_commands(commands)

    @staticmethod
    def _stage_unnoted_loss(storage, key, log_key, seen):
        script = script_for(storage, NOTE_UNNOTED_LOSS)
        lost = _event_json({'state': 'lost', 'at': seen,
                            'noted_by': 'redelivery'})

        def write(pipe):
            script(keys=[log_key, key],
                   args=[lost, LOG_LENGTH, ttl_of(storage),
                         RUN_PREFIX + repr(seen)], client=pipe)
        storage.stage(write)

    def _worker_fields(self, worker_info):
        """The record's fields naming the worker, and its label in the
        history: the same for every task a worker runs, so made once."""
        cached = getattr(self._stash, 'worker', None)
        if cached is None or cached[0] is not worker_info:
            pairs = tuple(field_pairs(
                {'host': worker_info.get('host'),
                 'pid': worker_info.get('pid'),
                 'consumer': worker_info.get('consumer'),
                 'worker': worker_info.get('worker')}))
            label = '%s:%s/%s' % (worker_info.get('host'),
                                  worker_info.get('pid'),
                                  worker_info.get('worker'))
            cached = self._stash.worker = (worker_info, pairs, label)
        return cached[1], cached[2]

    def on_outcome(self, storage, task, state, duration):
        if not self._active(storage):
            progress.leave(task.id)
            return
        settings = self._settings()
        name = self.task_name(task)
        value, exception, ran = self._take_outcome(task.id)
        # The worker names an outcome after Huey's last signal; the body's
        # exception tells two cases apart that signal order blurs.
        if ran and exception is not None:
            if state == 'scheduled':
                state = 'retrying'   # a retry with a delay goes to schedule
            elif state == 'complete':
                state = 'failed'     # e.g. a time-out, which emits no error
        now = time.time()
        fields = {'state': state, 'retries_left': task.retries}
        event = {'state': state}
        if ran or state in EXECUTED:
            fields['duration'] = round(duration, 6)
            event['duration'] = round(duration, 6)
        if state in TERMINAL:
            fields['finished'] = now
        if state in ('retrying', 'scheduled'):
            eta = epoch(task.eta) or now
            fields['next_retry' if state == 'retrying' else 'eta'] = eta
            event['eta'] = eta
        if exception is not None:
            # The traceback only for a task that failed for good: the
            # console's task page shows it (a retry's would be replaced).
            fields.update(error_fields(exception,
                                       with_traceback=state == 'failed'))
            event['error'] = fields['error_type']
        result_stored = False
        if state == 'complete':
            result_stored = value is not None or self.app.store_none
            if ran and result_stored:
                text, why = result_json(value,
                                        settings.result_max_bytes)
                if text is not None:
                    fields['result'] = text
                else:
                    fields['result_omitted'] = why
        elif state == 'failed':
            result_stored = self.app.results   # Huey stores the error
        ctx = progress.leave(task.id)
        if ctx is not None and ctx.dirty:
            fields.update(ctx.progress_fields())
        keys, ttl = storage.keys, ttl_of(storage)
        index_max = settings.index_max
        self._outcomes += 1
        # Trimming the indexes now and then keeps them within bounds at a
        # fraction of the cost (they overshoot by TRIM_EVERY at most).
        trim = self._outcomes % TRIM_EVERY == 1

        # The message of a task that ended without running to completion,
        # for a retry (daemon/actions/retry.py): only on those outcomes,
        # and sent with the outcome itself.
        kept = self._message_of(task) if state in KEEPS_MESSAGE else None

        def account(add):
            counts = []
            count = counts.append
            if result_stored:
                # Counted by the hour of its end (reads.results_held_
                # command): no per-task entry that outlives the record.
                count((keys.journal_held, int(now // 3600), 1))
            if kept is not None:
                add(('SET', keys.message(task.id), kept, 'EX', ttl))
            if trim:
                for command in trim_commands(keys, name, state, now, ttl,
                                             result_ttl_of(storage),
                                             index_max):
                    add(command)
            self._count(count, keys, name, state,
                        duration if 'duration' in fields else None)
            if waited is not None:
                _count_wait(count, keys, name, waited)
            # Sent by this process's sender within a second (counters):
            # the held results' hash gets its time to live with them (a
            # process whose first outcome, the one that trims, came
            # before a FLUSHDB would leave it without one).
            SHARED.add_many(storage.conn, counts, expire=(
                keys.journal_held, result_ttl_of(storage) + 3600)
                if result_stored else None)
        wait = getattr(self._stash, 'wait', None)
        self._stash.wait = None
        waited = wait[1] if wait is not None and wait[0] == task.id and \
            state != 'scheduled' else None
        # Retrying or scheduled: the next delivery overwrites this one's
        # fields, so its running goes into the history now, with the
        # outcome.
        before = self._wrote_running(task.id)
        if state in TERMINAL:
            # The end of the attempt, like its running, is told by the
            # record's fields (reads.unlogged_events): nothing pushed.
            event, before = None, False
            fields['unlogged'] = 'o'
        self._stage_change(storage, task.id, fields, event, extra=account,
                           reindex=(('running',), state), before=before)

    def _wrote_running(self, task_id):
        """For _change_commands' `before`: whether this thread wrote the
        running of the delivery of `task_id` under way (not for a task
        dequeued before its eta), which then goes into the history."""
        running = getattr(self._stash, 'running', None)
        self._stash.running = None
        return running == task_id

    def _message_of(self, task):
        """`task` as the queue would hold it (Huey's message, behind the
        priority prefix when it has one), or None when it cannot be made
        again."""
        try:
            data = self.app.serialize_task(task)
            return tag_message(data, task.priority, infinite=True) \
                if task.priority else data
        except Exception as exc:
            log.warning('the message of %s cannot be kept for a retry: %s',
                        task.id, exc)
            return None

    @staticmethod
    def _count(count, keys, name, state, duration):
        """The outcome's /metrics counts, each given to `count` as (hash
        key, field, amount) (for counters.SHARED: sent with a later round
        trip)."""
        if state == 'scheduled':
            return   # not due yet: no outcome to count
        count((keys.metrics_outcomes, '%s\t%s' % (name, state), 1))
        if duration is None:
            return
        bucket = next(b for b in DURATION_BUCKETS if duration <= b)
        count((keys.metrics_durations, '%s\t%r' % (name, bucket), 1))
        count((keys.metrics_durations, '%s\tsum_us' % name,
               int(round(duration * 1e6))))

    def on_requeued(self, storage, messages, reason):
        if not self._active(storage):
            progress.leave()
            return
        rides = self._round_trip_follows()
        staged = False
        for raw in messages:
            try:
                task = self.app.deserialize_task(raw)
            except Exception:
                continue   # the worker sets undecodable messages aside
            name = self.task_name(task)
            ctx = progress.leave(task.id)
            fields = {'state': 'pending', 'requeued_reason': reason,
                      'requeued_at': time.time()}
            if ctx is not None and ctx.dirty:
                fields.update(ctx.progress_fields())
            if rides:
                # The worker's own transaction puts the message back: the
                # record changes with it.  History: what happened, then
                # where the task is now.
                self._stage_change(storage, task.id, {'state': reason},
                                   {'state': reason},
                                   before=self._wrote_running(task.id))
                self._stage_change(storage, task.id, fields,
                                   {'state': 'pending'},
                                   incr={'requeues': 1},
                                   reindex=(('running',), 'pending'))
            else:
                self._stage_guarded_requeue(storage, task.id, raw, fields,
                                            reason)
            keys = storage.keys
            storage.stage_command('HINCRBY', keys.metrics_outcomes,
                                  '%s\t%s' % (name, reason), 1)
            staged = True
        if staged and not rides:
            storage.flush()

    def _stage_guarded_requeue(self, storage, task_id, raw, fields, reason):
        """The consumer put the message back already (a dead worker's or
        consumer's), so a worker may be running it again by now: the state
        becomes pending only while the message still waits in the queue."""
        keys = storage.keys
        now = time.time()
        script = script_for(storage, GUARDED_REQUEUE)
        mapping = [x for k, v in fields.items() for x in (k, text(v))]
        events = [json.dumps({'state': reason, 'at': now}),
                  json.dumps({'state': 'pending', 'at': now})]

        def write(pipe):
            script(keys=[keys.task(task_id), keys.task_log(task_id),
                         storage.queue_key, keys.journal_recent,
                         storage.priority_key, keys.journal_state('running'),
                         keys.journal_state('waiting')],
                   args=[raw, text(now), ttl_of(storage), LOG_LENGTH,
                         task_id] + events + [reason] + mapping,
                   client=pipe)
        storage.stage(write)

    def on_dead_letter(self, storage, record):
        """The task of a message set aside ends failed.  Staged only:
        stage_dead_letter's caller sends the dead letter itself next."""
        task_id = record.get('task_id')
        if not task_id or not self._active(storage):
            return
        progress.leave(task_id)
        name = record.get('task_name') or ''
        keys = storage.keys
        why = deadletters.explain(record)[:ERROR_MAX_CHARS]
        # id and name too: the producer may have written no record.
        fields = {'id': task_id, 'name': name or None, 'queue': self.app.name,
                  'state': 'failed', 'finished': time.time(),
                  'error_type': 'DeadLetter', 'error_message': why,
                  'dead_letter': record.get('reason')}
        event = {'state': 'failed', 'dead_letter': record.get('reason')}
        if record.get('task_id_verified') is False:
            # Never kept: the id is only the claim of a message that
            # failed its checks, and may name another task.
            self._stage_guarded_dead_letter(storage, task_id, name, fields,
                                            event)
            return
        message = record.get('message')
        ttl = ttl_of(storage)

        def account(add):
            if name:
                add(('HINCRBY', keys.metrics_outcomes, '%s\tfailed' % name,
                     1))
            if message:
                # As the queue held it; the dead letter may be purged
                # before an operator retries the task.
                add(('SET', keys.message(task_id),
                     base64.b64decode(message), 'EX', ttl))
        # A dead letter ends the delivery (the worker's, or a dead one's
        # the consumer set aside): its running goes into the history
        # first.
        self._stage_change(storage, task_id, fields, event, extra=account,
                           reindex=(WAITING_GROUPS + ('running',), 'failed'),
                           before=True)

    def _stage_guarded_dead_letter(self, storage, task_id, name, fields,
                                   event):
        """Only the message's claim names the task: the record is made or
        ended failed unless a worker runs that task or it ended already,
        so a forged message cannot undo a real outcome."""
        keys = storage.keys
        now = time.time()
        script = script_for(storage, GUARDED_DEAD_LETTER)
        pairs = field_pairs(fields)
        event = _event_json(dict(event, at=now))
        # Counted under names this app knows only: the counters stay
        # bounded by the task names, whatever a message claims.
        counted = '%s\tfailed' % name \
            if name in self.app._registry._registry else ''

        def write(pipe):
            script(keys=[keys.task(task_id), keys.task_log(task_id),
                         keys.journal_recent, keys.metrics_outcomes,
                         keys.journal_state('waiting'),
                         keys.journal_state('running'),
                         keys.journal_state('failed')],
                   args=[text(now), ttl_of(storage), LOG_LENGTH, task_id,
                         event, counted] + pairs,
                   client=pipe)
        storage.stage(write)

    # producer: a revoke requested through the endpoint or CLI

    def stage_revoke_requested(self, storage, task_id):
        self._stage_change(storage, task_id, {'revoke_requested': time.time()},
                           {'state': 'revoke-requested'})


# What a new delivery clears: what the last attempt left (its progress, end
# and error).  The history keeps the error; the record shows this attempt.
def _waited(reply, started):
    """Seconds from due to `started` (epoch seconds), from the HMGET of
    DUE_FIELDS; None when the record says nothing (a task first seen by
    the worker that runs it)."""
    times = []
    for value in reply or ():
        try:
            times.append(float(value))
        except (TypeError, ValueError):
            continue
    return max(0.0, started - max(times)) if times else None


def _count_wait(count, keys, name, waited):
    bucket = next(b for b in DURATION_BUCKETS if waited <= b)
    count((keys.metrics_waits, '%s\t%r' % (name, bucket), 1))
    count((keys.metrics_waits, '%s\tsum_us' % name,
           int(round(waited * 1e6))))


def trim_commands(keys, name, state, now, ttl, result_ttl, index_max):
    """What keeps the journal's shared keys within bounds, sent with one
    outcome in TRIM_EVERY: each index cut to the records' window (by
    score) and expiring `ttl` after its last write, so an index of a
    queue nobody uses any more ends too; the outcome's own state index
    cut to `index_max` entries; hours older than `result_ttl` out of the
    results count; the first layout's indexes (no longer written per
    task) cut and set to expire."""
    low = now - ttl
    out = []
    for group in INDEX_GROUPS:
        index = keys.journal_state(group)
        out += [('ZREMRANGEBYSCORE', index, '-inf', low),
                ('EXPIRE', index, ttl)]
    if state in INDEX_OF:
        out.append(('ZREMRANGEBYRANK', keys.journal_state(INDEX_OF[state]),
                    0, -index_max - 1))
    name_index = keys.journal_name(name)
    out += [('ZREMRANGEBYSCORE', name_index, '-inf', low),
            ('EXPIRE', name_index, ttl)]
    for old in (keys.journal_recent, keys.journal_results):
        out += [('ZREMRANGEBYSCORE', old, '-inf', low),
                ('EXPIRE', old, ttl)]
    out += [('EVAL', TRIM_HELD, 1, keys.journal_held,
             int((now - result_ttl) // 3600)),
            ('EXPIRE', keys.journal_held, result_ttl + 3600)]
    return out


RUNNING_DROPS = progress.PROGRESS_FIELDS + (
    'finished', 'next_retry', 'duration', 'error_type', 'error_message',
    'error_traceback')
WAITING_GROUPS = ('waiting',)

_HUEY_ENQUEUE = Huey.enqueue.__code__
# enqueue_recorded's answer for a call it leaves to the general path.
NOT_TAKEN = object()


def _record_extra(eta, expires, args_text, hidden):
    """A producer's record's optional fields (`eta`, `expires`: epoch
    seconds or None) as name/value pairs, as text: hiredis packs a float
    several times slower, and a web request waits on this."""
    extra = []
    if eta is not None:
        extra += ('eta', repr(eta))
    if expires is not None:
        extra += ('expires', repr(expires))
    if args_text is not None:
        extra += ('args', args_text)
    if hidden:
        extra += ('args_sensitive', '1')
    return extra


def _enqueue_recorded(keys, task_id, name, state_index, queue_key, message,
                      now, ttl, retries, extra):
    """(command, script) for SuiteStorage.send_enqueue: the LPUSH of
    `message` and the producer's record of `task_id` as one script
    (scripts.ENQUEUE_RECORDED, by its SHA1); `now`, `ttl` and `retries`
    as text, `extra` from _record_extra."""
    return (('EVALSHA', ENQUEUE_RECORDED_SHA, 4, keys.task(task_id),
             state_index, keys.journal_name(name), queue_key, now, ttl,
             task_id, message, name, retries, *extra), ENQUEUE_RECORDED)


def _result_of(app, task):
    """What Huey's enqueue returns for `task`: its Result (a ResultGroup
    with a pipeline), None when the app keeps no results."""
    if not app.results:
        return None
    results = app._pipeline_results(task)
    return ResultGroup(results) if len(results) > 1 else results[0]


class _Enqueueing:
    """Journal.enqueueing's context manager: a class rather than a
    generator, as a producer's every enqueue pays for it."""
    __slots__ = ('stack', 'entry')

    def __init__(self, stack, task):
        self.stack = stack
        self.entry = {'task': task, 'storage': None, 'staged': None,
                      'skipped': False}

    def __enter__(self):
        self.stack.append(self.entry)

    def __exit__(self, kind, value, traceback):
        if kind is not None:
            Journal._drop_staged(self.entry)
        self.stack.remove(self.entry)
        outer = self.stack[-1] if self.stack else None
        if outer is not None and outer['skipped']:
            outer['skipped'] = False
            storage, write = outer['storage'], outer['staged']
            if write is not None and not storage.is_staged(write):
                storage.stage(write)
        return False


def _inside_huey_enqueue():
    """Whether Huey.enqueue emitted the signal being handled (it writes
    the message right after).  Frames up: Signal.send, Huey._emit,
    Huey.enqueue; if Huey ever calls differently the answer is False,
    which costs a round trip, never a lost record."""
    frame = sys._getframe(3)
    for _ in range(4):
        if frame is None:
            return False
        if frame.f_code is _HUEY_ENQUEUE:
            return True
        frame = frame.f_back
    return False
