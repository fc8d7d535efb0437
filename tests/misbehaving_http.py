"""A local HTTP server (127.0.0.1 unless told another address: 127.0.0.2,
::1) that misbehaves on purpose, for the collect, pdf.extract and fetch
guard tests.  It also serves requests in proxy form (GET http://host/path):
the path decides, the log keeps what was asked.

Routes (query parameters in brackets):
  /ok/NAME [size, type]          200, `size` bytes of content type `type`
  /slow/NAME [delay]             sleeps, then 200
  /flaky/KEY [fail, code]        `code` (500) the first `fail` times, then 200
  /ratelimited/KEY [after]       429 with Retry-After: `after` once, then 200
  /truncated/NAME [declared, sent]  Content-Length `declared`, sends `sent`
  /oversized/NAME [size, length] `size` bytes; Content-Length only if length=1
  /loop/a, /loop/b               redirect to each other
  /chain/N                       redirects N times, then 200
  /redirect [to, code]           `code` (302) redirect to the URL `to`
  /wrongtype/NAME                200 with application/x-msdownload
  /inflight/NAME [delay]         200 after `delay`; counts requests in flight
  /api/next [page, pages, per]   JSON {"items": [...], "next": link or null}
  /api/number [page, pages, per] JSON {"data": {"items": [...]}}; empty after
  /api/link [page, pages]        JSON list; next page in a Link header
  /api/loop                      JSON whose next link points to itself
  /api/notjson                   200 application/json that is not JSON
  /file/NAME                     bytes registered with serve_bytes()
Every request is logged (path, arrival time) for the tests to inspect.
"""
import json
import socket
import threading
import time
from collections import Counter
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import parse_qs, urlsplit


class Server(ThreadingHTTPServer):
    daemon_threads = True

    def __init__(self, host='127.0.0.1', port=0):
        if ':' in host:
            self.address_family = socket.AF_INET6
        super().__init__((host, port), Handler)
        self.lock = threading.Lock()
        self.log = []              # (path, monotonic arrival time)
        self.hits = Counter()      # path without query -> requests
        self.in_flight = 0
        self.max_in_flight = 0
        self.files = {}            # name -> (bytes, content type)
        self.thread = threading.Thread(target=self.serve_forever,
                                       kwargs={'poll_interval': 0.05},
                                       daemon=True)

    @property
    def port(self):
        return self.server_address[1]

    @property
    def base(self):
        host = self.server_address[0]
        return 'http://%s:%d' % ('[%s]' % host if ':' in host else host,
                                 self.port)

    def url(self, path):
        return self.base + path

    def serve_bytes(self, name, data, content_type='application/pdf'):
        self.files[name] = (data, content_type)
        return self.url('/file/' + name)

    def arrivals(self, prefix):
        with self.lock:
            return [t for p, t in self.log if p.startswith(prefix)]

    def count(self, path):
        with self.lock:
            return self.hits[path]

    def start(self):
        self.thread.start()
        return self

    def stop(self):
        self.shutdown()
        self.server_close()


def _items(page, per):
    return [{'id': 'item-%d-%d' % (page, i), 'page': page, 'n': i,
             'title': 'Item %d of page %d' % (i, page)}
            for i in range(1, per + 1)]


