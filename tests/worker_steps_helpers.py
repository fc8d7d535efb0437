"""A worker's delivery and the consumer's recovery of a dead worker, taken
step by step by the test itself (the same pieces, in the same order, as
daemon/worker.py and daemon/delivery.py call them), so that a race can be
driven in each of the orders it can take, on the session's real Redis."""
import threading

from huey_worker import context, delivery, hooks
from huey_worker.storage import message_data

# Who the stepped worker says it is, in records and lock owners.
WORKER = {'host': 'test-host', 'pid': 4242, 'consumer': 'test:main',
          'worker': 0}


def inflight_key(app, worker):
    """The in-flight list of worker number `worker` of WORKER's
    consumer."""
    return app.keys.inflight('test:main', worker, 'test')


class Delivery:
    """One delivery of the queued message `raw` (bytes, as in the queue),
    as a worker makes it: the message in the in-flight list `inflight`
    (inflight_key), the hooks and the first transaction before the body,
    the outcome and the ack after it.  take() and start() return the
    delivery, so the steps chain."""

    def __init__(self, app, raw, inflight):
        self.app, self.raw, self.inflight = app, raw, inflight
        self.storage = app.storage
        self.task = app.deserialize_task(message_data(raw))

    def take(self):
        """The message moves from the queue into the in-flight list."""
        conn = self.storage.conn
        assert conn.lrem(self.storage.queue_key, 1, self.raw) == 1
        conn.lpush(self.inflight, self.raw)
        return self

    def start(self):
        storage, task = self.storage, self.task
        hooks.call(hooks.on_dequeued, storage, task, WORKER)
        # Last, as the worker sends them: the delivery count, and the read
        # of Huey's revocation keys.
        replies = storage.flush_all(
            ('HINCRBY', storage.keys.deliveries, task.id, 1),
            ('MGET', *[storage.result_key(k)
                       for k in self.app._revoke_keys(task)]))
        hooks.call(hooks.on_started, storage, task, replies)
        storage.flush()
        context.set_current(task, replies[-2], WORKER)
        return self

    def die(self):
        """The worker is killed in the body: no release of what it holds,
        no outcome, no ack; the message stays in its in-flight list."""
        context.clear_current()

    def finish(self, state='complete'):
        """The body ended `state`: the ack and the outcome, one round
        trip."""
        storage, task = self.storage, self.task
        context.clear_current()
        storage.stage_command('LREM', self.inflight, 1, self.raw)
        storage.stage_command('HDEL', storage.keys.deliveries, task.id)
        hooks.call(hooks.on_outcome, storage, task, state, 0.01)
        storage.flush()


def in_consumer_thread(fn, *args):
    """fn(*args) where the consumer's recovery of a dead worker runs: a
    thread of its own, with no task context and nothing staged; its
    value.  AssertionError if it has not returned within 30 s."""
    out = []
    thread = threading.Thread(target=lambda: out.append(fn(*args)))
    thread.start()
    thread.join(30)
    assert out, 'the recovery did not finish'
    return out[0]


def requeue(app, inflight, with_hooks=True):
    """The consumer putting a dead worker's message (the in-flight list
    `inflight`) back in the queue, as 'lost'; how many messages moved.
    with_hooks=False: the move alone, its on_requeued hooks not called yet
    (in the consumer they run right after it, in the same thread)."""
    def move():
        if with_hooks:
            return delivery.Delivery(app.storage).requeue_list(inflight,
                                                               'lost')
        held = list(hooks.on_requeued)
        hooks.on_requeued[:] = []
        try:
            return delivery.Delivery(app.storage).requeue_list(inflight,
                                                               'lost')
        finally:
            hooks.on_requeued[:] = held
    return in_consumer_thread(move)
