"""The floor: the least a Redis-backed consumer can do per task with
redis-py, BRPOP the message and SET a result, in N threads or processes.

    python bench/floor.py REDIS_URL WORKERS thread|process

Messages are task ids; the result goes where Huey's RedisExpireStorage
keeps it (huey.r.huey.<id>), so the benchmark sees it finish the same way.
Runs until SIGTERM.
"""
import multiprocessing
import signal
import sys
import threading

import redis

QUEUE = 'huey.redis.huey'
RESULT_PREFIX = b'huey.r.huey.'


def work(url):
    conn = redis.Redis.from_url(url)
    while True:
        reply = conn.brpop(QUEUE, timeout=1)
        if reply is not None:
            conn.set(RESULT_PREFIX + reply[1], b'1', ex=604800)


def main(url, workers, kind):
    signal.signal(signal.SIGTERM, lambda *a: sys.exit(0))
    if kind == 'process':
        runners = [multiprocessing.get_context('fork').Process(
            target=work, args=(url,), daemon=True) for _ in range(workers)]
    else:
        runners = [threading.Thread(target=work, args=(url,), daemon=True)
                   for _ in range(workers)]
    for runner in runners:
        runner.start()
    print('ready', flush=True)
    for runner in runners:
        runner.join()


if __name__ == '__main__':
    main(sys.argv[1], int(sys.argv[2]), sys.argv[3])
