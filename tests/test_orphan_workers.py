"""Process workers die with their consumer: after a kill -9 of the consumer
alone (not of its process group), none of its worker processes runs on as
an orphan taking tasks from the queue, and the restarted consumer (same
identity), which puts back what was in flight, runs each task at most once
more than it was interrupted.  Real processes, real SIGKILL."""
import os
import signal
import time

from ops_helpers import delivery_env, wait_until

TASKS = 40


def env_for(base_env, **extra):
    # Recovery by another consumer is not what these tests watch.
    return delivery_env(base_env, HUEY_WORKER_DELIVERY_RECOVERY_TIMEOUT=60,
                        **extra)


def children(pid):
    """Pids of the live processes whose parent is `pid` (from /proc)."""
    found = []
    for entry in os.listdir('/proc'):
        if not entry.isdigit():
            continue
        stat = _stat(int(entry))
        if stat and stat[1] == pid and stat[0] != 'Z':
            found.append(int(entry))
    return sorted(found)


def _stat(pid):
    """(state, ppid) of `pid`, or None once it is gone."""
    try:
        with open('/proc/%d/stat' % pid) as fh:
            text = fh.read()
    except (FileNotFoundError, ProcessLookupError):
        return None
    fields = text[text.rindex(')') + 2:].split()
    return fields[0], int(fields[1])


def alive(pid):
    """A zombie is dead: it runs nothing and only waits to be reaped."""
    stat = _stat(pid)
    return stat is not None and stat[0] != 'Z'


def runs(app):
    return {k.decode(): int(v) for k, v in
            app.storage.conn.hgetall('test:runs').items()}


def finished(app, results):
    return sum(1 for v in app.storage.conn.mget(
        [app.storage.result_key(r.id) for r in results]) if v)


def kill_consumer_alone(daemon, workers):
    """SIGKILL to the consumer's pid only, as `kill -9 PID` would; then
    every worker process it had must be gone within two seconds."""
    os.kill(daemon.pid, signal.SIGKILL)
    daemon.proc.wait(10)
    killed_at = time.monotonic()
    wait_until(lambda: not [p for p in workers if alive(p)], timeout=2,
               interval=0.02, what='the worker processes %s to die with '
               'their consumer (still alive: %s)' % (
                   workers, [p for p in workers if alive(p)]))
    return time.monotonic() - killed_at


def test_process_workers_die_with_a_killed_consumer(producer, base_env,
                                                    start_daemon):
    import delivery_tasks
    env = env_for(base_env)
    first = start_daemon(['consumer', '--workers', '2', '--worker-type',
                          'process'], env, 'first')
    first.wait_for_output('consumer ready')
    results = [delivery_tasks.slow_counted(0.5, str(i))
               for i in range(TASKS)]
    # Both workers busy, a few tasks done.
    wait_until(lambda: finished(producer, results) >= 2,
               what='a few tasks done')
    workers = children(first.pid)
    assert len(workers) == 2, workers
    gone_after = kill_consumer_alone(first, workers)

    # No consumer runs now: nothing may be taken from the queue, nothing
    # may run, nothing may complete.
    queue = producer.storage.conn.llen(producer.storage.queue_key)
    before, done = runs(producer), finished(producer, results)
    time.sleep(2)
    assert producer.storage.conn.llen(producer.storage.queue_key) == queue
    assert runs(producer) == before
    assert finished(producer, results) == done
    # What was running when the consumer died: at most one per worker.
    interrupted = {tag for tag in before
                   if not producer.storage.conn.exists(
                       producer.storage.result_key(results[int(tag)].id))}
    assert len(interrupted) <= 2, interrupted

    second = start_daemon(['consumer', '--workers', '2', '--worker-type',
                           'process'], env, 'second')   # same identity
    second.wait_for_output('consumer ready')
    deliveries = [r.get(blocking=True, timeout=60) for r in results]
    counted = runs(producer)
    assert sorted(counted) == sorted(str(i) for i in range(TASKS))
    for tag, n in counted.items():
        allowed = 2 if tag in interrupted else 1
        assert n <= allowed, (tag, n, interrupted)
    # The second run of an interrupted task knows it is a redelivery.
    assert sum(1 for d in deliveries if d > 1) == \
        sum(1 for n in counted.values() if n > 1)
    print('workers %s gone %.2fs after the kill; %d task(s) interrupted; '
          '%d runs for %d tasks' % (workers, gone_after, len(interrupted),
                                    sum(counted.values()), TASKS))
    second.signal(signal.SIGTERM)
    assert second.wait() == 0


