"""A small HTTP/1.1 server for the status endpoint: one loop thread does
the socket work, a few handler threads run the requests that read Redis.

Why this shape: a slow or half-open client costs a buffer in the loop,
never a thread, so it cannot block the others; a request reaches a
handler only once it is whole (head within MAX_HEADER_BYTES, body within
max_body_bytes, both within request_timeout).  Answers that need no Redis
(liveness, unknown routes) are given by the loop itself, so they come
even while every handler thread waits for a slow Redis.

Each connection is armed in epoll for one event at a time
(EPOLLONESHOT), and whichever thread holds it does the next step: the
loop reads and parses, a handler thread answers, sends (a status answer
fits the socket buffer, so the send completes at once) and closes or
re-arms the connection itself.  The answer does not go back to the loop
through a queue and a wake-up pipe to be sent from there: in the first
profiles that hand-back, the selector re-registrations around it and the
GIL switches they cost were most of the loop thread's work.

Requests are read by h11, one h11.Connection per client connection.
Framing (lengths, chunked bodies, header limits, pipelining) is where a
lax or home-made parser lets a proxy and this server disagree on where a
request ends; h11 is strict there and well kept.  What is left to us is
policy: the body limit (413), the HTTP version (505), and refusing a
request with both Content-Length and Transfer-Encoding, which h11 would
read as chunked while a proxy in front may have gone by the length.

An answer after which the connection stays open is written by h11: its
state machine has to see the answer to start the next request/response
cycle.  An answer after which the connection closes is rendered here
(Response.render): h11's state no longer matters then, and h11 takes
some 50 us to write an answer against 2 us here -- and most answers, to
pollers that connect per request, are of that kind.

Connections are kept alive as h11 allows (not after `Connection: close`,
nor for HTTP/1.0), up to KEEPALIVE_REQUESTS requests, idle for at most
request_timeout between them.

Slow clients (slowloris: a request head sent a byte a second) must not
take every connection slot, or a liveness probe is turned away with them.
Three limits keep room: a request head must be whole within head_timeout
of its first byte (a connection that sends nothing, of its accept); one
client address holds at most max_per_client connections; and a newcomer
over either limit makes room by evicting, first the connection whose
request (or silence) began longest ago, then the kept-alive one idle
longest.  A kept-alive poller between two polls is idle, so it goes only
once no incomplete request is left to evict; a connection being answered
is never evicted.  A newcomer is refused (503) only when nothing can go.

Who owns what: the connection map (_conns, with the per-address counts)
is shared by the loop, which adds and looks up connections, and the
handler threads, which close the connections they hold; every access
holds _conns_lock (not the GIL's incidental atomicity).  A connection's
own fields belong to the thread holding it (see EPOLLONESHOT above); the
loop's sweeps (_expire, _evict) act only on connections in the loop's
states, and an eviction shuts a socket down rather than closing it, so a
handler thread about to re-arm it never meets a reused descriptor.
"""
import collections
import errno
import http
import json
import logging
import queue
import select
import socket
import threading
import time
from urllib.parse import unquote

import h11

log = logging.getLogger('huey_worker.status')

MAX_HEADER_BYTES = 16 << 10
MAX_CONNECTIONS = 256
MAX_PER_CLIENT = 64
HEAD_TIMEOUT = 5.0
HANDLER_THREADS = 4
LINGER_SECONDS = 1.0
RECV_BYTES = 64 << 10
KEEPALIVE_REQUESTS = 100

_IN = select.EPOLLIN | select.EPOLLONESHOT
_OUT = select.EPOLLOUT | select.EPOLLONESHOT
_REASONS = {s.value: s.phrase for s in http.HTTPStatus}
_ENCODER = json.JSONEncoder(default=repr, sort_keys=True)
# h11's view of the client once its request has been read to the end.
_REQUEST_READ = (h11.DONE, h11.MUST_CLOSE)


class Request:
    __slots__ = ('method', 'path', 'query', 'headers', 'body', 'client')

    def __init__(self, method, path, query, headers, body, client):
        self.method, self.path, self.query = method, path, query
        self.headers, self.body, self.client = headers, body, client

    def __repr__(self):
        return 'Request(%s %s)' % (self.method, self.path)


