"""A fuzz pass over the status endpoint as a real daemon: hand-made hostile
requests (malformed request lines, oversized heads, Content-Length with
Transfer-Encoding, bad chunking, malformed and hostile JSON bodies, slow
and non-reading clients) and a seeded random generator of broken and
mutated requests.  Bad input is answered with a 4xx (or the 501 and 505
HTTP prescribes for an unknown transfer coding and version), never a 500
or a crash, and GET /health/live answers through it all."""
import json
import random
import socket
import threading

import pytest

from ops_helpers import (Client, raw_request, start_status_server, status_of,
                         wait_until)

TOKEN = 'fuzz-token'
AUTH = b'Authorization: Bearer ' + TOKEN.encode() + b'\r\n'
LIVE = b'GET /health/live HTTP/1.1\r\nHost: x\r\n\r\n'

# The 5xx HTTP prescribes for bad input: an unknown transfer coding (501)
# and an HTTP version not spoken (505).  Any other is a server fault.
PRESCRIBED_5XX = {501, 505}


def post(path, body, extra=b''):
    return (b'POST %s HTTP/1.1\r\nHost: x\r\n%sContent-Length: %d\r\n%s\r\n'
            % (path, AUTH, len(body), extra) + body)


def chunked(path, chunks):
    return (b'POST %s HTTP/1.1\r\nHost: x\r\n%sTransfer-Encoding: chunked'
            b'\r\n\r\n' % (path, AUTH) + chunks)


def nested(depth):
    return b'{"task": "add", "args": ' + b'[' * depth + b']' * depth + b'}'


