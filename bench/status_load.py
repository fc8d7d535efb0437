"""The status endpoint under concurrent clients, with a journal of many
records held in Redis.

The records are written through the journal's own hooks (the producer's
enqueue, then on_dequeued and on_outcome as a worker calls them), staged
and sent in MULTI blocks, so they are exactly what a run of that many
tasks leaves.  The load comes from wrk when it is installed (Debian: apt
install wrk; it costs the 2-core machine least), else from a few Python
client processes with several threads each.  Either way: 16 concurrent
clients, loopback only, for a fixed time, one connection per request
(`Connection: close`, as a web app polling with plain requests.get does),
or with keep_alive=True one connection per client reused for all its
requests (as requests.Session and Prometheus do); each request is timed
from connect (or, kept alive, from sending) to the last byte.
"""
import argparse
import multiprocessing
import os
import sys
import random
import re
import shutil
import socket
import subprocess
import tempfile
import threading
import time

from harness import STAGING, percentile, staged_enqueue


def fill_journal(app, task, count):
    """`count` complete task records; their ids."""
    from huey_worker import journal
    storage = app.storage
    writer = journal.install(app)
    worker = {'host': 'bench', 'pid': os.getpid(), 'consumer': 'bench',
              'worker': 0}
    ids = []
    # Only the journal records are wanted; the staged messages are dropped.
    with staged_enqueue(storage) as one_more:
        for _ in range(count):
            message = task.s()
            app.enqueue(message)
            writer.on_dequeued(storage, message, worker)
            writer.after_execute(message, 1, None)
            writer.on_outcome(storage, message, 'complete', 0.0005)
            ids.append(message.id)
            one_more()
    storage.conn.delete(STAGING)
    return ids


# --- a large journal behind a status server (console_load, metrics_scrape) ---

NAMES = 10   # task names the records are spread over


def journal_args(argv, description, per_run, default, quick):
    """The command line of a benchmark that reads a large journal:
    --records (journal records, default 100,000), --pending (messages left
    in the queue, default 10,000), `--<per_run>` (requests timed, `default`)
    and --quick (500 records, 100 pending, `quick` requests: a tiny run that
    proves every part works).  An argparse namespace; bad input exits 2."""
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument('--records', type=int, default=100000)
    parser.add_argument('--pending', type=int, default=10000)
    parser.add_argument('--' + per_run, type=int, default=default)
    parser.add_argument('--quick', action='store_true',
                        help='a tiny run that proves every part works')
    args = parser.parse_args(argv)
    if args.quick:
        args.records, args.pending = 500, 100
        setattr(args, per_run.replace('-', '_'), quick)
    return args


