"""HTTP downloads for the built-in tasks (requests underneath).

Every request goes through the gate of its host: at most
`per_host_concurrency` requests in flight and request starts spaced by
1/`rate_limit` seconds.  Gates live in the process, so tasks running in
threads of one consumer share them.

Redirects are followed here rather than by requests, so each hop passes
its host's gate, loops are named, and the limit is ours.  Every connection,
the first and each redirect's, goes through the address policy of
netguard ([collect] allow_networks); a refused address raises
AddressRefused (a TaskRejected), never retried.  Connection errors, read
timeouts, truncated bodies, 5xx, 408 and 429 are transient: retried after
a random wait below an exponentially growing bound ("full jitter"; a
Retry-After header wins).  Anything else is permanent and fails at once.
"""
import email.utils
import io
import random
import threading
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Optional
from urllib.parse import urljoin, urlsplit

import requests

from .netguard import AddressPolicy, AddressRefused, GuardedAdapter, \
    parse_networks
from .paths import atomic_file

CHUNK = 64 * 1024
REDIRECT_CODES = (301, 302, 303, 307, 308)
TRANSIENT_CODES = (408, 429)
TRANSIENT_REQUEST_ERRORS = (requests.exceptions.ConnectionError,
                            requests.exceptions.Timeout,
                            requests.exceptions.ChunkedEncodingError)


class FetchError(Exception):
    """A download that failed; `transient` says whether trying again later
    may succeed."""

    def __init__(self, url, problem, transient, status=None,
                 retry_after=None):
        self.url, self.problem, self.transient = url, problem, transient
        self.status, self.retry_after = status, retry_after
        self.attempts = 1
        super().__init__('%s: %s' % (url, problem))


class Cancelled(Exception):
    """The task that owns the download stopped (timeout or failure)."""


@dataclass
class Fetched:
    url: str
    final_url: str
    status: int
    content_type: str
    size: int
    attempts: int
    redirects: list = field(default_factory=list)
    headers: dict = field(default_factory=dict)
    body: Optional[bytes] = None


@dataclass(frozen=True)
class HttpSettings:
    connect_timeout: float = 10.0
    read_timeout: float = 60.0
    retries: int = 3
    retry_delay: float = 1.0
    retry_max_delay: float = 120.0
    max_body_bytes: int = 50 << 20
    content_types: tuple = ()
    max_redirects: int = 5
    user_agent: str = 'huey-worker-collect/1'
    per_host_concurrency: int = 2
    rate_limit: float = 5.0
    allow_networks: tuple = ()   # CIDR text, as in the config

    @classmethod
    def from_config(cls, cfg):
        c = cfg.collect
        return cls(c.connect_timeout, c.read_timeout, c.retries,
                   c.retry_delay, c.retry_max_delay, c.max_body_bytes,
                   tuple(c.content_types), c.max_redirects, c.user_agent,
                   c.per_host_concurrency, c.rate_limit,
                   tuple(c.allow_networks))


# -- per-host gates ----------------------------------------------------------

class HostGate:
    def __init__(self, concurrency, rate):
        self.params = (concurrency, rate)
        self._slots = threading.BoundedSemaphore(concurrency)
        self._lock = threading.Lock()
        self._next_start = 0.0
        self._interval = 1.0 / rate if rate else 0.0
        self._holders = 0

    def idle(self):
        return self._holders == 0 and self._next_start < time.monotonic()

    @contextmanager
    def slot(self, wait):
        """Hold one of the host's slots, entered no sooner than the rate
        allows.  `wait(seconds)` sleeps and raises if the caller must stop."""
        with self._lock:
            self._holders += 1
        try:
            while not self._slots.acquire(timeout=0.1):
                wait(0)
        except BaseException:
            with self._lock:
                self._holders -= 1
            raise
        try:
            with self._lock:
                now = time.monotonic()
                start = max(now, self._next_start)
                self._next_start = start + self._interval
            if start > now:
                wait(start - now)
            yield
        finally:
            self._slots.release()
            with self._lock:
                self._holders -= 1


_gates = {}
_gates_lock = threading.Lock()
MAX_IDLE_GATES = 1024   # forget idle hosts beyond this many


def host_key(url):
    parts = urlsplit(url)
    port = parts.port or {'http': 80, 'https': 443}.get(parts.scheme)
    return '%s:%s' % ((parts.hostname or '').lower(), port)


def gate_for(url, concurrency, rate):
    key = host_key(url)
    with _gates_lock:
        gate = _gates.get(key)
        if gate is None or gate.params != (concurrency, rate):
            if len(_gates) >= MAX_IDLE_GATES:
                for other in [k for k, g in _gates.items() if g.idle()]:
                    del _gates[other]
            gate = _gates[key] = HostGate(concurrency, rate)
        return gate


