"""The scheduler daemon as real processes on a real Redis, with the wall
clock driven through test clock files (no waiting for real minutes):
failover by SIGKILL and SIGSTOP, a standby whose clock runs ahead,
restarts within a minute, catch-up, delayed and retrying tasks, sd_notify,
Redis going away, reload, config errors."""
import datetime
import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from collections import Counter

import pytest

from ops_helpers import NotifySocket, wait_until
import redis
from huey.exceptions import TaskException

from huey_worker.devredis import EmbeddedRedis, free_port

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
UTC = datetime.timezone.utc
LEASE_TIMEOUT = 2     # seconds: the key lives 1.8 s in Redis
EVERY_MINUTE = 'scheduler_tasks.every_minute'
REPORT = 'scheduler_tasks.report'


def at(hhmmss):
    h, m, s = (int(x) for x in hhmmss.split(':'))
    return datetime.datetime(2030, 1, 1, h, m, s, tzinfo=UTC).timestamp()


class ClockFile:
    """A clock file one scheduler reads its wall time from."""

    def __init__(self, path, now):
        self.path = str(path)
        self.set(now)

    def set(self, now):
        tmp = self.path + '.tmp'
        with open(tmp, 'w') as fh:
            fh.write(repr(float(now)))
        os.replace(tmp, self.path)


class Cluster:
    """Scheduler processes sharing one Redis, each with its own clock."""

    def __init__(self, base_env, start_daemon, tmp_path, redis_url,
                 producer):
        self.base_env, self.start_daemon = base_env, start_daemon
        self.tmp_path = tmp_path
        self.redis = redis.Redis.from_url(redis_url, protocol=2)
        self.app = producer
        self.keys = producer.storage.keys
        self.ini = tmp_path / 'scheduler.ini'
        self.write_ini()
        self.count = 0

    def write_ini(self, scheduler_extra=''):
        self.ini.write_text(textwrap.dedent("""\
            [scheduler]
            lease_timeout = %d
            interval = 0.1
            %s

            [periodic:even-report]
            task = scheduler_tasks.report
            schedule = */2 * * * *
            args = ["even"]
            kwargs = {"copies": 2}
            """) % (LEASE_TIMEOUT, scheduler_extra))

    def start(self, now, name=None, **env):
        self.count += 1
        name = name or 'scheduler%d' % self.count
        clock = ClockFile(self.tmp_path / ('%s.clock' % name), now)
        full_env = dict(self.base_env)
        full_env.update({'HUEY_MODULES': 'sample_tasks,scheduler_tasks',
                         'HUEY_WORKER_CONFIG': str(self.ini),
                         'HUEY_TEST_CLOCK_FILE': clock.path})
        full_env.update({k: str(v) for k, v in env.items()})
        daemon = self.start_daemon(['scheduler'], full_env, name)
        daemon.clock = clock
        daemon.wait_for_output('scheduler ready')
        return daemon

    # -- what Redis says ---------------------------------------------------

    def leader_pid(self):
        token = self.redis.get(self.keys.scheduler_lease)
        return int(token.decode().split(':')[-2]) if token else None

    def wait_leader(self, daemon):
        wait_until(lambda: self.leader_pid() == daemon.pid, 20,
                   what='pid %d to lead' % daemon.pid)
        daemon.wait_for_output('became leader')

    def info(self):
        raw = self.redis.get(self.keys.scheduler_info)
        return json.loads(raw) if raw else {}

    def wait_evaluated(self, slot, daemon=None):
        def done():
            info = self.info()
            return info.get('last_evaluated') == slot and (
                daemon is None or info.get('pid') == daemon.pid)
        wait_until(done, 20, what='minute %s evaluated (info %r)'
                   % (slot, self.info()))

    def slots(self):
        """{(task, slot): dedupe record} for every slot enqueued."""
        out = {}
        for key in self.redis.scan_iter(self.keys.prefix + 'periodic:*'):
            record = json.loads(self.redis.get(key))
            out[(record['task'], record['slot'][11:])] = record
        return out

    def queue(self):
        raw = self.redis.lrange(self.app.storage.queue_key, 0, -1)
        return [self.app.serializer.deserialize(m) for m in raw]

    def schedule_delayed(self, when, n=1):
        """Put tasks in Huey's schedule as a worker does with a task it
        took before its eta (Huey.add_schedule)."""
        import sample_tasks
        ids = []
        for i in range(n):
            task = sample_tasks.add.s(i, 0)
            task.eta = datetime.datetime.fromtimestamp(
                when, UTC).replace(tzinfo=None)
            self.app.add_schedule(task)
            ids.append(task.id)
        return ids

    def queued_ids(self):
        return Counter(m.id for m in self.queue())

    def assert_exactly_once(self, expected_slots):
        """Each expected slot enqueued once, and nothing else."""
        slots = self.slots()
        assert sorted(slots) == sorted(expected_slots)
        queued = Counter((m.name, m.id) for m in self.queue()
                         if m.name in (EVERY_MINUTE, REPORT))
        assert all(n == 1 for n in queued.values()), queued
        assert sorted(queued) == sorted((task, record['id'])
                                        for (task, _), record in slots.items())


