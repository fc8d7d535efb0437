"""What the suite needs of the Redis it queues in, checked at the start of
every daemon and again while they run, and reported by GET /health and
GET /metrics:

* maxmemory-policy noeviction.  Any other policy lets a full Redis delete
  keys to make room: queued tasks (allkeys-*), or the keys with a time to
  live (volatile-*): consumer heartbeats (a live consumer then looks dead
  and its tasks run twice), the scheduler's lease (two leaders), results
  and the journal.  Refused at start (exit 78) unless [redis]
  allow_eviction; while running, /health says not ready.
* persistence (AOF or RDB snapshots): without it a restart of Redis loses
  every queued task.  A warning.
* used memory under [redis] memory_warning_ratio of maxmemory: a full
  noeviction Redis refuses writes (OOM), new tasks included.  /health says
  degraded above it.

Read from INFO memory and INFO persistence, which every Redis from 5.0 has
and managed services (which often disable or rename CONFIG) allow; CONFIG
GET save only to learn whether RDB snapshots are configured, and where it
is refused that stays unknown (no warning)."""
import logging
import threading
import time

import redis

from . import logs, redisconn
from .config import ConfigError
from .journal import reads

log = logging.getLogger('huey_worker.redis')

NOEVICTION = 'noeviction'
# Seconds between the daemons' checks while they run (one INFO each).
RECHECK_INTERVAL = 30.0


# --- reading Redis -----------------------------------------------------------

def parse_info(raw):
    """INFO's reply (bytes or text as Redis sends it, or the dict redis-py
    makes of it) as {field: text}."""
    if isinstance(raw, dict):
        return {str(k): str(v) for k, v in raw.items()}
    if isinstance(raw, bytes):
        raw = raw.decode('utf-8', 'replace')
    out = {}
    for line in str(raw).splitlines():
        if not line or line.startswith('#'):
            continue
        name, sep, value = line.partition(':')
        if sep:
            out[name.strip()] = value.strip()
    return out


def _number(info, name, default=0):
    try:
        return int(float(info.get(name, default)))
    except ValueError:
        return default


def _refused(exc):
    """A reply refusing the command (an ACL's NOPERM, a CONFIG renamed or
    disabled), as opposed to Redis being unavailable."""
    return isinstance(exc, redis.exceptions.ResponseError) and \
        not redisconn.unavailable(exc)


def redis_state(pool):
    """What Redis says of its memory and persistence, in one round trip
    (two when AOF is off): {'policy': str, 'maxmemory': bytes (0: no
    limit), 'used_memory': bytes, 'aof': bool, 'rdb': bool or None
    (unknown: CONFIG refused)}; None when INFO itself is refused (an ACL).
    Raises redis-py's errors when Redis is unreachable or unavailable."""
    try:
        memory, persistence = reads.replies(pool, (
            ('INFO', 'memory'), ('INFO', 'persistence')))
    except redis.exceptions.ResponseError as exc:
        if _refused(exc):
            return None
        raise
    memory, persistence = parse_info(memory), parse_info(persistence)
    state = {'policy': memory.get('maxmemory_policy') or None,
             'maxmemory': _number(memory, 'maxmemory'),
             'used_memory': _number(memory, 'used_memory'),
             'aof': persistence.get('aof_enabled') == '1', 'rdb': None}
    if not state['aof']:
        state['rdb'] = _rdb_configured(pool, persistence)
    return state


def _rdb_configured(pool, persistence):
    try:
        reply = reads.replies(pool, (('CONFIG', 'GET', 'save'),))[0]
    except redis.exceptions.ResponseError as exc:
        if not _refused(exc):
            raise
        # INFO has no word on the save rules; a snapshot made since the
        # start shows some exist.
        if _number(persistence, 'rdb_bgsave_in_progress') or \
                _number(persistence, 'rdb_last_bgsave_time_sec', -1) >= 0:
            return True
        return None
    if isinstance(reply, dict):
        value = next(iter(reply.values()), b'')
    else:
        value = reply[1] if len(reply) > 1 else b''
    if isinstance(value, bytes):
        value = value.decode('utf-8', 'replace')
    return bool(value.strip())


# --- what it means -----------------------------------------------------------

def _size(n):
    for unit in ('B', 'KB', 'MB', 'GB', 'TB'):
        if n < 1024 or unit == 'TB':
            return ('%d %s' if unit == 'B' else '%.1f %s') % (n, unit)
        n /= 1024.0


