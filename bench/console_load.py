"""What the web console's polling costs with a large journal: 100,000
task records (written through the journal's own hooks, as a run of that
many tasks leaves them) and 10,000 messages pending in the queue, served
by a real status server over loopback HTTP.

For each route a console page polls (docs/console.md), the latency of
one answer (p50 and p95 over --polls requests on a kept-alive
connection, as the browser has), and for the overview, which polls six
routes at once, the wall time of one whole poll (the six sent together
on six connections).  The issue's bar: each poll answered within 50 ms on
2 cores.

    .venv/bin/python bench/console_load.py [--records N] [--polls N]
"""
import http.client
import os
import sys
import threading
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)

from harness import percentile, private_redis, StatusServer  # noqa: E402
from status_load import journal_app, journal_args  # noqa: E402

BAR_MS = 50.0


def routes(task_id):
    """(page, path) of every route the console's pages poll."""
    overview = [('overview', p) for p in (
        '/health', '/queue', '/workers', '/tasks?state=running&limit=200',
        '/activity', '/periodic')]
    return overview + [
        ('tasks', '/tasks?limit=50'),
        ('tasks', '/tasks?state=complete&limit=50'),
        ('tasks', '/tasks?name=bench_console.task_3&limit=50'),
        ('tasks', '/tasks?state=failed&limit=50'),
        ('task', '/tasks/%s' % task_id),
        ('dead letters', '/dead-letters?limit=200'),
    ]


class Poller:
    def __init__(self, port):
        self.conn = http.client.HTTPConnection('127.0.0.1', port, timeout=30)

    def get(self, path):
        started = time.perf_counter()
        self.conn.request('GET', path)
        answer = self.conn.getresponse()
        data = answer.read()
        # /health is 503 here: no consumer runs (an answer all the same).
        assert answer.status in (200, 503), (path, answer.status, data[:200])
        return (time.perf_counter() - started) * 1000

    def close(self):
        self.conn.close()


def main(argv=None):
    args = journal_args(argv, __doc__.split('\n')[0], 'polls', 100, 5)
    rows = []
    with private_redis('huey-worker-bench-console-') as (server, workdir):
        from huey_worker.devredis import free_port
        ids = journal_app(server.url, workdir, 'bench_console',
                          args.records, args.pending)[2]
        port = free_port()
        with StatusServer(port, server.url, workdir).start(notify=True) \
                as status:
            status.wait_ready()
            poller = Poller(port)
            for page, path in routes(ids[len(ids) // 2]):
                poller.get(path)   # warm: connections, scripts, caches
                times = [poller.get(path) for _ in range(args.polls)]
                rows.append((page, path, percentile(times, 0.5),
                             percentile(times, 0.95)))
            poller.close()
            whole = overview_polls(port, args.polls)
    print('Console polling, %d journal records, %d pending, over loopback '
          'HTTP (kept alive), %d polls each:' % (args.records, args.pending,
                                                 args.polls))
    print('| page | route | p50 ms | p95 ms |')
    print('| --- | --- | ---: | ---: |')
    for page, path, p50, p95 in rows:
        print('| %s | `GET %s` | %.1f | %.1f |' % (page, path, p50, p95))
    print('| overview | one whole poll (the six above at once) | %.1f | %.1f |'
          % (percentile(whole, 0.5), percentile(whole, 0.95)))
    worst = max([p95 for *_, p95 in rows] + [percentile(whole, 0.95)])
    print('slowest p95: %.1f ms (bar: %.0f ms) -> %s' % (
        worst, BAR_MS, 'within' if worst <= BAR_MS else 'OVER'))
    return 0


def overview_polls(port, polls):
    """Wall ms of each overview poll: its six routes sent at once, each on
    its own kept-alive connection, as the browser does."""
    paths = [path for page, path in routes('x') if page == 'overview']
    pollers = [Poller(port) for _ in paths]
    out = []
    try:
        for _ in range(polls + 1):
            threads = [threading.Thread(target=p.get, args=(path,))
                       for p, path in zip(pollers, paths)]
            started = time.perf_counter()
            for thread in threads:
                thread.start()
            for thread in threads:
                thread.join()
            out.append((time.perf_counter() - started) * 1000)
    finally:
        for poller in pollers:
            poller.close()
    return out[1:]


if __name__ == '__main__':
    sys.exit(main())
