"""The cost of [redis] durable_writes: the enqueue rate of one producer and
the drain rate of one consumer with each enqueue and each ack WAITing for a
replica (WAIT 1), against the same without, on a private primary and
replica on loopback ports.  Runs alternate plain and durable; each figure
is the median (min-max) of its runs, and the ratio durable/plain the
median of the runs' ratios.

    .venv/bin/python bench/durable.py [--runs 3] [--tasks 2000]
        [--workers 4] [--worker-type thread]
"""
import argparse
import os
import shutil
import sys

BENCH = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, BENCH)

DURABLE = '1'   # seconds: the WAIT timeout, never reached with a replica up


def parse_args(argv):
    parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
    parser.add_argument('--runs', type=int, default=3)
    parser.add_argument('--tasks', type=int, default=2000,
                        help='tasks per run, enqueued and drained')
    parser.add_argument('--workers', type=int, default=4)
    parser.add_argument('--worker-type', default='thread',
                        choices=('thread', 'process'))
    return parser.parse_args(argv)


def start_replica(primary, workdir):
    """An EmbeddedRedis replica of `primary`, in sync."""
    from harness import wait_until
    from huey_worker.devredis import EmbeddedRedis
    replica = EmbeddedRedis(os.path.join(workdir, 'replica'), persist=False)
    replica.start()
    primary.client().config_set('repl-diskless-sync-delay', 0)
    replica.client().replicaof('127.0.0.1', primary.port)
    wait_until(lambda: replica.client().info('replication').get(
        'master_link_status') == 'up', 30, 'replica in sync', interval=0.05)
    return replica


def line(name, plain, durable, unit):
    """One figure's line; the ratio is the median of each run's
    durable/plain (neighbour runs share the machine's load)."""
    import statistics
    ratios = [d / p for d, p in zip(durable.values, plain.values)]
    return '%-8s plain %6.0f %s (%.0f-%.0f)  durable %6.0f %s (%.0f-%.0f)  ' \
        'durable/plain %.2fx (%.2f-%.2f)' % (
            name, plain.median, unit, plain.low, plain.high, durable.median,
            unit, durable.low, durable.high, statistics.median(ratios),
            min(ratios), max(ratios))


def main(argv=None):
    args = parse_args(argv)
    from harness import private_redis
    with private_redis('huey-worker-durable-') as (primary, workdir):
        figures = with_replica(primary, workdir, args.runs, args.tasks,
                               args.workers, args.worker_type)
    print('durable_writes (WAIT 1 on each enqueue and each ack), one '
          'replica on loopback; %d runs of %d tasks, %d %s workers' % (
              args.runs, args.tasks, args.workers, args.worker_type))
    for what in ('enqueue', 'drain'):
        print(line(what, figures[what, 'plain'], figures[what, 'durable'],
                   'tasks/s'))
    shutil.rmtree(workdir, ignore_errors=True)
    return 0


def with_replica(primary, workdir, runs, tasks, workers, worker_type):
    """measure() with a replica of `primary` (an EmbeddedRedis) started
    for it and removed after; the same figures.  bench/run.py's durable
    section calls it on the benchmark's own Redis."""
    replica = start_replica(primary, workdir)
    try:
        return measure(primary, workdir, runs, tasks, workers, worker_type)
    finally:
        replica.cleanup()


def measure(primary, workdir, runs, tasks, workers, worker_type):
    """{(enqueue or drain, plain or durable): Figure of tasks/s}: `runs`
    alternating runs of `tasks` enqueued by one producer, then drained by
    a consumer of `workers` `worker_type` workers, on `primary` (which
    must have a replica in sync)."""
    import enqueue as enq
    import throughput as tp
    from harness import Figure, SuiteConsumer
    from huey_worker import app as app_module
    from huey_worker import config

    os.environ['BENCH_REDIS_URL'] = primary.url
    client = primary.client()
    empty = os.path.join(workdir, 'empty.ini')
    open(empty, 'w').close()
    durable_env = {'HUEY_WORKER_REDIS_DURABLE_WRITES': DURABLE}
    cfgs = {mode: config.load(empty, environ=dict(
        {'HUEY_REDIS_URL': primary.url},
        **(durable_env if mode == 'durable' else {})))
        for mode in ('plain', 'durable')}
    app = app_module.huey.configure(cfgs['plain'])
    import bench_tasks
    figures = {(what, mode): Figure() for what in ('enqueue', 'drain')
               for mode in cfgs}
    for run in range(runs):
        for mode, cfg in cfgs.items():
            app.configure(cfg)
            figures['enqueue', mode].add(
                enq.rate(client, bench_tasks.noop, tasks))
            # The batch is staged by a plain producer: only the consumer's
            # writes (its acks) differ.
            app.configure(cfgs['plain'])
            consumer = SuiteConsumer(
                workers, worker_type, primary.url, workdir,
                task_events='none',
                extra_env=durable_env if mode == 'durable' else {})
            figures['drain', mode].add(tp.run_once(
                client, consumer,
                lambda: app.storage.result_key(bench_tasks.noop().id),
                lambda n: tp.suite_batch(app, bench_tasks.noop, n),
                tasks)['rate'])
            print('  ... run %d %s: enqueue %.0f/s, drain %.0f/s' % (
                run + 1, mode, figures['enqueue', mode].values[-1],
                figures['drain', mode].values[-1]), file=sys.stderr,
                flush=True)
    return figures


if __name__ == '__main__':
    sys.exit(main())