HOSTILE = [
    # Request lines.
    b'GET\r\n\r\n', b'GET /\r\n\r\n', b' / HTTP/1.1\r\nHost: x\r\n\r\n',
    b'GET  /health/live  HTTP/1.1\r\nHost: x\r\n\r\n',
    b'GET /health/live HTTP/1.1 extra\r\nHost: x\r\n\r\n',
    b'GE\x00T / HTTP/1.1\r\nHost: x\r\n\r\n',
    b'GET /\x00 HTTP/1.1\r\nHost: x\r\n\r\n',
    b'GET /tasks/%00%ff%c0%af HTTP/1.1\r\nHost: x\r\n\r\n',
    b'GET /tasks/' + b'%' * 300 + b' HTTP/1.1\r\nHost: x\r\n\r\n',
    b'GET /tasks?' + b'&'.join(b'a%d=1' % i for i in range(500)) +
    b' HTTP/1.1\r\nHost: x\r\n\r\n',
    b'GET /' + b'a' * 20000 + b' HTTP/1.1\r\nHost: x\r\n\r\n',
    b'GET / HTTP/1.1' + b'1' * 100 + b'\r\nHost: x\r\n\r\n',
    b'GET / HTTP/9.9\r\nHost: x\r\n\r\n', b'GET / HTTP/0.9\r\n\r\n',
    b'GET / FTP/1.1\r\nHost: x\r\n\r\n', b'\xff\xfe\xfd\r\n\r\n',
    b'\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03' + bytes(range(64)),
    b'PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n',
    b'\r\n' * 100, b'GET / HTTP/1.1\r\r\rHost: x\r\r\r\r',
    # Header fields: malformed, many, oversized.
    b'GET / HTTP/1.1\r\nHost x\r\n\r\n',
    b'GET / HTTP/1.1\r\nHost: x\r\nBad Name: 1\r\n\r\n',
    b'GET / HTTP/1.1\r\nHost: x\r\n: empty\r\n\r\n',
    b'GET / HTTP/1.1\r\nHost: x\r\nX: a\x00b\r\n\r\n',
    b'GET / HTTP/1.1\r\nHost: x\r\nX: \x7f\x80\xff\r\n\r\n',
    b'GET / HTTP/1.1\r\n Host: x\r\n\r\n',
    b'GET / HTTP/1.1\r\nHost: x\r\n' + b'X: y\r\n' * 3000 + b'\r\n',
    b'GET / HTTP/1.1\r\nHost: x\r\nX: ' + b'v' * 70000 + b'\r\n\r\n',
    b'GET / HTTP/1.1\r\nHost: x\r\n' + b''.join(
        b'X-%d: %s\r\n' % (i, b'v' * 100) for i in range(200)) + b'\r\n',
    b'GET /health/live HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer ' +
    b'\xff' * 100 + b'\r\n\r\n',
    b'GET /queue HTTP/1.1\r\nHost: x\r\nAuthorization: ' + b'B' * 15000 +
    b'\r\n\r\n',
    # Content-Length with Transfer-Encoding, and lengths that lie.
    b'POST /tasks HTTP/1.1\r\nHost: x\r\n' + AUTH +
    b'Content-Length: 3\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nabc\r\n'
    b'0\r\n\r\n',
    b'POST /tasks HTTP/1.1\r\nHost: x\r\n' + AUTH +
    b'Transfer-Encoding: chunked\r\nContent-Length: 3\r\n\r\n3\r\nabc\r\n'
    b'0\r\n\r\n',
    b'POST /tasks HTTP/1.1\r\nHost: x\r\n' + AUTH +
    b'Transfer-Encoding: chunked, chunked\r\n\r\n0\r\n\r\n',
    b'POST /tasks HTTP/1.1\r\nHost: x\r\n' + AUTH +
    b'Transfer-Encoding: identity, chunked\r\n\r\n0\r\n\r\n',
    b'POST /tasks HTTP/1.1\r\nHost: x\r\n' + AUTH +
    b'Transfer-Encoding: xchunked\r\n\r\n0\r\n\r\n',
    b'POST /tasks HTTP/1.1\r\nHost: x\r\n' + AUTH +
    b'Transfer-Encoding : chunked\r\n\r\n0\r\n\r\n',
    b'POST /tasks HTTP/1.1\r\nHost: x\r\n' + AUTH +
    b'Transfer-Encoding: chunked\r\nTransfer-Encoding: chunked\r\n\r\n'
    b'0\r\n\r\n',
    b'GET /health/live HTTP/1.1\r\nHost: x\r\nContent-Length: 5\r\n'
    b'Transfer-Encoding: chunked\r\n\r\n0\r\n\r\nGET /queue HTTP/1.1\r\n'
    b'Host: x\r\n\r\n',
    post(b'/tasks', b'{}', b'Content-Length: 2\r\n'),
    b'POST /tasks HTTP/1.1\r\nHost: x\r\n' + AUTH +
    b'Content-Length: +2\r\n\r\n{}',
    b'POST /tasks HTTP/1.1\r\nHost: x\r\n' + AUTH +
    b'Content-Length: 0x2\r\n\r\n{}',
    b'POST /tasks HTTP/1.1\r\nHost: x\r\n' + AUTH +
    b'Content-Length: 2 2\r\n\r\n{}',
    b'POST /tasks HTTP/1.1\r\nHost: x\r\n' + AUTH +
    b'Content-Length: -1\r\n\r\n{}',
    b'POST /tasks HTTP/1.1\r\nHost: x\r\n' + AUTH +
    b'Content-Length: 99999999999999999999999999\r\n\r\n{}',
    b'POST /tasks HTTP/1.1\r\nHost: x\r\n' + AUTH +
    b'Content-Length: 50\r\n\r\n{}',       # shorter than it says
    b'POST /tasks HTTP/1.1\r\nHost: x\r\n' + AUTH +
    b'Content-Length: 2\r\n\r\n{}GARBAGE AFTER THE BODY\r\n\r\n',
    # Bad chunking.
    chunked(b'/tasks', b'-1\r\nabc\r\n0\r\n\r\n'),
    chunked(b'/tasks', b'fffffffffffffffffffffff\r\nabc\r\n0\r\n\r\n'),
    chunked(b'/tasks', b'3 \r\nabc\r\n0\r\n\r\n'),
    chunked(b'/tasks', b'0x3\r\nabc\r\n0\r\n\r\n'),
    chunked(b'/tasks', b'2\r\nabc\r\n0\r\n\r\n'),
    chunked(b'/tasks', b'5\r\nabc\r\n0\r\n\r\n'),
    chunked(b'/tasks', b'3;' + b'e' * 20000 + b'\r\nabc\r\n0\r\n\r\n'),
    chunked(b'/tasks', b'2\r\n{}\r\n0\r\n' + b'T: t\r\n' * 5000 + b'\r\n'),
    chunked(b'/tasks', b'2\r\n{}\r\n0\r\n'),          # no last CRLF
    chunked(b'/tasks', b'2\n{}\n0\n\n'),
    chunked(b'/tasks', b'\r\n'),
    chunked(b'/tasks', b'1\r\n{\r\n' * 5000 + b'0\r\n\r\n'),
    # Malformed and hostile JSON bodies (with the token: they reach the
    # route's own checks).
    post(b'/tasks', b''), post(b'/tasks', b'{'), post(b'/tasks', b'nul'),
    post(b'/tasks', b'[' * 300000),                        # too large
    chunked(b'/tasks', b'10000\r\n' + b'[' * 0x10000 + b'\r\n' * 5),
    post(b'/tasks', b'\xef\xbb\xbf{"task": "add"}'),      # a BOM
    post(b'/tasks', b'{"task": "\xff\xfe"}'),               # not UTF-8
    post(b'/tasks', b'{"task": "\\ud800"}'),                # lone surrogate
    post(b'/tasks', b'{"task": "add", "task": "boom"}'),
    post(b'/tasks', b'[' * 5000 + b']' * 5000),
    post(b'/tasks', b'{"a":' * 5000 + b'1' + b'}' * 5000),
    post(b'/tasks', nested(990)), post(b'/tasks', nested(200)),
    post(b'/tasks', b'{"task": "add", "kwargs": {"a": ' + b'{"b": ' * 900 +
         b'1' + b'}' * 901 + b'}'),
    post(b'/tasks', b'{"task": "add", "args": [' + b'1' * 5000 + b']}'),
    post(b'/tasks', b'{"task": "add", "args": [1e999999, -1e999999]}'),
    post(b'/tasks', b'{"task": "add", "args": [NaN, Infinity]}'),
    post(b'/tasks', b'{"task": "add", "delay": NaN}'),
    post(b'/tasks', b'{"task": "add", "delay": Infinity}'),
    post(b'/tasks', b'{"task": "add", "delay": -1}'),
    post(b'/tasks', b'{"task": "add", "delay": true}'),
    post(b'/tasks', b'{"task": {"$gt": ""}}'),
    post(b'/tasks', b'{"task": "add", "id": "../../etc/passwd"}'),
    post(b'/tasks', b'{"task": "add", "id": ""}'),
    post(b'/tasks', b'{"task": "' + b'a.' * 5000 + b'"}'),
    post(b'/tasks', b'{"task": "add", "args": [' +
         b','.join(b'"%d"' % i for i in range(20000)) + b']}'),
    post(b'/tasks', b'{"task": "add", "kwargs": {"": 1, "\\u0000": 2}}'),
    post(b'/tasks', b'{"task": "add", "args": "notalist"}'),
    post(b'/tasks/x/revoke', b'{'), post(b'/tasks/x/revoke', b'[' * 5000),
    post(b'/dead-letters/requeue', b'{"all": "true"}'),
    post(b'/dead-letters/requeue', b'{"ids": [' +
         b','.join(b'"%d"' % i for i in range(20000)) + b']}'),
    post(b'/dead-letters/purge', b'{"ids": [], "all": true}'),
    post(b'/dead-letters/purge', b'{"ids": [1, null, {}]}'),
    post(b'/dead-letters/purge', b'{"queue": "' + b'q' * 5000 + b'"}'),
    post(b'/dead-letters/purge', b'{"ids": ["x"], "queue": ["a"]}'),
]


