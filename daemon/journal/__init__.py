"""The task journal: every task's life, recorded in Redis under the suite's
own keys (never in Huey's result store), read by the status endpoint and
the operator CLI.

Layout (hw:<queue>: prefix, see daemon/keys.py):
  task:<id>       hash, the record: state, name, args summary, times,
                  attempt, retries, worker, progress, metadata, error, result
  task-log:<id>   list, the last LOG_LENGTH state changes (JSON) but those
                  the record tells: the producer's first (its `enqueued`,
                  reads.with_enqueue_event; pushed only with an eta), a
                  delivery's running (a field run:<started>) and its end
                  (`unlogged` 'o'): reads.unlogged_events.  A task run
                  once to its end has no list; whatever ends a delivery
                  otherwise or overwrites its fields pushes them first
                  (the worker for a retry or its own requeue, FOLD_LUA in
                  the scripts of requeues and actions)
  journal:state:<group>  zset id -> when it entered its state (listings)
  journal:name:<name>    zset id -> when it was enqueued
  journal:results-held   hash hour -> results Huey stored then
  message:<id>    string, the message of a failed/revoked/canceled task
  metrics:*       hashes of per-task-name counters for /metrics
Every record, log and kept message expires [journal] retention (at most
[huey] result_timeout) after its last change, and the indexes are cut to
the same window and expire, so nothing grows without bound; Huey's result
outlives the record and answers for it after that (reads.read_task).
The first layout's journal:recent and journal:results are read until
they expire (docs/journal.md, "The first layout").

Writers:
  producer  Huey's SIGNAL_ENQUEUED: pending (scheduled with a future eta);
            staged, so it rides the LPUSH of the enqueue itself, and only
            that: an enqueue that raises (pickling, Redis) leaves none.
            Five commands (record, its TTL, two index entries, the name
            index's TTL), sent with the LPUSH as one script
            (scripts.ENQUEUE_RECORDED): a web request waits on them.
            A task without eta or priority skips the staging:
            Journal.enqueue_recorded does Huey's enqueue and this in
            one step.
  worker    huey_worker.hooks: on_dequeued -> running (and on_started, for
            a task no producer recorded, the rest of its record: a plain
            Huey producer's); on_outcome -> complete,
            failed, retrying, revoked, expired, canceled, scheduled;
            on_requeued -> lost / interrupted, then pending; on_dead_letter
            -> failed (guarded when the id is only what a message that
            failed its checks claims).  Staged, so they ride the worker's
            own round trips.
  Huey's post_execute hook hands over what the hooks lack (the return
  value and the exception).
  reader    a task the journal has no record of, looked for among the
            queued messages (seen.py) and recorded pending when found.
Each change is a fixed handful of commands (HSET, EXPIRE, RPUSH, LTRIM,
ZADD...): O(1) per change, no KEYS anywhere.

Modules: layout (states, encoding), writer (the hooks), scripts (Lua for
the guarded changes), reads (for the endpoint and the CLI), seen (tasks
found waiting in the queue with no record).  The
in-task API lives in daemon/progress.py and is re-exported here.
"""
import contextlib

from huey import signals as S

from .. import hooks
from ..progress import (  # the public in-task API
    current_delivery, current_task_id, report_progress, sensitive)
from .layout import (
    DURATION_BUCKETS, STATES, TERMINAL, args_summary, result_json)
from .reads import decode_record, is_terminal, list_tasks, read_task, shape
from .seen import find_queued, seen_queued
from .writer import NOT_TAKEN, Journal

_journals = {}


def enqueueing(app, task):
    """Context manager around Huey's enqueue of `task` by `app`
    (huey_worker.app.SuiteApp.enqueue): the record the enqueue signal
    stages is sent with the enqueue's write, or dropped when the enqueue
    raises."""
    journal = _journals.get(id(app))
    if journal is None:
        return contextlib.nullcontext()
    return journal.enqueueing(task)


def enqueue_recorded(app, task):
    """Huey's enqueue of `task` by `app` with its record, in one step, when
    the task is a plain one (huey_worker.app.SuiteApp.enqueue): the
    result handle Huey's enqueue returns, or NOT_TAKEN for the general
    path (enqueueing around Huey's own enqueue)."""
    journal = _journals.get(id(app))
    if journal is None:
        return NOT_TAKEN
    return journal.enqueue_recorded(task)


def install(app):
    """Record the life of every task of `app` (idempotent).  Called for the
    shared app when huey_worker.app is imported; [journal] enabled switches it."""
    journal = _journals.get(id(app))
    if journal is not None:
        return journal
    journal = _journals[id(app)] = Journal(app)
    app._signal.connect(journal.on_enqueued, S.SIGNAL_ENQUEUED)
    app.post_execute('huey_worker.journal')(journal.after_execute)
    hooks.on_dequeued.append(journal.on_dequeued)
    hooks.on_started.append(journal.on_started)
    hooks.on_outcome.append(journal.on_outcome)
    hooks.on_requeued.append(journal.on_requeued)
    hooks.on_dead_letter.append(journal.on_dead_letter)
    return journal


__all__ = [
    'report_progress', 'current_delivery', 'current_task_id', 'sensitive',
    'install', 'enqueueing', 'enqueue_recorded', 'NOT_TAKEN', 'Journal',
    'STATES', 'TERMINAL', 'DURATION_BUCKETS',
    'args_summary', 'result_json', 'read_task', 'list_tasks', 'shape',
    'decode_record', 'is_terminal', 'seen_queued', 'find_queued']
