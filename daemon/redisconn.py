"""Redis connections built from [redis] settings: plain, TLS, unix socket or
through Sentinel."""
import logging
import random
import re
import threading
import time

import redis
from redis.backoff import NoBackoff
from redis.retry import Retry
from redis._parsers.base import BaseParser
from redis.connection import Connection
from redis.sentinel import Sentinel, SentinelManagedConnection

from .config import ConfigError, redact_url

log = logging.getLogger('huey_worker.redis')


def _common_kwargs(cfg):
    r = cfg.redis
    kwargs = {
        'socket_connect_timeout': r.connect_timeout,
        'socket_timeout': r.socket_timeout,
        'socket_keepalive': True,
        # Ping a connection that sat idle before reusing it, so a Redis
        # restart is noticed on a cheap command, not a lost blocking read.
        'health_check_interval': 15,
        # No silent retries inside redis-py: a retried BRPOPLPUSH whose first
        # reply was lost would take a second message.  The daemons retry
        # whole operations themselves, with backoff and a log line.
        'retry': Retry(NoBackoff(), 0),
        # RESP2, what Huey is written against: redis-py 8 otherwise opens
        # each connection with HELLO 3, which Redis before 6.0 refuses.  A
        # `protocol=3` in [redis] url still wins.
        'protocol': 2,
    }
    if r.username:
        kwargs['username'] = r.username
    if r.password:
        kwargs['password'] = r.password
    return kwargs


def _tls_kwargs(cfg):
    r = cfg.redis
    kwargs = {'ssl_cert_reqs': 'required' if r.tls_verify else 'none',
              'ssl_check_hostname': bool(r.tls_verify)}
    if r.tls_ca_file:
        kwargs['ssl_ca_certs'] = r.tls_ca_file
    if r.tls_cert_file:
        kwargs['ssl_certfile'] = r.tls_cert_file
    if r.tls_key_file:
        kwargs['ssl_keyfile'] = r.tls_key_file
    return kwargs


def connection_pool(cfg):
    """A connection pool for the configured Redis (or Sentinel master);
    its `durable_wait_ms` is [redis] durable_writes in milliseconds (0:
    off), for SuiteStorage's writes."""
    pool = _connection_pool(cfg)
    pool.durable_wait_ms = int(round(cfg.redis.durable_writes * 1000))
    return pool


def _connection_pool(cfg):
    r = cfg.redis
    kwargs = _common_kwargs(cfg)
    if r.sentinels:
        sentinel_kwargs = {'socket_connect_timeout': r.connect_timeout,
                           'socket_timeout': r.connect_timeout,
                           # One try per sentinel, then the next one:
                           # redis-py's default retries a sentinel that
                           # does not answer 10 times with backoff (about
                           # a minute for a paused host's, at the default
                           # connect_timeout) before asking the others.
                           'retry': Retry(NoBackoff(), 0),
                           'protocol': 2}
        if r.sentinel_password:
            sentinel_kwargs['password'] = r.sentinel_password
        # An IPv6 address comes bracketed ([::1]:26379), as in a URL.
        hosts = [(w.rpartition(':')[0].strip('[]'),
                  int(w.rpartition(':')[2])) for w in r.sentinels]
        sentinel = Sentinel(hosts, sentinel_kwargs=sentinel_kwargs,
                            db=r.db, **kwargs)
        return sentinel.master_for(
            r.sentinel_master,
            connection_class=MasterFollowingConnection).connection_pool
    if r.url:
        if r.url.startswith('rediss://'):
            kwargs.update(_tls_kwargs(cfg))
        if r.url.startswith('unix://'):
            del kwargs['socket_keepalive']  # TCP only
        try:
            return redis.ConnectionPool.from_url(r.url, **kwargs)
        except ValueError as exc:
            raise ConfigError(str(exc), 'redis', 'url', redact_url(r.url),
                              origin=str(cfg.source('redis.url')))
    return redis.ConnectionPool(host=r.host, port=r.port, db=r.db, **kwargs)


