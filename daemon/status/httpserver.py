"""A small HTTP/1.1 server for the status endpoint: one selector thread does
all socket I/O, a few handler threads run complete requests.

Why this shape: a slow or half-open client costs a buffer in the selector
loop, never a thread, so it cannot block the others; a request reaches a
handler only once it is whole (headers within MAX_HEADER_BYTES, body
within max_body_bytes, both within request_timeout).  Parsing is h11's.
Every response closes its connection (polling clients and Prometheus do
not need keep-alive), after a short lingering read so a client still
sending a refused body sees the answer rather than a reset.
"""
import collections
import http
import json
import logging
import queue
import selectors
import socket
import time
from concurrent.futures import ThreadPoolExecutor
from urllib.parse import unquote

import h11

log = logging.getLogger('huey_worker.status')

MAX_HEADER_BYTES = 16 << 10
MAX_CONNECTIONS = 256
HANDLER_THREADS = 4
LINGER_SECONDS = 1.0
RECV_BYTES = 64 << 10

Request = collections.namedtuple(
    'Request', 'method path query headers body client')


class Response:
    def __init__(self, status, body=b'', content_type='application/json',
                 headers=None):
        self.status, self.body = status, body
        self.content_type = content_type
        self.headers = list(headers or ())

    @classmethod
    def json(cls, status, payload, headers=None):
        body = json.dumps(payload, default=repr, sort_keys=True).encode() \
            + b'\n'
        return cls(status, body, 'application/json', headers)

    @classmethod
    def error(cls, status, detail, headers=None, **extra):
        payload = {'error': http.HTTPStatus(status).phrase.lower(),
                   'status': status, 'detail': detail}
        payload.update(extra)
        return cls.json(status, payload, headers)

    def render(self, head=False):
        try:
            reason = http.HTTPStatus(self.status).phrase
        except ValueError:
            reason = 'Unknown'
        lines = ['HTTP/1.1 %d %s' % (self.status, reason),
                 'Content-Type: %s' % self.content_type,
                 'Content-Length: %d' % len(self.body),
                 'Cache-Control: no-store',
                 'X-Content-Type-Options: nosniff',
                 'Connection: close']
        lines += ['%s: %s' % (k, v) for k, v in self.headers]
        data = ('\r\n'.join(lines) + '\r\n\r\n').encode('latin-1')
        return data if head else data + self.body


class _Conn:
    READING, HANDLING, WRITING, LINGERING = range(4)

    def __init__(self, sock, client, deadline):
        self.sock, self.client = sock, client
        self.parser = h11.Connection(h11.SERVER,
                                     max_incomplete_event_size=MAX_HEADER_BYTES)
        self.state = self.READING
        self.deadline = deadline
        self.request = None
        self.body = bytearray()
        self.out = b''
        self.received = 0
        self.started = time.monotonic()


