"""The cost of one no-op task in this suite's worker and in huey's own
worker loop, in one process against a private Redis: CPU microseconds per
task (robust on a busy machine), wall microseconds, Redis commands and
round trips per task.  With --profile, a CPU-time profile of the suite's
worker (cProfile with a CPU clock, so waiting on Redis does not count).

    .venv/bin/python bench/profile_worker.py [--tasks N] [--profile]
        [--quiet] [--pyinstrument]

--quiet compares without per-task log lines (suite task_events = none, huey
at WARNING); by default both log two INFO lines per task to a file (suite
task_events = both).
"""
import argparse
import cProfile
import logging
import multiprocessing
import os
import pstats
import shutil
import sys
import tempfile
import time

BENCH = os.path.dirname(os.path.abspath(__file__))
sys.path[:0] = [os.path.dirname(BENCH), BENCH]

from huey_worker.devredis import EmbeddedRedis  # noqa: E402
from harness import held_writes  # noqa: E402

ROUNDS = 8


def suite_worker(app, cfg):
    from huey_worker import delivery
    from huey_worker.worker import Slot, StopFlag, Worker, install_outcome_receiver
    slot = multiprocessing.RawArray(Slot, 1)[0]
    worker = Worker(app, cfg, 0, slot, StopFlag(), 'profile', False, 'bench')
    # What Worker.run sets up before its loop, without the loop.
    worker.storage = app.storage
    worker.storage.pin_connection()
    worker.keys = worker.storage.keys
    worker.inflight_key = worker.keys.inflight('profile', 0, 'bench')
    worker.delivery = delivery.Delivery(worker.storage)
    worker.worker_info = {'host': 'bench', 'pid': os.getpid(),
                          'consumer': 'profile', 'worker': 0}
    install_outcome_receiver(app)
    return worker.loop


def settle_suite(app):
    """The suite's worker sends its next queue read with each ack: drop
    the one left waiting on the empty queue, so it cannot take a message
    of huey's round."""
    app.storage.unpin_connection()
    app.storage.pin_connection()


def plain_step(app):
    def step():
        task = app.dequeue()
        if task is not None:
            app.execute(task)
    return step


class SendCounter:
    """Counts round trips (every packet redis-py sends is one) and the
    commands in them (as sent: a Lua script is one)."""

    def __init__(self):
        import redis.connection
        self.count = self.commands = 0
        cls = redis.connection.AbstractConnection
        send, one, many = (cls.send_packed_command, cls.send_command,
                           cls.pack_commands)

        def counted_send(conn, command, check_health=True):
            self.count += 1
            return send(conn, command, check_health)

        def counted_one(conn, *args, **kwargs):
            self.commands += 1
            return one(conn, *args, **kwargs)

        def counted_many(conn, commands):
            commands = list(commands)
            if not getattr(self, 'inside_pack', False):
                self.commands += len([c for c in commands
                                      if c[0] not in ('MULTI', 'EXEC')])
            return many(conn, commands)
        cls.send_packed_command = counted_send
        cls.send_command = counted_one
        cls.pack_commands = counted_many
        from huey_worker import transaction
        pack = transaction.pack

        def counted_pack(conn, commands):
            self.commands += len([c for c in commands
                                  if c[0] not in ('MULTI', 'EXEC')])
            return pack(conn, commands)
        transaction.pack = counted_pack


def redis_cpu(client):
    info = client.info('cpu')
    return info['used_cpu_sys'] + info['used_cpu_user']


def measure(step, fill, count, client, sends):
    fill(count)
    sends.count = sends.commands = 0
    server = redis_cpu(client)
    wall, cpu = time.perf_counter(), time.process_time()
    for _ in range(count):
        step()
    wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
    server = redis_cpu(client) - server
    trips, commands = sends.count, sends.commands
    return cpu / count * 1e6, wall / count * 1e6, commands / count, \
        trips / count, server / count * 1e6


def commands_per_task(step, fill, count, client):
    """{command: (calls, microseconds) per task}: what Redis counted
    (INFO commandstats; a script's commands too, and the script with
    them) over `count` tasks."""
    fill(count)
    client.config_resetstat()
    for _ in range(count):
        step()
    stats = client.info('commandstats')
    return {name[len('cmdstat_'):]: (value['calls'] / count,
                                      value['usec'] / count)
            for name, value in stats.items()
            if name not in ('cmdstat_config|resetstat', 'cmdstat_info')}


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    parser.add_argument('--tasks', type=int, default=2000)
    parser.add_argument('--quiet', action='store_true')
    parser.add_argument('--no-journal', action='store_true',
                        help='the suite with [journal] enabled = false')
    parser.add_argument('--profile', action='store_true')
    parser.add_argument('--pyinstrument', action='store_true')
    args = parser.parse_args(argv)

    workdir = tempfile.mkdtemp(prefix='bench-profile-')
    server = EmbeddedRedis(os.path.join(workdir, 'redis'),
                           persist=False).start()
    try:
        return run(args, server, workdir)
    finally:
        server.cleanup()
        shutil.rmtree(workdir, ignore_errors=True)