class Response:
    def __init__(self, status, body=b'', content_type='application/json',
                 headers=None):
        self.status, self.body = status, body
        self.content_type = content_type
        self.headers = list(headers or ())

    @classmethod
    def json(cls, status, payload, headers=None):
        body = _ENCODER.encode(payload).encode() + b'\n'
        return cls(status, body, 'application/json', headers)

    @classmethod
    def error(cls, status, detail, headers=None, **extra):
        payload = {'error': _REASONS.get(status, 'error').lower(),
                   'status': status, 'detail': detail}
        payload.update(extra)
        return cls.json(status, payload, headers)

    @property
    def reason(self):
        return _REASONS.get(self.status, 'Unknown')

    def fields(self):
        """The header fields of this answer, Connection aside."""
        return [('Content-Type', self.content_type),
                ('Content-Length', str(len(self.body))),
                ('Cache-Control', 'no-store'),
                ('X-Content-Type-Options', 'nosniff')] + self.headers

    def render(self, head=False):
        """The answer with `Connection: close`, head and (unless `head`)
        body as one string of bytes, so it leaves in one send."""
        lines = ['HTTP/1.1 %d %s' % (self.status, self.reason)]
        lines += ['%s: %s' % field for field in self.fields()]
        lines += ['Connection: close', '', '']
        data = '\r\n'.join(lines).encode('latin-1')
        return data if head else data + self.body


def _host(client):
    return client[0] if isinstance(client, tuple) and client else client


# -- the server ---------------------------------------------------------------

class _Conn:
    READING, HANDLING, WRITING, LINGERING = range(4)
    __slots__ = ('sock', 'fd', 'client', 'host', 'parser', 'state',
                 'deadline', 'request_deadline', 'began', 'received',
                 'request', 'body', 'out', 'keep', 'served', 'started',
                 'nodelay', 'evicted', 'registered')

    def __init__(self, sock, client, now, head_timeout, request_timeout):
        self.sock, self.fd, self.client = sock, sock.fileno(), client
        self.host = _host(client)
        self.parser = h11.Connection(
            h11.SERVER, max_incomplete_event_size=MAX_HEADER_BYTES)
        self.state = self.READING
        # The whole request by request_deadline; its head, and the first
        # byte of it, sooner (deadline).
        self.request_deadline = now + request_timeout
        self.deadline = now + min(head_timeout, request_timeout)
        self.began = now        # when the request being read began
        self.received = 0       # bytes given to the parser, all requests
        self.request = None     # the request being read, until it is whole
        self.body = None
        self.out = b''
        self.keep = False
        self.served = 0
        self.started = time.monotonic()
        self.nodelay = self.evicted = self.registered = False

    def waiting(self):
        """Nothing of a next request received yet."""
        parser = self.parser
        return parser.their_state is h11.IDLE and not parser.trailing_data[0]

    def idle(self):
        """Kept alive between two requests: served one, nothing of the next
        one received yet."""
        return self.served and self.waiting()


