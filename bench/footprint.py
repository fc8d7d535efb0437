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

    .venv/bin/python bench/footprint.py [--tasks N] [--runs N]
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


def run_once(client, make, warmup, enqueue, count, timeout=300):
    """Bytes of used_memory per finished task, and the breakdown.  Both
    readings are taken with no consumer connected (its client buffers
    would be noise against a small batch)."""
    wait_redis_idle(client)
    client.flushdb()   # our private server, started by this benchmark
    warm_key = warmup()
    contender = make().start()
    try:
        wait_until(lambda: client.exists(warm_key), 60, 'warm-up result',
                   interval=0.005)
    finally:
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
    args = parser.parse_args(argv)
    import run as bench_run
    with private_redis('huey-worker-footprint-') as (server, workdir):
        os.environ['BENCH_REDIS_URL'] = server.url
        bench = bench_run.Bench(bench_run.parse_args([]), server, workdir)
        out = measure(bench, args.tasks, args.runs,
                      progress=bench_run.progress)
    shutil.rmtree(workdir, ignore_errors=True)
    from table import cell, ratio_cell
    print('bytes per finished task: suite %s, plain huey %s, ratio %s' % (
        cell(out['suite']), cell(out['plain']),
        ratio_cell(out['suite'], out['plain'])))
    for who, parts in out['breakdown'].items():
        print('%s (MEMORY USAGE per task):' % who)
        for name, size in sorted(parts.items(), key=lambda p: -p[1]):
            print('  %8.1f  %s' % (size, name))
    return 0


if __name__ == '__main__':
    sys.exit(main())