@pytest.fixture
def cluster(base_env, start_daemon, tmp_path, redis_url, producer):
    c = Cluster(base_env, start_daemon, tmp_path, redis_url, producer)
    yield c
    c.redis.close()


def minutes(task, *hhmm):
    return [(task, '%sZ' % m) for m in hhmm]


def test_three_schedulers_sigkill_and_sigstop_every_slot_once(cluster):
    a = cluster.start(at('12:00:10'), 'a')
    cluster.wait_leader(a)
    b = cluster.start(at('12:00:10'), 'b')
    c = cluster.start(at('12:00:10'), 'c')
    for standby in (b, c):
        standby.wait_for_output('standby: the leader is')
    cluster.wait_evaluated('2030-01-01T12:00Z', a)
    delayed = {t: cluster.schedule_delayed(at(t), 3) for t in (
        '12:00:30', '12:01:30', '12:02:30', '12:03:30', '12:04:30')}

    def set_all(now, *daemons):
        for d in daemons or (a, b, c):
            d.clock.set(now)

    def moved(when):
        ids = cluster.queued_ids()
        return all(ids[i] == 1 for i in delayed[when])

    set_all(at('12:01:05'))
    cluster.wait_evaluated('2030-01-01T12:01Z', a)
    wait_until(lambda: moved('12:00:30'), what='delayed tasks moved')

    # The leader dies mid-minute: a standby takes over within the lease.
    a.signal(signal.SIGKILL)
    set_all(at('12:01:40'), b, c)
    wait_until(lambda: cluster.leader_pid() in (b.pid, c.pid), 20,
               what='a standby to take over')
    second = b if cluster.leader_pid() == b.pid else c
    third = c if second is b else b
    second.wait_for_output('became leader')
    wait_until(lambda: cluster.info().get('pid') == second.pid)
    wait_until(lambda: moved('12:01:30'), what='delayed tasks moved')
    set_all(at('12:02:05'), second, third)
    cluster.wait_evaluated('2030-01-01T12:02Z', second)

    # The new leader is paused past its lease; the third takes over.
    second.signal(signal.SIGSTOP)
    cluster.wait_leader(third)
    third.clock.set(at('12:02:10'))
    # The paused one's clock says 12:03:10: were it to act on waking it
    # would enqueue slot 12:03 and move the tasks due at 12:02:30.
    second.clock.set(at('12:03:10'))
    second.signal(signal.SIGCONT)
    second.wait_for_output('lease not renewed before its local deadline')
    second.wait_for_output('standby: the leader is')
    time.sleep(1.0)  # give the resumed one ample passes to misbehave in
    assert ('scheduler_tasks.every_minute', '12:03Z') not in cluster.slots()
    assert not any(cluster.queued_ids()[i] for i in delayed['12:02:30'])
    assert cluster.leader_pid() == third.pid

    set_all(at('12:03:05'), second, third)
    cluster.wait_evaluated('2030-01-01T12:03Z', third)
    set_all(at('12:04:40'), second, third)
    cluster.wait_evaluated('2030-01-01T12:04Z', third)
    for when in delayed:
        wait_until(lambda: moved(when), what='tasks due %s moved' % when)

    cluster.assert_exactly_once(
        minutes(EVERY_MINUTE, '12:00', '12:01', '12:02', '12:03', '12:04')
        + minutes(REPORT, '12:00', '12:02', '12:04'))
    slots = cluster.slots()
    tokens = {d: '%d:' % d.pid for d in (a, second, third)}
    assert tokens[third] in slots[(EVERY_MINUTE, '12:03Z')]['leader']
    assert tokens[a] in slots[(EVERY_MINUTE, '12:01Z')]['leader']
    assert all(tokens[second] not in r['leader'] for (_, m), r in
               slots.items() if m >= '12:03Z')
    every_delayed = [i for ids in delayed.values() for i in ids]
    assert all(cluster.queued_ids()[i] == 1 for i in every_delayed)
    assert cluster.redis.zcard(cluster.app.storage.schedule_key) == 0
    from huey_worker import journal
    record = journal.read_task(cluster.app, cluster.app.storage,
                               delayed['12:03:30'][0])
    # (scheduled, not pending: the journal judges the eta by the real
    # clock, and the test clock runs in 2030)
    assert record['name'] == 'sample_tasks.add'
    report = [m for m in cluster.queue() if m.name == REPORT][0]
    assert report.args == ('even',) and report.kwargs == {'copies': 2}
    # The others saw the failovers happen.
    third.wait_for_output('standby: the leader is')
    assert 'Traceback' not in ''.join(d.output() for d in (a, b, c))


