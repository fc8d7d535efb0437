"""What the scheduler tells others: `keys.scheduler_info`, a JSON object
written by the leader only (its write is conditioned on the lease inside
Redis), read by the status endpoint, /metrics and the CLI.

Fields: leader (token), host, pid, since, renewed_at, lease_timeout,
last_evaluated (the newest minute looked at: a new leader resumes after
it), last_slot / last_slot_at / last_slot_task (the newest periodic slot
enqueued), slots_enqueued and delayed_moved (running totals across
leaders), periodic ({entry: {task, schedule, last_slot}}), version,
updated_at, and stopped_at when that leader stopped cleanly.  Minutes
are ISO 'YYYY-MM-DDTHH:MMZ' (UTC), times unix seconds.  The lease key
itself is the truth about who leads now: `read_status` gives both.
"""
import json

from .lease import LEADER_CHECK, NOT_LEADER

# Kept well past any catch-up window; refreshed by every leader.
INFO_TTL_MS = 8 * 86400 * 1000

# KEYS: lease, info.  ARGV: token, JSON, ttl (ms).
WRITE_INFO = LEADER_CHECK + """
redis.call('SET', KEYS[2], ARGV[2], 'PX', ARGV[3])
return 1
"""


def _text(value):
    return value.decode('utf-8', 'replace') if isinstance(value, bytes) \
        else value


def parse(raw):
    """The info object, or {} when absent or unreadable."""
    if not raw:
        return {}
    try:
        value = json.loads(_text(raw))
    except ValueError:
        return {}
    return value if isinstance(value, dict) else {}


class InfoWriter:
    def __init__(self, conn, keys):
        self.conn, self.keys = conn, keys
        self._script = conn.register_script(WRITE_INFO)

    def read(self):
        return parse(self.conn.get(self.keys.scheduler_info))

    def write(self, token, info):
        """Returns False when the lease is not ours inside Redis."""
        reply = self._script(
            keys=[self.keys.scheduler_lease, self.keys.scheduler_info],
            args=[token, json.dumps(info, sort_keys=True), INFO_TTL_MS])
        return reply != NOT_LEADER


def read_status(conn, keys):
    """The scheduler as others see it, in one round trip:
    {'leader': token or None, 'lease_ttl': seconds left or None,
     'info': the info object ({} when none)}.  'leader' None means no
    scheduler leads right now (none runs, or a handover is under way)."""
    pipe = conn.pipeline(transaction=False)
    pipe.get(keys.scheduler_lease)
    pipe.pttl(keys.scheduler_lease)
    pipe.get(keys.scheduler_info)
    token, pttl, raw = pipe.execute()
    token = _text(token)
    return {'leader': token,
            'lease_ttl': (pttl / 1000.0) if token and pttl and pttl > 0
            else None,
            'info': parse(raw)}
