"""Several hosts on one Redis, as network namespaces on a bridge
(tests/multihost.py): a partition of a consumer host, a consumer paused
and resumed (SIGSTOP, SIGCONT: a paused VM), and the harness's own
clean-up (a Redis failover through Sentinel: test_multihost_failover.py;
one host's clock 30 s ahead: test_multihost_clock.py).  Each
consumer host runs a consumer and a scheduler with its own identity, as
the installed units would.

The figures (tasks, faults, lost, duplicates against tasks in flight at
the faults, times to recover) are printed (pytest -s) and written into
docs/delivery.md "Across hosts"; the assertions are about outcomes, never
about durations."""
import collections
import os
import re
import signal
import time

import pytest

import multihost
from multihost import wait_for

pytestmark = [pytest.mark.slow,
              pytest.mark.skipif(multihost.available() is not None,
                                 reason=str(multihost.available()))]

CONSUMERS = ('a', 'b', 'c')
RECOVERY_TIMEOUT = 3.0
FIGURES = {}


def daemon_env(tmp_path, redis_env, identity, extra=None):
    config_path = tmp_path / 'huey-worker.ini'
    config_path.touch()
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(('HUEY_', 'REDIS_', 'NOTIFY_SOCKET',
                                'WATCHDOG_'))}
    env.update({
        'HUEY_WORKER_CONFIG': str(config_path),
        'PYTHONPATH': os.path.join(multihost.ROOT, 'tests'),
        'HUEY_WORKER_TASKS_BUILTIN': 'false',
        'HUEY_MODULES': 'sample_tasks,delivery_tasks',
        'PYTHONUNBUFFERED': '1',
        'HUEY_CONSUMER_ID': identity,
        'HUEY_WORKER_DELIVERY_HEARTBEAT_INTERVAL': '0.5',
        'HUEY_WORKER_DELIVERY_RECOVERY_TIMEOUT': str(RECOVERY_TIMEOUT),
        'HUEY_WORKER_DELIVERY_MAX_DELIVERIES': '50',
        'HUEY_WORKER_REDIS_RETRY_MAX_DELAY': '0.5',
        'HUEY_WORKER_REDIS_CONNECT_TIMEOUT': '1',
        # Short, so a connection hung by the partition is given up soon.
        'HUEY_WORKER_REDIS_SOCKET_TIMEOUT': '3',
        'HUEY_WORKER_CONSUMER_READ_TIMEOUT': '1',
        'HUEY_WORKER_LOGGING_TASK_EVENTS': 'both',
    })
    env.update(redis_env)
    env.update(extra or {})
    return env


def producer_app(monkeypatch, tmp_path, redis_env):
    """The shared Huey app, configured as a web app producing tasks from
    the root namespace would have it."""
    from huey_worker import app as app_module
    from huey_worker import config
    for name in list(os.environ):
        if name.startswith(('HUEY_', 'REDIS_')):
            monkeypatch.delenv(name)
    for name, value in redis_env.items():
        monkeypatch.setenv(name, value)
    path = tmp_path / 'producer.ini'
    path.touch()
    monkeypatch.setenv('HUEY_WORKER_CONFIG', str(path))
    monkeypatch.setenv('HUEY_WORKER_REDIS_RETRY_MAX_DELAY', '0.5')
    app_module.huey.configure(config.load())
    import delivery_tasks  # noqa: F401  registers the tasks
    return app_module.huey


def in_flight(client, identity):
    """{task message: list} of what `identity`'s lists hold now."""
    held = {}
    for key in client.scan_iter('hw:huey:inflight:%s:*' % identity):
        for raw in client.lrange(key, 0, -1):
            held[raw] = key
    return held


def task_ids_of(app, messages):
    from huey_worker.storage import message_data
    return {app.deserialize_task(message_data(raw)).id for raw in messages}


def journal_states(app, task_id):
    """The states of `task_id`'s history, oldest first, and its state."""
    from huey_worker.journal.reads import read_task
    record = read_task(app, app.storage, task_id)
    history = [e.get('state') or e.get('event') for e in
               (record or {}).get('history') or []]
    return history, (record or {}).get('state')


def report(name, **figures):
    FIGURES[name] = figures
    print('\nmultihost %s: %s' % (name, ', '.join(
        '%s=%s' % kv for kv in figures.items())))


@pytest.fixture
def hosts(tmp_path):
    with multihost.cluster(tmp_path) as cluster:
        redis_host = cluster.host('redis')
        _, client = redis_host.redis_server()
        consumers = {name: cluster.host(name) for name in CONSUMERS}
        yield cluster, redis_host, client, consumers
        assert client.ping()


def start_consumers(tmp_path, consumers, redis_env, workers=2):
    daemons = {}
    for name, host in consumers.items():
        env = daemon_env(tmp_path, redis_env, name)
        daemons[name] = host.daemon(
            ['consumer', '--workers', str(workers), '--worker-type',
             'thread'], env, 'consumer')
        host.daemon(['scheduler'], env, 'scheduler')
    return daemons


def enqueue_slow(app, count, seconds, tag):
    import delivery_tasks
    return [delivery_tasks.slow_counted(seconds, '%s-%d' % (tag, i)).id
            for i in range(count)]