def journal_app(redis_url, workdir, module, records, pending):
    """The suite's app on `redis_url` (an empty config file in `workdir`)
    with NAMES no-op tasks `module`.task_0 ... task_9, `records` complete
    journal records spread evenly over them and `pending` messages left in
    the queue (so queue reads find heads and their records).  (app, list
    of the tasks, list of the records' task ids); the time it took goes to
    stderr."""
    from huey_worker import app as app_module, config
    empty = os.path.join(workdir, 'empty.ini')
    open(empty, 'w').close()
    cfg = config.load(empty, environ={'HUEY_REDIS_URL': redis_url})
    app = app_module.huey.configure(cfg)
    tasks = []
    for i in range(NAMES):
        def body():
            return 1
        body.__module__ = module
        body.__name__ = body.__qualname__ = 'task_%d' % i
        tasks.append(app.task()(body))
    started = time.monotonic()
    ids = []
    for task in tasks:
        ids += fill_journal(app, task, records // NAMES)
    for i in range(pending):
        tasks[i % NAMES]()
    print('  ... %d records, %d pending, written in %.1fs' % (
        records, pending, time.monotonic() - started), file=sys.stderr)
    return app, tasks, ids


def _request(address, path, keep_alive=False):
    return ('GET %s HTTP/1.1\r\nHost: %s:%d\r\nUser-Agent: huey-worker-bench'
            '\r\n%s\r\n' % (path, address[0], address[1],
                              '' if keep_alive else 'Connection: close\r\n')
            ).encode()


def _one(address, request):
    """(status, seconds) of one request on a fresh connection."""
    started = time.perf_counter()
    sock = socket.create_connection(address, timeout=30)
    try:
        sock.sendall(request)
        data = bytearray()
        while True:
            chunk = sock.recv(65536)
            if not chunk:
                break
            data += chunk
    finally:
        sock.close()
    return int(data[9:12] or 0), time.perf_counter() - started


class _Kept:
    """(status, seconds) of requests on one connection, reused."""

    def __init__(self, address):
        self.address, self.file = address, None

    def __call__(self, request):
        started = time.perf_counter()
        if self.file is None:
            self.sock = socket.create_connection(self.address, timeout=30)
            self.file = self.sock.makefile('rb')
        self.sock.sendall(request)
        status = int(self.file.readline()[9:12] or 0)
        length, close = 0, False
        while True:
            line = self.file.readline().lower()
            if line in (b'\r\n', b''):
                break
            if line.startswith(b'content-length:'):
                length = int(line[15:])
            elif line.startswith(b'connection:') and b'close' in line:
                close = True
        self.file.read(length)
        if close:   # the server's per-connection cap: open another
            self.file.close()
            self.sock.close()
            self.file = None
        return status, time.perf_counter() - started


def _client(address, paths, seconds, threads, start_at, out, seed,
            keep_alive=False):
    requests = [_request(address, p, keep_alive) for p in paths]
    results = []
    lock = threading.Lock()

    def loop(index):
        local, pick = [], random.Random(seed * 1000 + index)
        send = _Kept(address) if keep_alive else (
            lambda request: _one(address, request))
        while time.time() < start_at:
            time.sleep(0.001)
        stop_at = start_at + seconds
        while time.time() < stop_at:
            local.append(send(pick.choice(requests)))
        with lock:
            results.extend(local)
    runners = [threading.Thread(target=loop, args=(i,))
               for i in range(threads)]
    for runner in runners:
        runner.start()
    for runner in runners:
        runner.join()
    out.put(results)


def load(address, paths, seconds=3.0, processes=2, threads=8, seed=1,
         keep_alive=False):
    """Requests per second, p50 and p99 latency (ms), the statuses seen and
    the client used, with processes x threads concurrent clients asking
    for `paths` (picked at random per request) during `seconds`, each
    request on a new connection, or with `keep_alive` on one per client."""
    if shutil.which('wrk'):
        return wrk_load(address, paths, seconds, processes,
                        processes * threads, seed, keep_alive)
    return python_load(address, paths, seconds, processes, threads, seed,
                       keep_alive)


WRK_SCRIPT = """
math.randomseed(%d)
local paths = {%s}
%s
request = function()
  return wrk.format("GET", paths[math.random(#paths)])
end
"""


def wrk_load(address, paths, seconds, threads, connections, seed,
             keep_alive=False):
    with tempfile.NamedTemporaryFile('w', suffix='.lua') as script:
        script.write(WRK_SCRIPT % (seed, ', '.join(
            '"%s"' % p.replace('"', '') for p in paths),
            '' if keep_alive else 'wrk.headers["Connection"] = "close"'))
        script.flush()
        out = subprocess.run(
            ['wrk', '-t', str(threads), '-c', str(connections), '-d',
             '%ds' % max(1, round(seconds)), '--latency', '-s', script.name,
             'http://%s:%d' % address], capture_output=True, text=True,
            timeout=seconds + 60).stdout
    rps = re.search(r'Requests/sec:\s+([\d.]+)', out)
    if rps is None:
        raise RuntimeError('wrk said: %s' % out)
    latency = {int(p): _ms(v, unit) for p, v, unit in re.findall(
        r'^\s+(50|99)%\s+([\d.]+)(us|ms|s)\s*$', out, re.M)}
    total = int(re.search(r'(\d+) requests in', out).group(1))
    statuses = {200: total}
    bad = re.search(r'Non-2xx or 3xx responses: (\d+)', out)
    if bad:
        statuses = {200: total - int(bad.group(1)), 'non-2xx': int(
            bad.group(1))}
    errors = re.search(r'Socket errors: (.*)', out)
    if errors and sum(int(n) for n in re.findall(r'\d+', errors.group(1))):
        statuses['socket errors'] = errors.group(1).strip()
    return {'rps': float(rps.group(1)), 'p50': latency[50],
            'p99': latency[99], 'statuses': statuses, 'client': 'wrk'}


def _ms(value, unit):
    return float(value) * {'us': 0.001, 'ms': 1.0, 's': 1000.0}[unit]


def python_load(address, paths, seconds, processes, threads, seed,
                keep_alive=False):
    ctx = multiprocessing.get_context('fork')
    out = ctx.Queue()
    start_at = time.time() + 0.3
    clients = [ctx.Process(target=_client, args=(
        address, paths, seconds, threads, start_at, out, seed + i,
        keep_alive))
        for i in range(processes)]
    for client in clients:
        client.start()
    results = []
    for _ in clients:
        results += out.get(timeout=seconds + 120)
    for client in clients:
        client.join(30)
    latencies = [t * 1000.0 for _, t in results]
    statuses = {}
    for status, _ in results:
        statuses[status] = statuses.get(status, 0) + 1
    return {'rps': len(results) / seconds,
            'p50': percentile(latencies, 0.5),
            'p99': percentile(latencies, 0.99),
            'statuses': statuses, 'client': 'python'}
