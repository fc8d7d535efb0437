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
        # Scheduler (leader election and what it did); written by the
        # scheduler daemon, read by the status endpoint and CLI.
        self.scheduler_lease = p + 'scheduler:lease'  # owner token, PX lease
        self.scheduler_info = p + 'scheduler:info'    # JSON: leader, last slot
        # Task journal (daemon/journal/): indexes and metrics counters.
        self.journal_recent = p + 'journal:recent'    # zset: id -> last change
        self.journal_results = p + 'journal:results'  # zset: id -> finished
        self.metrics_outcomes = p + 'metrics:outcomes'    # hash: name\tstate
        self.metrics_durations = p + 'metrics:durations'  # hash: name\tbucket

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
        return '%sinflight:%s:%s:%s' % (self.prefix, identity, incarnation,
                                         worker)

    def task(self, task_id):
        return '%stask:%s' % (self.prefix, task_id)

    def task_log(self, task_id):
        """List of one task's state changes (the journal's history)."""
        return '%stask-log:%s' % (self.prefix, task_id)
