"""GET /metrics: Prometheus text format through prometheus-client, from a
collector that reads Redis at scrape time.  Counters and the duration
histogram live in Redis (written by the journal with each outcome), so
they are right whatever the worker type and however many consumers run;
gauges come from Huey's keys and the consumers' heartbeats."""
import logging
import struct
import threading
import time

import redis
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from prometheus_client.core import (CollectorRegistry, CounterMetricFamily,
                                    GaugeMetricFamily, HistogramMetricFamily)

from .. import journal, overview, preflight
from ..journal import reads
from ..journal.layout import DUE_FIELDS, field_pairs, text, ttl_of
from ..journal.scripts import GUARDED_SEEN, script_for
from ..journal.seen import HEAD_BYTES, message_claims
from ..scheduler.periodic import parse_slot_name
from ..storage import message_data

log = logging.getLogger('huey_worker.status')


class SuiteCollector:
    def __init__(self, app):
        self.app = app

    def collect(self):
        up = GaugeMetricFamily('huey_worker_redis_up',
                               'Whether Redis answered this scrape.')
        try:
            families = list(self._families())
        except overview.REDIS_ERRORS as exc:
            log.warning('metrics: Redis unavailable: %s', exc)
            up.add_metric([], 0)
            yield up
            return
        up.add_metric([], 1)
        yield up
        yield from families

    def _families(self):
        tasks = CounterMetricFamily(
            'huey_worker_tasks', 'Task outcomes by task name and state.',
            labels=['queue', 'task', 'state'])
        durations = HistogramMetricFamily(
            'huey_worker_task_duration_seconds',
            'Run time of task bodies (complete, failed and retrying runs).',
            labels=['queue', 'task'])
        gauges = {name: GaugeMetricFamily('huey_worker_%s' % name, text,
                                          labels=['queue'])
                  for name, text in (
                      ('queue_pending', 'Messages waiting in the queue.'),
                      ('queue_scheduled', 'Tasks waiting for their eta '
                                          '(delayed and retry-delayed).'),
                      ('tasks_running', 'Tasks being run by live workers.'),
                      ('results_held', 'Task results held (journal index).'),
                      ('dead_letters', 'Messages in the dead-letter list.'),
                      ('consumers_live', 'Consumers with a fresh heartbeat.'),
                      ('scheduler_leader', '1 when a scheduler holds the '
                                           'leader lease.'))}
        leader_info = GaugeMetricFamily(
            'huey_worker_scheduler_leader_info',
            'The scheduler leader now (value 1; which one in the labels).',
            labels=['queue', 'leader', 'host', 'pid'])
        last_slot = GaugeMetricFamily(
            'huey_worker_scheduler_last_slot_timestamp_seconds',
            'Start of the last periodic minute the scheduler leader '
            'enqueued (Unix time).', labels=['queue'])
        workers = GaugeMetricFamily(
            'huey_worker_workers', 'Workers of live consumers by state.',
            labels=['queue', 'consumer', 'state'])
        restarts = CounterMetricFamily(
            'huey_worker_worker_restarts',
            'Workers restarted after dying, per live consumer (since the '
            'consumer started).', labels=['queue', 'consumer'])
        consumer_started = GaugeMetricFamily(
            'huey_worker_consumer_started_timestamp_seconds',
            'When each live consumer process started (Unix time): a change '
            'is a restart of the daemon.', labels=['queue', 'consumer'])
        slot_age = GaugeMetricFamily(
            'huey_worker_scheduler_last_slot_age_seconds',
            'Seconds since the start of the last periodic minute the '
            'scheduler leader enqueued (by this endpoint\'s clock).',
            labels=['queue'])
        for name, storage in overview.queue_storages(self.app):
            snap = overview.snapshot(self.app, storage, counts=True,
                                     scheduler=True, metrics=True)
            for (task, state), count in sorted(snap['outcomes'].items()):
                tasks.add_metric([name, task, state], count)
            for task, stats in sorted(snap['durations'].items()):
                cumulative, running = [], 0
                for bound in journal.DURATION_BUCKETS:
                    running += stats['buckets'].get(bound, 0)
                    cumulative.append(('+Inf' if bound == float('inf')
                                       else repr(bound), running))
                durations.add_metric([name, task], cumulative,
                                     stats['sum'])
            q = overview.queue_entry(snap)
            gauges['queue_pending'].add_metric([name], q['pending'])
            gauges['queue_scheduled'].add_metric([name], q['scheduled'])
            gauges['tasks_running'].add_metric([name], q['running'])
            gauges['results_held'].add_metric([name], q['results_held'])
            gauges['dead_letters'].add_metric([name], q['dead_letters'])
            gauges['consumers_live'].add_metric([name], q['consumers'])
            scheduler = snap['scheduler']
            gauges['scheduler_leader'].add_metric(
                [name], 1 if scheduler['leader_present'] else 0)
            if scheduler['leader_present']:
                leader_info.add_metric([name, str(scheduler['leader']),
                                        str(scheduler['host'] or ''),
                                        str(scheduler['pid'] or '')], 1)
            slot = parse_slot_name(scheduler['last_slot'])
            if slot is not None:
                last_slot.add_metric([name], slot)
                slot_age.add_metric([name], max(0.0, time.time() - slot))
            for consumer in snap['consumers']:
                if not consumer['alive']:
                    continue
                ident = consumer['identity']
                workers.add_metric([name, ident, 'busy'], consumer['busy'])
                workers.add_metric([name, ident, 'idle'], consumer['idle'])
                restarts.add_metric([name, ident], consumer['restarts'])
                if isinstance(consumer['started'], (int, float)):
                    consumer_started.add_metric([name, ident],
                                                consumer['started'])
        yield tasks
        yield durations
        yield from gauges.values()
        yield leader_info
        yield last_slot
        yield slot_age
        yield workers
        yield restarts
        yield consumer_started
        yield from queue_signals(self.app)
        yield from redis_policy(self.app)