class SlowClients:
    """Clients that send requests a few bytes at a time (`answers` gets the
    status each is answered with), and one that sends requests without
    ever reading the answers."""

    REQUESTS = [post(b'/tasks', b'{"task": "add", "args": [1, 2]}'),
                chunked(b'/tasks', b'1\r\n{\r\n1\r\n}\r\n0\r\n\r\n'),
                b'GET /queue HTTP/1.1\r\nHost: x\r\n' + b'X: y\r\n' * 50]

    def __init__(self, port, count, step=3):
        self.port, self.count, self.step = port, count, step
        self.answers = []
        self.stopping = threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)

    def __enter__(self):
        self.thread.start()
        return self

    def __exit__(self, *exc):
        self.stopping.set()
        self.thread.join(30)

    def _run(self):
        clients = []
        greedy = socket.create_connection(('127.0.0.1', self.port))
        greedy.setblocking(False)
        try:
            for i in range(self.count):
                s = socket.create_connection(('127.0.0.1', self.port))
                s.setblocking(False)
                clients.append([s, self.REQUESTS[i % len(self.REQUESTS)]])
            while not self.stopping.wait(0.2):
                try:   # pipelined requests, answers never read
                    greedy.send(b'GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n'
                                * 10)
                except OSError:
                    pass
                for client in list(clients):
                    s, rest = client
                    try:
                        answer = s.recv(65536)
                    except BlockingIOError:
                        answer = None
                    except OSError:
                        answer = b''
                    if answer is not None:
                        self.answers.append(status_of(answer))
                        clients.remove(client)
                        s.close()
                        continue
                    if rest:
                        try:
                            s.send(rest[:self.step])
                        except OSError:
                            pass
                        client[1] = rest[self.step:]
        finally:
            greedy.close()
            for s, _ in clients:
                s.close()


