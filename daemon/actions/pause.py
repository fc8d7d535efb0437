"""Pause and resume a queue: its workers finish what they run and take
nothing new until it is resumed, on every host, across consumer restarts.

The pause is one key, Keys.paused (hw:<queue>:paused: JSON saying who
paused it, when, from where and why; no expiry), which every consumer
reads each pass (half a second: Consumer._read_operator_keys) and passes
on to its workers in shared memory: a worker looks at that flag before
each queue read (no round trip on the hot path), and a message a read
took after the pause reached its consumer goes back to the queue
unstarted.  The scheduler goes on moving due tasks into a paused queue:
they wait there with the rest.

Each change (not a repeat: pausing a paused queue changes nothing) is
logged in the queue's event list (Keys.events, newest first, the last
EVENTS_KEPT), which `huey-worker status` shows."""
import json
import time

from .. import overview
from ..journal.scripts import script_for
from .base import ActionError

EVENTS_KEPT = 100

# KEYS: the paused key, the events list.  ARGV: 1 the pause (JSON), 2 the
# event, 3 events kept.  Returns {1, pause} when paused now, {0, the pause
# in force} when paused already.
PAUSE = """
local current = redis.call('GET', KEYS[1])
if current then return {0, current} end
redis.call('SET', KEYS[1], ARGV[1])
redis.call('LPUSH', KEYS[2], ARGV[2])
redis.call('LTRIM', KEYS[2], 0, tonumber(ARGV[3]) - 1)
return {1, ARGV[1]}
"""

# KEYS, ARGV: as PAUSE (ARGV[1] unused).  Returns {1, the pause lifted},
# {0} when the queue was not paused.
RESUME = """
local current = redis.call('GET', KEYS[1])
if not current then return {0} end
redis.call('DEL', KEYS[1])
redis.call('LPUSH', KEYS[2], ARGV[2])
redis.call('LTRIM', KEYS[2], 0, tonumber(ARGV[3]) - 1)
return {1, current}
"""


def _storage(app, queue):
    storage = overview.storage_for(app, queue)
    if storage is None:
        raise ActionError('unknown queue %r' % queue, 404, 66)
    return storage


def _json(raw):
    if raw is None:
        return None
    try:
        value = json.loads(raw)
    except ValueError:
        return {}
    return value if isinstance(value, dict) else {}


def pause(app, actor, queue=None, reason=None):
    """Pause `queue` (the app's own when None).  Returns {'queue',
    'paused': True, 'already': bool, 'pause': {at, via, by, from,
    reason}} (the pause in force: the earlier one when it was paused
    already).  ActionError: unknown queue (404/66), a reason that is not
    a short text (400/65)."""
    if reason is not None and (not isinstance(reason, str) or
                               len(reason) > 500):
        raise ActionError('the reason must be a text of at most 500 '
                          'characters')
    storage = _storage(app, queue)
    now = time.time()
    value = actor.last_action('pause', now, reason=reason or None)
    done, current = script_for(storage, PAUSE)(
        keys=[storage.keys.paused, storage.keys.events],
        args=[value, value, EVENTS_KEPT])
    return {'queue': storage.name, 'paused': True, 'already': not done,
            'pause': _json(current)}


def resume(app, actor, queue=None):
    """Resume `queue`.  Returns {'queue', 'paused': False, 'already':
    bool (it was not paused), 'was': the pause lifted or None}."""
    storage = _storage(app, queue)
    now = time.time()
    event = actor.last_action('resume', now)
    reply = script_for(storage, RESUME)(
        keys=[storage.keys.paused, storage.keys.events],
        args=['', event, EVENTS_KEPT])
    return {'queue': storage.name, 'paused': False, 'already': not reply[0],
            'was': _json(reply[1]) if reply[0] else None}


def pause_state(storage):
    """The pause in force on `storage`'s queue ({at, via, by, from,
    reason}), or None when it is not paused."""
    return _json(storage.conn.get(storage.keys.paused))


def queue_events(storage, limit=10):
    """The queue's last `limit` operator events (pause, resume), newest
    first: [{action, at, via, by, from, reason?}]."""
    return [e for e in (_json(raw) for raw in storage.conn.lrange(
        storage.keys.events, 0, max(0, int(limit)) - 1)) if e]