class MasterFollowingConnection(SentinelManagedConnection):
    """A connection to the Sentinel master that asks the sentinels where
    the master is each time it reconnects, however it reconnects.

    redis-py 8's Connection.send_packed_command reconnects a dropped
    connection by connect_check_health(), past SentinelManagedConnection's
    connect(), which is where the master is looked up: a connection kept
    out of the pool (a worker's own, SuiteStorage.pin_connection) then
    reconnected to the address it had, the dead or demoted primary, for
    good.  Pool checkouts call connect() and were never affected.

    A READONLY reply (the primary was demoted while alive) has the
    connection dropped before its next command, so that command asks the
    sentinels again; not at once, as the replies after it (a pipeline's)
    are still to be read.  It is raised as the ReadOnlyError it is:
    redis-py's own class turns it into a ConnectionError, which would hide
    that nothing was written (a refused write is safe to send again; one
    whose reply was lost is not)."""

    demoted = False   # a READONLY reply came: reconnect before sending

    def connect(self):
        super().connect()
        _note_master((self.host, self.port))

    def send_packed_command(self, command, check_health=True):
        if self.demoted:
            self.demoted = False
            self.disconnect()
        if not self._sock:
            self.connect()   # the Sentinel lookup, then the socket
        super().send_packed_command(command, check_health)

    def read_response(self, *args, **kwargs):
        try:
            return Connection.read_response(self, *args, **kwargs)
        except redis.exceptions.ReadOnlyError:
            self.demoted = True
            raise


def ready(conn):
    """`conn` (a connection of a pool, kept out of it between commands)
    ready for a command: one that Redis closed while it sat idle (a
    restart, its `timeout`) or that holds an unread reply is dropped and
    reconnected first, as the pool's checkout does.  Raises redis-py's
    ConnectionError or TimeoutError when Redis cannot be reached."""
    try:
        if conn.can_read():   # connects a dropped connection first
            raise redis.exceptions.ConnectionError('connection has data')
    except (redis.exceptions.ConnectionError, redis.exceptions.TimeoutError,
            OSError):
        conn.disconnect()
        conn.connect()
    return conn


# The Sentinel master this process last connected to, and how many times
# that changed: a worker compares the count between its queue reads
# (master_changes), as a failover may have dropped writes it made to the
# old primary.
_master = {'address': None, 'changes': 0}
_master_lock = threading.Lock()


def _note_master(address):
    with _master_lock:
        if _master['address'] not in (None, address):
            _master['changes'] += 1
        _master['address'] = address


def master_changes():
    """How many times this process's connections found the Sentinel master
    at another address than before (int; 0 without Sentinel)."""
    return _master['changes']


def describe(cfg):
    """Where Redis is, for log lines: never with the password."""
    r = cfg.redis
    if r.sentinels:
        return 'sentinel master %s via %s' % (r.sentinel_master,
                                              ', '.join(r.sentinels))
    if r.url:
        return redact_url(r.url)
    return 'redis://%s:%d/%d' % (r.host, r.port, r.db)


# Redis answers, but cannot do what was asked for now: a replica (READONLY,
# as after a failover), a replica that lost its master (MASTERDOWN), data
# still loading (LOADING), writes stopped by a failed save (MISCONF) or by
# min-replicas-to-write (NOREPLICAS), a script or module busy (BUSY), a
# blocking read ended by a role change (UNBLOCKED), memory full (OOM), a
# cluster state (TRYAGAIN, CLUSTERDOWN).  Each passes by itself or by an
# operator's hand: the same as an outage, never a reason to exit or to fail
# a task.
UNAVAILABLE_CODES = frozenset((
    'READONLY', 'MASTERDOWN', 'LOADING', 'MISCONF', 'NOREPLICAS', 'BUSY',
    'UNBLOCKED', 'OOM', 'TRYAGAIN', 'CLUSTERDOWN'))
