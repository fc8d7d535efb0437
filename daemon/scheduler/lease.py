"""The leader lease: one Redis key holding the leader's token.

* acquire: SET key token NX PX ttl -- whoever sets it leads;
* renew:   a script that PEXPIREs the key only while it still holds our
           token (compare-and-pexpire);
* release: a script that DELetes it only while it holds our token
           (compare-and-del), so a clean stop hands over at once.

The key lives for 90% of lease_timeout: a standby retries right when the
lease would run out, so a dead leader is replaced within lease_timeout.

Locally the leader trusts its lease until `sent + ttl - margin` on the boot
clock, where `sent` is when the acquiring or renewing command left: Redis
started the expiry later than that, so the local deadline always comes
first and a leader that cannot renew stops acting before its lease is gone
from Redis's point of view.  Every action is also conditioned on the lease
inside Redis (each action script starts with LEADER_CHECK), which covers
what a local clock cannot: a process paused between its check and its
command.
"""
import logging

from ..clock import boot_clock

log = logging.getLogger('huey_worker.scheduler')

TTL_FRACTION = 0.9      # of lease_timeout: the key's life in Redis
MARGIN_FRACTION = 0.1   # of the ttl: the leader stops trusting it this early
RENEWALS_PER_TTL = 3    # the leader renews every ttl / 3

# The first lines of every action script: KEYS[1] is the lease, ARGV[1] our
# token; a script run by anyone else changes nothing and returns NOT_LEADER.
NOT_LEADER = -1
LEADER_CHECK = """
if redis.call('GET', KEYS[1]) ~= ARGV[1] then return -1 end
"""

RENEW = """
if redis.call('GET', KEYS[1]) == ARGV[1] then
  return redis.call('PEXPIRE', KEYS[1], ARGV[2])
end
return 0
"""

RELEASE = """
if redis.call('GET', KEYS[1]) == ARGV[1] then
  return redis.call('DEL', KEYS[1])
end
return 0
"""


def _text(value):
    return value.decode('utf-8', 'replace') if isinstance(value, bytes) \
        else value


class Lease:
    def __init__(self, conn, key, token, lease_timeout, clock=boot_clock):
        self.conn, self.key, self.token = conn, key, token
        self.clock = clock
        self.ttl = lease_timeout * TTL_FRACTION
        self.ttl_ms = max(1, int(self.ttl * 1000))
        self.margin = self.ttl * MARGIN_FRACTION
        self.renew_every = self.ttl / RENEWALS_PER_TTL
        self.valid_until = None   # boot clock; None: we do not lead
        self.last_renewed = None  # boot clock of the last good renewal
        self.holder = None        # token of the leader, as last seen
        self.holder_ttl = None    # seconds it had left then (None: unknown)
        self._renew = conn.register_script(RENEW)
        self._release = conn.register_script(RELEASE)

    # -- state -------------------------------------------------------------

    def held(self):
        """True while this process may act as leader."""
        return self.valid_until is not None and self.clock() < self.valid_until

    def expired_locally(self):
        """We led, and the local deadline passed without a renewal."""
        return self.valid_until is not None and not self.held()

    def drop(self, holder=None):
        """Stop leading (lost, expired or released)."""
        self.valid_until = None
        self.last_renewed = None
        self.holder = holder

    # -- Redis -------------------------------------------------------------

    def try_acquire(self):
        """One attempt to become leader; returns True when we now lead.
        Otherwise `holder` and `holder_ttl` say who leads and for how long."""
        sent = self.clock()
        pipe = self.conn.pipeline(transaction=True)
        pipe.set(self.key, self.token, nx=True, px=self.ttl_ms)
        pipe.get(self.key)
        pipe.pttl(self.key)
        acquired, holder, pttl = pipe.execute()
        if acquired:
            self._granted(sent)
            return True
        self.holder = _text(holder)
        self.holder_ttl = pttl / 1000.0 if pttl is not None and pttl >= 0 \
            else None
        return False

    def renew(self):
        """Extend our lease; returns False when it is no longer ours (it ran
        out and someone else, or nobody, holds the key)."""
        sent = self.clock()
        if self._renew(keys=[self.key], args=[self.token, self.ttl_ms]):
            self._granted(sent)
            return True
        self.drop()
        return False

    def release(self):
        """Give the lease up if it is still ours (a clean stop)."""
        held = self.valid_until is not None
        self.drop()
        if held:
            return bool(self._release(keys=[self.key], args=[self.token]))
        return False

    def _granted(self, sent):
        self.valid_until = sent + self.ttl - self.margin
        self.last_renewed = sent
        self.holder = self.token
        self.holder_ttl = self.ttl

    # -- timing ------------------------------------------------------------

    def renewal_due(self):
        return self.last_renewed is None or \
            self.clock() - self.last_renewed >= self.renew_every

    def next_attempt_in(self):
        """Seconds a standby waits before its next attempt: right after the
        current lease would run out, at most a third of the ttl (so a
        renewed lease is looked at again, and a deleted one found soon)."""
        if self.holder_ttl is None:
            return self.renew_every
        return min(self.holder_ttl + 0.01, self.renew_every)

    def next_renewal_in(self):
        if self.last_renewed is None:
            return 0
        return max(0.0, self.last_renewed + self.renew_every - self.clock())
