"""What the status endpoint and the operator CLI report about the system as
a whole: queue depths, consumers and their workers, health.  Read from
Redis only (heartbeat records, Huey's keys, the journal's indexes), so it
is right whatever the worker type and wherever the consumers run.

Every read is bounded: LLEN/ZCARD/ZCOUNT, and at most MAX_CONSUMERS
heartbeat records per queue.
"""
import json
import re
import time

import redis

from . import journal, preflight, redisconn
from .journal import reads
from .scheduler.periodic import naive_utc
from .storage import SuiteStorage

MAX_CONSUMERS = 1000
REDIS_ERRORS = (redis.exceptions.RedisError, OSError)

_extra_storages = {}
_listed = {}


def queue_storages(app):
    """[(queue name, storage)]: [huey] queue first, then [status] queues,
    all on the app's connection pool."""
    cfg = app.config
    main = app.storage
    # Asked for on every request of the status endpoint: worked out again
    # only when the configuration (SIGHUP) or the storage changes.
    listed = _listed.get(id(app))
    if listed is not None and listed[0] is cfg and listed[1] is main:
        return listed[2]
    out = [(main.name, main)]
    for name in getattr(cfg.status, 'queues', ()) or ():
        key = (id(main.pool), name)
        storage = _extra_storages.get(key)
        if storage is None:
            storage = _extra_storages[key] = SuiteStorage(
                name, expire_time=cfg.huey.result_timeout,
                connection_pool=main.pool)
        if storage.name not in [n for n, _ in out]:
            out.append((storage.name, storage))
    out = tuple(out)
    _listed[id(app)] = (cfg, main, out)
    return out


def storage_for(app, queue=None):
    for name, storage in queue_storages(app):
        if queue is None or name == queue:
            return storage
    return None


def find_task(app, task_id):
    """(storage, shaped record) of the first queue that knows `task_id`:
    its journal record, else (a plain Huey producer's task, not yet taken
    by a worker) its message waiting in the queue, which is then recorded
    pending (journal.seen_queued; bounded, see daemon/journal/seen.py)."""
    storages = queue_storages(app)
    for _, storage in storages:
        record = journal.read_task(app, storage, task_id)
        if record is not None:
            return storage, record
    for _, storage in storages:
        record = journal.seen_queued(app, storage, task_id)
        if record is not None:
            return storage, record
    return None, None


# --- one queue, in two round trips --------------------------------------------

def snapshot(app, storage, counts=False, scheduler=False, metrics=False):
    """What the reports need of one queue: its consumers, and on request
    its counts, its scheduler, its outcome and duration counters.  All in
    one round trip, plus one for the consumers' records (their names come
    with the first): every report here used to take four to nine, each a
    redis-py command with its own Python cost."""
    keys = storage.keys
    commands = [('ZREVRANGE', keys.consumers, 0, MAX_CONSUMERS - 1,
                  'WITHSCORES')]
    if counts or scheduler:
        commands.append(('GET', keys.paused))   # actions/pause.py
    if counts:
        # The list and the priority set (less the marker that points at
        # it), and an adopted PriorityRedisHuey's own set:
        # storage.queue_size_commands.
        sizing = storage.queue_size_commands()
        commands += sizing
        commands += [('ZCARD', storage.schedule_key),
                     ('LLEN', keys.dead),
                     reads.results_held_command(storage)]
    if scheduler:
        # Delayed and retrying tasks due for longer than OVERDUE_GRACE: only
        # a scheduler moves them into the queue.  Due by Redis's clock, as
        # the scheduler judges it, not by this host's; the scores' zone
        # offset (none for the suite's storage) is this host's to tell.
        now = time.time()
        offset = storage.convert_ts(naive_utc(now)) - now
        commands += [('GET', keys.scheduler_lease),
                     ('PTTL', keys.scheduler_lease),
                     ('GET', keys.scheduler_info),
                     ('EVAL', COUNT_OVERDUE, 1, storage.schedule_key,
                      OVERDUE_GRACE, repr(offset))]
    if metrics:
        commands += [('HGETALL', keys.metrics_outcomes),
                     ('HGETALL', keys.metrics_durations)]
    answers = iter(reads.replies(storage.pool, commands))
    out = {'beats': _scored(next(answers))}
    if counts or scheduler:
        out['pause'] = _pause(next(answers))
    if counts:
        out['pending'] = storage.queue_size_of(
            [next(answers) for _ in sizing])
        out['scheduled'], out['dead'], out['results_held'] = (
            int(next(answers)) for _ in range(3))
    if scheduler:
        out['scheduler'] = _scheduler(next(answers), next(answers),
                                      next(answers))
        out['scheduler']['overdue'] = int(next(answers))
    if metrics:
        out['outcomes'] = reads.parse_outcome_counts(next(answers))
        out['durations'] = reads.parse_duration_stats(next(answers))
    out['consumers'] = _consumers(storage, out.pop('beats'))
    return out