# --- queue latency, wait times, pause, Redis memory --------------------------

# KEYS: Huey's list, the suite's priority set, and an adopted
# PriorityRedisHuey's own set when there is one.  ARGV: how many bytes of
# each member to return.  Returns kind/member pairs ('l' list, 'p' the
# suite's set, 'n' Huey's own set): the oldest plain message (the list's
# right end, where workers take, past the priority marker), and of each
# set its next message and the first of its lowest priority (FIFO within
# a priority, so the longest waiting of that priority).  Read only, and
# O(log n) however long the queue.
OLDEST_PENDING = r"""
local keep = tonumber(ARGV[1])
local out = {}
local tail = redis.call('LRANGE', KEYS[1], -2, -1)
for i = #tail, 1, -1 do
  if tail[i] ~= '\0priority' then
    out[#out + 1] = 'l'
    out[#out + 1] = string.sub(tail[i], 1, keep)
    break
  end
end
for k = 2, #KEYS do
  local kind = 'p'
  if k == 3 then kind = 'n' end
  local first = redis.call('ZRANGE', KEYS[k], 0, 0)
  if first[1] then
    out[#out + 1] = kind
    out[#out + 1] = string.sub(first[1], 1, keep)
    local last = redis.call('ZRANGE', KEYS[k], -1, -1, 'WITHSCORES')
    local lowest = redis.call('ZRANGEBYSCORE', KEYS[k], last[2], last[2],
                              'LIMIT', 0, 1)
    if lowest[1] and lowest[1] ~= first[1] then
      out[#out + 1] = kind
      out[#out + 1] = string.sub(lowest[1], 1, keep)
    end
  end
end
return out
"""
PAUSED_KEY = 'paused'          # hw:<queue>:paused, set by a pause command
# Ids first seen at the head of a queue by this process, when the journal
# is off and nothing else tells their age: {(queue, id): time}.
_first_seen_here = {}
_first_seen_lock = threading.Lock()


