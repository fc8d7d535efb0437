"""`make bench`: this suite against huey's own consumer, in one run, on one
private Redis, printed as one table.

    .venv/bin/python bench/run.py [--runs N] [--tasks N] [--quick]
        [--only SECTION,...] [--markdown PATH]

Sections: throughput (with start-up time, memory and CPU per task on the
way), latency (with the pickup split into its parts), enqueue, footprint,
durable ([redis] durable_writes against a replica), status, scrape, pdf,
recovery.  Each figure is the median
of --runs runs with their min and max; runs of the two consumers alternate
so a busy machine slows both alike, and the ratios (taken run by run) are
the figures to read first.  Targets (issue 8) are shown beside the rows
they apply to; they are not asserted anywhere.
"""
import argparse
import datetime
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time

BENCH = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(BENCH)
sys.path[:0] = [ROOT, BENCH]

SECTIONS = ('throughput', 'latency', 'enqueue', 'footprint', 'durable',
            'status', 'scrape', 'pdf', 'recovery')


def parse_args(argv):
    parser = argparse.ArgumentParser(
        description=__doc__.split('\n')[0],
        formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument('--runs', type=int, default=5,
                        help='runs per figure (default 5)')
    parser.add_argument('--tasks', type=int, default=2500,
                        help='no-op tasks per throughput run (default 2500)')
    parser.add_argument('--latency-samples', type=int, default=300)
    parser.add_argument('--enqueue-tasks', type=int, default=3000)
    parser.add_argument('--footprint-tasks', type=int, default=5000)
    parser.add_argument('--records', type=int, default=100000,
                        help='journal records held for the status endpoint '
                             '(default 100000)')
    parser.add_argument('--status-seconds', type=float, default=2.0)
    parser.add_argument('--pdf-pages', type=int, default=200)
    parser.add_argument('--recovery-timeout', type=float, default=2.0,
                        help='[delivery] recovery_timeout of the crash '
                             'recovery rows (heartbeat 0.5 s; default 2)')
    parser.add_argument('--modes', metavar='KIND:N,...',
                        help='consumer modes for throughput and memory, e.g. '
                             'thread:1,process:2 (default: thread 1, 4 and 16 '
                             'and process with one worker per CPU)')
    parser.add_argument('--only', default=','.join(SECTIONS),
                        help='comma-separated sections (default: all)')
    parser.add_argument('--quick', action='store_true',
                        help='a tiny run that proves every part works; its '
                             'figures mean little')
    parser.add_argument('--markdown', metavar='PATH',
                        help='also write the table as Markdown')
    args = parser.parse_args(argv)
    args.only = [s.strip() for s in args.only.split(',') if s.strip()]
    unknown = sorted(set(args.only) - set(SECTIONS))
    if unknown:
        parser.error('unknown section(s) %s (known: %s)' % (
            ', '.join(unknown), ', '.join(SECTIONS)))
    if args.modes:
        try:
            args.modes = [(int(n), kind) for kind, _, n in (
                m.strip().partition(':') for m in args.modes.split(','))
                if kind in ('thread', 'process')]
        except ValueError:
            args.modes = None
        if not args.modes:
            parser.error('--modes: expected e.g. thread:4,process:2')
    args.settle, args.lost_watch = 0.5, 2.0
    if args.quick:
        args.runs, args.tasks, args.latency_samples = 1, 200, 20
        args.enqueue_tasks, args.records, args.status_seconds = 200, 500, 0.5
        args.footprint_tasks = 300
        args.pdf_pages, args.recovery_timeout = 5, 1.5
        args.settle, args.lost_watch = 0.1, 1.0
    return args


class Bench:
    def __init__(self, args, server, workdir):
        from huey_worker import app as app_module, config
        self.args, self.server, self.workdir = args, server, workdir
        self.url = server.url
        self.client = server.client()
        empty = os.path.join(workdir, 'empty.ini')
        open(empty, 'w').close()
        self.cfg = config.load(empty, environ={'HUEY_REDIS_URL': self.url})
        self.app = app_module.huey.configure(self.cfg)
        import bench_tasks
        import plain_tasks
        self.tasks, self.plain_tasks = bench_tasks, plain_tasks
        self.plain = plain_tasks.huey

    # -- consumers -------------------------------------------------------------

    def suite(self, workers, kind, **kwargs):
        from harness import SuiteConsumer
        return SuiteConsumer(workers, kind, self.url, self.workdir, **kwargs)

    def plain_consumer(self, workers, kind, **kwargs):
        from harness import PlainConsumer
        return PlainConsumer(workers, kind, self.url, self.workdir, **kwargs)

    def floor(self, workers, kind):
        from harness import FloorConsumer
        return FloorConsumer(workers, kind, self.url, self.workdir)

    def modes(self):
        if self.args.modes:
            return self.args.modes
        cpus = len(os.sched_getaffinity(0))
        if self.args.quick:
            return [(4, 'thread'), (cpus, 'process')]
        return [(1, 'thread'), (4, 'thread'), (16, 'thread'), (cpus, 'process')]


def throughput(bench, table, results):
    from harness import Figure
    from table import cell, ratio_cell
    import throughput as tp
    args, app, client = bench.args, bench.app, bench.client
    tasks, plain_tasks, plain = bench.tasks, bench.plain_tasks, bench.plain

    def warm_suite():
        return app.storage.result_key(tasks.noop().id)

    def warm_plain():
        return plain.storage.result_key(plain_tasks.noop().id)

    def warm_floor():
        client.lpush('huey.redis.huey', b'warm')
        return b'huey.r.huey.warm'

    def batch_suite(n):
        return tp.suite_batch(app, tasks.noop, n)

    def batch_plain(n):
        return tp.plain_batch(plain, plain_tasks.noop, n)

    def batch_priority(n):
        return tp.suite_priority_batch(app, tasks.noop, n)

    def batch_floor(n):
        return tp.floor_batch(client, n)

    # 'info': each consumer's default logging (the suite: one line per task,
    # at its end; huey_consumer: two); 'quiet': no per-task lines.
    variants = [('info', {}, {})]
    if not args.quick:
        variants.append(('quiet', {'task_events': 'none'}, {'quiet': True}))
    figures = {}
    for workers, kind in bench.modes():
        mode = '%s x%d' % (kind, workers)
        contenders = []
        for name, suite_kw, plain_kw in variants:
            contenders.append((('suite', name), lambda kw=suite_kw: bench.suite(
                workers, kind, **kw), warm_suite, batch_suite))
            contenders.append((('plain', name), lambda kw=plain_kw:
                               bench.plain_consumer(workers, kind, **kw),
                               warm_plain, batch_plain))
        if not args.quick:
            # The suite logging as much as huey_consumer does.
            contenders.append((('suite', 'both'), lambda: bench.suite(
                workers, kind, task_events='both'), warm_suite, batch_suite))
            # What the journal costs: the same suite with it switched off.
            contenders.append((('suite', 'nojournal'), lambda: bench.suite(
                workers, kind, task_events='none', extra_env={
                    'HUEY_WORKER_JOURNAL_ENABLED': 'false'}),
                warm_suite, batch_suite))
        # Every task with a priority: the priority set and the TAKE script
        # instead of the list and BRPOPLPUSH.
        contenders.append((('suite', 'priority'), lambda: bench.suite(
            workers, kind), warm_suite, batch_priority))
        contenders.append((('floor', 'info'), lambda: bench.floor(workers, kind),
                           warm_floor, batch_floor))
        for run in range(args.runs):
            # Alternate the order so neither side always goes first.
            order = contenders if run % 2 == 0 else contenders[::-1]
            for key, make, warm, batch in order:
                out = tp.run_once(client, make(), warm, batch, args.tasks,
                                  settle=args.settle)
                for name, value in out.items():
                    figures.setdefault((mode, key, name), Figure()).add(value)
                progress('throughput %s %s/%s run %d: %.0f tasks/s' % (
                    mode, key[0], key[1], run + 1, out['rate']))
    results['throughput'] = figures

    def get(mode, who, variant, name):
        return figures.get((mode, (who, variant), name))

    drained = ('Throughput, no-op tasks/s, draining a queue pre-filled '
               'with %d no-op tasks (moved in at once with RENAME while the '
               'consumer waits idle), from the RENAME to the results of the '
               'last tasks, every result checked; ratio suite / '
               'huey_consumer run by run' % args.tasks)
    for name, header in (
            ('info', drained + '; default logging to a file '
                     '(suite: one INFO line per task, [logging] task_events '
                     '= end; huey_consumer: two), and in the last columns '
                     'the suite with two (task_events = both); journal on '
                     '(the default)'),
            ('quiet', drained + '; no per-task log lines '
                      '(suite task_events = none, huey_consumer -q); '
                      'journal on, and off in the last columns')):
        if name not in [v[0] for v in variants]:
            continue
        quiet = name == 'quiet'
        table.section(header, ['mode', 'suite', 'huey_consumer', 'ratio',
                               'redis-py floor', 'target'] +
                      (['suite, journal off', 'ratio'] if quiet else
                       ['suite, two lines', 'ratio']))
        for workers, kind in bench.modes():
            mode = '%s x%d' % (kind, workers)
            suite_rate = get(mode, 'suite', name, 'rate')
            plain_rate = get(mode, 'plain', name, 'rate')
            other = get(mode, 'suite', 'nojournal' if quiet else 'both',
                        'rate')
            table.row(mode, cell(suite_rate), cell(plain_rate),
                      ratio_cell(suite_rate, plain_rate),
                      cell(get(mode, 'floor', 'info', 'rate')), '>= 1.20x',
                      *([cell(other), ratio_cell(other, plain_rate)]
                        if other is not None else []))
        table.section('CPU per no-op task, microseconds: the consumer process '
                      'and its workers, and the Redis server (%s)' % (
                          'no per-task lines' if quiet else
                          'default logging'),
                      ['mode', 'suite', 'huey_consumer', 'ratio',
                       'redis-py floor', 'Redis: suite', 'Redis: huey'] +
                      (['suite, journal off'] if quiet else
                       ['suite, two lines']))
        for workers, kind in bench.modes():
            mode = '%s x%d' % (kind, workers)
            suite_cpu = get(mode, 'suite', name, 'cpu_us')
            plain_cpu = get(mode, 'plain', name, 'cpu_us')
            table.row(mode, cell(suite_cpu), cell(plain_cpu),
                      ratio_cell(suite_cpu, plain_cpu),
                      cell(get(mode, 'floor', 'info', 'cpu_us')),
                      cell(get(mode, 'suite', name, 'redis_cpu_us')),
                      cell(get(mode, 'plain', name, 'redis_cpu_us')),
                      *([cell(get(mode, 'suite', 'nojournal' if quiet
                                  else 'both', 'cpu_us'))]
                        if not args.quick else []))

    table.section('Throughput with task priorities, no-op tasks/s: every '
                  'task enqueued with priority=1 (the priority set, read '
                  'with the TAKE script) against plain tasks (the list, '
                  'read with BRPOPLPUSH); default logging, journal on',
                  ['mode', 'suite, plain', 'suite, priority=1', 'ratio',
                   'CPU us: plain', 'CPU us: priority', 'Redis CPU us: plain',
                   'Redis CPU us: priority'])
    for workers, kind in bench.modes():
        mode = '%s x%d' % (kind, workers)
        plain_rate = get(mode, 'suite', 'info', 'rate')
        ranked_rate = get(mode, 'suite', 'priority', 'rate')
        table.row(mode, cell(plain_rate), cell(ranked_rate),
                  ratio_cell(ranked_rate, plain_rate),
                  cell(get(mode, 'suite', 'info', 'cpu_us')),
                  cell(get(mode, 'suite', 'priority', 'cpu_us')),
                  cell(get(mode, 'suite', 'info', 'redis_cpu_us')),
                  cell(get(mode, 'suite', 'priority', 'redis_cpu_us')))

    table.section('Memory, MiB (thread mode: RSS of the process; process '
                   'mode: PSS of the consumer and its workers)',
                  ['mode', 'suite idle', 'huey idle', 'difference',
                   'suite busy', 'huey busy', 'target'])
    for workers, kind in bench.modes():
        mode = '%s x%d' % (kind, workers)
        what = 'rss' if kind == 'thread' else 'pss'
        suite_idle = get(mode, 'suite', 'info', 'idle_' + what)
        plain_idle = get(mode, 'plain', 'info', 'idle_' + what)
        difference = Figure(a - b for a, b in zip(suite_idle.values,
                                                  plain_idle.values))
        table.row(mode, cell(suite_idle, '%.1f'), cell(plain_idle, '%.1f'),
                  cell(difference, '%+.1f'),
                  cell(get(mode, 'suite', 'info', 'busy_' + what), '%.1f'),
                  cell(get(mode, 'plain', 'info', 'busy_' + what), '%.1f'),
                  'idle thread RSS within 10 MiB' if kind == 'thread' else '')

    table.section('Start-up, seconds from spawn', ['consumer', 'READY=1',
                                                   'first task done',
                                                   'target'])
    for kind in ('thread', 'process'):
        ready, first, first_plain = Figure(), Figure(), Figure()
        for workers, k in bench.modes():
            if k != kind:
                continue
            mode = '%s x%d' % (kind, workers)
            for variant in [v[0] for v in variants]:
                ready.values += get(mode, 'suite', variant, 'ready').values
                first.values += get(mode, 'suite', variant,
                                    'first_task').values
                first_plain.values += get(mode, 'plain', variant,
                                          'first_task').values
        table.row('suite, %s mode' % kind, cell(ready, '%.2f'),
                  cell(first, '%.2f'), 'READY <= 1 s')
        table.row('huey_consumer, %s mode' % kind, '(no sd_notify)',
                  cell(first_plain, '%.2f'), '')
    builtin = Figure()
    for _ in range(args.runs):
        client.flushdb()
        with bench.suite(4, 'thread', builtin=True).start(notify=True) as c:
            builtin.add(c.wait_ready())
    table.row('suite, thread x4, built-in tasks loaded (the default)',
              cell(builtin, '%.2f'), '', 'READY <= 1 s')


def latency(bench, table, results):
    from harness import Figure
    from table import cell, ratio_cell
    import latency as lat
    args, client = bench.args, bench.client
    senders = {
        'suite': (lambda: bench.suite(4, 'thread'),
                  lat.suite_sender(bench.app, bench.tasks.stamp)),
        'plain': (lambda: bench.plain_consumer(4, 'thread'),
                  lat.plain_sender(bench.plain, bench.plain_tasks.stamp)),
    }
    figures = {}
    for run in range(args.runs):
        order = ['suite', 'plain'] if run % 2 == 0 else ['plain', 'suite']
        for who in order:
            make, send = senders[who]
            out = lat.run_once(client, make(), send, args.latency_samples,
                               seed=run)
            for name, value in out.items():
                figures.setdefault((who, name), Figure()).add(value)
            progress('latency %s run %d: p50 %.2f ms, p99 %.2f ms' % (
                who, run + 1, out['p50'], out['p99']))
    results['latency'] = figures
    table.section('Pickup latency, ms: one task at a time enqueued into an '
                  'idle queue, from its enqueue\'s write leaving the '
                  'producer to the start of the task body (thread x4, %d '
                  'probes per run); ratio suite / huey_consumer run by run'
                  % args.latency_samples,
                  ['', 'suite', 'huey_consumer', 'ratio', 'target'])
    table.row('p50', cell(figures[('suite', 'p50')], '%.2f'),
              cell(figures[('plain', 'p50')], '%.2f'),
              ratio_cell(figures[('suite', 'p50')],
                         figures[('plain', 'p50')]), '<= 1.00x')
    table.row('p99', cell(figures[('suite', 'p99')], '%.2f'),
              cell(figures[('plain', 'p99')], '%.2f'),
              ratio_cell(figures[('suite', 'p99')],
                         figures[('plain', 'p99')]), '<= 2 ms')
    pickup_parts(bench, table, senders)


def pickup_parts(bench, table, senders):
    """The pickup split into its parts (bench/pickup_trace.py), with the
    journal off too: runs of their own, so the marks cost the figures
    above nothing."""
    from harness import Figure
    from table import cell
    import latency as lat
    import pickup_trace
    args, client = bench.args, bench.client
    contenders = {
        'suite': senders['suite'],
        'suite, journal off': (lambda: bench.suite(4, 'thread', extra_env={
            'HUEY_WORKER_JOURNAL_ENABLED': 'false'}), senders['suite'][1]),
        'plain': senders['plain'],
    }
    marks = os.path.join(bench.workdir, 'pickup-marks')
    parts = {}
    for run in range(args.runs):
        for who, (make, send) in contenders.items():
            out = lat.run_traced(client, make(), send,
                                 args.latency_samples, run, marks)
            for name, value in out.items():
                parts.setdefault((who, name), Figure()).add(value)
        progress('pickup parts run %d' % (run + 1))
    table.section('Where the pickup time goes, us: the probes above split '
                  'by clock marks in the consumers (bench/pickup_trace.py),'
                  ' median of each run\'s probes; thread x4, runs of '
                  'their own', ['', 'suite', 'suite, journal off',
                                'huey_consumer'])
    for name, _, _ in pickup_trace.PARTS:
        table.row(name, *(cell(parts.get((who, name)))
                          for who in contenders))


def enqueue(bench, table, results):
    from huey_worker import config
    from harness import Figure
    from table import cell, ratio_cell
    import enqueue as enq
    args, client, app = bench.args, bench.client, bench.app
    no_journal = config.load(os.path.join(bench.workdir, 'empty.ini'),
                             environ={'HUEY_REDIS_URL': bench.url,
                                      'HUEY_WORKER_JOURNAL_ENABLED': 'false'})

    def measure(label):
        """suite, plain and journal-off rates, run by run, alternating."""
        figures = {'suite': Figure(), 'suite-nojournal': Figure(),
                   'plain': Figure()}
        for run in range(args.runs):
            app.configure(bench.cfg)
            figures['suite'].add(enq.rate(client, bench.tasks.noop,
                                          args.enqueue_tasks))
            figures['plain'].add(enq.rate(client, bench.plain_tasks.noop,
                                          args.enqueue_tasks))
            app.configure(no_journal)
            figures['suite-nojournal'].add(enq.rate(
                client, bench.tasks.noop, args.enqueue_tasks))
            app.configure(bench.cfg)
            progress('enqueue%s run %d: suite %.0f/s, plain %.0f/s' % (
                label, run + 1, figures['suite'].values[-1],
                figures['plain'].values[-1]))
        return figures

    figures = measure('')
    # The same loops with the producer and Redis sharing one CPU: each
    # enqueue's time is then the CPU both spend on it (no idle core
    # waking up between request and reply), a steadier ratio of cost.
    with enq.one_cpu(bench.server.process.pid):
        pinned = measure(' (one CPU)')
    results['enqueue'] = figures
    results['enqueue-one-cpu'] = pinned
    table.section('Enqueue rate, tasks/s from one producer (task() in a '
                  'loop)', ['producer', 'tasks/s', 'ratio to huey',
                            'one CPU', 'ratio to huey'])
    for label, which in (('suite, journal on (the default)', 'suite'),
                         ('suite, journal off', 'suite-nojournal')):
        table.row(label, cell(figures[which]),
                  ratio_cell(figures[which], figures['plain']),
                  cell(pinned[which]),
                  ratio_cell(pinned[which], pinned['plain']))
    table.row('plain huey', cell(figures['plain']), '',
              cell(pinned['plain']), '')


def durable(bench, table, results):
    from table import cell, ratio_cell
    import durable as dur
    args = bench.args
    runs, tasks = min(args.runs, 3), args.enqueue_tasks
    figures = dur.with_replica(bench.server, bench.workdir, runs, tasks,
                               4, 'thread')
    bench.app.configure(bench.cfg)
    results['durable'] = figures
    table.section('[redis] durable_writes: each enqueue and each ack waits '
                  'for a replica (WAIT 1; one replica on loopback), tasks/s; '
                  '%d no-op tasks per run, thread x4, no per-task log lines'
                  % tasks, ['', 'durable_writes off', 'on', 'ratio'])
    for what in ('enqueue', 'drain'):
        off, on = figures[what, 'plain'], figures[what, 'durable']
        table.row(what, cell(off), cell(on), ratio_cell(on, off))


def footprint(bench, table, results):
    from harness import Figure
    from table import cell, ratio_cell
    import footprint as fp
    args = bench.args
    runs = min(args.runs, 3)
    out = fp.measure(bench, args.footprint_tasks, runs, progress=progress)
    results['footprint'] = out
    cfg = bench.cfg
    result_ttl = cfg.huey.result_timeout
    retention = min(cfg.journal.retention or result_ttl, result_ttl)
    # What a Redis holding result_timeout's worth of tasks holds per task:
    # the result all along, the rest of the fresh figure for the journal's
    # retention only.
    steady = Figure(p + (s - p) * retention / result_ttl
                    for s, p in zip(out['suite'].values, out['plain'].values))
    table.section('Redis memory per finished task, bytes (INFO used_memory '
                  'before and after %d no-op tasks; journal on, default '
                  'settings: results %d s, [journal] retention %d s)'
                  % (args.footprint_tasks, result_ttl, retention),
                  ['', 'suite', 'plain huey (RedisExpireHuey)', 'ratio',
                   'target'])
    table.row('just finished (record, index entries, result)',
              cell(out['suite']), cell(out['plain']),
              ratio_cell(out['suite'], out['plain']), '')
    table.row('held over result_timeout at a steady rate (derived: the '
              'journal\'s part for its retention only)', cell(steady),
              cell(out['plain']), ratio_cell(steady, out['plain']), '')
    held = fp.measure_held(bench, runs, rate=100 if args.quick else 400,
                           result_timeout=4 if args.quick else 14,
                           retention=1 if args.quick else 2,
                           progress=progress)
    results['footprint-held'] = held
    table.row('held at a steady rate, measured: %s tasks/s, results %d s, '
              'journal %d s, per task whose result '
              'is alive' % ((100, 4, 1) if args.quick else (400, 14, 2)),
              cell(held['suite']), cell(held['plain']),
              ratio_cell(held['suite'], held['plain']), '<= 2.00x')
    parts = out['breakdown'].get('suite', {})
    table.row('suite, by key (MEMORY USAGE): ' + ', '.join(
        '%s %.0f' % (name, size) for name, size in
        sorted(parts.items(), key=lambda p: -p[1])), '', '', '', '')


def scrape(bench, table, results):
    """/metrics and the console's polls against a large journal: absolute
    figures (plain huey has neither), from bench/metrics_scrape.py and
    bench/console_load.py, each on a private Redis of its own."""
    quick = ['--quick'] if bench.args.quick else []
    table.section('/metrics scrape and console polls with 100,000 journal '
                  'records, 10 task names (absolute: plain huey has '
                  'neither)' if not quick else
                  '/metrics scrape and console polls (quick: 500 records)',
                  ['figures'])
    lines = []
    for script in ('metrics_scrape.py', 'console_load.py'):
        done = subprocess.run([sys.executable, os.path.join(BENCH, script)] +
                              quick, capture_output=True, text=True,
                              timeout=1800)
        if done.returncode != 0:
            raise RuntimeError('%s failed: %s' % (script,
                                                   done.stderr[-500:]))
        lines += [line for line in done.stdout.splitlines() if line.strip()]
    for line in lines:
        table.row(line)
    results['scrape'] = lines


def status(bench, table, results):
    from huey_worker.devredis import free_port
    from harness import Figure, StatusServer
    from table import cell
    import status_load
    args, client = bench.args, bench.client
    client.flushdb()
    started = time.monotonic()
    ids = status_load.fill_journal(bench.app, bench.tasks.noop, args.records)
    progress('status: %d journal records written in %.1fs' % (
        len(ids), time.monotonic() - started))
    port = free_port()
    task_paths = ['/tasks/%s' % i for i in ids[::max(1, len(ids) // 5000)]]
    # (row, paths, keep-alive): the target is for a new connection per
    # request (a web app polling with requests.get); the kept-alive row is
    # what requests.Session and Prometheus see.
    routes = [('/health', ['/health'], False),
              ('/tasks/<id>', task_paths, False),
              ('/metrics', ['/metrics'], False),
              ('/tasks/<id>, kept alive', task_paths, True)]
    figures = {}
    # A live consumer, so /health and /metrics report a real one.
    with bench.suite(1, 'thread', task_events='none').start(notify=True) \
            as consumer, StatusServer(port, bench.url, bench.workdir).start(
                notify=True) as server:
        consumer.wait_ready()
        server.wait_ready()
        for run in range(args.runs):
            for route, paths, keep_alive in routes:
                out = status_load.load(('127.0.0.1', port), paths,
                                       seconds=args.status_seconds,
                                       seed=run * 10, keep_alive=keep_alive)
                bad = {s: n for s, n in out['statuses'].items()
                       if s != 200}
                if bad:
                    raise RuntimeError('%s answered %r; log: %s' % (
                        route, bad, server.log_path))
                for name in ('rps', 'p50', 'p99'):
                    figures.setdefault((route, name), Figure()).add(out[name])
                client_used = out['client']
                progress('status %s run %d: %.0f req/s, p99 %.1f ms' % (
                    route, run + 1, out['rps'], out['p99']))
    results['status'] = figures
    table.section('Status endpoint with %d journal records held, 16 '
                  'concurrent clients (%s, a new connection per request '
                  'unless kept alive)'
                  % (len(ids), 'wrk -t2 -c16' if client_used == 'wrk' else
                     'Python: 2 processes x 8 threads'),
                  ['route', 'requests/s', 'p50 ms', 'p99 ms', 'target'])
    for route, _, _ in routes:
        table.row(route, cell(figures[(route, 'rps')]),
                  cell(figures[(route, 'p50')], '%.1f'),
                  cell(figures[(route, 'p99')], '%.1f'),
                  '>= 2000/s, p99 <= 20 ms' if route == '/tasks/<id>'
                  else '')


def pdf(bench, table, results):
    from harness import Figure
    from table import cell, ratio_cell
    try:
        import pdf_extract
        from huey_worker import config
    except ImportError as exc:
        table.section('PDF extraction', ['', ''])
        table.row('bench/pdf_extract.py missing or broken', str(exc))
        return
    args = bench.args
    runs = max(args.runs, 3) if not args.quick else 1
    wall = {'direct': Figure(), 'suite': Figure()}
    cpu = {'direct': Figure(), 'suite': Figure()}
    with tempfile.TemporaryDirectory(prefix='bench-pdf-',
                                     dir=bench.workdir) as tmp:
        input_root = os.path.join(tmp, 'input')
        os.makedirs(input_root)
        path = os.path.join(input_root, 'bench.pdf')
        pdf_extract.make_document(path, args.pdf_pages)
        cfg = config.load(os.path.join(bench.workdir, 'empty.ini'),
                          environ={}, overrides={
                              'pdf.input_root': input_root,
                              'pdf.output_root': os.path.join(tmp, 'output'),
                              'pdf.max_pages': str(args.pdf_pages)})
        contenders = [('direct', pdf_extract.direct, (path,)),
                      ('suite', pdf_extract.suite, (cfg, 'bench.pdf'))]
        for _, fn, fn_args in contenders:
            fn(*fn_args)   # warm up
        for run in range(runs * 3):
            for label, fn, fn_args in contenders[::1 if run % 2 else -1]:
                by_wall, by_cpu = pdf_extract.timed(fn, *fn_args)
                wall[label].add(by_wall)
                cpu[label].add(by_cpu)
    results['pdf'] = {'wall': wall, 'cpu': cpu}
    progress('pdf: direct %.0f, suite %.0f pages/s (cpu)' % (
        cpu['direct'].median, cpu['suite'].median))
    table.section('PDF text extraction, pages/s (%d-page document, '
                  'bench/pdf_extract.py: pdf.extract\'s code against '
                  'pymupdf directly)' % args.pdf_pages,
                  ['clock', 'pymupdf direct', 'through the suite', 'ratio',
                   'target'])
    table.row('CPU time', cell(cpu['direct']), cell(cpu['suite']),
              ratio_cell(cpu['suite'], cpu['direct']), '>= 0.95x')
    table.row('wall clock', cell(wall['direct']), cell(wall['suite']),
              ratio_cell(wall['suite'], wall['direct']), '')


def recovery(bench, table, results):
    from harness import Figure
    from table import cell
    import recovery as rec
    args, client = bench.args, bench.client
    extra = {'HUEY_WORKER_DELIVERY_HEARTBEAT_INTERVAL': '0.5',
             'HUEY_WORKER_DELIVERY_RECOVERY_TIMEOUT':
                 '%g' % args.recovery_timeout}

    def make(identity):
        return bench.suite(1, 'thread', identity=identity, extra_env=extra)

    figures = {'restart': Figure(), 'rescue': Figure()}
    lost = 0
    watch = args.lost_watch
    for run in range(args.runs):
        figures['restart'].add(rec.suite_once(client, bench.app,
                                              bench.tasks.hold, make, True))
        figures['rescue'].add(rec.suite_once(client, bench.app,
                                             bench.tasks.hold, make, False))
        back = rec.plain_once(client, bench.plain, bench.plain_tasks.hold,
                              lambda: bench.plain_consumer(1, 'thread'),
                              watch=watch)
        lost += back is None
        progress('recovery run %d: restart %.2fs, other consumer %.2fs' % (
            run + 1, figures['restart'].values[-1],
            figures['rescue'].values[-1]))
    results['recovery'] = figures
    table.section('Crash recovery: kill -9 of a consumer running a task, to '
                  'the task back in the queue, seconds',
                  ['case', 'seconds'])
    table.row('suite, restarted at once (same identity)',
              cell(figures['restart'], '%.2f'))
    table.row('suite, no restart: another consumer recovers it '
              '(recovery_timeout %gs, heartbeat 0.5s)' % args.recovery_timeout,
              cell(figures['rescue'], '%.2f'))
    table.row('huey_consumer, restarted at once',
              'lost in %d of %d runs (not back %gs after the restart)'
              % (lost, args.runs, watch))


def machine_lines(args, hiredis):
    import huey
    import redis
    from huey_worker.devredis import find_redis_server
    import subprocess
    cpu = '?'
    try:
        with open('/proc/cpuinfo') as fh:
            for line in fh:
                if line.startswith('model name'):
                    cpu = line.split(':', 1)[1].strip()
                    break
    except OSError:
        pass
    version = subprocess.run([find_redis_server(), '--version'],
                             capture_output=True, text=True).stdout.split()
    redis_version = next((w.split('=')[1] for w in version
                          if w.startswith('v=')), '?')
    try:
        with open('/proc/loadavg') as fh:
            load = fh.read().split()[0]
    except OSError:
        load = '?'
    return ['huey-worker benchmark, %s' % datetime.datetime.now().strftime(
                '%Y-%m-%d %H:%M'),
            'machine: %d CPUs (%s), %s, Python %s, Redis %s, huey %s, '
            'redis-py %s; load average at start %s' % (
                os.cpu_count(), cpu, platform.platform(terse=True),
                platform.python_version(), redis_version, huey.__version__,
                redis.__version__, load),
            hiredis,
            'each figure: median of %d run(s) [min-max]; ratios run by run%s'
            % (args.runs, '; QUICK RUN, figures mean little' if args.quick
               else '')]


def progress(text):
    print('  ... ' + text, file=sys.stderr, flush=True)


def main(argv=None):
    args = parse_args(argv)
    for name in list(os.environ):
        if name.startswith(('HUEY_', 'REDIS_')):
            del os.environ[name]   # the benchmark's settings only
    from huey_worker.devredis import EmbeddedRedis
    from table import Table
    workdir = tempfile.mkdtemp(prefix='huey-worker-bench-')
    server = EmbeddedRedis(os.path.join(workdir, 'redis'), persist=False)
    server.start()
    os.environ['BENCH_REDIS_URL'] = server.url
    started = time.monotonic()
    from harness import hiredis_line
    table = Table(machine_lines(args, hiredis_line(server.url, workdir)))
    results = {}
    failed = []
    try:
        bench = Bench(args, server, workdir)
        for name in SECTIONS:
            if name not in args.only:
                continue
            section_started = time.monotonic()
            try:
                globals()[name](bench, table, results)
                progress('%s: %.0fs' % (name, time.monotonic() -
                                        section_started))
            except Exception as exc:
                failed.append(name)
                table.section('%s: FAILED' % name, ['error'])
                table.row('%s: %s' % (type(exc).__name__, exc))
                progress('%s failed: %s: %s' % (name, type(exc).__name__,
                                                exc))
    finally:
        server.cleanup()
    table.title.append('benchmark time: %.0fs' % (time.monotonic() - started))
    sys.stdout.write(table.text())
    if args.markdown:
        with open(args.markdown, 'w') as fh:
            fh.write(table.markdown())
    if failed:
        print('failed sections: %s (logs kept in %s)' % (
            ', '.join(failed), workdir), file=sys.stderr)
        return 1
    shutil.rmtree(workdir, ignore_errors=True)
    return 0


if __name__ == '__main__':
    sys.exit(main())