def test_a_standby_whose_clock_runs_30s_ahead(cluster):
    a = cluster.start(at('12:00:20'), 'a')
    cluster.wait_leader(a)
    b = cluster.start(at('12:00:50'), 'b-ahead')
    b.wait_for_output('standby: the leader is')
    cluster.wait_evaluated('2030-01-01T12:00Z', a)
    due_for_a = cluster.schedule_delayed(at('12:00:40'), 2)
    assert not any(cluster.queued_ids()[i] for i in due_for_a)

    a.signal(signal.SIGKILL)
    cluster.wait_leader(b)
    # b's minute 12:00 was done by a: nothing enqueued twice.  What is due
    # by b's clock moves (30 s early: the price of its skew), once.
    wait_until(lambda: all(cluster.queued_ids()[i] == 1 for i in due_for_a))
    cluster.assert_exactly_once(minutes(EVERY_MINUTE, '12:00')
                                + minutes(REPORT, '12:00'))
    b.clock.set(at('12:01:10'))            # real 12:00:40
    cluster.wait_evaluated('2030-01-01T12:01Z', b)

    # A scheduler with the right clock takes over from the one ahead: it
    # resumes after 12:01 and waits for its own clock to get there.
    a2 = cluster.start(at('12:00:45'), 'a2')
    a2.wait_for_output('standby: the leader is')
    b.signal(signal.SIGTERM)
    assert b.wait(20) == 0
    cluster.wait_leader(a2)
    a2.wait_for_output('periodic slots resume after 2030-01-01T12:01Z')
    a2.clock.set(at('12:01:10'))
    time.sleep(0.5)   # passes in which a2 must not enqueue 12:01 again
    a2.clock.set(at('12:02:05'))
    cluster.wait_evaluated('2030-01-01T12:02Z', a2)
    cluster.assert_exactly_once(
        minutes(EVERY_MINUTE, '12:00', '12:01', '12:02')
        + minutes(REPORT, '12:00', '12:02'))


def test_restart_within_the_minute_sd_notify_and_clean_release(
        cluster, tmp_path):
    notify = NotifySocket(tmp_path / 'notify.sock')
    try:
        first = cluster.start(at('12:00:10'), 'first',
                              NOTIFY_SOCKET=notify.path,
                              WATCHDOG_USEC=2000000)
        notify.wait_for('READY=1')
        notify.wait_for('WATCHDOG=1')
        notify.wait_for('STATUS=leader since')
        cluster.wait_evaluated('2030-01-01T12:00Z', first)
        notify.wait_for('last slot 2030-01-01T12:00Z')
        first.signal(signal.SIGTERM)
        assert first.wait(20) == 0
        notify.wait_for('STOPPING=1')
        # Released on a clean stop, not left to run out.
        assert cluster.redis.get(cluster.keys.scheduler_lease) is None
        assert cluster.info()['stopped_at']
        first.wait_for_output('lease released')

        again = cluster.start(at('12:00:40'), 'again',
                              NOTIFY_SOCKET=notify.path)
        cluster.wait_leader(again)
        other = cluster.start(at('12:00:40'), 'other',
                              NOTIFY_SOCKET=notify.path)
        notify.wait_for('STATUS=standby; leader is')
        cluster.wait_evaluated('2030-01-01T12:00Z', again)
        wait_until(lambda: 'stopped_at' not in cluster.info())
        cluster.assert_exactly_once(minutes(EVERY_MINUTE, '12:00')
                                    + minutes(REPORT, '12:00'))
        assert other.proc.poll() is None
    finally:
        notify.close()