class Handler(BaseHTTPRequestHandler):
    protocol_version = 'HTTP/1.0'   # one request per connection: simple

    def log_message(self, *args):
        pass

    def do_GET(self):
        parts = urlsplit(self.path)
        q = {k: v[-1] for k, v in parse_qs(parts.query).items()}
        path = parts.path
        server = self.server
        with server.lock:
            server.log.append((self.path, time.monotonic()))
            server.hits[path] += 1
            hits = server.hits[path]
        route = path.split('/')[1] if '/' in path else ''
        handler = getattr(self, 'route_' + route.replace('-', '_'), None)
        if handler is None:
            return self.send_body(b'not found', 'text/plain', 404)
        try:
            handler(path, q, hits)
        except (BrokenPipeError, ConnectionResetError):
            pass

    # -- helpers -------------------------------------------------------------

    def send_body(self, body, content_type='text/plain', status=200,
                  headers=None, length=True):
        self.send_response(status)
        self.send_header('Content-Type', content_type)
        if length:
            self.send_header('Content-Length', str(len(body)))
        for name, value in (headers or {}).items():
            self.send_header(name, value)
        self.end_headers()
        self.wfile.write(body)

    def send_json(self, value, headers=None):
        self.send_body(json.dumps(value).encode(), 'application/json',
                       headers=headers)

    def redirect(self, location, status=302):
        self.send_response(status)
        self.send_header('Location', location)
        self.send_header('Content-Length', '0')
        self.end_headers()

    # -- routes --------------------------------------------------------------

    def route_ok(self, path, q, hits):
        size = int(q.get('size', 100))
        body = (path.encode() + b'\n') * (size // (len(path) + 1) + 1)
        self.send_body(body[:size], q.get('type', 'text/plain'))

    def route_slow(self, path, q, hits):
        time.sleep(float(q.get('delay', 2)))
        self.send_body(b'finally', 'text/plain')

    def route_flaky(self, path, q, hits):
        if hits <= int(q.get('fail', 2)):
            return self.send_body(b'try again', 'text/plain',
                                  int(q.get('code', 500)))
        self.send_body(b'worked after %d' % hits, 'text/plain')

    def route_ratelimited(self, path, q, hits):
        if hits == 1:
            return self.send_body(b'slow down', 'text/plain', 429,
                                  {'Retry-After': q.get('after', '1')})
        self.send_body(b'thanks for waiting', 'text/plain')

    def route_truncated(self, path, q, hits):
        declared, sent = int(q.get('declared', 1000)), int(q.get('sent', 500))
        self.send_response(200)
        self.send_header('Content-Type', 'text/plain')
        self.send_header('Content-Length', str(declared))
        self.end_headers()
        self.wfile.write(b'x' * sent)
        self.wfile.flush()
        self.close_connection = True

    def route_oversized(self, path, q, hits):
        size = int(q.get('size', 4096))
        self.send_body(b'y' * size, 'text/plain',
                       length=q.get('length', '1') == '1')

    def route_loop(self, path, q, hits):
        self.redirect('/loop/b' if path == '/loop/a' else '/loop/a')

    def route_chain(self, path, q, hits):
        left = int(path.rsplit('/', 1)[1])
        if left > 0:
            return self.redirect('/chain/%d' % (left - 1), 301)
        self.send_body(b'end of the chain', 'text/plain')

    def route_redirect(self, path, q, hits):
        self.redirect(q['to'], int(q.get('code', 302)))

    def route_wrongtype(self, path, q, hits):
        self.send_body(b'MZ\x90\x00', 'application/x-msdownload')

    def route_inflight(self, path, q, hits):
        server = self.server
        with server.lock:
            server.in_flight += 1
            server.max_in_flight = max(server.max_in_flight,
                                       server.in_flight)
        try:
            time.sleep(float(q.get('delay', 0.3)))
        finally:
            with server.lock:
                server.in_flight -= 1
        self.send_body(b'done', 'text/plain')

    def route_api(self, path, q, hits):
        kind = path.split('/')[2]
        page = int(q.get('page', 1))
        pages = int(q.get('pages', 3))
        per = int(q.get('per', 4))
        if kind == 'next':
            nxt = '/api/next?page=%d&pages=%d&per=%d' % (page + 1, pages, per)
            return self.send_json({'items': _items(page, per),
                                   'next': nxt if page < pages else None})
        if kind == 'number':
            items = _items(page, per) if page <= pages else []
            return self.send_json({'data': {'items': items}, 'page': page})
        if kind == 'link':
            headers = {}
            if page < pages:
                headers['Link'] = '</api/link?page=%d&pages=%d>; rel="next"' \
                    % (page + 1, pages)
            return self.send_json(_items(page, 2), headers)
        if kind == 'loop':
            return self.send_json({'items': _items(1, 1),
                                   'next': '/api/loop'})
        if kind == 'notjson':
            return self.send_body(b'{"items": [', 'application/json')
        self.send_body(b'no such api', 'text/plain', 404)

    def route_file(self, path, q, hits):
        name = path.split('/', 2)[2]
        if name not in self.server.files:
            return self.send_body(b'no such file', 'text/plain', 404)
        data, content_type = self.server.files[name]
        self.send_body(data, content_type)