def results(app, ids):
    from huey.serializer import Serializer
    raw = app.storage.conn.mget(['huey.r.huey.' + i for i in ids])
    return {i: (Serializer().deserialize(v) if v else None)
            for i, v in zip(ids, raw)}


def check_outcomes(app, client, ids, tag):
    """Each task ran to one final state, and the outcome kept is the one
    of its last run (never a stale one of a consumer fenced off): returns
    (duplicates, stale outcomes, uncounted runs).

    A run counts itself with its body's first write (test:runs) and
    returns the delivery number it saw.  An outcome below the runs counted
    is an earlier delivery's, kept over a later run's: stale.  One above
    them is the last delivery's, after a delivery whose run never counted
    itself: the cut fell between the worker's first transaction (which
    counts the delivery) and the body's first write, which hangs in the
    cut-off socket and lands after the heal, or never (uncounted)."""
    runs = {k.decode(): int(v) for k, v in
            client.hgetall('test:runs').items()}
    outcomes = results(app, ids)
    duplicates = stale = uncounted = 0
    for n, task_id in enumerate(ids):
        ran = runs.get('%s-%d' % (tag, n), 0)
        assert ran >= 1, task_id
        duplicates += ran - 1
        stale += outcomes[task_id] < ran
        uncounted += outcomes[task_id] > ran
        history, state = journal_states(app, task_id)
        assert state == 'complete', (task_id, state, history)
    return duplicates, stale, uncounted


# The two ways a scheduler gives up leading (daemon/scheduler/service.py).
STEPPED_DOWN = re.compile('lease not renewed before its local deadline|'
                          'lost the lease')


def slot_runs(daemons):
    """{task id: runs started} of the periodic slot task, from the
    consumers' task event lines (every run logs its start)."""
    from test_multihost_clock import SLOT_TASK
    return collections.Counter(re.findall(
        r'start %s (\S+)' % re.escape(SLOT_TASK),
        ''.join(d.output() for d in daemons)))


def test_partition_of_a_consumer_host(hosts, tmp_path, monkeypatch):
    """The cut-off host runs two tasks, and its scheduler leads: a peer
    takes the lease over, enqueues the slot of a minute the cut lasts
    across, and each slot runs once."""
    # Here, not at the top: test_multihost_clock imports from this module.
    from test_multihost_clock import redis_now, slots, start_host
    from huey_worker.scheduler.periodic import minute_of
    cluster, redis_host, client, consumers = hosts
    redis_env = {'HUEY_REDIS_URL': 'redis://%s:6379/0' % redis_host.address}
    app = producer_app(monkeypatch, tmp_path, redis_env)
    daemons, schedulers = {}, {}
    # The host to be cut off first: its scheduler leads.
    for name in ('c', 'a', 'b'):
        daemons[name], schedulers[name] = start_host(
            tmp_path, consumers[name], redis_env)
        wait_for(lambda: 'became leader' in schedulers['c'].output(), 30,
                 "c's scheduler leading")
    wait_for(lambda: client.zcard('hw:huey:consumers') == 3, 30,
             'three consumers registered')
    ids = enqueue_slow(app, 12, 4, 'part')
    victim = consumers['c']

    def running_two():
        # Two of these, not a slot's task: that one must run once.
        held = in_flight(client, 'c')
        return held if len(held) == 2 and \
            task_ids_of(app, held) <= set(ids) else None
    held = wait_for(running_two, 30, 'c running 2 tasks')
    exposed = task_ids_of(app, held)
    victim.cut()
    cut_at = time.monotonic()
    cut_minute = minute_of(redis_now(client))
    try:
        wait_for(lambda: any('became leader' in schedulers[n].output()
                             for n in ('a', 'b')), 30, 'a peer leading')
        handover_in = time.monotonic() - cut_at
        wait_for(lambda: all(v is not None for v in
                             results(app, ids).values()), 60,
                 'every task done by a and b')
        recovered_in = time.monotonic() - cut_at
        assert not in_flight(client, 'c')
        wait_for(lambda: cut_minute + 60 in slots(client), 90,
                 'the slot of the minute after the cut, by a peer')
    finally:
        victim.heal()
    # The cut-off consumer's bodies ended meanwhile; back on the network
    # it must find its tasks taken and write nothing of them.
    wait_for(lambda: 'fenced' in daemons['c'].output(), 30,
             'c fencing its stale deliveries')
    wait_for(lambda: STEPPED_DOWN.search(schedulers['c'].output()), 30,
             "c's scheduler giving the lease up")
    wait_for(lambda: set(slot_runs(daemons.values())) >= {
        v[0] for v in slots(client).values()}, 30, "each slot's task run")
    time.sleep(2 * RECOVERY_TIMEOUT)   # room for a stale write to land
    duplicates, stale, uncounted = check_outcomes(app, client, ids, 'part')
    done = slots(client)
    minutes = sorted(done)
    runs = slot_runs(daemons.values())
    token = re.search(r'became leader \(token (\S+),',
                      schedulers['c'].output()).group(1)
    report('partition', tasks=len(ids), partitions=1,
           in_flight_at_fault=len(exposed), duplicates=duplicates,
           stale_outcomes=stale, uncounted_runs=uncounted,
           recovered_s='%.1f' % recovered_in, slots=len(done),
           slot_runs_twice=sum(n > 1 for n in runs.values()),
           leader_handover_s='%.1f' % handover_in)
    assert stale == 0
    assert duplicates <= len(exposed)
    # Scheduler: c led once, and not since; a slot every minute, once
    # each (a slot enqueued twice is a second task: a run no slot names).
    assert schedulers['c'].output().count('became leader') == 1
    assert client.get('hw:huey:scheduler:lease') not in (None,
                                                         token.encode())
    assert minutes == list(range(minutes[0], minutes[-1] + 60, 60))
    assert all(len(v) == 1 for v in done.values()), done
    assert set(runs) <= {v[0] for v in done.values()}, (runs, done)
    assert all(n == 1 for n in runs.values()), runs