class HttpServer:
    """Serve `handler(Request) -> Response` on a listening socket until
    `should_stop()` is true.  `limits`: max_body_bytes, request_timeout."""

    def __init__(self, sock, handler, max_body_bytes, request_timeout,
                 threads=HANDLER_THREADS, max_connections=MAX_CONNECTIONS):
        self.sock = sock
        self.sock.setblocking(False)
        self.handler = handler
        self.max_body_bytes = max_body_bytes
        self.request_timeout = request_timeout
        self.max_connections = max_connections
        self._pool = ThreadPoolExecutor(threads, thread_name_prefix='http')
        self._done = queue.SimpleQueue()
        self._wake_r, self._wake_w = socket.socketpair()
        self._wake_r.setblocking(False)
        self._wake_w.setblocking(False)
        self._sel = selectors.DefaultSelector()
        self._conns = {}
        self.requests = 0

    @property
    def address(self):
        return self.sock.getsockname()[:2]

    # -- the loop -------------------------------------------------------------

    def serve(self, should_stop, tick=None, tick_interval=0.25):
        sel = self._sel
        sel.register(self.sock, selectors.EVENT_READ, 'accept')
        sel.register(self._wake_r, selectors.EVENT_READ, 'wake')
        try:
            while not should_stop():
                for key, mask in sel.select(tick_interval):
                    if key.data == 'accept':
                        self._accept()
                    elif key.data == 'wake':
                        self._drain_wake()
                    else:
                        self._on_event(key.data, mask)
                self._collect_done()
                self._expire()
                if tick is not None:
                    tick()
        finally:
            self._finish()

    def _finish(self, grace=5.0):
        """Stop accepting; let requests being handled answer; close all."""
        try:
            self._sel.unregister(self.sock)
        except (KeyError, ValueError):
            pass
        self.sock.close()
        deadline = time.monotonic() + grace
        while time.monotonic() < deadline and any(
                c.state in (_Conn.HANDLING, _Conn.WRITING)
                for c in self._conns.values()):
            for key, mask in self._sel.select(0.05):
                if key.data == 'wake':
                    self._drain_wake()
                elif key.data != 'accept':
                    self._on_event(key.data, mask)
            self._collect_done()
        for conn in list(self._conns.values()):
            self._close(conn)
        self._pool.shutdown(wait=False, cancel_futures=True)
        self._sel.close()
        self._wake_r.close()
        self._wake_w.close()

    # -- connections ------------------------------------------------------------

    def _accept(self):
        for _ in range(64):
            try:
                sock, client = self.sock.accept()
            except (BlockingIOError, InterruptedError):
                return
            except OSError as exc:
                log.warning('accept failed: %s', exc)
                return
            sock.setblocking(False)
            if len(self._conns) >= self.max_connections:
                self._refuse(sock)
                continue
            conn = _Conn(sock, client, time.monotonic() + self.request_timeout)
            self._conns[sock.fileno()] = conn
            self._sel.register(sock, selectors.EVENT_READ, conn)

    @staticmethod
    def _refuse(sock):
        data = Response.error(503, 'too many open connections; retry '
                                   'shortly', [('Retry-After', '1')]).render()
        try:
            sock.send(data)
        except OSError:
            pass
        sock.close()

    def _on_event(self, conn, mask):
        if conn.state == _Conn.READING and mask & selectors.EVENT_READ:
            self._read(conn)
        elif conn.state == _Conn.WRITING and mask & selectors.EVENT_WRITE:
            self._write(conn)
        elif conn.state == _Conn.LINGERING:
            self._linger(conn)
        elif conn.state == _Conn.HANDLING:
            pass  # a client closing early is seen when the answer is sent

    def _read(self, conn):
        try:
            data = conn.sock.recv(RECV_BYTES)
        except (BlockingIOError, InterruptedError):
            return
        except OSError:
            self._close(conn)
            return
        if not data and not conn.received:
            self._close(conn)   # opened and closed without a word
            return
        conn.received += len(data)
        try:
            conn.parser.receive_data(data)
            self._parse(conn)
        except h11.RemoteProtocolError as exc:
            status = exc.error_status_hint or 400
            self._respond(conn, Response.error(
                status, 'malformed request: %s' % exc))

    def _parse(self, conn):
        while conn.state == _Conn.READING:
            event = conn.parser.next_event()
            if event is h11.NEED_DATA:
                return
            if isinstance(event, h11.Request):
                conn.request = event
                # h11 limits only a head still arriving; one that came
                # whole in a single read is measured here.
                size = len(event.target) + sum(
                    len(k) + len(v) + 4 for k, v in event.headers)
                if size > MAX_HEADER_BYTES:
                    self._respond(conn, Response.error(
                        431, 'request head of %d bytes; the limit is %d' % (
                            size, MAX_HEADER_BYTES)))
                    return
                length = _content_length(event.headers)
                if length is not None and length > self.max_body_bytes:
                    self._respond(conn, Response.error(
                        413, 'request body of %d bytes; the limit is %d '
                             '([status] max_body_bytes)' % (
                                 length, self.max_body_bytes)))
                    return
                if conn.parser.they_are_waiting_for_100_continue:
                    try:
                        conn.sock.send(b'HTTP/1.1 100 Continue\r\n\r\n')
                    except OSError:
                        pass
            elif isinstance(event, h11.Data):
                conn.body += event.data
                if len(conn.body) > self.max_body_bytes:
                    self._respond(conn, Response.error(
                        413, 'request body larger than %d bytes ([status] '
                             'max_body_bytes)' % self.max_body_bytes))
                    return
            elif isinstance(event, h11.EndOfMessage):
                self._dispatch(conn)
                return
            elif isinstance(event, h11.ConnectionClosed):
                self._close(conn)
                return

    def _dispatch(self, conn):
        conn.state = _Conn.HANDLING
        # Not watched while handled: a client that closes or sends more
        # would otherwise wake the loop over and over.
        self._sel.unregister(conn.sock)
        event = conn.request
        target = event.target.decode('latin-1')
        path, _, query = target.partition('?')
        headers = {}
        for name, value in event.headers:
            headers.setdefault(name.decode('latin-1').lower(),
                               value.decode('latin-1'))
        request = Request(event.method.decode('latin-1'), unquote(path),
                          query, headers, bytes(conn.body), conn.client)
        self._pool.submit(self._handle, conn, request)

    def _handle(self, conn, request):
        try:
            response = self.handler(request)
        except Exception:
            log.exception('error answering %s %s', request.method,
                          request.path)
            response = Response.error(500, 'internal error; see the log')
        data = response.render(head=request.method == 'HEAD')
        level = logging.WARNING if response.status >= 500 else logging.DEBUG
        log.log(level, '%s %s %s -> %d (%.1f ms)', request.client[0],
                request.method, request.path, response.status,
                (time.monotonic() - conn.started) * 1000)
        self._done.put((conn, data))
        try:
            self._wake_w.send(b'x')
        except OSError:
            pass   # the pipe is full: the loop is awake already

    def _drain_wake(self):
        try:
            while self._wake_r.recv(4096):
                pass
        except (BlockingIOError, InterruptedError):
            pass

    def _collect_done(self):
        while True:
            try:
                conn, data = self._done.get_nowait()
            except queue.Empty:
                return
            self.requests += 1
            if self._conns.get(conn.sock.fileno()) is conn:
                self._start_write(conn, data)

    def _respond(self, conn, response):
        self._start_write(conn, response.render())

    def _start_write(self, conn, data):
        conn.state = _Conn.WRITING
        conn.out = data
        conn.deadline = time.monotonic() + self.request_timeout
        self._watch(conn, selectors.EVENT_WRITE)
        self._write(conn)

    def _watch(self, conn, events):
        try:
            self._sel.modify(conn.sock, events, conn)
        except KeyError:
            self._sel.register(conn.sock, events, conn)

    def _write(self, conn):
        try:
            sent = conn.sock.send(conn.out)
        except (BlockingIOError, InterruptedError):
            return
        except OSError:
            self._close(conn)
            return
        conn.out = conn.out[sent:]
        if conn.out:
            return
        try:
            conn.sock.shutdown(socket.SHUT_WR)
        except OSError:
            self._close(conn)
            return
        conn.state = _Conn.LINGERING
        conn.deadline = time.monotonic() + LINGER_SECONDS
        self._watch(conn, selectors.EVENT_READ)

    def _linger(self, conn):
        try:
            if conn.sock.recv(RECV_BYTES):
                return
        except (BlockingIOError, InterruptedError):
            return
        except OSError:
            pass
        self._close(conn)

    def _expire(self):
        now = time.monotonic()
        for conn in list(self._conns.values()):
            if now < conn.deadline or conn.state == _Conn.HANDLING:
                continue
            if conn.state == _Conn.READING:
                self._respond(conn, Response.error(
                    408, 'request not complete within %gs ([status] '
                         'request_timeout)' % self.request_timeout))
                conn.deadline = now + 1.0   # one second to take the 408
                continue
            self._close(conn)

    def _close(self, conn):
        fd = conn.sock.fileno()
        if fd >= 0:
            try:
                self._sel.unregister(conn.sock)
            except (KeyError, ValueError):
                pass
            self._conns.pop(fd, None)
        conn.sock.close()


def _content_length(headers):
    for name, value in headers:
        if name == b'content-length':
            try:
                return int(value)
            except ValueError:
                return None
    return None