def test_replaced_workers_die_with_a_killed_consumer_too(
        producer, base_env, start_daemon):
    """Workers started after the first ones (recycled after max_tasks, or
    restarted after a crash) are forked by the consumer's main loop: they
    too die with the consumer, and live while it does."""
    import delivery_tasks
    env = env_for(base_env, HUEY_WORKER_CONSUMER_MAX_TASKS=2)
    daemon = start_daemon(['consumer', '--workers', '2', '--worker-type',
                           'process'], env)
    daemon.wait_for_output('consumer ready')
    original = children(daemon.pid)
    assert len(original) == 2, original
    quick = [delivery_tasks.slow_counted(0.05, 'q%d' % i) for i in range(8)]
    for r in quick:
        r.get(blocking=True, timeout=30)
    daemon.wait_for_output('recycled after 2 tasks')
    # A crash: kill -9 of one (recycled) worker; the consumer restarts it.
    recycled = wait_until(lambda: len(children(daemon.pid)) == 2 and
                          not set(children(daemon.pid)) & set(original) and
                          children(daemon.pid), what='recycled workers')
    os.kill(recycled[0], signal.SIGKILL)
    daemon.wait_for_output('died (killed by SIGKILL); restarting it')
    workers = wait_until(lambda: len(children(daemon.pid)) == 2 and
                         recycled[0] not in children(daemon.pid) and
                         children(daemon.pid), what='the restarted worker')
    # The replacements outlive the loop pass that started them.
    long_ones = [delivery_tasks.slow_counted(30, 'long%d' % i)
                 for i in range(2)]
    wait_until(lambda: len(runs(producer)) == len(quick) + 2,
               what='both long tasks running')
    time.sleep(1)
    assert all(alive(p) for p in workers)
    assert children(daemon.pid) == workers
    kill_consumer_alone(daemon, workers)
    time.sleep(1)
    assert producer.storage.conn.hlen('test:runs') == len(quick) + 2
    assert not any(producer.storage.conn.exists(
        producer.storage.result_key(r.id)) for r in long_ones)



def test_issue_13_reproduction_two_consumers_nothing_lost(
        producer, base_env, start_daemon):
    """Issue 13 §5 as reported: two consumers, one process-mode with two
    workers; kill -9 of its main pid only; six tasks submitted; whatever
    worker processes outlived it killed -9 too.  Then every one of the
    twelve tasks runs to its end (2 of 12 stayed `running` for ever when
    the workers outlived their consumer)."""
    import delivery_tasks
    env = delivery_env(base_env)     # recovered after 3 s
    doomed = start_daemon(['consumer', '--workers', '2', '--worker-type',
                           'process'], dict(
                               env, HUEY_WORKER_CONSUMER_IDENTITY='doomed'),
                          'doomed')
    doomed.wait_for_output('consumer ready')
    first = [delivery_tasks.slow_counted(2, 'a%d' % i) for i in range(6)]
    wait_until(lambda: len(runs(producer)) >= 2, what='two tasks running')
    workers = children(doomed.pid)
    assert len(workers) == 2, workers
    survivor = start_daemon(['consumer', '--workers', '2'], dict(
        env, HUEY_WORKER_CONSUMER_IDENTITY='survivor'), 'survivor')
    survivor.wait_for_output('consumer ready')
    os.kill(doomed.pid, signal.SIGKILL)
    doomed.proc.wait(10)
    second = [delivery_tasks.slow_counted(2, 'b%d' % i) for i in range(6)]
    # Past recovery_timeout: the survivor recovered `doomed`.
    wait_until(lambda: producer.storage.conn.zscore(
        producer.keys.consumers, 'doomed') is None,
        what='the killed consumer recovered')
    orphans = [p for p in workers if alive(p)]
    for pid in orphans:
        os.kill(pid, signal.SIGKILL)
    for r in first + second:
        r.get(blocking=True, timeout=60)
    assert sorted(runs(producer)) == sorted(
        ['a%d' % i for i in range(6)] + ['b%d' % i for i in range(6)])
    assert orphans == [], 'worker processes outlived their consumer'
    survivor.signal(signal.SIGTERM)
    assert survivor.wait() == 0
