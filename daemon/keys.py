"""Redis key names of the suite.  Everything lives under `hw:<queue>:`,
apart from Huey's own keys (queue, schedule, results), so `redis-cli --scan
--pattern 'hw:*'` shows exactly what the suite added."""


class Keys:
    def __init__(self, queue):
        self.queue = queue
        self.prefix = 'hw:%s:' % queue
        p = self.prefix
        self.consumers = p + 'consumers'        # zset: identity -> last beat
        self.deliveries = p + 'deliveries'      # hash: task id -> deliveries
        self.dead = p + 'dead'                  # list of dead-letter records
        self.stats = p + 'stats'                # hash of cumulative counters
        # Messages with a priority (Huey's priority=), beside Huey's list
        # of plain ones: zset member -> -priority (daemon/storage.py).
        self.priority = p + 'priority'
        self.priority_seq = p + 'priority:seq'  # FIFO within a priority
        # Set by an adopted PriorityRedisHuey's consumers and CLI: the queue
        # is Huey's sorted set (storage.NATIVE_LAYOUT), even while empty.
        self.layout = p + 'layout'
        # Scheduler (leader election and what it did); written by the
        # scheduler daemon, read by the status endpoint and CLI.
        self.scheduler_lease = p + 'scheduler:lease'  # owner token, PX lease
        self.scheduler_info = p + 'scheduler:info'    # JSON: leader, last slot
        # Task journal (daemon/journal/): indexes and metrics counters.
        # journal:recent and journal:results are the first layout's
        # per-task indexes: no longer written per task (the state indexes
        # list every record; results_held counts results by the hour),
        # still read and trimmed until what they hold has expired.
        self.journal_recent = p + 'journal:recent'    # zset: id -> last change
        self.journal_results = p + 'journal:results'  # zset: id -> finished
        # hash: hour (epoch seconds // 3600) -> results Huey stored then
        self.journal_held = p + 'journal:results-held'
        self.metrics_outcomes = p + 'metrics:outcomes'    # hash: name\tstate
        self.metrics_durations = p + 'metrics:durations'  # hash: name\tbucket
        # Enqueued (or due) to started, per task name: name\tbucket, sum.
        self.metrics_waits = p + 'metrics:waits'
        # hash: in-flight list of a gone consumer -> Redis time (ms) it was
        # first seen holding messages (Delivery.sweep_orphans).
        self.inflight_orphans = p + 'inflight-orphans'
        # Where the operator actions and GET /tasks find any task still in
        # retention: per state group and per task name (ids only, scored
        # by time: daemon/journal/layout.py INDEX_OF).
        self.journal_state_prefix = p + 'journal:state:'
        self.journal_name_prefix = p + 'journal:name:'
        # Pause (daemon/actions/pause.py): present while the queue is
        # paused (JSON: who paused it, when, from where; no expiry), and
        # the queue's operator events (JSON, newest first, capped).
        self.paused = p + 'paused'
        self.events = p + 'events'
        # Cancel (daemon/actions/cancel.py): one mark per task id, and
        # one per message (its SHA-1), which the put-back scripts read.
        self.cancel_prefix = p + 'cancel:'
        self.cancel_message_prefix = p + 'cancel-message:'

    def consumer(self, identity):
        """Hash describing one live consumer; expires without heartbeats."""
        return '%sconsumer:%s' % (self.prefix, identity)

    def consumer_lists(self, identity):
        """Set of the in-flight list keys one consumer has used."""
        return '%sinflight-lists:%s' % (self.prefix, identity)

    def inflight(self, identity, worker, incarnation):
        """The list holding the message one worker is running.  Each start
        of a consumer (incarnation) has lists of its own, so a queue read
        still pending from a killed predecessor cannot land in a list the
        successor uses; the successor sweeps its predecessors' lists."""
        return '%s%s:%s' % (self.inflight_prefix(identity), incarnation,
                            worker)

    def inflight_prefix(self, identity):
        """What every in-flight list of `identity` starts with: recovery
        finds them by SCAN, whether or not an index still names them."""
        return '%sinflight:%s:' % (self.prefix, identity)

    def identity_of_inflight(self, key):
        """The consumer identity an in-flight list key is named after (an
        identity may hold colons: host:instance), or None for another
        key."""
        head = self.prefix + 'inflight:'
        if not key.startswith(head):
            return None
        parts = key[len(head):].rsplit(':', 2)
        return parts[0] if len(parts) == 3 and parts[0] else None

    def task(self, task_id):
        return '%stask:%s' % (self.prefix, task_id)

    def task_log(self, task_id):
        """List of one task's state changes (the journal's history)."""
        return '%stask-log:%s' % (self.prefix, task_id)

    def journal_state(self, group):
        """Zset of the ids of tasks whose state is in `group` (layout.
        INDEX_OF: 'waiting', 'running', or an end state), scored by when
        they entered it."""
        return self.journal_state_prefix + group

    def journal_name(self, name):
        """Zset of the ids of tasks of task name `name`, scored by when
        they were enqueued (or first seen)."""
        return self.journal_name_prefix + name

    def message(self, task_id):
        """String: the message of a task that ended failed, revoked or
        canceled (or was set aside, or purged), in the form the queue holds
        it, kept as long as its record so a retry runs the same
        arguments."""
        return '%smessage:%s' % (self.prefix, task_id)

    def cancel(self, task_id):
        """String: an operator asked to cancel `task_id` (JSON: who, when,
        from where); lives as long as the task's record."""
        return self.cancel_prefix + task_id

    def cancel_message(self, digest):
        """String: the message whose SHA-1 (hex) is `digest` belongs to a
        cancelled task: a script putting it back drops it instead."""
        return self.cancel_message_prefix + digest
