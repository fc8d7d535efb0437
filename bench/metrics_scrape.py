"""The cost of one scrape of GET /metrics with a large journal: 100,000
task records (written through the journal's own hooks, as a run of that
many tasks leaves them) under 10 task names, and 10,000 messages pending
in the queue (so the queue-latency reads find heads and their records).

An absolute figure, not a ratio against plain Huey (which has no
/metrics): milliseconds per scrape over HTTP from a real status server
(one kept-alive connection, as Prometheus scrapes), and the collector's
own time in this process (render_metrics, no HTTP).  Also the Redis
commands one scrape sends, which must not grow with the records.

    .venv/bin/python bench/metrics_scrape.py [--records N] [--scrapes N]
"""
import http.client
import os
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)

from harness import percentile, private_redis, StatusServer  # noqa: E402
from status_load import NAMES, journal_app, journal_args  # noqa: E402


def main(argv=None):
    args = journal_args(argv, __doc__.split('\n')[0], 'scrapes', 200, 10)
    with private_redis('huey-worker-bench-metrics-') as (server, workdir):
        from huey_worker.devredis import free_port
        from huey_worker.status.metrics import render_metrics
        app = journal_app(server.url, workdir, 'bench_metrics',
                          args.records, args.pending)[0]

        inproc = []
        for _ in range(args.scrapes):
            t = time.perf_counter()
            body = render_metrics(app)[0]
            inproc.append((time.perf_counter() - t) * 1000)
        conn = server.client()
        before = conn.info('stats')['total_commands_processed']
        render_metrics(app)
        commands = conn.info('stats')['total_commands_processed'] - before - 1

        port = free_port()
        over_http = []
        with StatusServer(port, server.url, workdir).start(notify=True) \
                as status:
            status.wait_ready()
            client = http.client.HTTPConnection('127.0.0.1', port, timeout=30)
            for _ in range(args.scrapes):
                t = time.perf_counter()
                client.request('GET', '/metrics')
                answer = client.getresponse()
                data = answer.read()
                over_http.append((time.perf_counter() - t) * 1000)
                assert answer.status == 200, data[:200]
            client.close()
    assert b'huey_worker_queue_latency_seconds' in body
    print('GET /metrics, %d journal records, %d task names, %d pending: '
          'p50 %.1f ms, p99 %.1f ms per scrape over HTTP (kept alive); '
          'collector alone p50 %.1f ms; %d Redis commands per scrape; '
          '%d bytes' % (args.records, NAMES, args.pending,
                        percentile(over_http, 0.5),
                        percentile(over_http, 0.99), percentile(inproc, 0.5),
                        commands, len(data)))
    return 0


if __name__ == '__main__':
    sys.exit(main())