def _pause(raw):
    """The pause in force (daemon/actions/pause.py) from its key's value:
    {at, via, by, from, reason?}, or None."""
    if raw is None:
        return None
    try:
        info = json.loads(raw)
    except ValueError:
        return {}
    return info if isinstance(info, dict) else {}


def _scored(raw):
    """ZRANGE ... WITHSCORES as [(member, score)], from RESP2 (flat) or
    RESP3 (pairs)."""
    if raw and isinstance(raw[0], (list, tuple)):
        return [(member, float(score)) for member, score in raw]
    return [(raw[i], float(raw[i + 1])) for i in range(0, len(raw), 2)]


# --- consumers -----------------------------------------------------------------

def consumers(app, storage):
    """The consumers that heartbeat on `storage`'s queue, newest beat first,
    each marked alive or not."""
    return snapshot(app, storage)['consumers']


def _consumers(storage, beats):
    if not beats:
        return []
    keys = storage.keys
    identities = [i.decode() if isinstance(i, bytes) else i for i, _ in beats]
    records = reads.replies(storage.pool, [
        ('MGET',) + tuple(keys.consumer(i) for i in identities)])[0]
    out = []
    for identity, (_, score), raw in zip(identities, beats, records):
        info = {}
        if raw is not None:
            try:
                info = json.loads(raw)
            except ValueError:
                info = {}
        # The record expires recovery_timeout after the last beat: its
        # presence is the liveness test, free of clock skew between hosts.
        alive = bool(info)
        workers = []
        for w in info.get('worker_list', ()):
            current = None
            if w.get('busy') and w.get('task_id'):
                current = {'id': w['task_id'], 'name': w.get('task_name'),
                           'started': w.get('task_started')}
            workers.append({
                'worker': w.get('worker'), 'pid': w.get('pid'),
                'alive': bool(w.get('alive', True)) and alive,
                'busy': bool(w.get('busy')) and alive,
                'current_task': current, 'last_tick': w.get('last_tick'),
                'done': w.get('done', 0), 'failed': w.get('failed', 0)})
        out.append({
            'identity': identity, 'queue': info.get('queue', storage.name),
            'host': info.get('host'), 'pid': info.get('pid'),
            'worker_type': info.get('worker_type'),
            'version': info.get('version'), 'started': info.get('started'),
            'last_heartbeat': score, 'alive': alive,
            'workers': workers,
            'busy': sum(1 for w in workers if w['busy']),
            'idle': sum(1 for w in workers if w['alive'] and not w['busy']),
            'done': info.get('done', 0), 'failed': info.get('failed', 0),
            'restarts': info.get('restarts', 0),
            'recycled': info.get('recycled', 0)})
    return out


def workers_report(app):
    """GET /workers and `huey-worker workers`."""
    listed = []
    for _, storage in queue_storages(app):
        listed.extend(consumers(app, storage))
    live = [c for c in listed if c['alive']]
    return {'consumers': listed,
            'totals': {'consumers': len(live),
                       'workers': sum(len(c['workers']) for c in live),
                       'busy': sum(c['busy'] for c in live),
                       'idle': sum(c['idle'] for c in live),
                       'restarts': sum(c['restarts'] for c in live)}}


# --- queues --------------------------------------------------------------------

