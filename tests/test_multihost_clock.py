"""One host's clock 30 s ahead (tests/multihost.py hosts; the skew is the
daemons' test clock file, `+30`: Linux time namespaces do not shift
CLOCK_REALTIME).  Consumers and schedulers decide by Redis's clock where
hosts must agree (heartbeat keys' expiry, TIME): the skewed scheduler
leads and enqueues each periodic slot once, none early, none skipped, and
moves a delayed task at its eta, not 25 s early; no live consumer is
presumed dead; a consumer killed on the skewed host or on a right one is
recovered.  A task delayed 5 s by a producer whose clock is 30 s ahead
runs at the eta that producer wrote (35 s later): Huey turns a delay into
an eta on the producer, and the suite cannot tell it from an eta asked
for.

Every host shares the machine's real clock underneath, and the journal
stamps events with it: its `started` times are Redis's clock here, the
yardstick for "not early".  Figures are printed (pytest -s) as in
tests/test_multihost.py; the assertions are about outcomes."""
import datetime
import json
import re
import signal
import time

import pytest

import multihost
from multihost import wait_for
from test_multihost import (daemon_env, in_flight, producer_app, report,
                            results, task_ids_of)

pytestmark = [pytest.mark.slow,
              pytest.mark.skipif(multihost.available() is not None,
                                 reason=str(multihost.available()))]

SKEW = 30
SLOT_TASK = 'scheduler_tasks.every_minute'
TASKS, SECONDS = 8, 3


def redis_now(client):
    seconds, micros = client.time()
    return seconds + micros / 1e6


def started(app, task_id):
    from huey_worker.journal.reads import read_task
    return (read_task(app, app.storage, task_id) or {}).get('started')


def start_host(tmp_path, host, redis_env, extra=None):
    """A consumer (2 thread workers) and a scheduler on `host`."""
    env = daemon_env(tmp_path, redis_env, host.name, dict({
        'HUEY_MODULES': 'sample_tasks,delivery_tasks,scheduler_tasks',
        'HUEY_WORKER_SCHEDULER_LEASE_TIMEOUT': '3',
        'HUEY_WORKER_SCHEDULER_INTERVAL': '0.2'}, **(extra or {})))
    consumer = host.daemon(['consumer', '--workers', '2', '--worker-type',
                            'thread'], env, 'consumer')
    scheduler = host.daemon(['scheduler'], env, 'scheduler')
    return consumer, scheduler


def kill_holding(client, app, daemons, name):
    """SIGKILL `name`'s consumer once it runs two tasks; returns (the ids
    it held, seconds until a peer recovered it)."""
    held = wait_for(lambda: in_flight(client, name) if len(
        in_flight(client, name)) == 2 else None, 30, '%s running 2' % name)
    daemons[name].signal(signal.SIGKILL)
    killed_at = time.monotonic()
    wait_for(lambda: client.zscore('hw:huey:consumers', name) is None, 30,
             '%s recovered by a peer' % name)
    return task_ids_of(app, held), time.monotonic() - killed_at


def slots(client):
    """{slot minute (unix s): [task ids]} of the periodic slots enqueued."""
    from huey_worker.scheduler.periodic import parse_slot_name
    out = {}
    for key in client.scan_iter('hw:huey:periodic:code:%s:*' % SLOT_TASK):
        record = json.loads(client.get(key))
        out.setdefault(parse_slot_name(record['slot']), []).append(
            record['id'])
    return out