def answer_of(data, attempts=3):
    """The answer to `data` sent on a new connection (b'' when the server
    closed it without one).  A reset while sending a large request whose
    head the server already refused is retried: the refusal itself is the
    answer looked for."""
    for _ in range(attempts):
        try:
            return raw_request(data=data, port=answer_of.port, timeout=15)
        except (ConnectionResetError, BrokenPipeError):
            continue
    return b''


def mutate(rng, data):
    """`data` with a few random byte-level changes."""
    data = bytearray(data)
    for _ in range(rng.randint(1, 4)):
        where = rng.randrange(len(data) + 1)
        roll = rng.random()
        if roll < 0.3 and data:
            del data[where:where + rng.randint(1, 8)]
        elif roll < 0.6:
            data[where:where] = bytes(rng.getrandbits(8)
                                      for _ in range(rng.randint(1, 8)))
        elif roll < 0.8:
            data[where:where] = rng.choice([b'\r\n', b'\n', b'\r', b'\x00',
                                            b' ', b':', b'\r\n\r\n', b'%',
                                            b'Transfer-Encoding: chunked\r\n',
                                            b'Content-Length: 7\r\n'])
        elif data:
            cut = rng.randrange(len(data))
            data = data[:cut]
    return bytes(data)


FUZZ_PATHS = ['/', '/health/live', '/queue', '/workers', '/metrics',
              '/tasks', '/tasks/abc', '/tasks/' + 'x' * 300,
              '/tasks/a%2Fb', '/tasks/../queue', '//queue', '/queue/',
              '/tasks?state=bogus', '/tasks?limit=-1', '/tasks?limit=abc',
              '/tasks?limit=5&limit=6', '/tasks?%zz', '/metrics?', '*',
              'http://127.0.0.1/health/live', '/tasks/\u00e9t\u00e9',
              '/api/collect/task/x', '/dead-letters?limit=0',
              '/dead-letters/requeue', '/dead-letters/purge',
              '/tasks/abc/revoke', '/api/collect/task/', '/tasks/', '//',
              '/..', '/tasks/%00', '/tasks/%ZZ', '/%2e%2e/etc/passwd',
              '/tasks?limit=0', '/tasks?queue=other', '/queue?x=1']
FUZZ_METHODS = ['GET', 'POST', 'PUT', 'DELETE', 'HEAD', 'OPTIONS', 'PATCH',
                'TRACE', 'CONNECT', 'get', 'BREW']
FUZZ_BODIES = [{'task': 'add', 'args': [1, 2]}, {'task': 'nosuch'}, [],
               {'task': 'add', 'args': [[[[1]]]], 'kwargs': {'a': None}},
               {'task': 'x' * 1000}, 'just a string', None, 12,
               {'task': 'add', 'delay': 1e308}, {'ids': ['a', 'b']},
               {'all': True}, {'all': True, 'ids': ['a']}]