def test_paused_consumer_fences_its_recovered_tasks(hosts, tmp_path,
                                                    monkeypatch):
    cluster, redis_host, client, consumers = hosts
    redis_env = {'HUEY_REDIS_URL': 'redis://%s:6379/0' % redis_host.address}
    app = producer_app(monkeypatch, tmp_path, redis_env)
    daemons = start_consumers(tmp_path, consumers, redis_env)
    wait_for(lambda: client.zcard('hw:huey:consumers') == 3, 30,
             'three consumers registered')
    ids = enqueue_slow(app, 12, 4, 'stop')
    held = wait_for(lambda: in_flight(client, 'b') if len(
        in_flight(client, 'b')) == 2 else None, 30, 'b running 2 tasks')
    exposed = task_ids_of(app, held)
    daemons['b'].signal(signal.SIGSTOP)
    stopped_at = time.monotonic()
    try:
        # Presumed dead: its heartbeat key expired, a peer recovered it.
        wait_for(lambda: client.zscore('hw:huey:consumers', 'b') is None,
                 30, 'b recovered by a peer')
        recovered_in = time.monotonic() - stopped_at
    finally:
        daemons['b'].signal(signal.SIGCONT)
    wait_for(lambda: all(v is not None for v in
                         results(app, ids).values()), 60, 'every task done')
    wait_for(lambda: 'fenced' in daemons['b'].output(), 30,
             'b fencing its recovered deliveries')
    time.sleep(2 * RECOVERY_TIMEOUT)
    duplicates, stale, uncounted = check_outcomes(app, client, ids, 'stop')
    report('pause', tasks=len(ids), pauses=1, in_flight_at_fault=len(exposed),
           duplicates=duplicates, stale_outcomes=stale,
           uncounted_runs=uncounted, recovered_s='%.1f' % recovered_in)
    assert stale == 0
    assert duplicates <= len(exposed)


HOLD_A_CLUSTER = '''
import sys, time
sys.path.insert(0, %r)
import multihost
with multihost.cluster(sys.argv[1]) as cluster:
    host = cluster.host('x')
    host.start('sleep', ['sleep', '600'], {})
    # Told only once `ip netns exec` has put the sleeper in the namespace
    # (under load that takes a moment after Popen returns).
    deadline = time.monotonic() + 30
    while not multihost._ip('netns', 'pids', host.ns).stdout.split() \
            and time.monotonic() < deadline:
        time.sleep(0.02)
    print(cluster.run_id, flush=True)
    time.sleep(600)
'''


def _running(pid):
    """True while `pid` exists and is no zombie (its parent gone, it waits
    for whoever reaps orphans here)."""
    try:
        with open('/proc/%d/stat' % pid) as fh:
            return fh.read().rsplit(')', 1)[1].split()[0] != 'Z'
    except FileNotFoundError:
        return False


@pytest.mark.parametrize('signum', [signal.SIGTERM, signal.SIGKILL])
def test_the_harness_leaves_nothing_behind(tmp_path, signum):
    """A run stopped by SIGTERM cleans up itself; one SIGKILLed is swept
    by the next run (its owner is gone); a live run is never swept."""
    import subprocess
    import sys
    holder = subprocess.Popen(
        [sys.executable, '-c', HOLD_A_CLUSTER % os.path.dirname(
            os.path.abspath(__file__)), str(tmp_path)],
        stdout=subprocess.PIPE, text=True)
    try:
        run_id = holder.stdout.readline().strip()
        sleeper = multihost._ip('netns', 'pids', run_id + '-x').stdout.split()
        assert run_id and multihost.leftovers(run_id) and sleeper
        assert run_id not in multihost.sweep_stale_runs()
        holder.send_signal(signum)
        holder.wait(30)
        if signum == signal.SIGKILL:
            assert multihost.leftovers(run_id)
            assert run_id in multihost.sweep_stale_runs()
        assert multihost.leftovers(run_id) == []
        assert not os.path.exists(os.path.join(multihost.RUNS_DIR, run_id))
        assert not _running(int(sleeper[0]))
    finally:
        if holder.poll() is None:
            holder.kill()
            holder.wait()