def test_missed_slots_follow_the_catch_up_window(cluster):
    cluster.write_ini('catchup_window = 300')
    first = cluster.start(at('12:00:10'), 'first')
    cluster.wait_evaluated('2030-01-01T12:00Z', first)
    first.signal(signal.SIGTERM)
    assert first.wait(20) == 0
    # Ten minutes without a scheduler; the window reaches back to 12:05:30.
    later = cluster.start(at('12:10:30'), 'later')
    cluster.wait_evaluated('2030-01-01T12:10Z', later)
    later.wait_for_output('periodic slots from 2030-01-01T12:01Z to '
                          '2030-01-01T12:05Z were missed')
    cluster.assert_exactly_once(
        minutes(EVERY_MINUTE, '12:00', '12:06', '12:07', '12:08', '12:09',
                '12:10') + minutes(REPORT, '12:00', '12:06', '12:08',
                                   '12:10'))
    assert '(270s late: catch-up)' in later.output()
    # The journal hears of each enqueue as it would from Huey's scheduler.
    from huey_worker import journal
    record = cluster.slots()[(EVERY_MINUTE, '12:07Z')]
    task = journal.read_task(cluster.app, cluster.app.storage, record['id'])
    assert task['state'] == 'pending' and task['name'] == EVERY_MINUTE


def test_retrying_task_comes_back_through_the_schedule(
        producer, base_env, start_daemon, tmp_path):
    """Real time, a real consumer: a task with an eta that the worker took
    early, and a failed task whose retry Huey scheduled a second later,
    both reach the queue again through the scheduler and run once more."""
    import importlib
    import sample_tasks
    tasks = importlib.import_module('scheduler_tasks')
    try:
        env = dict(base_env, HUEY_MODULES='sample_tasks,scheduler_tasks')
        scheduler = start_daemon(['scheduler', '--set',
                                  'scheduler.interval=0.2'], env, 'sched')
        consumer = start_daemon(['consumer', '--workers', '2'], env,
                                'consumer')
        scheduler.wait_for_output('became leader')
        consumer.wait_for_output('consumer ready')
        retry_log = tmp_path / 'retry.log'
        touched = tmp_path / 'touched'
        retried = tasks.fail_then_retry_later(str(retry_log))
        later = sample_tasks.touch_after.schedule((0, str(touched)), delay=1)
        assert later.get(blocking=True, timeout=30) == str(touched)

        def retry_succeeded():
            retried.reset()   # the first run's error was stored meanwhile
            try:
                return retried.get() == 2
            except TaskException:
                return False
        wait_until(retry_succeeded, 30, what='the retry to succeed')
        assert retry_log.read_text() == 'run\nrun\n'
        assert len(touched.read_text().splitlines()) == 1
        scheduler.wait_for_output('due delayed/retrying task(s)')
        assert producer.storage.conn.zcard(producer.storage.schedule_key) == 0
    finally:
        for wrapper in (tasks.every_minute, tasks.report,
                        tasks.fail_then_retry_later):
            wrapper.unregister()
        sys.modules.pop('scheduler_tasks', None)


def test_redis_unreachable_at_start_then_back(base_env, start_daemon,
                                              tmp_path):
    port = free_port()
    env = dict(base_env, HUEY_REDIS_URL='redis://127.0.0.1:%d/0' % port)
    daemon = start_daemon(['scheduler', '--set', 'redis.retry_max_delay=0.5',
                           '--set', 'scheduler.lease_timeout=2'],
                          env, 'noredis')
    daemon.wait_for_output('Redis unreachable at redis://127.0.0.1:%d/0'
                           % port)
    server = EmbeddedRedis(str(tmp_path / 'late-redis'), port=port,
                           persist=False)
    os.makedirs(server.directory)
    try:
        server.start()
        daemon.wait_for_output('became leader')
        daemon.wait_for_output('Redis reachable again')
        assert daemon.output().count('Redis unreachable at') == 1
        server.stop()   # and gone again while leading
        daemon.wait_for_output('lease not renewed before its local deadline')
        server.start()
        wait_until(lambda: daemon.output().count('became leader') == 2)
        assert daemon.proc.poll() is None
        daemon.signal(signal.SIGTERM)
        assert daemon.wait(20) == 0
    finally:
        server.cleanup()