def eviction_problem(state, where):
    """Why `state`'s maxmemory-policy loses the suite's data (str), or None
    for noeviction (or a policy INFO does not show)."""
    policy = state and state['policy']
    if not policy or policy == NOEVICTION:
        return None
    limit = ('when it reaches maxmemory (%s)' % _size(state['maxmemory'])
             if state['maxmemory'] else 'as soon as a maxmemory is set')
    if policy.startswith('volatile-'):
        what = ('deletes keys that have a time to live: consumer heartbeats '
                '(a live consumer then looks dead and its tasks run twice), '
                'the scheduler\'s lease (two leaders), task results and the '
                'journal')
    else:
        what = ('deletes any key, queued tasks included, which are then lost '
                'without a trace')
    return ('Redis at %s has maxmemory-policy %s: %s it %s.  Set '
            'maxmemory-policy noeviction on Redis (redis.conf, or CONFIG SET '
            'maxmemory-policy noeviction), or set [redis] allow_eviction = '
            'true to accept that loss' % (where, policy, limit, what))


def persistence_off(state):
    """True when Redis keeps nothing on disk (no AOF, no RDB snapshots);
    False when it does or it cannot be told."""
    return bool(state) and not state['aof'] and state['rdb'] is False


def memory_ratio(state):
    """used_memory / maxmemory, or None without a maxmemory."""
    if not state or not state['maxmemory']:
        return None
    return state['used_memory'] / float(state['maxmemory'])


PERSISTENCE_TEXT = ('Redis keeps nothing on disk (no AOF, no RDB snapshots): '
                    'a restart of Redis loses every queued task; turn on '
                    'appendonly (or save rules) in redis.conf')


def memory_text(state, ratio, threshold):
    return ('Redis uses %s of its maxmemory %s (%.0f%%, above [redis] '
            'memory_warning_ratio %g): when full it refuses writes, new tasks '
            'included' % (_size(state['used_memory']),
                          _size(state['maxmemory']), ratio * 100, threshold))


def health_check(cfg, pool, where):
    """For GET /health: (check dict for checks.redis, reasons (each makes
    it not ready), warnings, degraded: memory above the ratio).  Raises
    redis-py's errors when Redis is unavailable."""
    state = redis_state(pool)
    if state is None:
        return {'info': 'INFO refused (ACL): not checked'}, [], [], False
    reasons, warnings = [], []
    allowed = cfg.redis.allow_eviction
    problem = eviction_problem(state, where)
    if problem and not allowed:
        reasons.append(problem)
    elif problem:
        warnings.append('Redis maxmemory-policy is %s ([redis] '
                        'allow_eviction = true): a full Redis deletes keys'
                        % state['policy'])
    if persistence_off(state):
        warnings.append(PERSISTENCE_TEXT)
    ratio = memory_ratio(state)
    threshold = cfg.redis.memory_warning_ratio
    high = ratio is not None and ratio >= threshold
    if high:
        warnings.append(memory_text(state, ratio, threshold))
    check = {
        'maxmemory_policy': state['policy'],
        'eviction': {'ok': not problem or allowed, 'allowed': allowed},
        'memory': {'ok': not high, 'used': state['used_memory'],
                   'maxmemory': state['maxmemory'],
                   'ratio': None if ratio is None else round(ratio, 4),
                   'threshold': threshold},
        'persistence': {'ok': None if state['rdb'] is None and
                        not state['aof'] else not persistence_off(state),
                        'aof': state['aof'], 'rdb': state['rdb']}}
    return check, reasons, warnings, high


# --- the daemons ---------------------------------------------------------------

def _value(x):
    return x() if callable(x) else x