def queue_signals(app, now=None):
    """The families that need reads beyond overview.snapshot(): queue
    latency, paused state and wait-time histograms per queue.
    A fixed number of round trips whatever the queues hold: the queue
    heads (one script call per queue, one write), the records of those
    heads (at most three per queue, one write), the paused keys and wait
    histograms (one), and a write only when a head has no record yet.
    Raises REDIS_ERRORS."""
    now = time.time() if now is None else now
    storages = overview.queue_storages(app)
    pool = storages[0][1].pool
    latency = GaugeMetricFamily(
        'huey_worker_queue_latency_seconds',
        'Age of the oldest pending task: seconds since it became due '
        '(0 when the queue is empty).', labels=['queue'])
    paused = GaugeMetricFamily(
        'huey_worker_queue_paused',
        '1 while the key hw:<queue>:paused exists (the queue is paused).',
        labels=['queue'])
    waits = HistogramMetricFamily(
        'huey_worker_task_wait_seconds',
        'Time tasks waited in the queue, from due (enqueued, eta or retry '
        'time) to started.', labels=['queue', 'task'])
    commands = []
    for _, storage in storages:
        prefix = storage.keys.prefix
        commands += [('EXISTS', prefix + PAUSED_KEY),
                     ('HGETALL', storage.keys.metrics_waits)]
    replies = reads.replies(pool, commands)
    for i, (name, storage) in enumerate(storages):
        paused.add_metric([name], 1 if replies[2 * i] else 0)
        for task, stats in sorted(reads.parse_duration_stats(
                replies[2 * i + 1]).items()):
            waits.add_metric([name, task], _cumulative(stats['buckets']),
                             stats['sum'])
    try:
        ages = oldest_pending_ages(app, storages, now)
    except redis.exceptions.ResponseError as exc:
        # Scripts refused (an ACL, a managed Redis without Lua): no
        # latency, rather than a scrape that says Redis is down.
        log.warning('metrics: queue latency not read: %s', exc)
        ages = None
    for name, _ in storages:
        if ages is not None:
            latency.add_metric([name], ages.get(name, 0.0))
    yield latency
    yield paused
    yield waits


def _cumulative(buckets):
    out, running = [], 0
    for bound in journal.DURATION_BUCKETS:
        running += buckets.get(bound, 0)
        out.append(('+Inf' if bound == float('inf') else repr(bound),
                    running))
    return out


def oldest_pending_ages(app, storages, now):
    """{queue name: seconds its oldest pending task has been due}, for the
    queues with a pending task whose id can be read (a message that
    cannot be read counts as 0 s old: it is set aside when taken)."""
    heads = reads.replies(storages[0][1].pool, [
        _heads_command(storage) for _, storage in storages])
    candidates = []   # (queue, storage, task id, time known from the message)
    for (name, storage), reply in zip(storages, heads):
        pairs = list(reply or ())
        for kind, member in zip(pairs[::2], pairs[1::2]):
            claim = _claim(kind, member)
            if claim is not None:
                candidates.append((name, storage) + claim)
    if not candidates:
        return {}
    records = reads.replies(storages[0][1].pool, [
        ('HMGET', storage.keys.task(task_id)) + DUE_FIELDS
        for _, storage, task_id, _ in candidates])
    ages, unseen = {}, []
    for (name, storage, task_id, stamped), fields in zip(candidates,
                                                           records):
        known = [float(v) for v in fields if v is not None]
        due = max(known) if known else stamped
        if due is None:
            due = _first_seen(app, storage, task_id, now, unseen)
        ages[name] = max(ages.get(name, 0.0), max(0.0, now - due))
    if unseen:
        _record_unseen(unseen)
    return ages


def _heads_command(storage):
    keys = [storage.queue_key, storage.priority_key]
    native = getattr(storage, 'native_key', None)
    if native is not None:
        keys.append(native)
    # A priority member carries its sequence and priority before Huey's
    # message: a few dozen bytes more than the claims read.
    return ('EVAL', OLDEST_PENDING, len(keys), *keys, HEAD_BYTES + 64)