def test_one_host_30s_ahead(tmp_path, monkeypatch):
    from huey_worker.scheduler.periodic import minute_of, slot_name
    import delivery_tasks
    with multihost.cluster(tmp_path) as cluster:
        redis_host = cluster.host('redis')
        _, client = redis_host.redis_server()
        redis_env = {'HUEY_REDIS_URL': 'redis://%s:6379/0'
                     % redis_host.address}
        app = producer_app(monkeypatch, tmp_path, redis_env)
        clock_file = tmp_path / 'ahead.clock'
        clock_file.write_text('+%d' % SKEW)
        hosts = {n: cluster.host(n) for n in ('c', 'a', 'b')}
        daemons, schedulers = {}, {}
        # The skewed host first: its scheduler leads.
        daemons['c'], schedulers['c'] = start_host(
            tmp_path, hosts['c'], redis_env,
            {'HUEY_TEST_CLOCK_FILE': str(clock_file)})
        wait_for(lambda: 'became leader' in schedulers['c'].output(), 30,
                 'the skewed scheduler leading')
        for name in ('a', 'b'):
            daemons[name], schedulers[name] = start_host(
                tmp_path, hosts[name], redis_env)
        wait_for(lambda: client.zcard('hw:huey:consumers') == 3, 30,
                 'three consumers registered')
        for daemon in (daemons['c'], schedulers['c']):
            told = re.search(r"clock is ([-+][0-9.]+)s off Redis's",
                             daemon.output())
            assert told and abs(float(told.group(1)) - SKEW) < 1, told

        # Delayed 5 s by a producer on Redis's clock, and by one 30 s
        # ahead (its eta: its own clock's now + 5), while the workers are
        # idle: a run starts as soon as the task is moved.
        sent = redis_now(client)
        right = delivery_tasks.slow_counted.schedule((0, 'clk-right'),
                                                     delay=5).id
        ahead_eta = sent + SKEW + 5
        ahead = delivery_tasks.slow_counted.schedule(
            (0, 'clk-ahead'), eta=datetime.datetime.fromtimestamp(
                ahead_eta, datetime.timezone.utc)).id
        wait_for(lambda: results(app, [right])[right] is not None, 30,
                 'the task delayed 5 s')
        ids = [delivery_tasks.slow_counted(SECONDS, 'clk-%d' % i).id
               for i in range(TASKS)]
        exposed_c, recovered_c = kill_holding(client, app, daemons, 'c')
        exposed_a, recovered_a = kill_holding(client, app, daemons, 'a')
        # The skewed leader hands over to a right one.
        schedulers['c'].signal(signal.SIGKILL)
        wait_for(lambda: any('became leader' in schedulers[n].output()
                             for n in ('a', 'b')), 30, 'a new leader')
        wait_for(lambda: all(v is not None for v in results(
            app, ids + [ahead]).values()), 60, 'every task done')
        end = minute_of(redis_now(client))
        wait_for(lambda: json.loads(client.get('hw:huey:scheduler:info'))
                 .get('last_evaluated', '') >= slot_name(end), 30,
                 'the leader at the current minute')

        # Periodic: every minute from the first leader's on, once each,
        # none ahead of Redis's minute, none started before its minute.
        done = slots(client)
        minutes = sorted(done)
        assert minutes == list(range(minutes[0], minutes[-1] + 60, 60))
        assert end <= minutes[-1] <= minute_of(redis_now(client)), minutes
        assert all(len(v) == 1 for v in done.values()), done
        slot_ids = {v[0]: m for m, v in done.items()}
        wait_for(lambda: all(started(app, i) for i in slot_ids), 30,
                 'every slot run')
        early_slots = [m for i, m in slot_ids.items()
                       if started(app, i) < m]
        # Delayed: not before the eta by Redis's clock, and moved once (a
        # task moved early goes back to the schedule from the worker, and
        # is moved again).
        assert started(app, right) >= sent + 5
        assert started(app, ahead) >= ahead_eta
        moves = json.loads(client.get('hw:huey:scheduler:info'))[
            'delayed_moved']

        # Consumers: only the two killed were recovered; each task ran
        # once, but one in flight on a consumer at its kill may run again.
        runs = {k.decode(): int(v) for k, v in
                client.hgetall('test:runs').items()}
        exposed = exposed_c | exposed_a
        duplicates = 0
        for n, task_id in enumerate(ids):
            ran = runs['clk-%d' % n]
            duplicates += ran - 1
            assert ran == 1 or task_id in exposed, (task_id, ran)
        assert runs['clk-right'] == runs['clk-ahead'] == 1
        logs = ''.join(d.output() for d in daemons.values())
        assert 'presumed dead' not in logs
        recovered = set(re.findall(r'consumer (\S+) silent for more', logs)) \
            | set(re.findall(r'a list of the consumer (\S+) that is gone',
                             logs))
        assert recovered <= {'c', 'a'}, recovered
        report('clock', skew_s=SKEW, tasks=len(ids) + 2 + len(done),
               slots=len(done), early_slots=len(early_slots),
               delayed_moves=moves, duplicates=duplicates,
               in_flight_at_kills=len(exposed_c) + len(exposed_a),
               recovered_skewed_s='%.1f' % recovered_c,
               recovered_right_s='%.1f' % recovered_a,
               delayed_right_after_s='%.1f' % (started(app, right) - sent),
               delayed_ahead_after_s='%.1f' % (started(app, ahead) - sent))
        assert early_slots == []
        assert moves == 2
