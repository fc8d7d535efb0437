"""Operator actions on tasks and queues: retry, revoke and restore, cancel,
pause and resume, purge, and finding any task.  One implementation, called by the CLI
(huey_worker.cli: retry, revoke, restore, purge-queue, find), the status
endpoint's write routes (huey_worker.status.routes) and the console built
on them, so all three do exactly the same thing.

Every action:
* changes Redis in one Lua script per task (or per batch of messages), so
  it is atomic against workers, the scheduler and recovery, and is
  idempotent: a second call finds the work done and changes nothing;
* records itself in the task's history (who, from where, when:
  base.Actor) and in the record's last_action field;
* answers per task with an Outcome: done, or why not.

Modules: base (Actor, Outcome, time parsing), retry, revoke (revoke and
restore, by id or by task name), cancel (a running task), pause (pause
and resume a queue), purge (a queue's pending messages or its
schedule), find (the listing, over the journal's state and name
indexes)."""
from .base import (SELECT_MAX, ActionError, Actor, Outcome, parse_time,
                   summary)
from .cancel import RESULTS as cancel_results
from .cancel import CancelOutcome, cancel, cancel_one
from .find import find
from .pause import pause, pause_state, queue_events, resume
from .purge import purge_queue, purge_schedule, purge_size
from .retry import RETRYABLE, retry, retry_one, select_retryable
from .revoke import (REVOCABLE, resolve_name, restore, restore_name, revoke,
                     revoke_name)

__all__ = ['ActionError', 'Actor', 'Outcome', 'parse_time', 'summary',
           'find', 'purge_queue', 'purge_schedule', 'purge_size',
           'RETRYABLE', 'retry', 'retry_one', 'select_retryable',
           'REVOCABLE', 'revoke', 'restore', 'revoke_name', 'restore_name',
           'resolve_name', 'SELECT_MAX', 'CancelOutcome', 'cancel',
           'cancel_one', 'cancel_results', 'pause', 'resume', 'pause_state', 'queue_events']
