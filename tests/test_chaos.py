"""The chaos test: hundreds of tasks while worker processes and whole
consumers (thread and process mode) are killed with SIGKILL again and
again, and Redis is restarted once.  Every task must complete; duplicates
may only come from tasks in flight at the kills."""
import json
import os
import random
import signal
import time

import pytest
from huey.serializer import Serializer

from huey_worker.devredis import EmbeddedRedis

pytestmark = pytest.mark.slow

TASKS = 600
# What each chaos step does, in turn.
PLAN = ('worker', 'chaos-thread', 'worker', 'chaos-proc', 'worker',
        'chaos-thread')


def consumer_info(client, identity):
    raw = client.get('hw:huey:consumer:%s' % identity)
    return json.loads(raw) if raw else None


def in_flight(client, identity):
    lists = client.smembers('hw:huey:inflight-lists:%s' % identity)
    return sum(client.llen(k) for k in lists)


def where_missing(client, ids):
    """Say where each task without a result is, for the failure message."""
    missing = [i for i, v in zip(ids, client.mget(['huey.r.huey.' + i
                                                   for i in ids])) if not v]
    places = {'queue': client.lrange('huey.redis.huey', 0, -1),
              'schedule': client.zrange('huey.schedule.huey', 0, -1),
              'dead': client.lrange('hw:huey:dead', 0, -1)}
    for key in client.scan_iter('hw:huey:inflight:*'):
        places[key.decode()] = client.lrange(key, 0, -1)
    report = []
    for task_id in missing:
        found = [name for name, items in places.items()
                 if any(task_id.encode() in item for item in items)]
        report.append('%s in %s' % (task_id, found or 'nowhere'))
    indexes = {k.decode(): sorted(client.smembers(k)) for k in
               client.scan_iter('hw:huey:inflight-lists:*')}
    return '%d task(s) missing: %s; in-flight indexes: %s' % (
        len(missing), '; '.join(report), indexes)


def test_no_task_lost_under_kill_9_and_a_redis_restart(tmp_path, base_env,
                                                       start_daemon):
    import delivery_tasks
    from huey_worker.app import huey
    rng = random.Random(20261122)
    server = EmbeddedRedis(str(tmp_path / 'chaos-redis')).start()
    env = dict(base_env, HUEY_REDIS_URL=server.url,
               HUEY_MODULES='sample_tasks,delivery_tasks',
               HUEY_WORKER_DELIVERY_HEARTBEAT_INTERVAL='0.5',
               HUEY_WORKER_DELIVERY_RECOVERY_TIMEOUT='3',
               HUEY_WORKER_DELIVERY_MAX_DELIVERIES='50',
               HUEY_WORKER_REDIS_RETRY_MAX_DELAY='0.5',
               HUEY_WORKER_LOGGING_TASK_EVENTS='false')
    specs = {'chaos-thread': ['--workers', '4', '--worker-type', 'thread'],
             'chaos-proc': ['--workers', '2', '--worker-type', 'process']}
    running = {}

    def start(identity):
        running[identity] = start_daemon(
            ['consumer'] + specs[identity],
            dict(env, HUEY_CONSUMER_ID=identity), name=identity)

    client = server.client()
    try:
        for identity in specs:
            start(identity)
        ids = []
        pipe = client.pipeline()
        for i in range(TASKS):
            task = delivery_tasks.chaos_unit.s(i)
            ids.append(task.id)
            pipe.lpush('huey.redis.huey', huey.serialize_task(task))
        pipe.execute()

        kills = {'worker': 0, 'consumer': 0}
        exposed = 0            # tasks in flight at the moments of the kills
        redis_restarted = False
        delayed_restart = None
        deadline = time.monotonic() + 240
        step = 0

        def done():
            return sum(1 for v in client.mget(['huey.r.huey.' + i
                                               for i in ids]) if v)

        while done() < TASKS:
            assert time.monotonic() < deadline, where_missing(client, ids)
            time.sleep(0.6)
            if delayed_restart and time.monotonic() >= delayed_restart[1]:
                start(delayed_restart[0])
                delayed_restart = None
            completed = done()
            if not redis_restarted and completed > TASKS // 3:
                server.restart()          # AOF on: the queue survives
                redis_restarted = True
                continue
            if completed > TASKS * 0.8:
                continue                  # let it finish
            step += 1
            action = PLAN[step % len(PLAN)]
            if action == 'worker':
                info = consumer_info(client, 'chaos-proc')
                pids = [w['pid'] for w in (info or {}).get('worker_list', [])
                        if w['pid'] and w['alive']]
                if pids and 'chaos-proc' in running:
                    exposed += 1  # a worker runs one task at a time
                    try:
                        os.kill(rng.choice(pids), signal.SIGKILL)
                        kills['worker'] += 1
                    except ProcessLookupError:
                        pass
            elif action in running and delayed_restart is None:
                exposed += in_flight(client, action) + \
                    int(specs[action][1])  # + any taken meanwhile
                os.killpg(running[action].pid, signal.SIGKILL)
                running[action].wait()
                kills['consumer'] += 1
                if action == 'chaos-thread':
                    start(action)         # comes back: requeues at once
                else:                     # stays away: others recover it
                    del running[action]
                    delayed_restart = (action, time.monotonic() + 4)

        runs = {int(k): int(v) for k, v in
                client.hgetall('test:chaos-runs').items()}
        results = [Serializer().deserialize(v) for v in
                   client.mget(['huey.r.huey.' + i for i in ids])]
        duplicates = sum(n - 1 for n in runs.values())
        print('\nchaos: %d tasks, %d completed, %d lost, %d duplicate runs; '
              '%d worker kills, %d consumer kills, redis restarted: %s; '
              'tasks exposed at kills <= %d' % (
                  TASKS, len(results), TASKS - len(runs), duplicates,
                  kills['worker'], kills['consumer'], redis_restarted,
                  exposed))
        assert results == list(range(TASKS))
        assert sorted(runs) == list(range(TASKS))
        assert duplicates <= exposed
        assert redis_restarted and kills['consumer'] >= 4 and \
            kills['worker'] >= 3
        assert client.llen('hw:huey:dead') == 0
        assert client.llen('huey.redis.huey') == 0
    finally:
        for daemon in running.values():
            daemon.stop()
        server.cleanup()