# redis-py's pipelines prefix the error of the command that failed.
_ANNOTATED = re.compile(r'^Command # \d+ \(.*\) of pipeline caused error: ',
                        re.S)
# Redis before 7 wraps the error a script's redis.call met in one of its
# own: "ERR Error running script (call to f_<sha1>): @user_script:2:
# @user_script: 2: -READONLY You can't write against a read only replica."
# The code that says Redis cannot serve now is the inner one.
_SCRIPT_WRAPPED = re.compile(
    r'Error running script \(call to [^)]*\):.*?-([A-Z][A-Z_]*\b.*)$', re.S)


class NotReplicated(redis.exceptions.ResponseError):
    """A write the primary took that no replica confirmed within [redis]
    durable_writes (WAIT): not acknowledged, as with Redis's own
    min-replicas-to-write refusal, whose code it carries (so every daemon
    waits it out as Redis unavailable).  Unlike that refusal the write
    may be there: it survives unless a failover drops it (the primary
    demoted while alive loses what it took since the promotion)."""

    def __init__(self, *args):
        super().__init__(*args)
        self.status_code = 'NOREPLICAS'   # an instance's in redis-py 8


def error_code(exc):
    """The code a Redis error reply starts with ('READONLY', 'ERR', ...),
    the inner one for a script's error wrapped by Redis before 7, or None
    for errors that are not replies."""
    code = getattr(exc, 'status_code', None)
    if code:
        return code
    if not isinstance(exc, redis.exceptions.ResponseError) or not exc.args:
        return None
    text = _ANNOTATED.sub('', str(exc.args[0]), count=1)
    wrapped = _SCRIPT_WRAPPED.search(text)
    if wrapped is not None:
        text = wrapped.group(1)
    word = text.split(' ', 1)[0]
    return word if word.isupper() else None


def unwrap_script_error(exc):
    """`exc`, a script's error reply, as redis-py raises the error the
    script's own command met when that command is sent alone: on Redis
    before 7 a READONLY or OOM inside a script comes back wrapped in a
    plain ResponseError (_SCRIPT_WRAPPED), which neither retry_readonly
    nor a caller catching ReadOnlyError or OutOfMemoryError would know.
    Only for UNAVAILABLE_CODES; anything else is returned as it is."""
    if type(exc) is not redis.exceptions.ResponseError or not exc.args:
        return exc
    wrapped = _SCRIPT_WRAPPED.search(str(exc.args[0]))
    if wrapped is None or \
            wrapped.group(1).split(' ', 1)[0] not in UNAVAILABLE_CODES:
        return exc
    return BaseParser.parse_error(wrapped.group(1).rstrip())


# redis-py's MasterNotFoundError names each sentinel by its client's repr
# (a few hundred characters each): host:port says the same.
_SENTINEL_REPR = re.compile(
    r'<redis\.client\.Redis\(<redis\.connection\.ConnectionPool\(<'
    r'[^<>]*?(?:<[^<>]*>[^<>]*?)*?host=([^,]+),port=(\d+)[^<>]*?'
    r'(?:<[^<>]*>[^<>]*?)*>\)>\)>')


def error_text(exc):
    """`exc` as a line for logs and STATUS, with the code redis-py strips
    from the replies it knows ('READONLY You can't write against...'),
    and sentinels named host:port."""
    text = _SENTINEL_REPR.sub(r'sentinel \1:\2', str(exc))
    code = getattr(exc, 'status_code', None)
    if code and not text.startswith(code):
        return '%s %s' % (code, text)
    return text


def unavailable(exc):
    """True when `exc` (any exception) means Redis cannot be used now
    (unreachable, or answering one of UNAVAILABLE_CODES): wait and try
    again.  False for anything else, such as a reply refusing this one
    command (a wrong type, a value too large), which trying again cannot
    mend."""
    if isinstance(exc, (redis.exceptions.ConnectionError,
                        redis.exceptions.TimeoutError, OSError)):
        return True   # BusyLoadingError (LOADING) is one too
    return isinstance(exc, redis.exceptions.ResponseError) and \
        error_code(exc) in UNAVAILABLE_CODES