class HttpServer:
    """Serve `handler` on a listening socket until `should_stop()` is true.

    `handler(Request)` returns a Response, which is sent at once, or a
    callable of no arguments returning one, which a handler thread runs
    (anything that may wait, such as Redis).  Limits: max_body_bytes;
    request_timeout, in seconds (to receive a request, to send its
    answer, and the idle time allowed between requests on a kept-alive
    connection); head_timeout, in seconds (to receive a request's line
    and headers from its first byte, or a first byte from the accept; the
    lower of the two timeouts applies); max_connections open at once and
    max_per_client of them from one client address (see the module's
    docstring for how room is made)."""

    def __init__(self, sock, handler, max_body_bytes, request_timeout,
                 threads=HANDLER_THREADS, max_connections=MAX_CONNECTIONS,
                 keepalive_requests=KEEPALIVE_REQUESTS,
                 head_timeout=HEAD_TIMEOUT, max_per_client=MAX_PER_CLIENT):
        self.sock = sock
        self.sock.setblocking(False)
        self.handler = handler
        self.max_body_bytes = max_body_bytes
        self.request_timeout = request_timeout
        self.head_timeout = head_timeout
        self.max_connections = max_connections
        self.max_per_client = max_per_client
        self.keepalive_requests = keepalive_requests
        self._work = queue.SimpleQueue()
        self._threads = [threading.Thread(target=self._worker, daemon=True,
                                          name='http-%d' % i)
                         for i in range(threads)]
        self._epoll = select.epoll()
        # fd -> _Conn, and how many of them, evicted ones aside, in all and
        # per client address; shared with the handler threads, which close
        # connections: held under _conns_lock, always.
        self._conns = {}
        self._open = 0
        self._per_host = collections.Counter()
        self._conns_lock = threading.Lock()
        self._stopping = False
        self._count_lock = threading.Lock()
        self._requests = 0

    @property
    def address(self):
        return self.sock.getsockname()[:2]

    @property
    def requests(self):
        return self._requests

    # -- the loop -------------------------------------------------------------

    def serve(self, should_stop, tick=None, tick_interval=0.25):
        listen_fd = self.sock.fileno()
        self._epoll.register(listen_fd, select.EPOLLIN)
        for thread in self._threads:
            thread.start()
        lookup = self._lookup
        due = 0.0
        try:
            while not should_stop():
                for fd, _ in self._epoll.poll(tick_interval):
                    if fd == listen_fd:
                        self._accept()
                        continue
                    conn = lookup(fd)
                    if conn is not None:
                        try:
                            self._on_event(conn)
                        except Exception:
                            self._crashed(conn)
                now = time.monotonic()
                if now >= due:
                    due = now + tick_interval
                    self._expire(now)
                    if tick is not None:
                        tick()
        finally:
            self._finish()

    def _finish(self, grace=5.0):
        """Stop accepting; let requests being answered finish; close all."""
        self._stopping = True
        try:
            self._epoll.unregister(self.sock.fileno())
        except (OSError, ValueError):
            pass
        self.sock.close()
        deadline = time.monotonic() + grace
        while time.monotonic() < deadline and any(
                c.state in (_Conn.HANDLING, _Conn.WRITING)
                for c in self._snapshot()):
            for fd, _ in self._epoll.poll(0.05):
                conn = self._lookup(fd)
                if conn is not None:
                    self._on_event(conn)
        while True:   # work not begun is dropped
            try:
                self._work.get_nowait()
            except queue.Empty:
                break
        for _ in self._threads:
            self._work.put(None)
        for conn in self._snapshot():
            self._close(conn)
        self._epoll.close()

    def _on_event(self, conn):
        state = conn.state
        if state == _Conn.READING:
            self._read(conn)
        elif state == _Conn.WRITING:
            self._write(conn)
        elif state == _Conn.LINGERING:
            self._linger(conn)

    def _arm(self, conn, events):
        """Wait for `events` on `conn`, once; the loop takes it from there."""
        try:
            if conn.registered:
                self._epoll.modify(conn.fd, events)
            else:
                conn.registered = True
                self._epoll.register(conn.fd, events)
        except (OSError, ValueError):
            self._close(conn)   # closed under us (server stopping)

    # -- connections ----------------------------------------------------------

    def _lookup(self, fd):
        with self._conns_lock:
            return self._conns.get(fd)

    def _snapshot(self):
        """The open connections, as a list the caller may go through while
        others come and go."""
        with self._conns_lock:
            return list(self._conns.values())

    def _add(self, conn):
        with self._conns_lock:
            self._conns[conn.fd] = conn
            self._open += 1
            self._per_host[conn.host] += 1

    def _uncount(self, conn):
        """Take `conn` out of the counts (lock held): it is on its way out."""
        self._open -= 1
        left = self._per_host[conn.host] - 1
        if left:
            self._per_host[conn.host] = left
        else:
            del self._per_host[conn.host]

    def _accept(self):
        for _ in range(64):
            try:
                sock, client = self.sock.accept()
            except (BlockingIOError, InterruptedError):
                return
            except OSError as exc:
                if exc.errno in (errno.ECONNABORTED, errno.EPROTO):
                    continue
                log.warning('accept failed: %s', exc)
                return
            sock.setblocking(False)
            host = _host(client)
            with self._conns_lock:
                from_host = self._per_host[host]
            if from_host >= self.max_per_client and not self._evict(
                    host, 'for another from %s ([status] max_connections_'
                          'per_client = %d)' % (host, self.max_per_client)):
                self._refuse(sock, 'too many open connections from %s '
                                   '([status] max_connections_per_client = '
                                   '%d)' % (host, self.max_per_client))
                continue
            with self._conns_lock:
                full = self._open >= self.max_connections
            if full and not self._evict(
                    None, '(all %d connection slots taken)'
                          % self.max_connections):
                self._refuse(sock, 'too many open connections (%d)'
                             % self.max_connections)
                continue
            conn = _Conn(sock, client, time.monotonic(), self.head_timeout,
                         self.request_timeout)
            self._add(conn)
            # With TCP_DEFER_ACCEPT (server.py) the request is usually here
            # already: read it now, and use epoll only if it is not.
            try:
                self._read(conn)
            except Exception:
                self._crashed(conn)

    def _crashed(self, conn):
        """A bug met while serving one connection ends that connection,
        not the server."""
        log.exception('error serving %s; connection closed',
                      _host(conn.client))
        self._close(conn)

    def _evict(self, host, why):
        """End one connection (of client address `host`, or of anyone when
        None) to make room; False when none may go.  First the one whose
        request, or silence, began longest ago (a slow client's: it gets a
        408 that says `why`), then the kept-alive one idle longest (closed
        without an answer, as at its idle timeout).  Never one being
        answered.

        Shut down, not closed: a handler thread may be re-arming it this
        very moment, and its descriptor must not be reused under it; the
        loop closes it on the end-of-file this causes."""
        slow = idle = None
        for c in self._snapshot():
            if c.state != _Conn.READING or c.evicted or (
                    host is not None and c.host != host):
                continue
            if c.idle():
                if idle is None or c.deadline < idle.deadline:
                    idle = c
            elif slow is None or c.began < slow.began:
                slow = c   # (began is set while a request is being read)
        conn = slow or idle
        if conn is None:
            return False
        with self._conns_lock:
            if conn.evicted:
                return False
            conn.evicted = True
            self._uncount(conn)
        # Closed by the loop on the end-of-file; at the latest then.
        conn.deadline = time.monotonic() + LINGER_SECONDS
        try:
            if conn is slow:
                conn.sock.send(Response.error(
                    408, 'request not complete after %.1fs; connection '
                         'closed to make room %s' % (
                             time.monotonic() - conn.began, why)).render())
            conn.sock.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass
        return True

    @staticmethod
    def _refuse(sock, why):
        data = Response.error(503, '%s; retry shortly' % why,
                              [('Retry-After', '1')]).render()
        try:
            sock.send(data)
        except OSError:
            pass
        sock.close()

    def _read(self, conn):
        try:
            data = conn.sock.recv(RECV_BYTES)
        except (BlockingIOError, InterruptedError):
            self._arm(conn, _IN)
            return
        except OSError:
            self._close(conn)
            return
        # b'' tells h11 the client closed its side: between requests that
        # is a ConnectionClosed event, within one a RemoteProtocolError.
        conn.received += len(data)
        conn.parser.receive_data(data)
        self._process(conn)

    def _process(self, conn):
        """Go through what h11 has of `conn`'s input, answering or handing
        on each request as it is whole; run by whichever thread holds the
        connection."""
        parser = conn.parser
        while True:
            try:
                event = parser.next_event()
            except h11.RemoteProtocolError as exc:
                self._reject(conn, exc.error_status_hint,
                             'malformed request: %s' % exc)
                return
            kind = type(event)
            if kind is h11.Request:
                if not self._begin(conn, event):
                    return
            elif kind is h11.EndOfMessage:
                if not self._dispatch(conn):
                    return
            elif kind is h11.Data:
                conn.body += event.data
                if len(conn.body) > self.max_body_bytes:
                    self._reject(conn, 413, 'request body larger than %d '
                                            'bytes ([status] max_body_bytes)'
                                 % self.max_body_bytes)
                    return
            elif event is h11.NEED_DATA:
                if parser.they_are_waiting_for_100_continue:
                    self._send_continue(conn)
                if conn.began is None and conn.request is None \
                        and not conn.waiting():
                    # The first bytes of a request: its head must be whole
                    # within head_timeout, whatever time is left besides.
                    conn.began = time.monotonic()
                    conn.deadline = min(conn.request_deadline,
                                        conn.began + self.head_timeout)
                conn.state = _Conn.READING
                self._arm(conn, _IN)
                return
            else:   # ConnectionClosed: the client left between requests
                self._close(conn)
                return

    def _begin(self, conn, event):
        """Take the head of a request (h11.Request); False when it is
        refused."""
        conn.started = time.monotonic()
        if conn.began is None:   # the head came whole with the one before
            conn.began = conn.started
        conn.deadline = conn.request_deadline   # for the body, if any
        # h11 limits a head while it arrives (max_incomplete_event_size);
        # one that came whole in a single read is measured here, once
        # enough bytes have come for any head to be too large.
        if conn.received > MAX_HEADER_BYTES:
            size = len(event.target) + sum(
                len(name) + len(value) + 4
                for name, value in event.headers.raw_items())
            if size > MAX_HEADER_BYTES:
                self._reject(conn, 431, 'request head of %d bytes; the '
                                        'limit is %d' % (size,
                                                         MAX_HEADER_BYTES))
                return False
        # h11 reads any HTTP/x.y (and treats 2.0 as 1.1): HTTP/2 and later
        # are not spoken in this syntax.
        if not event.http_version.startswith(b'1.'):
            self._reject(conn, 505, 'HTTP/%s is not spoken here; HTTP/1.1 '
                                    'is' % event.http_version.decode())
            return False
        headers = {}
        for name, value in event.headers:   # h11 lower-cases the names
            headers.setdefault(name.decode('latin-1'), value.decode('latin-1'))
        length = headers.get('content-length')
        if length is not None:
            if 'transfer-encoding' in headers:
                self._reject(conn, 400, 'both Content-Length and '
                                        'Transfer-Encoding')
                return False
            # Refused before the body comes, and before any 100 Continue.
            if int(length) > self.max_body_bytes:
                self._reject(conn, 413, 'request body of %s bytes; the limit '
                                        'is %d ([status] max_body_bytes)'
                             % (length, self.max_body_bytes))
                return False
        path, _, query = event.target.decode('latin-1').partition('?')
        conn.request = Request(event.method.decode('latin-1'), unquote(path),
                               query, headers, b'', conn.client)
        conn.body = bytearray()
        return True

    @staticmethod
    def _send_continue(conn):
        data = conn.parser.send(h11.InformationalResponse(
            status_code=100, headers=(), reason='Continue'))
        try:
            conn.sock.send(data)
        except OSError:
            pass   # the answer's send finds out

    def _dispatch(self, conn):
        """The request is whole: answer it, or hand it to a handler thread.
        True when it was answered and the connection is kept for the next
        (and still held by this thread)."""
        request = conn.request
        request.body = bytes(conn.body)
        conn.request = conn.body = conn.began = None
        conn.state = _Conn.HANDLING
        try:
            answer = self.handler(request)
        except Exception:
            answer = self._failed(request)
        if isinstance(answer, Response):
            return self._reply(conn, request, answer)
        self._work.put((conn, request, answer))
        return False

    def _worker(self):
        # Daemon threads: one stuck on a dead Redis must not hold up exit.
        get = self._work.get
        while True:
            item = get()
            if item is None:
                return
            try:
                self._handle(*item)
            except Exception:
                self._crashed(item[0])

    def _handle(self, conn, request, work):
        try:
            response = work()
        except Exception:
            response = self._failed(request)
        if self._reply(conn, request, response):
            self._process(conn)

    @staticmethod
    def _failed(request):
        log.exception('error answering %s %s', request.method, request.path)
        return Response.error(500, 'internal error; see the log')

    def _reply(self, conn, request, response):
        """Send `response`; True when the connection is kept for another
        request (and still held by this thread)."""
        conn.served += 1
        head = request.method == 'HEAD'
        # h11 says whether the client allows another request (DONE, not
        # MUST_CLOSE); our limits may end the connection sooner.
        keep = (conn.parser.their_state is h11.DONE and not self._stopping
                and conn.served < self.keepalive_requests)
        if keep:
            data = self._write_kept(conn, response, head)
            conn.parser.start_next_cycle()
        else:
            data = response.render(head)
        level = logging.WARNING if response.status >= 500 else logging.DEBUG
        if log.isEnabledFor(level):
            log.log(level, '%s %s %s -> %d (%.1f ms)', _host(request.client),
                    request.method, request.path, response.status,
                    (time.monotonic() - conn.started) * 1000)
        with self._count_lock:
            self._requests += 1
        if keep and not conn.nodelay:
            # The next answer must not wait for this one's ACK (Nagle).
            conn.nodelay = True
            try:
                conn.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY,
                                     1)
            except OSError:
                pass
        return self._send(conn, data, keep)

    def _write_kept(self, conn, response, head):
        """`response` as h11 writes it, on a connection that stays open."""
        parser = conn.parser
        fields = response.fields() + [
            ('Connection', 'keep-alive'),
            ('Keep-Alive', 'timeout=%d, max=%d' % (
                self.request_timeout,
                self.keepalive_requests - conn.served))]
        data = parser.send(h11.Response(status_code=response.status,
                                        headers=fields,
                                        reason=response.reason))
        if not head:   # h11 knows the answer to HEAD has no body
            data += parser.send(h11.Data(data=response.body))
        return data + parser.send(h11.EndOfMessage())

    def _reject(self, conn, status, detail):
        """Answer a request that is not read to its end (malformed, too
        large, too slow), and close: where the next one would start is
        unknown or not worth finding out."""
        self._send(conn, Response.error(status, detail).render(), False)

    def _send(self, conn, data, keep):
        try:
            sent = conn.sock.send(data)
        except (BlockingIOError, InterruptedError):
            sent = 0
        except OSError:
            self._close(conn)
            return False
        if sent < len(data):
            conn.out = memoryview(data)[sent:]
            conn.keep = keep
            conn.deadline = time.monotonic() + self.request_timeout
            conn.state = _Conn.WRITING
            self._arm(conn, _OUT)
            return False
        return self._sent(conn, keep)

    def _sent(self, conn, keep):
        """The answer is out: ready the connection for the next request
        (True), or close it."""
        conn.out = b''
        if keep:
            conn.deadline = conn.request_deadline = \
                time.monotonic() + self.request_timeout
            return True
        if conn.parser.their_state in _REQUEST_READ:
            # The request was read to its end: unless the client sent
            # more, nothing it sends can be lost to a reset, so close now.
            try:
                more = conn.sock.recv(RECV_BYTES)
            except OSError:
                more = b''
            if not more:
                self._close(conn)
                return False
        # Unread bytes (a refused body, say) would make close() send a
        # reset that can destroy the answer before the client reads it:
        # read and drop them for a while first.
        try:
            conn.sock.shutdown(socket.SHUT_WR)
        except OSError:
            self._close(conn)
            return False
        conn.state = _Conn.LINGERING
        conn.deadline = time.monotonic() + LINGER_SECONDS
        self._arm(conn, _IN)
        return False

    def _write(self, conn):
        try:
            sent = conn.sock.send(conn.out)
        except (BlockingIOError, InterruptedError):
            sent = 0
        except OSError:
            self._close(conn)
            return
        conn.out = conn.out[sent:]
        if conn.out:
            self._arm(conn, _OUT)
        elif self._sent(conn, conn.keep):
            self._process(conn)

    def _linger(self, conn):
        try:
            if conn.sock.recv(RECV_BYTES):
                self._arm(conn, _IN)
                return
        except (BlockingIOError, InterruptedError):
            self._arm(conn, _IN)
            return
        except OSError:
            pass
        self._close(conn)

    def _expire(self, now):
        for conn in self._snapshot():
            if now < conn.deadline:
                continue
            state = conn.state
            if state == _Conn.READING:
                if conn.evicted:
                    # Its end-of-file never came to the loop; no thread
                    # can be re-arming it this long after.
                    self._close(conn)
                    continue
                if conn.idle():
                    # Between requests: no answer is owed (and one sent
                    # now could be taken for the answer to a request
                    # crossing it on the wire).
                    self._close(conn)
                    continue
                conn.state = _Conn.HANDLING   # taken off the loop's hands
                if conn.request is None and \
                        conn.deadline < conn.request_deadline:
                    detail = ('request line and headers not complete within '
                              '%gs ([status] head_timeout)'
                              % self.head_timeout)
                else:
                    detail = ('request not complete within %gs ([status] '
                              'request_timeout)' % self.request_timeout)
                self._reject(conn, 408, detail)
            elif state in (_Conn.WRITING, _Conn.LINGERING):
                self._close(conn)

    def _close(self, conn):
        with self._conns_lock:
            if self._conns.get(conn.fd) is conn:
                del self._conns[conn.fd]
                if not conn.evicted:
                    self._uncount(conn)
        try:
            conn.sock.close()   # leaves epoll with it
        except OSError:
            pass