# -- helpers -----------------------------------------------------------------

def media_type(header):
    return (header or '').split(';', 1)[0].strip().lower()


def type_allowed(mtype, patterns):
    if not patterns:
        return True
    major = mtype.split('/', 1)[0]
    for pattern in patterns:
        pattern = pattern.strip().lower()
        if pattern in ('*', '*/*', mtype) or pattern == major + '/*':
            return True
    return False


def parse_retry_after(value, now=None):
    """Seconds to wait from a Retry-After header (seconds or HTTP date)."""
    if not value:
        return None
    value = value.strip()
    if value.isdigit():
        return float(value)
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    if when is None:
        return None
    now = time.time() if now is None else now
    return max(0.0, when.timestamp() - now)


# A generator of our own: a task that seeds the random module must not make
# every worker's retries come back in step.
_jitter = random.Random()


def backoff_delay(retry, base, cap, rng=None):
    """Seconds to wait before retry number `retry` (1 for the first):
    uniform between 0 and min(cap, base * 2**(retry - 1)), "full jitter",
    so that clients that failed together do not all come back together."""
    bound = min(cap, base * 2.0 ** min(retry - 1, 1000))
    return (rng or _jitter).uniform(0, bound)


# -- the fetcher -------------------------------------------------------------

class Fetcher:
    """Downloads for one task run.  Thread-safe: each thread gets its own
    requests session."""

    def __init__(self, settings, run=None, cancel=None):
        self.settings = settings
        self.run = run
        self.cancel = cancel or threading.Event()
        self.policy = AddressPolicy(parse_networks(settings.allow_networks))
        self._local = threading.local()
        self._sessions = []
        self._sessions_lock = threading.Lock()

    def close(self):
        with self._sessions_lock:
            for session in self._sessions:
                session.close()
            self._sessions = []

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def _session(self):
        session = getattr(self._local, 'session', None)
        if session is None:
            session = requests.Session()
            session.headers['User-Agent'] = self.settings.user_agent
            adapter = GuardedAdapter(
                self.policy,
                pool_maxsize=max(2, self.settings.per_host_concurrency),
                max_retries=0)
            session.mount('http://', adapter)
            session.mount('https://', adapter)
            self._local.session = session
            with self._sessions_lock:
                self._sessions.append(session)
        return session

    def wait(self, seconds):
        """Sleep up to `seconds`; raise if the task timed out or stopped."""
        deadline = time.monotonic() + seconds
        while True:
            if self.cancel.is_set():
                raise Cancelled()
            if self.run is not None:
                self.run.check_timeout()
            left = deadline - time.monotonic()
            if left <= 0:
                return
            self.cancel.wait(min(left, 0.2))

    # -- public --------------------------------------------------------------

    def fetch_to_file(self, url, path, max_bytes=None, content_types=None):
        """Download `url` into `path` (atomically: a failed download leaves
        nothing behind).  Returns a Fetched; raises FetchError (its
        `transient` says whether a later try may work), AddressRefused (an
        address outside [collect] allow_networks), Cancelled."""
        return self._with_retries(url, lambda: atomic_file(path), max_bytes,
                                  content_types)

    def fetch_bytes(self, url, max_bytes=None, content_types=None):
        holder = {}

        @contextmanager
        def memory():
            buf = io.BytesIO()
            yield buf
            holder['body'] = buf.getvalue()

        fetched = self._with_retries(url, memory, max_bytes, content_types)
        fetched.body = holder.get('body', b'')
        return fetched

    # -- internals -----------------------------------------------------------

    def _with_retries(self, url, open_sink, max_bytes, content_types):
        s = self.settings
        max_bytes = s.max_body_bytes if max_bytes is None else max_bytes
        content_types = s.content_types if content_types is None \
            else content_types
        attempt = 0
        while True:
            attempt += 1
            try:
                fetched = self._attempt(url, open_sink, max_bytes,
                                        content_types)
                fetched.attempts = attempt
                return fetched
            except FetchError as exc:
                exc.attempts = attempt
                if not exc.transient or attempt > s.retries:
                    raise
                if exc.retry_after is not None:
                    if exc.retry_after > s.retry_max_delay:
                        too_long = FetchError(
                            url, '%s; the server asks to wait %gs '
                            '(Retry-After), more than [collect] '
                            'retry_max_delay (%gs)' % (
                                exc.problem, exc.retry_after,
                                s.retry_max_delay),
                            True, exc.status, exc.retry_after)
                        too_long.attempts = attempt
                        raise too_long
                    delay = exc.retry_after
                else:
                    delay = backoff_delay(attempt, s.retry_delay,
                                          s.retry_max_delay)
                self.wait(delay)

    def _attempt(self, url, open_sink, max_bytes, content_types):
        s = self.settings
        current, hops = url, []
        while True:
            scheme = urlsplit(current).scheme.lower()
            if scheme not in ('http', 'https') or not urlsplit(current).netloc:
                raise FetchError(current, 'not an http:// or https:// URL',
                                 False)
            gate = gate_for(current, s.per_host_concurrency, s.rate_limit)
            with gate.slot(self.wait):
                try:
                    response = self._request(current)
                except AddressRefused as exc:
                    exc.url, exc.hop = url, current
                    raise
                try:
                    if response.status_code in REDIRECT_CODES:
                        current = self._next_hop(url, current, response,
                                                 hops)
                        continue
                    return self._receive(url, current, response, hops,
                                         open_sink, max_bytes, content_types)
                finally:
                    response.close()

    def _request(self, url):
        s = self.settings
        try:
            return self._session().get(
                url, stream=True, allow_redirects=False,
                timeout=(s.connect_timeout, s.read_timeout))
        except requests.exceptions.ConnectTimeout:
            raise FetchError(url, 'connect timed out after %gs'
                             % s.connect_timeout, True)
        except requests.exceptions.ReadTimeout:
            raise FetchError(url, 'no response within %gs ([collect] '
                             'read_timeout)' % s.read_timeout, True)
        except TRANSIENT_REQUEST_ERRORS as exc:
            raise FetchError(url, 'connection failed: %s' % _reason(exc),
                             True)
        except requests.exceptions.RequestException as exc:
            raise FetchError(url, 'bad request: %s' % exc, False)

    def _next_hop(self, origin, current, response, hops):
        location = response.headers.get('Location')
        if not location:
            raise FetchError(current, 'HTTP %d redirect without a Location '
                             'header' % response.status_code, False)
        target = urljoin(current, location)
        chain = [origin] + hops
        if target in chain:
            raise FetchError(origin, 'redirect loop: %s' % ' -> '.join(
                chain + [target]), False)
        if len(hops) >= self.settings.max_redirects:
            raise FetchError(origin, 'more than %d redirects ([collect] '
                             'max_redirects): %s' % (
                                 self.settings.max_redirects,
                                 ' -> '.join(chain + [target])), False)
        hops.append(target)
        return target

    def _receive(self, url, current, response, hops, open_sink, max_bytes,
                 content_types):
        status = response.status_code
        if status in TRANSIENT_CODES or status >= 500:
            raise FetchError(url, 'HTTP %d %s' % (status, response.reason),
                             True, status, parse_retry_after(
                                 response.headers.get('Retry-After')))
        if not 200 <= status < 300:
            raise FetchError(url, 'HTTP %d %s' % (status, response.reason),
                             False, status)
        mtype = media_type(response.headers.get('Content-Type'))
        if not type_allowed(mtype, content_types):
            raise FetchError(url, 'content type %r is not allowed '
                             '([collect] content_types: %s)' % (
                                 mtype or '(none)', ', '.join(content_types)),
                             False, status)
        declared = _declared_length(response)
        if declared is not None and declared > max_bytes:
            raise FetchError(url, 'body of %d bytes is larger than the '
                             'limit of %d bytes' % (declared, max_bytes),
                             False, status)
        size = 0
        with open_sink() as out:
            try:
                for chunk in response.iter_content(CHUNK):
                    size += len(chunk)
                    if size > max_bytes:
                        raise FetchError(url, 'body larger than the limit '
                                         'of %d bytes' % max_bytes, False,
                                         status)
                    out.write(chunk)
                    self.wait(0)
            except TRANSIENT_REQUEST_ERRORS as exc:
                raise FetchError(url, 'connection broken after %d bytes: %s'
                                 % (size, _reason(exc)), True, status)
            except requests.exceptions.RequestException as exc:
                raise FetchError(url, 'cannot read the body: %s' % exc,
                                 False, status)
            if declared is not None and size != declared:
                raise FetchError(url, 'body truncated: %d of %d bytes' % (
                    size, declared), True, status)
        return Fetched(url, current, status, mtype, size, 1, list(hops),
                       response.headers.copy())


def _declared_length(response):
    """Content-Length, when it states the size of what we will read."""
    if response.headers.get('Content-Encoding', 'identity') != 'identity':
        return None
    value = response.headers.get('Content-Length')
    if value is None or not value.strip().isdigit():
        return None
    return int(value)


def _reason(exc):
    """The innermost useful text of a requests/urllib3 exception."""
    seen = exc
    while seen.args and isinstance(seen.args[0], Exception):
        seen = seen.args[0]
    reason = getattr(seen, 'reason', None)
    return str(reason or seen)