def unreachable(exc):
    """Whether `exc` is a lost or refused connection (as opposed to an
    answer saying Redis cannot serve now)."""
    return isinstance(exc, (redis.exceptions.ConnectionError,
                            redis.exceptions.TimeoutError, OSError)) and \
        not isinstance(exc, redis.exceptions.BusyLoadingError)


def outage_word(exc):
    """'unreachable' or 'unavailable', for log and STATUS lines."""
    return 'unreachable' if unreachable(exc) else 'unavailable'


# os.urandom underneath: nothing to share with a forked worker, whose
# draws must differ from its siblings'.
_random = random.SystemRandom()


def jitter(ceiling):
    """A wait drawn uniformly from [0, ceiling] seconds ("full jitter"): so
    that the threads of many hosts that lost Redis at the same moment do
    not all come back at the same moments."""
    return _random.uniform(0, ceiling) if ceiling > 0 else 0.0


class Backoff:
    """Waits between attempts: the n-th is drawn from [0, ceiling_n] (full
    jitter), where ceiling_1 = `first` and each next ceiling doubles, up to
    `maximum` (seconds).  reset() starts over from `first`."""

    def __init__(self, first, maximum):
        self.first, self.maximum = first, maximum
        self.ceiling = None

    def next(self):
        """The next wait, in seconds (0 <= wait <= maximum)."""
        if self.ceiling is None:
            self.ceiling = min(self.first, self.maximum)
        else:
            self.ceiling = min(self.ceiling * 2, self.maximum)
        return jitter(self.ceiling)

    def reset(self):
        self.ceiling = None


READONLY_TRIES = 5


def retry_readonly(write):
    """`write()`, tried again while Redis refuses it with READONLY, up to
    READONLY_TRIES times in all, waiting 0 to 0.2, 0.4, 0.8, 1.6 s (full
    jitter) between tries; returns what it returns.  For a producer's
    write, which has no retry loop of its own: a demoted primary applied
    nothing, and through Sentinel the next try finds the new primary
    (MasterFollowingConnection).  The last ReadOnlyError, and any other
    error at once, is raised."""
    try:
        return write()   # a producer's every enqueue: nothing more to set up
    except redis.exceptions.ReadOnlyError:
        pass
    backoff = Backoff(0.2, 1.6)
    for tries_left in range(READONLY_TRIES - 2, -1, -1):
        time.sleep(backoff.next())
        try:
            return write()
        except redis.exceptions.ReadOnlyError:
            if not tries_left:
                raise


class RedisOutage:
    """One daemon's view of Redis being unreachable or unavailable: one log
    line when it goes, one when it comes back (never a line per retry),
    the error for STATUS, and the backoff delay for the next try (full
    jitter, Backoff)."""

    FIRST_DELAY = 0.2

    def __init__(self, cfg, clock=time.time):
        self.cfg, self.clock = cfg, clock
        self.since = None        # clock() when Redis was first missed
        self.error = None
        self.word = 'unreachable'
        self.backoff = Backoff(self.FIRST_DELAY, cfg.redis.retry_max_delay)
        self.delay = self.FIRST_DELAY

    @property
    def down(self):
        return self.since is not None

    def failed(self, exc):
        if self.since is None:
            self.since = self.clock()
            self.word = outage_word(exc)
            log.warning('Redis %s at %s (%s); retrying with backoff up to '
                        '%gs', self.word, describe(self.cfg), error_text(exc),
                        self.cfg.redis.retry_max_delay)
        self.delay = self.backoff.next()
        self.error = error_text(exc)

    def ok(self):
        if self.since is not None:
            log.warning('Redis reachable again after %.1fs',
                        self.clock() - self.since)
        self.since = self.error = None
        self.backoff.reset()
        self.delay = self.FIRST_DELAY
