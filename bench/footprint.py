"""Redis memory held per finished task: the suite (journal on, default
settings) against plain huey's RedisExpireHuey, on the same private Redis
in the same run.

One run per contender: the database is emptied, a consumer started, given
one warm-up task and stopped, then INFO memory's used_memory is read; N
no-op tasks go through the contender's producer (the suite's: journal
records included) and a consumer started again; once every result exists
the consumer stops, and used_memory is read again (the consumer's own
bookkeeping, a fixed handful of keys, is in both readings).  The difference over N is the figure: what
Redis holds per finished task, allocator overhead, dictionary entries and
expiry entries included (MEMORY USAGE misses the last two).  Beside it,
per kind of key, the MEMORY USAGE sum over N (`breakdown`), to show where
the bytes are.

Then the steady state the issue's figure is about (a week of results
held, journal records for a day): run_held, time compressed.

    .venv/bin/python bench/footprint.py [--tasks N] [--runs N]
                                        [--held-rate N]
"""
import argparse
import os
import re
import shutil
import sys
import time

BENCH = os.path.dirname(os.path.abspath(__file__))
sys.path[:0] = [os.path.dirname(BENCH), BENCH]

from harness import (  # noqa: E402
    Figure, private_redis, wait_redis_idle, wait_until)


def used_memory(client):
    # A few reads: used_memory moves by a few bytes between two calls
    # (client buffers), which is noise against thousands of tasks.
    return client.info('memory')['used_memory']


_ID = re.compile(r'[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-'
                 r'[0-9a-f]{12}')


def breakdown(client, count):
    """{kind of key: MEMORY USAGE bytes per task}: a task id in a key's
    name becomes ID, so each task's keys add up under one kind."""
    sums = {}
    for key in client.scan_iter(count=1000):
        name = _ID.sub('ID', key.decode('utf-8', 'replace'))
        size = client.memory_usage(key, samples=0) or 0
        sums[name] = sums.get(name, 0) + size
    return {name: size / count for name, size in sums.items()
            if size / count >= 1}


def started_warm(client, make, warmup):
    """An emptied database and a contender started that has run one
    warm-up task: (the contender, the warm-up result's key)."""
    wait_redis_idle(client)
    client.flushdb()   # our private server, started by this benchmark
    warm_key = warmup()
    contender = make().start()
    try:
        wait_until(lambda: client.exists(warm_key), 60, 'warm-up result',
                   interval=0.005)
    except BaseException:
        contender.stop(graceful=True)
        raise
    return contender, warm_key


def run_once(client, make, warmup, enqueue, count, timeout=300):
    """Bytes of used_memory per finished task, and the breakdown.  Both
    readings are taken with no consumer connected (its client buffers
    would be noise against a small batch)."""
    contender, _ = started_warm(client, make, warmup)
    contender.stop(graceful=True)
    wait_redis_idle(client)
    before = used_memory(client)
    result_keys = enqueue(count)
    contender = make().start()
    try:
        deadline = time.monotonic() + timeout
        while sum(client.exists(*result_keys[i:i + 1000])
                  for i in range(0, count, 1000)) < count:
            if time.monotonic() > deadline:
                raise RuntimeError('%s left results missing; log: %s' % (
                    contender.label, contender.log_path))
            time.sleep(0.02)
        time.sleep(0.2)    # the last outcomes written
    finally:
        contender.stop(graceful=True)
    wait_redis_idle(client)
    after = used_memory(client)
    return {'bytes': (after - before) / count,
            'breakdown': breakdown(client, count)}


def run_held(client, make, warmup, enqueue_one, rate, result_timeout,
             retention):
    """Bytes of used_memory per task held at a steady rate: tasks go in at
    `rate` per second, and once results have been expiring for a while
    (result_timeout + retention + 2 seconds in all, journal records
    expiring after `retention`) the memory over the baseline is divided
    by the tasks whose results are alive (enqueued within the last
    `result_timeout` seconds).  The same as a week of tasks held with
    records for a day, time compressed: what Redis holds, keys expired
    but not yet reclaimed by Redis included."""
    contender, warm_key = started_warm(client, make, warmup)
    try:
        time.sleep(0.3)
        client.delete(warm_key)
        before = used_memory(client)
        started = time.monotonic()
        duration = result_timeout + retention + 2
        times = []
        sent = 0
        while True:
            now = time.monotonic() - started
            if now >= duration:
                break
            due = int(now * rate)
            while sent < due:
                enqueue_one()
                times.append(time.monotonic())
                sent += 1
            time.sleep(0.01)
        time.sleep(0.5)   # the last outcomes written
        after = used_memory(client)
        end = time.monotonic()
        alive = sum(1 for t in times if t >= end - result_timeout)
    finally:
        contender.stop(graceful=True)
    return {'bytes': (after - before) / alive, 'alive': alive}


