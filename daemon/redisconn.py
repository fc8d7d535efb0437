"""Redis connections built from [redis] settings: plain, TLS, unix socket or
through Sentinel."""
import logging
import time

import redis
from redis.backoff import NoBackoff
from redis.retry import Retry
from redis.sentinel import Sentinel

from .config import ConfigError

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
    """A connection pool for the configured Redis (or Sentinel master)."""
    r = cfg.redis
    kwargs = _common_kwargs(cfg)
    if r.sentinels:
        sentinel_kwargs = {'socket_connect_timeout': r.connect_timeout,
                           'socket_timeout': r.connect_timeout,
                           'protocol': 2}
        if r.sentinel_password:
            sentinel_kwargs['password'] = r.sentinel_password
        hosts = [(w.rpartition(':')[0], int(w.rpartition(':')[2]))
                 for w in r.sentinels]
        sentinel = Sentinel(hosts, sentinel_kwargs=sentinel_kwargs,
                            db=r.db, **kwargs)
        return sentinel.master_for(r.sentinel_master).connection_pool
    if r.url:
        if r.url.startswith('rediss://'):
            kwargs.update(_tls_kwargs(cfg))
        if r.url.startswith('unix://'):
            del kwargs['socket_keepalive']  # TCP only
        try:
            return redis.ConnectionPool.from_url(r.url, **kwargs)
        except ValueError as exc:
            raise ConfigError(str(exc), 'redis', 'url', _redact_url(r.url),
                              origin=str(cfg.source('redis.url')))
    return redis.ConnectionPool(host=r.host, port=r.port, db=r.db, **kwargs)


def describe(cfg):
    """Where Redis is, for log lines: never with the password."""
    r = cfg.redis
    if r.sentinels:
        return 'sentinel master %s via %s' % (r.sentinel_master,
                                              ', '.join(r.sentinels))
    if r.url:
        return _redact_url(r.url)
    return 'redis://%s:%d/%d' % (r.host, r.port, r.db)


def _redact_url(url):
    scheme, sep, rest = url.partition('://')
    creds, at, host = rest.rpartition('@')
    if not at:
        return url
    user = creds.partition(':')[0]
    return '%s%s%s:***@%s' % (scheme, sep, user, host)


class RedisOutage:
    """One daemon's view of Redis being unreachable: one log line when it
    goes, one when it comes back (never a line per retry), the error for
    STATUS, and the backoff delay for the next try."""

    FIRST_DELAY = 0.2

    def __init__(self, cfg, clock=time.time):
        self.cfg, self.clock = cfg, clock
        self.since = None        # clock() when Redis was first missed
        self.error = None
        self.delay = self.FIRST_DELAY

    @property
    def down(self):
        return self.since is not None

    def failed(self, exc):
        if self.since is None:
            self.since = self.clock()
            log.warning('Redis unreachable at %s (%s); retrying with backoff '
                        'up to %gs', describe(self.cfg), exc,
                        self.cfg.redis.retry_max_delay)
        else:
            self.delay = min(self.delay * 2, self.cfg.redis.retry_max_delay)
        self.error = str(exc)

    def ok(self):
        if self.since is not None:
            log.warning('Redis reachable again after %.1fs',
                        self.clock() - self.since)
        self.since = self.error = None
        self.delay = self.FIRST_DELAY