def fuzz_request(rng):
    """A random request, well-formed or not; sometimes mutated bytes."""
    method = rng.choice(FUZZ_METHODS)
    path = rng.choice(FUZZ_PATHS)
    headers = [('Host', 'localhost')]
    roll = rng.random()
    body = b''
    if roll < 0.3:
        body = json.dumps(rng.choice(FUZZ_BODIES)).encode()
    elif roll < 0.4:
        depth = rng.choice([10, 500, 2000])
        body = b'[' * depth + b']' * depth
    elif roll < 0.5:
        body = bytes(rng.getrandbits(8) for _ in range(rng.randint(1, 300)))
    if rng.random() < 0.6:
        headers.append(('Authorization', rng.choice([
            'Bearer ' + TOKEN, 'Bearer wrong', 'Basic abc', 'Bearer', '',
            'bearer ' + TOKEN, 'Bearer ' + TOKEN + '\u00e9'])))
    if rng.random() < 0.2:
        headers.append(('X-' + 'h' * rng.randint(1, 50),
                        'v' * rng.randint(0, 2000)))
    if rng.random() < 0.1:
        headers.append(('Transfer-Encoding', 'chunked'))
        body = b'%x\r\n%s\r\n0\r\n\r\n' % (len(body), body) if \
            rng.random() < 0.5 else b'zz\r\n' + body
    elif body or method in ('POST', 'PUT'):
        length = len(body) if rng.random() < 0.9 else rng.choice(
            [0, len(body) + 5, -1, 'x'])
        headers.append(('Content-Length', str(length)))
    head = '%s %s HTTP/1.1\r\n' % (method, path)
    head += ''.join('%s: %s\r\n' % h for h in headers) + '\r\n'
    data = head.encode('utf-8') + body
    roll = rng.random()
    if roll < 0.3:
        data = mutate(rng, data)
    elif roll < 0.35:
        data = bytes(rng.getrandbits(8) for _ in range(rng.randint(1, 200)))
    return data


def check_answer(request, answer, seen):
    if not request:
        assert answer == b''   # nothing asked, nothing answered
        return
    status = status_of(answer)
    assert status is not None, (request[:300], answer[:300])
    assert status < 500 or status in PRESCRIBED_5XX, (request[:300],
                                                      answer[:300])
    if status >= 400:
        # Errors are JSON; the first answer on the connection is checked.
        head, _, rest = answer.partition(b'\r\n\r\n')
        length = int(head.split(b'Content-Length: ')[1].split(b'\r\n')[0])
        if not request.startswith(b'HEAD '):
            assert 'error' in json.loads(rest[:length])
    seen[status] = seen.get(status, 0) + 1


@pytest.fixture
def server(base_env, start_daemon):
    env = dict(base_env, HUEY_STATUS_TOKEN=TOKEN,
               HUEY_WORKER_STATUS_MAX_BODY_BYTES='200000',
               HUEY_WORKER_STATUS_REQUEST_TIMEOUT='2',
               HUEY_WORKER_STATUS_HEAD_TIMEOUT='1')
    daemon, port = start_status_server(start_daemon, env)
    answer_of.port = port
    return daemon, port


def test_hostile_and_random_requests(server):
    daemon, port = server
    client = Client(port, token=TOKEN)
    seen = {}
    with SlowClients(port, 20) as slow:
        for request in HOSTILE:
            check_answer(request, answer_of(request), seen)
            assert status_of(answer_of(LIVE)) == 200
        rng = random.Random(20261122)
        for n in range(2000):
            request = fuzz_request(rng)
            check_answer(request, answer_of(request), seen)
            if n % 50 == 0:
                assert status_of(answer_of(LIVE)) == 200
        # Slow clients are turned away once [status] head_timeout is over;
        # liveness is answered meanwhile.
        def all_answered():
            assert status_of(answer_of(LIVE)) == 200
            return len(slow.answers) >= slow.count
        wait_until(all_answered, timeout=30, interval=0.1,
                   what='answers to the slow clients')
    assert slow.answers == [408] * slow.count
    # The generator reached the routes, not only the parser.
    assert {200, 202, 400, 401, 404, 405, 413, 431} <= set(seen), seen
    assert daemon.proc.poll() is None
    assert client.get('/health/live')[0] == 200
    assert client.get('/queue')[0] == 200
    output = daemon.output()
    assert 'Traceback' not in output and 'error answering' not in output
