"""No-op task throughput of one consumer process, with its start-up time
and memory on the way.

One run: the database is emptied, one warm-up task is queued, the consumer
is started (READY=1 and the warm-up task's result timed from the spawn),
its idle memory is read, then a batch of N no-op tasks prepared in a
staging list is put in the queue at once with RENAME (the consumer is
already waiting, so its start-up is not in the figure).  The clock stops
when the results of the last tasks of the batch exist (the queue is FIFO:
every earlier one is done or finishing); every result is then checked, so
a consumer that skips tasks cannot look fast.  Memory is sampled while it
works.
"""
import threading
import time
import uuid

from harness import (CHUNK, STAGING, Timeout, cpu_seconds, pss_mib, rss_mib,
                     staged_enqueue, wait_redis_idle, wait_until)

STAGING_PRIORITY = STAGING + ':priority'



class Batch:
    """N messages waiting in STAGING, and the result keys to look for."""

    def __init__(self, client, queue_key, result_keys):
        self.client, self.queue_key = client, queue_key
        self.result_keys = result_keys

    def release(self):
        started = time.perf_counter()
        self.client.rename(STAGING, self.queue_key)
        return started

    def wait_done(self, tail, timeout):
        keys = self.result_keys[-tail:]
        wait_until(lambda: self.client.exists(*keys) == len(keys), timeout,
                   'results of the last %d tasks' % len(keys))
        return time.perf_counter()

    def missing(self):
        absent = 0
        for i in range(0, len(self.result_keys), 1000):
            keys = self.result_keys[i:i + 1000]
            absent += len(keys) - self.client.exists(*keys)
        return absent


def suite_batch(app, task, count):
    """Through the suite's producer API, journal records included: staged
    and sent in MULTI blocks, with the queue key pointed at STAGING while
    they go out."""
    storage = app.storage
    queue_key = storage.queue_key
    ids = []
    with staged_enqueue(storage) as one_more:
        for _ in range(count):
            ids.append(task().id)
            one_more()
    return Batch(storage.conn, queue_key,
                 [storage.result_key(i) for i in ids])


class PriorityBatch(Batch):
    """A batch of messages with a priority: the set and the marker wait
    under staging keys and are released together."""

    def release(self):
        started = time.perf_counter()
        pipe = self.client.pipeline(transaction=True)
        pipe.rename(STAGING_PRIORITY, self.priority_key)
        pipe.rename(STAGING, self.queue_key)
        pipe.execute()
        return started


def suite_priority_batch(app, task, count, priority=1):
    """suite_batch with every task given `priority`: they wait in the
    priority set and workers take them with the TAKE script (one priority
    for all, so they still run in the order sent)."""
    storage = app.storage
    queue_key, priority_key = storage.queue_key, storage.priority_key
    storage.priority_key = STAGING_PRIORITY
    ids = []
    try:
        with staged_enqueue(storage) as one_more:
            for _ in range(count):
                ids.append(task(priority=priority).id)
                one_more()
    finally:
        storage.priority_key = priority_key
    batch = PriorityBatch(storage.conn, queue_key,
                          [storage.result_key(i) for i in ids])
    batch.priority_key = priority_key
    return batch


def plain_batch(app, task, count):
    storage = app.storage
    ids, pipe = [], storage.conn.pipeline(transaction=False)
    for i in range(count):
        message = task.s()
        ids.append(message.id)
        pipe.lpush(STAGING, app.serialize_task(message))
        if (i + 1) % CHUNK == 0:
            pipe.execute()
    pipe.execute()
    return Batch(storage.conn, storage.queue_key,
                 [storage.result_key(i) for i in ids])


def floor_batch(client, count):
    ids = [uuid.uuid4().hex.encode() for _ in range(count)]
    pipe = client.pipeline(transaction=False)
    for i, task_id in enumerate(ids):
        pipe.lpush(STAGING, task_id)
        if (i + 1) % CHUNK == 0:
            pipe.execute()
    pipe.execute()
    return Batch(client, 'huey.redis.huey',
                 [b'huey.r.huey.' + i for i in ids])


class MemorySampler(threading.Thread):
    """Highest RSS (main process) and PSS (whole tree) while it runs."""

    def __init__(self, pid, interval=0.1):
        super().__init__(daemon=True)
        self.pid, self.interval = pid, interval
        self.rss = self.pss = 0.0
        self._halt = threading.Event()

    def run(self):
        while not self._halt.is_set():
            self.sample()
            self._halt.wait(self.interval)

    def sample(self):
        self.rss = max(self.rss, rss_mib(self.pid))
        self.pss = max(self.pss, pss_mib(self.pid))

    def finish(self):
        self._halt.set()
        self.join()
        self.sample()
        return self.rss, self.pss


def run_once(client, contender, warmup, make_batch, count, timeout=300,
             settle=0.5):
    """One measured run; a dict of figures.  `warmup()` queues one task and
    returns its result key; `make_batch(count)` prepares the batch."""
    wait_redis_idle(client)
    client.flushdb()   # our private server, started by this benchmark
    warm_key = warmup()
    notify = contender.label == 'suite'
    contender.start(notify=notify)
    out = {}
    try:
        if notify:
            out['ready'] = contender.wait_ready()
        elif contender.label == 'floor':
            wait_until(lambda: 'ready' in contender.output(), 30,
                       'floor ready', interval=0.01)
        wait_until(lambda: client.exists(warm_key) or
                   (not contender.alive() and _died(contender)), 60,
                   'warm-up result', interval=0.001)
        out['first_task'] = time.monotonic() - contender.started
        time.sleep(settle)   # start-up done before "idle" is read
        out['idle_rss'] = rss_mib(contender.pid)
        out['idle_pss'] = pss_mib(contender.pid)
        batch = make_batch(count)
        sampler = MemorySampler(contender.pid)
        sampler.start()
        cpu_before = cpu_seconds(contender.pid)
        redis_before = redis_cpu(client)
        started = batch.release()
        try:
            finished = batch.wait_done(max(1, contender.workers), timeout)
        except Timeout:
            sampler.finish()
            raise RuntimeError('%s did not finish %d tasks within %ds; its '
                               'log: %s' % (contender.label, count, timeout,
                                            contender.log_path))
        out['cpu_us'] = (cpu_seconds(contender.pid) - cpu_before) / count * 1e6
        out['redis_cpu_us'] = (redis_cpu(client) - redis_before) / count * 1e6
        out['busy_rss'], out['busy_pss'] = sampler.finish()
        _check_all_done(batch, contender, count)
        out['rate'] = count / (finished - started)
    finally:
        contender.stop()
    return out


def redis_cpu(client):
    """CPU seconds the Redis server has used (its main thread and all)."""
    info = client.info('cpu')
    return info['used_cpu_sys'] + info['used_cpu_user']


def _check_all_done(batch, contender, count):
    """Every task of the batch left a result (the last ones finishing
    first is possible with several workers, so allow a moment)."""
    deadline = time.monotonic() + 30
    while True:
        absent = batch.missing()
        if not absent:
            return
        if time.monotonic() > deadline:
            raise RuntimeError('%s: %d of %d results missing; log: %s' % (
                contender.label, absent, count, contender.log_path))
        time.sleep(0.05)


def _died(contender):
    raise RuntimeError('%s exited (%s) before its first task; log: %s' % (
        contender.label, contender.proc.returncode, contender.log_path))