class Preflight:
    """One daemon's checks of Redis: at_start() refuses an evicting Redis
    (ConfigError, exit 78) and logs the warnings; recheck(), from the
    daemon's loop, logs each change once (a CONFIG SET while it runs),
    never raising.  `cfg` and `pool`: the values, or callables returning
    the current ones (a status-server reload replaces both)."""

    def __init__(self, cfg, pool, daemon):
        self._cfg, self._pool, self.daemon = cfg, pool, daemon
        self.problems = None     # {kind: text} found by the last check
        self.next_check = 0.0    # time.monotonic() of the next recheck

    @property
    def cfg(self):
        return _value(self._cfg)

    def _problems(self, state):
        cfg = self.cfg
        out = {}
        if state is None:
            return out
        problem = eviction_problem(state, redisconn.describe(cfg))
        if problem:
            out['eviction'] = problem
        if persistence_off(state):
            out['persistence'] = PERSISTENCE_TEXT
        ratio = memory_ratio(state)
        if ratio is not None and ratio >= cfg.redis.memory_warning_ratio:
            out['memory'] = memory_text(state, ratio,
                                        cfg.redis.memory_warning_ratio)
        return out

    def at_start(self):
        """Raises ConfigError (to the log file too) for an evicting Redis
        unless [redis] allow_eviction; redis-py's errors when Redis is
        unavailable (the caller waits and tries again)."""
        cfg = self.cfg
        state = redis_state(_value(self._pool))
        self.next_check = time.monotonic() + RECHECK_INTERVAL
        if state is None:
            log.warning('%s: Redis refuses INFO (an ACL?): its '
                        'maxmemory-policy, persistence and memory are not '
                        'checked', self.daemon)
        problems = self.problems = self._problems(state)
        if 'eviction' in problems and not cfg.redis.allow_eviction:
            with logs.config_errors_to_file():
                raise ConfigError(problems['eviction'], 'redis',
                                  'allow_eviction', 'false',
                                  origin=str(cfg.source(
                                      'redis.allow_eviction')))
        for kind, text in problems.items():
            log.warning('%s%s', text, ' (allowed by [redis] allow_eviction)'
                        if kind == 'eviction' else '')
        return True

    def recheck(self):
        """From the daemon's loop: at most every RECHECK_INTERVAL seconds,
        one INFO; a problem that appears is logged once (an evicting policy
        as an error), and once more when it goes.  Never raises: Redis
        being down is the daemon's outage handling's business."""
        now = time.monotonic()
        if now < self.next_check:
            return
        self.next_check = now + RECHECK_INTERVAL
        try:
            problems = self._problems(redis_state(_value(self._pool)))
        except Exception:
            return
        before = self.problems or {}
        for kind, text in problems.items():
            if kind in before:
                continue
            if kind == 'eviction' and not self.cfg.redis.allow_eviction:
                log.error('%s: %s; GET /health says not ready, and a restart '
                          'of the daemons is refused (exit 78)',
                          self.daemon, text)
            else:
                log.warning('%s: %s', self.daemon, text)
        for kind in before:
            if kind not in problems:
                log.warning('%s: Redis is fine again: %s', self.daemon, {
                    'eviction': 'maxmemory-policy is noeviction',
                    'persistence': 'it persists to disk',
                    'memory': 'memory use is below [redis] '
                              'memory_warning_ratio'}[kind])
        self.problems = problems


def checked_at_start(daemon, preflight):
    """For a MainLoop daemon (consumer, scheduler) once Redis answered:
    run preflight.at_start(), waiting out an outage the way the daemon
    waits for Redis (its RedisOutage, backoff, STATUS).  True when done,
    False when told to stop first; ConfigError propagates (exit 78)."""
    while not daemon.flags.stop_requests:
        try:
            preflight.at_start()
        except (redis.exceptions.RedisError, OSError) as exc:
            daemon.outage.failed(exc)
            daemon.notifier.status('waiting for Redis at %s: %s' % (
                redisconn.describe(preflight.cfg), redisconn.error_text(exc)))
            daemon.pause(daemon.outage.delay)
            continue
        daemon.outage.ok()
        return True
    return False


class StartGate:
    """For a daemon that serves while Redis is down (the status server):
    attempt(), called from its loop, tries preflight.at_start() with
    backoff until Redis answers once, then goes on with recheck().  False
    once refused: `refusal` holds the ConfigError (exit 78)."""

    def __init__(self, preflight, cfg):
        self.preflight = preflight
        self.backoff = redisconn.Backoff(redisconn.RedisOutage.FIRST_DELAY,
                                         cfg.redis.retry_max_delay)
        self.done = False
        self.refusal = None
        self.next_try = 0.0
        self.waiting_logged = False

    def attempt(self):
        if self.refusal is not None:
            return False
        if self.done:
            self.preflight.recheck()
            return True
        now = time.monotonic()
        if now < self.next_try:
            return True
        try:
            self.preflight.at_start()
        except ConfigError as exc:
            self.refusal = exc
            return False
        except (redis.exceptions.RedisError, OSError) as exc:
            if not self.waiting_logged:
                self.waiting_logged = True
                log.info('%s: Redis %s (%s): its maxmemory-policy is checked '
                         'once it answers', self.preflight.daemon,
                         redisconn.outage_word(exc),
                         redisconn.error_text(exc))
            self.next_try = now + self.backoff.next()
            return True
        self.done = True
        return True

    def watch(self):
        """attempt() from now on in a thread of its own, so that a Redis
        that does not answer (connect_timeout) never holds up the daemon's
        loop; the loop checks `refusal`."""
        def run():
            while self.attempt():
                due = self.preflight.next_check if self.done \
                    else self.next_try
                time.sleep(min(RECHECK_INTERVAL,
                               max(0.05, due - time.monotonic())))
        threading.Thread(target=run, name='preflight', daemon=True).start()