def measure_held(bench_like, runs, rate=400, result_timeout=14, retention=2,
                 progress=None):
    """{'suite': Figure, 'plain': Figure}: run_held for both, alternating,
    with result_timeout : retention as the defaults' 7 days : 1 day."""
    from huey_worker import config
    b = bench_like
    timeouts = {'HUEY_RESULT_TIMEOUT': str(result_timeout),
                'HUEY_WORKER_JOURNAL_RETENTION': str(retention)}
    empty = os.path.join(b.workdir, 'empty.ini')
    held_cfg = config.load(empty, environ=dict(timeouts,
                                               HUEY_REDIS_URL=b.url))
    # For huey_consumer's plain_tasks.huey (bench/plain_tasks.py).
    os.environ['BENCH_RESULT_TIMEOUT'] = str(result_timeout)
    figures = {'suite': Figure(), 'plain': Figure()}
    try:
        b.app.configure(held_cfg)
        contenders = {
            'suite': (lambda: b.suite(2, 'thread', task_events='none',
                                      extra_env=timeouts),
                      lambda: b.app.storage.result_key(b.tasks.noop().id),
                      b.tasks.noop),
            'plain': (lambda: b.plain_consumer(2, 'thread', quiet=True),
                      lambda: b.plain.storage.result_key(
                          b.plain_tasks.noop().id),
                      b.plain_tasks.noop),
        }
        for run in range(runs):
            order = ['suite', 'plain'] if run % 2 == 0 else ['plain', 'suite']
            for who in order:
                make, warm, enqueue_one = contenders[who]
                out = run_held(b.client, make, warm, enqueue_one, rate,
                               result_timeout, retention)
                figures[who].add(out['bytes'])
                if progress:
                    progress('footprint held %s run %d: %.0f bytes/task '
                             '(%d results alive)' % (who, run + 1,
                                                     out['bytes'],
                                                     out['alive']))
    finally:
        b.app.configure(b.cfg)
        os.environ.pop('BENCH_RESULT_TIMEOUT', None)
    return figures


def suite_enqueue(app, task):
    storage = app.storage

    def enqueue(count):
        ids = []
        for _ in range(count):
            ids.append(task().id)
        return [storage.result_key(i) for i in ids]
    return enqueue


def plain_enqueue(app, task):
    storage = app.storage

    def enqueue(count):
        return [storage.result_key(task().id) for _ in range(count)]
    return enqueue


def measure(bench_like, count, runs, progress=None):
    """{'suite': Figure, 'plain': Figure, 'breakdown': {who: {...}}} over
    `runs` alternating runs.  `bench_like`: bench/run.py's Bench."""
    b = bench_like
    contenders = {
        'suite': (lambda: b.suite(2, 'thread', task_events='none'),
                  lambda: b.app.storage.result_key(b.tasks.noop().id),
                  suite_enqueue(b.app, b.tasks.noop)),
        'plain': (lambda: b.plain_consumer(2, 'thread', quiet=True),
                  lambda: b.plain.storage.result_key(
                      b.plain_tasks.noop().id),
                  plain_enqueue(b.plain, b.plain_tasks.noop)),
    }
    figures = {'suite': Figure(), 'plain': Figure()}
    shown = {}
    for run in range(runs):
        order = ['suite', 'plain'] if run % 2 == 0 else ['plain', 'suite']
        for who in order:
            make, warm, enqueue = contenders[who]
            out = run_once(b.client, make, warm, enqueue, count)
            figures[who].add(out['bytes'])
            shown[who] = out['breakdown']
            if progress:
                progress('footprint %s run %d: %.0f bytes/task' % (
                    who, run + 1, out['bytes']))
    return {'suite': figures['suite'], 'plain': figures['plain'],
            'breakdown': shown}


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    parser.add_argument('--tasks', type=int, default=5000)
    parser.add_argument('--runs', type=int, default=3)
    parser.add_argument('--held-rate', type=int, default=400,
                        help='tasks/s of the steady-state runs (0: none)')
    args = parser.parse_args(argv)
    import run as bench_run
    with private_redis('huey-worker-footprint-') as (server, workdir):
        os.environ['BENCH_REDIS_URL'] = server.url
        bench = bench_run.Bench(bench_run.parse_args([]), server, workdir)
        out = measure(bench, args.tasks, args.runs,
                      progress=bench_run.progress)
        held = measure_held(bench, args.runs, rate=args.held_rate,
                            progress=bench_run.progress) \
            if args.held_rate else None
    shutil.rmtree(workdir, ignore_errors=True)
    from table import cell, ratio_cell
    print('bytes per finished task: suite %s, plain huey %s, ratio %s' % (
        cell(out['suite']), cell(out['plain']),
        ratio_cell(out['suite'], out['plain'])))
    if held:
        print('bytes per task held at a steady rate (results 14 s, journal '
              '2 s: 7 d and 1 d compressed): suite %s, plain huey %s, '
              'ratio %s' % (cell(held['suite']), cell(held['plain']),
                            ratio_cell(held['suite'], held['plain'])))
    for who, parts in out['breakdown'].items():
        print('%s (MEMORY USAGE per task):' % who)
        for name, size in sorted(parts.items(), key=lambda p: -p[1]):
            print('  %8.1f  %s' % (size, name))
    return 0


if __name__ == '__main__':
    sys.exit(main())