def run(args, server, workdir):
    for name in list(os.environ):
        if name.startswith(('HUEY_', 'REDIS_')):
            del os.environ[name]
    os.environ['BENCH_REDIS_URL'] = server.url
    empty = os.path.join(workdir, 'empty.ini')
    open(empty, 'w').close()
    from huey_worker import app as app_module, config, logs
    cfg = config.load(empty, environ={
        'HUEY_REDIS_URL': server.url,
        'HUEY_WORKER_LOGGING_TASK_EVENTS': 'none' if args.quiet else 'both',
        'HUEY_WORKER_JOURNAL_ENABLED': 'false' if args.no_journal
        else 'true'})
    # One handler each, writing to a file, as both daemons' stderr is in
    # the benchmark.
    logs.setup(cfg, stderr=open(os.path.join(workdir, 'suite.log'), 'w'))
    # huey_consumer's own logger setup: INFO (or WARNING with -q) to a file.
    huey_handler = logging.FileHandler(os.path.join(workdir, 'plain.log'))
    huey_handler.setFormatter(logging.Formatter(
        '[%(asctime)s] %(levelname)s:%(name)s:%(threadName)s:%(message)s'))
    app = app_module.huey.configure(cfg)
    import bench_tasks
    import plain_tasks
    suite_step = suite_worker(app, cfg)
    plain = plain_tasks.huey
    step_plain = plain_step(plain)
    client = server.client()
    sends = SendCounter()

    def suite_fill(n):
        storage = app.storage
        with held_writes(storage):
            for _ in range(n):
                bench_tasks.noop()
            storage.flush()

    def plain_fill(n):
        pipe = client.pipeline(transaction=False)
        for _ in range(n):
            pipe.lpush(plain.storage.queue_key,
                       plain.serialize_task(plain_tasks.noop.s()))
        pipe.execute()

    def as_plain(fn):
        # The suite's logging setup quiets 'huey'; huey_consumer's does not.
        def wrapped(*a):
            huey_logger = logging.getLogger('huey')
            saved = huey_logger.level, list(huey_logger.handlers), \
                huey_logger.propagate
            huey_logger.setLevel(logging.WARNING if args.quiet
                                 else logging.INFO)
            huey_logger.handlers[:] = [huey_handler]
            huey_logger.propagate = False
            try:
                return fn(*a)
            finally:
                huey_logger.setLevel(saved[0])
                huey_logger.handlers[:] = saved[1]
                huey_logger.propagate = saved[2]
        return wrapped

    per_round = max(100, args.tasks // ROUNDS)
    measure(suite_step, suite_fill, 100, client, sends)    # warm up both
    settle_suite(app)
    as_plain(measure)(step_plain, plain_fill, 100, client, sends)
    results = {'suite': [], 'plain': []}
    for _ in range(ROUNDS):
        results['suite'].append(measure(suite_step, suite_fill, per_round,
                                        client, sends))
        settle_suite(app)
        results['plain'].append(as_plain(measure)(step_plain, plain_fill,
                                                  per_round, client, sends))
    print('per no-op task, %d x %d tasks each, logging: %s' % (
        ROUNDS, per_round, 'no per-task lines' if args.quiet
        else 'two INFO lines per task to a file'))
    print('%-6s %10s %10s %10s %12s %14s' % (
        '', 'cpu us', 'wall us', 'commands', 'round trips', 'redis cpu us'))
    for label, rows in results.items():
        rows.sort()
        cpu, wall, commands, trips, server = rows[len(rows) // 2]
        print('%-6s %10.0f %10.0f %10.1f %12.1f %14.0f' % (
            label, cpu, wall, commands, trips, server))
    ratio = sorted(p[0] / s[0] for s, p in zip(results['suite'],
                                               results['plain']))
    print('plain/suite cpu ratio (median): %.2f' % ratio[len(ratio) // 2])
    settle_suite(app)
    for label, step, fill in (('suite', suite_step, suite_fill),
                              ('plain', as_plain(step_plain), plain_fill)):
        calls = commands_per_task(step, fill, per_round, client)
        print('%s: %.1f commands a task as Redis runs them (a script\'s '
              'too), %.0f us in them (a script\'s own time includes its '
              'commands\'): %s' % (
                  label, sum(c for c, _ in calls.values()),
                  sum(u for name, (_, u) in calls.items()
                      if name not in ('eval', 'evalsha', 'exec')),
                  ', '.join('%s %.2g (%.1f us)' % (name, c, u)
                            for name, (c, u) in sorted(
                                calls.items(), key=lambda c: -c[1][0]))))
        settle_suite(app)

    if args.profile or args.pyinstrument:
        suite_fill(args.tasks)
        if args.pyinstrument:
            from pyinstrument import Profiler
            profiler = Profiler(interval=0.0002)
            profiler.start()
            for _ in range(args.tasks):
                suite_step()
            profiler.stop()
            print(profiler.output_text(unicode=False, color=False,
                                       show_all=False))
        else:
            profile = cProfile.Profile(time.process_time)
            profile.enable()
            for _ in range(args.tasks):
                suite_step()
            profile.disable()
            stats = pstats.Stats(profile).sort_stats('tottime')
            stats.print_stats(35)
            if os.environ.get('BENCH_CALLERS'):
                stats.print_callers(os.environ['BENCH_CALLERS'])
    return 0


if __name__ == '__main__':
    sys.exit(main())