def test_sighup_keeps_a_bad_config_and_applies_a_good_one(cluster):
    daemon = cluster.start(at('12:00:10'), 'hup')
    cluster.wait_leader(daemon)
    good = cluster.ini.read_text()
    cluster.ini.write_text(good.replace('*/2 * * * *', '*/2 * * *'))
    daemon.signal(signal.SIGHUP)
    daemon.wait_for_output('configuration not reloaded, keeping the current '
                           'one')
    line = 1 + good.splitlines().index('schedule = */2 * * * *')
    assert 'scheduler.ini, line %d' % line in daemon.output()
    cluster.ini.write_text(good.replace('*/2 * * * *', '*/3 * * * *'))
    daemon.signal(signal.SIGHUP)
    daemon.wait_for_output('lease released for the reload')
    wait_until(lambda: daemon.output().count('scheduler ready') == 2)
    daemon.wait_for_output('(*/3 * * * *)')
    wait_until(lambda: daemon.output().count('became leader') == 2)
    assert daemon.proc.poll() is None


def _run_scheduler(env, timeout=60):
    return subprocess.run([sys.executable, '-m', 'huey_worker', 'scheduler'],
                          env=env, cwd=ROOT, capture_output=True, text=True,
                          timeout=timeout)


@pytest.mark.parametrize('section, needle', [
    ('[periodic:x]\ntask = sample_tasks.add\nschedule = 0 25 * * *\n',
     '[periodic:x] schedule'),
    ('[periodic:x]\nschedule = 0 2 * * *\ntask = myapp.nope\n',
     '[periodic:x] task'),
    ('[periodic:x]\nschedule = 0 2 * * *\ntask = sample_tasks.add\n'
     'args = [1]\n', '[periodic:x] args'),
])
def test_bad_periodic_entries_exit_78_naming_the_line(
        base_env, tmp_path, section, needle):
    ini = tmp_path / 'bad.ini'
    ini.write_text('[scheduler]\nlease_timeout = 5\n\n' + section)
    lines = ini.read_text().splitlines()
    line = 1 + next(i for i, text in enumerate(lines)
                    if text.startswith(needle.split('] ')[1]))
    result = _run_scheduler(dict(base_env, HUEY_WORKER_CONFIG=str(ini)))
    assert result.returncode == 78, result.stderr
    assert needle in result.stderr
    assert '%s, line %d' % (ini, line) in result.stderr
    assert 'Traceback' not in result.stderr


def test_status_endpoint_shows_the_leader_and_the_last_slot(cluster,
                                                            start_daemon):
    from ops_helpers import Client, start_status_server
    from prometheus_client.parser import text_string_to_metric_families
    leader = cluster.start(at('12:00:10'), 'leader')
    cluster.wait_leader(leader)
    cluster.wait_evaluated('2030-01-01T12:00Z', leader)
    env = dict(cluster.base_env, HUEY_WORKER_CONFIG=str(cluster.ini),
               HUEY_MODULES='sample_tasks,scheduler_tasks')
    server, port = start_status_server(start_daemon, env)
    client = Client(port)
    status, body = client.get('/health')
    scheduler = body['checks']['queues']['huey']['scheduler']
    assert scheduler['leader_present'] and scheduler['pid'] == leader.pid
    assert scheduler['last_slot'] == '2030-01-01T12:00Z'
    _, _, text = client.request('GET', '/metrics')
    samples = {(s.name, tuple(sorted(s.labels.items()))): s.value
               for family in text_string_to_metric_families(text.decode())
               for s in family.samples}
    assert samples[('huey_worker_scheduler_last_slot_timestamp_seconds',
                    (('queue', 'huey'),))] == at('12:00:00')
    info = [labels for (name, labels), value in samples.items()
            if name == 'huey_worker_scheduler_leader_info' and value == 1]
    assert len(info) == 1 and ('pid', str(leader.pid)) in info[0]