def queue_entry(snap):
    """One queue of queue_report() from its snapshot(counts=True)."""
    live = [c for c in snap['consumers'] if c['alive']]
    return {
        'pending': snap['pending'], 'scheduled': snap['scheduled'],
        'running': sum(c['busy'] for c in live),
        'results_held': snap['results_held'],
        'dead_letters': snap['dead'],
        'consumers': len(live),
        'workers': sum(len(c['workers']) for c in live),
        'idle_workers': sum(c['idle'] for c in live),
        'paused': snap['pause'] is not None, 'pause': snap['pause']}


def queue_report(app):
    """GET /queue and `huey-worker status`: per queue, what waits, runs,
    is held and was set aside."""
    return {'queues': {
        name: queue_entry(snapshot(app, storage, counts=True))
        for name, storage in queue_storages(app)}}


# --- scheduler -----------------------------------------------------------------

def scheduler_state(storage):
    """The scheduler as its leader last described it.  deployed is False
    when neither the lease nor the info key exists: no scheduler has run
    on this queue (or its info was deleted), which is not a fault."""
    keys = storage.keys
    return _scheduler(*reads.replies(storage.pool, (
        ('GET', keys.scheduler_lease), ('PTTL', keys.scheduler_lease),
        ('GET', keys.scheduler_info))))


def _scheduler(lease, lease_ms, raw_info):
    info = {}
    if raw_info is not None:
        try:
            info = json.loads(raw_info)
        except ValueError:
            info = {'unreadable': True}
    deployed = lease is not None or raw_info is not None
    return {
        'deployed': deployed,
        'leader_present': lease is not None,
        'leader': info.get('leader') or (lease.decode('utf-8', 'replace')
                                         if isinstance(lease, bytes)
                                         else lease),
        'host': info.get('host'), 'pid': info.get('pid'),
        'since': info.get('since'), 'last_slot': info.get('last_slot'),
        'lease_remaining': lease_ms / 1000.0 if lease_ms and lease_ms > 0
        else None}


# --- health --------------------------------------------------------------------

# Seconds a delayed or retrying task may be past due before a queue without
# a scheduler is unhealthy: a leader moves due tasks every [scheduler]
# interval (1 s), so a few seconds late is a scheduler missing, not slow.
OVERDUE_GRACE = 10
# KEYS: the schedule.  ARGV: grace (s), the scores' offset from unix
# seconds (s).  Counts the tasks due more than `grace` ago by Redis's
# clock (TIME); reads only.
COUNT_OVERDUE = """
local t = redis.call('TIME')
local due = tonumber(t[1]) + tonumber(t[2]) / 1e6 - tonumber(ARGV[1])
  + tonumber(ARGV[2])
return redis.call('ZCOUNT', KEYS[1], '-inf', string.format('%.6f', due))
"""


_GOOD_REPLICAS = re.compile(r'^min_slaves_good_slaves:(\d+)', re.M)


def write_refusal(storage):
    """Why Redis, though it answers reads, refuses every write (str), or
    None: it is a replica (as the old master is after a failover, until
    the daemons' connections follow Sentinel to the new one), or a master
    that min-replicas-to-write stops (no replica in sync).  None too when
    ROLE is not allowed (an ACL): nothing known then."""
    try:
        role, replication = reads.replies(
            storage.pool, [('ROLE',), ('INFO', 'replication')])
    except redis.exceptions.ResponseError:
        return None
    kind = role[0].decode('utf-8', 'replace') if isinstance(
        role[0], bytes) else str(role[0])
    if kind == 'master':
        # Shown only under min-replicas-to-write: with no replica good
        # enough, every write is refused (NOREPLICAS), as on an old
        # primary left without its replica after a failover.
        good = _GOOD_REPLICAS.search(replication.decode('utf-8', 'replace')
                                     if isinstance(replication, bytes)
                                     else str(replication))
        if good and int(good.group(1)) == 0:
            return ('NOREPLICAS: Redis is a master without a replica in '
                    'sync (min-replicas-to-write is set); every write is '
                    'refused')
        return None
    if kind == 'slave' and len(role) >= 4:
        master = '%s:%s' % tuple(
            x.decode('utf-8', 'replace') if isinstance(x, bytes) else x
            for x in role[1:3])
        link = role[3].decode('utf-8', 'replace') if isinstance(
            role[3], bytes) else role[3]
        return ('READONLY: Redis is a read-only replica of %s (replication '
                'link: %s); every write is refused' % (master, link))
    return 'Redis is a %s, not a master: writes are refused' % kind


