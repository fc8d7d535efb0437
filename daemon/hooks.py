"""Extension points the delivery path calls, so the journal, metrics and
other observers plug in without the worker knowing about them.

Each list holds callables; a failing callable is logged and skipped, never
allowed to break delivery.  Callables that write to Redis should stage
their commands on the storage (`stage_command()`, or `stage()` for a Lua
script) so they ride the worker's next round trip.
"""
import logging

from . import redisconn

log = logging.getLogger('huey_worker.hooks')

# (storage, task, worker_info) -- a worker took `task` and is about to run
# it.  worker_info: dict(host, pid, consumer, worker).
on_dequeued = []
# (storage, task, replies) -- the worker's first transaction of the
# delivery went through: the on_dequeued hooks' staged writes and the
# delivery count.  `replies`: those of every command it sent, in order
# (a hook that staged a callable learns its commands' places from the
# pipeline's command_stack when the callable runs).  The worker sends the
# delivery count's HINCRBY and the read of Huey's revocation keys last:
# delivery_count(replies) reads the first.  What a hook stages here goes
# out before the task body runs (or with the outcome).
on_started = []
# (storage, task, state, duration) -- a worker is about to ack `task`;
# state is the final word of this delivery: complete, failed, retrying,
# revoked, expired, interrupted, canceled.
on_outcome = []
# (storage, messages, reason) -- raw messages put back in the queue because
# the worker or consumer that held them died or stopped (reason: 'lost',
# 'interrupted').
on_requeued = []
# (storage, record) -- a message set aside in the dead-letter list; the
# record as daemon/deadletters.py describes it (task_id None when the
# message does not say; task_id_verified False when the id is only what a
# message that failed its checks claims).  Its caller sends what is staged.
on_dead_letter = []


def delivery_count(replies):
    """The delivery count in an on_started hook's `replies`: how many times
    the message was handed to a worker without an outcome, this time
    included (1 normally; more after its worker or consumer died).  None
    when the replies do not say."""
    try:
        count = replies[-2]
    except (IndexError, TypeError):
        return None
    return count if isinstance(count, int) else None


def call(hooks, *args):
    for hook in list(hooks):
        try:
            hook(*args)
        except Exception as exc:
            name = getattr(hook, '__qualname__', hook)
            if redisconn.unavailable(exc):
                # Redis's state (a failover under way, no replica to
                # confirm a write): no bug to show a traceback for.
                log.warning('hook %s: Redis %s (%s); its write is not made',
                            name, redisconn.outage_word(exc),
                            redisconn.error_text(exc))
            else:
                log.exception('hook %s failed', name)