def _claim(kind, member):
    """(task id, enqueue time the message itself carries or None), or None
    when the id cannot be read."""
    kind = kind.decode() if isinstance(kind, bytes) else kind
    stamped = None
    if kind == 'n' and len(member) > 8:
        # Huey's own priority set prefixes each message with its enqueue
        # time in microseconds (RedisPriorityQueue.enqueue).
        stamped = struct.unpack('>Q', member[:8])[0] / 1e6
        member = member[8:]
    elif kind == 'p':
        member = message_data(member)
    claim = message_claims(member)
    return None if claim is None else (claim[0], stamped)


def _first_seen(app, storage, task_id, now, unseen):
    """The due time of a pending task with no record (a plain Huey
    producer's): with the journal on, recorded now as first seen in the
    queue (as a reader looking for it would), so every endpoint and every
    later scrape read the same time; with it off, when this process first
    saw it."""
    cfg = app.config
    if cfg is not None and cfg.journal.enabled:
        unseen.append((storage, task_id, now))
        return now
    key = (storage.name, task_id)
    with _first_seen_lock:
        if len(_first_seen_here) > 10000:
            _first_seen_here.clear()
        return _first_seen_here.setdefault(key, now)


def _record_unseen(unseen):
    """Record each (storage, task id, time) pending, first seen in the
    queue (the script leaves a record written meanwhile alone)."""
    for storage, task_id, now in unseen:
        keys = storage.keys
        fields = {'id': task_id, 'queue': storage.name, 'state': 'pending',
                  'first_seen': now, 'first_seen_in': 'queue'}
        event = '{"state": "pending", "at": %s, "seen_in": "queue"}' % (
            text(now))
        script_for(storage, GUARDED_SEEN)(
            keys=[keys.task(task_id), keys.task_log(task_id),
                  keys.journal_recent],
            args=[text(now), ttl_of(storage), task_id, event] +
            field_pairs(fields))


def redis_memory(state):
    """Redis's used_memory and maxmemory (0: no limit) from
    preflight.redis_state's INFO memory (read once per scrape)."""
    for metric, field, help_text in (
            ('huey_worker_redis_memory_used_bytes', 'used_memory',
             'Memory Redis uses (INFO used_memory).'),
            ('huey_worker_redis_memory_max_bytes', 'maxmemory',
             'Redis maxmemory; 0 when no limit is set.')):
        if isinstance(state.get(field), int):
            family = GaugeMetricFamily(metric, help_text)
            family.add_metric([], state[field])
            yield family


def redis_policy(app):
    """Redis's maxmemory-policy and persistence (huey_worker.preflight):
    what decides whether a full Redis deletes queued tasks, and whether a
    restart loses them.  Nothing when INFO is refused (an ACL); the rdb
    series is absent when CONFIG is refused and no snapshot was made."""
    state = preflight.redis_state(app.storage.pool)
    if state is None:
        return
    yield from redis_memory(state)
    if state['policy']:
        policy = GaugeMetricFamily(
            'huey_worker_redis_maxmemory_policy_info',
            'Redis maxmemory-policy (value 1; which one in the label).',
            labels=['policy'])
        policy.add_metric([state['policy']], 1)
        yield policy
        evicts = GaugeMetricFamily(
            'huey_worker_redis_evicting_policy',
            '1 when the maxmemory-policy is not noeviction: a full Redis '
            'deletes keys (queued tasks with allkeys-*).')
        evicts.add_metric([], 0 if state['policy'] == preflight.NOEVICTION
                          else 1)
        yield evicts
    persistence = GaugeMetricFamily(
        'huey_worker_redis_persistence',
        '1 when Redis persists to disk that way (aof: appendonly; rdb: save '
        'rules).', labels=['kind'])
    persistence.add_metric(['aof'], 1 if state['aof'] else 0)
    if state['rdb'] is not None:
        persistence.add_metric(['rdb'], 1 if state['rdb'] else 0)
    yield persistence


_registries = {}


def render_metrics(app):
    """(body bytes, content type)."""
    registry = _registries.get(id(app))
    if registry is None:
        registry = CollectorRegistry(auto_describe=False)
        registry.register(SuiteCollector(app))
        _registries[id(app)] = registry
    return generate_latest(registry), CONTENT_TYPE_LATEST