def health_report(app):
    """(healthy, body).  Ready when Redis answers and takes writes (no
    replica), each reported queue has a live consumer, and, where a
    scheduler was ever deployed, it has a leader."""
    reasons = []
    checks = {'redis': {'ok': True}}
    queues = {}
    pauses = []
    for name, storage in queue_storages(app):
        try:
            snap = snapshot(app, storage, scheduler=True)
            # One Redis for every queue: asked once.
            refusal = None if queues else write_refusal(storage)
            if not queues:   # its maxmemory-policy, persistence, memory
                memory = preflight.health_check(
                    app.config, storage.pool, redisconn.describe(app.config))
        except REDIS_ERRORS as exc:
            if queues:
                raise   # Redis answered for the first queue
            checks['redis'] = {'ok': False,
                               'error': redisconn.error_text(exc)}
            reasons.append('Redis %s: %s' % (redisconn.outage_word(exc),
                                             redisconn.error_text(exc)))
            return False, {'status': 'unhealthy', 'live': True,
                           'ready': False, 'checks': checks,
                           'reasons': reasons}
        if refusal is not None:
            checks['redis'] = {'ok': False, 'error': refusal}
            reasons.append('Redis unavailable: %s' % refusal)
            return False, {'status': 'unhealthy', 'live': True,
                           'ready': False, 'checks': checks,
                           'reasons': reasons}
        live = [c for c in snap['consumers'] if c['alive']]
        scheduler = snap['scheduler']
        leaderless = not scheduler['leader_present']
        entry = {'consumers': {'ok': bool(live), 'live': len(live)},
                 # Paused by an operator: reported, not a failure.
                 'paused': snap['pause'] is not None,
                 'scheduler': {'ok': not leaderless or (
                     not scheduler['deployed'] and not scheduler['overdue']),
                               **scheduler}}
        if not live:
            reasons.append('queue %s: no live consumer (none heartbeat '
                           'within %gs)' % (
                               name, app.config.delivery.recovery_timeout))
        if not entry['scheduler']['ok'] and scheduler['deployed']:
            reasons.append('queue %s: the scheduler has no leader (last '
                           'leader %s)' % (name, scheduler['leader'] or '?'))
        elif not entry['scheduler']['ok']:
            # Never deployed (huey_consumer ran its own scheduler): delayed
            # and retrying tasks wait for ever without one.
            reasons.append('queue %s: %d delayed or retrying task(s) due for '
                           'over %ds and no scheduler runs (start huey-worker '
                           'scheduler)' % (name, scheduler['overdue'],
                                           OVERDUE_GRACE))
        queues[name] = entry
        if snap['pause'] is not None:
            pauses.append((name, snap['pause']))
    checks['queues'] = queues
    paused = ['queue %s is paused (since %s, by %s from %s%s): its workers '
              'take no new task until it is resumed' % (
                  name, time.strftime('%Y-%m-%d %H:%M:%S', time.localtime(
                      info.get('at', 0))), info.get('by', '?'),
                  info.get('from', '?'), ': %s' % info['reason']
                  if info.get('reason') else '')
              for name, info in pauses]
    if queues:
        checks['redis'].update(memory[0])
        reasons += memory[1]
    healthy = not reasons
    # Degraded: ready, but Redis is near its maxmemory (writes refused when
    # full); warnings say so, and what else needs a look (persistence off).
    return healthy, {'status': 'unhealthy' if not healthy else 'degraded'
                     if queues and memory[3] else 'ok',
                     'live': True, 'ready': healthy, 'checks': checks,
                     'reasons': reasons,
                     'warnings': (memory[2] if queues else []) + paused}
