"""The clocks the daemons read.

Wall time that hosts must agree on (which minute it is, which delayed
tasks are due, the times a heartbeat or the scheduler's record carries)
is Redis's clock (RedisClock): TIME, read once a pass, with the boot clock
counting between reads, so a host whose clock is off by seconds decides
as the others do.  Durations (leases, grace periods) are timed with the
boot clock, which never jumps with NTP or a hand-set date and keeps
counting while the process is stopped (SIGSTOP) or the VM is suspended.

TEST ONLY: HUEY_TEST_CLOCK_FILE names a file holding either a fixed time
in unix seconds (`1893499200`) or an offset from the real clock (`+30`,
`-12.5`).  It is re-read on every call, so a test moves time by rewriting
it (atomically: write a temporary file, then rename).  A fixed time
drives the scheduler's wall time outright (Redis's clock is not read:
tests step through minutes); an offset skews this host's clock, which
Redis's clock then overrides.  Never set it in production; the daemons
log a warning when it is set.
"""
import os
import time

import redis

from . import redisconn
from .config import ConfigError

TEST_CLOCK_ENV = 'HUEY_TEST_CLOCK_FILE'
# Seconds this host's clock may be off Redis's before a daemon says so
# (it goes by Redis's clock either way).
SKEW_WARNING = 1.0


def system_clock():
    return time.time()


def boot_clock():
    """Seconds on a clock that only moves forward, suspend included."""
    try:
        return time.clock_gettime(time.CLOCK_BOOTTIME)
    except (AttributeError, OSError):
        return time.monotonic()


def _parse(text):
    text = text.strip()
    if text[:1] in '+-':
        return 'offset', float(text)
    return 'fixed', float(text)


class FileClock:
    """Wall time as a test file says (see the module docstring)."""

    def __init__(self, path):
        self.path = path
        try:
            self._reading = self._read()
        except (OSError, ValueError) as exc:
            raise ConfigError('test clock file %s: %s' % (path, exc),
                              origin='environment %s' % TEST_CLOCK_ENV)

    def _read(self):
        with open(self.path, encoding='ascii') as fh:
            return _parse(fh.read())

    def __call__(self):
        try:
            self._reading = self._read()
        except (OSError, ValueError):
            pass  # keep the last good reading
        kind, number = self._reading
        return number if kind == 'fixed' else time.time() + number

    @property
    def fixed(self):
        """True while the file holds a fixed time, not an offset."""
        return self._reading[0] == 'fixed'

    def __repr__(self):
        return 'FileClock(%r)' % self.path


def from_environment(environ=None):
    """The wall clock to use: the test clock file when one is named."""
    environ = os.environ if environ is None else environ
    path = environ.get(TEST_CLOCK_ENV)
    return FileClock(path) if path else system_clock


class RedisClock:
    """Wall time (unix seconds) by Redis's clock: the TIME last read, plus
    the boot clock's seconds since.  `host` is this host's wall clock,
    used until the first read (and to say how far off it is: skew())."""

    def __init__(self, host=system_clock):
        self.host = host
        self._base = None   # (Redis's unix seconds, boot clock) at a read
        self.jump = 0.0     # seconds Redis's clock jumped at the last read
        self._skew_told = False

    def sync(self, conn):
        """Read TIME from `conn` (one round trip); Redis errors raise, and
        ConfigError when Redis refuses TIME itself (renamed away by
        rename-command, as some managed Redis do, or an ACL without it):
        waiting, as for an outage, would never end."""
        sent = boot_clock()
        try:
            reply = conn.time()
        except redis.exceptions.ResponseError as exc:
            if redisconn.unavailable(exc):
                raise
            raise ConfigError(
                'Redis refuses TIME (%s): the consumers and the scheduler '
                'go by Redis\'s clock; allow TIME on this Redis (no '
                'rename-command of TIME, +time in the ACL)'
                % redisconn.error_text(exc))
        self.note(reply, sent, boot_clock())

    def note(self, reply, sent, received):
        """Take a TIME `reply` ([seconds, microseconds]) sent and received
        at these boot clock times: Redis read its clock in between."""
        seconds, micros = (int(v) for v in reply)
        expected = None if self._base is None else self()
        self._base = (seconds + micros / 1e6, (sent + received) / 2.0)
        # How far Redis's clock moved against the boot clock since the
        # last read: a failover to a server whose clock differs, or a step
        # of the server's clock.
        self.jump = 0.0 if expected is None else self() - expected

    def __call__(self):
        if self._base is None:
            return self.host()
        redis_at, at = self._base
        return redis_at + boot_clock() - at

    def skew(self):
        """Seconds this host's clock is ahead of Redis's (None before the
        first read)."""
        return None if self._base is None else self.host() - self()

    def tell_skew(self, log, who):
        """Log when this host's clock comes to be SKEW_WARNING or more off
        Redis's, and when it is back; `who` names the daemon."""
        skew = self.skew()
        off = skew is not None and abs(skew) >= SKEW_WARNING
        if off and not self._skew_told:
            log.warning('this host\'s clock is %+.1fs off Redis\'s: the %s '
                        'goes by Redis\'s clock (check NTP)', skew, who)
        elif self._skew_told and not off:
            log.info('this host\'s clock agrees with Redis\'s again')
        self._skew_told = off

    def __repr__(self):
        return 'RedisClock(host=%r)' % self.host


def warn_if_test_clock(clock, log):
    """The TEST CLOCK warning, when `clock` (or the host clock a
    RedisClock falls back on) is a test clock file."""
    test_clock = getattr(clock, 'host', clock)
    if isinstance(test_clock, FileClock):
        log.warning('TEST CLOCK: %s is read from %s (%s is for tests only)',
                    'wall time' if test_clock is clock else
                    'this host\'s clock', test_clock.path, TEST_CLOCK_ENV)


def shared_clock(environ=None):
    """The wall clock hosts agree on: Redis's (a RedisClock, to sync), or
    a fixed test clock file's time when one is named."""
    host = from_environment(environ)
    if isinstance(host, FileClock) and host.fixed:
        return host
    return RedisClock(host)
