"""Issue 19, the web console's routes over real HTTP against a real
status-server and Redis: the page and every asset it loads, served from
the package with the right types and a strict Content-Security-Policy, no
inline script or style, the vendored chart library as its NOTICE records
it, the token rules (beyond loopback the page loads without it, its data
does not), and the two JSON routes the console adds (GET /activity,
GET /periodic) with real tasks."""
import hashlib
import html.parser
import os
import re
import time

import pytest

from ops_helpers import Client, start_status_server, wait_for_state

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ASSETS = os.path.join(ROOT, 'daemon', 'status', 'console', 'assets')


@pytest.fixture
def env(base_env):
    return dict(base_env, HUEY_MODULES='sample_tasks,actions_tasks',
                HUEY_STATUS_TOKEN='t0ken-for-the-console')


@pytest.fixture
def server(env, start_daemon):
    _, port = start_status_server(start_daemon, env)
    return Client(port)


class PageParser(html.parser.HTMLParser):
    """What the page loads, and anything inline it must not have."""

    def __init__(self):
        super().__init__()
        self.scripts, self.links, self.inline = [], [], []
        self._in_script = False

    def handle_starttag(self, tag, attrs):
        attrs = dict(attrs)
        for name in attrs:
            if name.startswith('on') or name == 'style':
                self.inline.append('%s %s=' % (tag, name))
        if tag == 'style':
            self.inline.append('<style>')
        if tag == 'script':
            self._in_script = True
            self.scripts.append(attrs)
        if tag == 'link':
            self.links.append(attrs)

    def handle_endtag(self, tag):
        if tag == 'script':
            self._in_script = False

    def handle_data(self, data):
        if self._in_script and data.strip():
            self.inline.append('inline script')


def csp_of(headers):
    return {part.strip().split()[0]: part.strip().split()[1:]
            for part in headers['Content-Security-Policy'].split(';')}


def test_the_page_is_served_with_a_strict_policy_and_nothing_inline(server):
    status, headers, _ = server.request('GET', '/console', auth=False)
    assert status == 308 and headers['Location'] == '/console/'

    status, headers, body = server.request('GET', '/console/', auth=False)
    assert status == 200
    assert headers['Content-Type'] == 'text/html; charset=utf-8'
    assert headers['X-Content-Type-Options'] == 'nosniff'
    assert headers['X-Frame-Options'] == 'DENY'
    assert headers['Referrer-Policy'] == 'no-referrer'
    policy = csp_of(headers)
    assert policy['default-src'] == ["'self'"]
    assert policy['script-src'] == ["'self'"]
    assert policy['style-src'] == ["'self'"]
    assert policy['frame-ancestors'] == ["'none'"]
    assert policy['connect-src'] == ["'self'"]
    assert 'unsafe-inline' not in headers['Content-Security-Policy']
    assert 'unsafe-eval' not in headers['Content-Security-Policy']
    page = PageParser()
    page.feed(body.decode())
    assert page.inline == []
    assert [s.get('src') for s in page.scripts] == ['assets/app.js']
    assert all(s.get('type') == 'module' for s in page.scripts)
    # No CDN: everything the page loads is relative, on this endpoint.
    for url in [s['src'] for s in page.scripts] + \
            [link['href'] for link in page.links]:
        assert not re.match(r'\w+:|//', url), url


def module_imports(source):
    return re.findall(r"^import .* from '\./([\w./-]+)';$", source, re.M)


def test_every_asset_the_page_loads_is_served_with_its_type(server):
    _, _, body = server.request('GET', '/console/', auth=False)
    page = PageParser()
    page.feed(body.decode())
    wanted = [link['href'] for link in page.links] + \
        [s['src'] for s in page.scripts]
    types = {'.js': 'text/javascript; charset=utf-8',
             '.css': 'text/css; charset=utf-8', '.svg': 'image/svg+xml'}
    seen = set()
    while wanted:
        url = wanted.pop()
        if url in seen:
            continue
        seen.add(url)
        status, headers, data = server.request('GET', '/console/' + url,
                                               auth=False)
        assert status == 200, url
        assert headers['Content-Type'] == types[os.path.splitext(url)[1]]
        assert headers['X-Content-Type-Options'] == 'nosniff'
        assert "frame-ancestors 'none'" in headers['Content-Security-Policy']
        name = url[len('assets/'):]
        with open(os.path.join(ASSETS, name), 'rb') as fh:
            assert fh.read() == data, url
        if url.endswith('.js'):
            text = data.decode()
            # Relative imports only (no CDN), each served too.
            assert not re.search(r"from '(https?:)?//", text)
            folder = os.path.dirname(url)
            wanted += [os.path.normpath(os.path.join(folder, i))
                       for i in module_imports(text)]
    # The page, its five views and the chart library were all reached.
    for name in ('assets/app.js', 'assets/overview.js', 'assets/tasks.js',
                 'assets/task.js', 'assets/deadletters.js',
                 'assets/periodic.js', 'assets/vendor/uPlot.esm.js',
                 'assets/vendor/uPlot.min.css', 'assets/console.css'):
        assert name in seen, name


def test_what_is_not_an_asset_is_not_served(server):
    for path in ('/console/assets/nope.js', '/console/assets/../__init__.py',
                 '/console/assets/vendor/NOTICE', '/console/assets/index.html',
                 '/console/assets/%2e%2e/__init__.py'):
        status, _, _ = server.request('GET', path, auth=False)
        assert status == 404, path
    assert server.request('POST', '/console/', auth=False)[0] == 405
    # Refusals carry the console's headers too.
    for path in ('/console/?x=1', '/console/assets/app.js?v=1&v=2'):
        status, headers, _ = server.request('GET', path, auth=False)
        assert status == 400, path
        assert "default-src 'self'" in headers['Content-Security-Policy']
        assert headers['X-Frame-Options'] == 'DENY'


def test_the_vendored_chart_library_is_the_one_its_notice_records():
    with open(os.path.join(ASSETS, 'vendor', 'NOTICE')) as fh:
        notice = fh.read()
    assert 'uPlot 1.6.32' in notice and 'MIT' in notice
    listed = re.findall(r'^\s+(\S+)\s+sha256 ([0-9a-f]{64})$', notice, re.M)
    assert {name for name, _ in listed} == {'uPlot.esm.js', 'uPlot.min.css'}
    for name, digest in listed:
        with open(os.path.join(ASSETS, 'vendor', name), 'rb') as fh:
            assert hashlib.sha256(fh.read()).hexdigest() == digest, name
    assert os.path.exists(os.path.join(ASSETS, 'vendor', 'uPlot.LICENSE'))


def test_the_index_lists_the_console_routes(server):
    status, index = server.get('/')
    assert status == 200
    for route in ('GET /console/', 'GET /activity', 'GET /periodic'):
        assert route in index['routes']


def test_beyond_loopback_the_page_loads_but_its_data_needs_the_token(
        env, start_daemon, tmp_path):
    with open(env['HUEY_WORKER_CONFIG'], 'w') as fh:
        fh.write('[status]\nbind = 0.0.0.0\n')
    daemon = start_daemon(['status-server', '--port', '0'], env, 'exposed')
    daemon.wait_for_output('status endpoint listening on')
    port = int(re.search(r'listening on http://0\.0\.0\.0:(\d+)/',
                         daemon.output()).group(1))
    anyone = Client(port)
    holder = Client(port, token=env['HUEY_STATUS_TOKEN'])
    for path in ('/console/', '/console/assets/app.js',
                 '/console/assets/vendor/uPlot.esm.js'):
        assert anyone.request('GET', path)[0] == 200, path
    for path in ('/activity', '/periodic', '/queue', '/tasks'):
        status, headers, _ = anyone.request('GET', path)
        assert status == 401 and 'Bearer' in headers['WWW-Authenticate']
        assert holder.request('GET', path)[0] == 200, path


def test_activity_counts_outcomes_per_minute_with_real_tasks(
        server, env, producer, start_daemon, tmp_path):
    import actions_tasks
    import sample_tasks
    consumer = start_daemon(['consumer', '--workers', '2'], env, 'consumer')
    consumer.wait_for_output('consumer ready')
    done = [actions_tasks.quick(i).id for i in range(5)]
    failed = [sample_tasks.boom().id for _ in range(2)]
    for task_id in done:
        wait_for_state(producer, task_id, 'complete')
    for task_id in failed:
        wait_for_state(producer, task_id, 'failed')
    status, body = server.get('/activity')
    assert status == 200
    assert body['step'] == 60 and body['minutes'] == 60
    queue = body['queues']['huey']
    assert len(queue['complete']) == len(queue['failed']) == 60
    assert sum(queue['complete']) == 5 and sum(queue['failed']) == 2
    # They ran in the last minute or two: the newest buckets.
    assert sum(queue['complete'][-2:]) == 5
    assert body['start'] <= time.time() <= body['start'] + 3600
    assert queue['paused'] is False
    assert queue['latency'] == 0.0          # nothing pending

    # A pending task makes the latency grow; the paused key shows.
    consumer.signal(15)
    consumer.wait(30)
    actions_tasks.quick(99)
    time.sleep(1.1)
    producer.storage.conn.set(producer.storage.keys.prefix + 'paused', '1')
    queue = server.get('/activity')[1]['queues']['huey']
    assert queue['latency'] >= 1.0
    assert queue['paused'] is True


def test_periodic_lists_entries_with_their_next_run(
        env, producer, start_daemon, tmp_path):
    with open(env['HUEY_WORKER_CONFIG'], 'w') as fh:
        fh.write('[periodic:nightly]\ntask = sample_tasks.add\n'
                 'schedule = 30 2 * * *\nargs = [1, 2]\n')
    _, port = start_status_server(start_daemon, env)
    client = Client(port)
    status, body = client.get('/periodic')
    assert status == 200 and body['error'] is None
    queue = body['queues']['huey']
    assert queue['scheduler']['leader_present'] is False
    (entry,) = queue['entries']
    assert entry['key'] == 'config:nightly'
    assert entry['task'] == 'sample_tasks.add'
    assert entry['schedule'] == '30 2 * * *'
    assert entry['declared_here'] is True and entry['run_by_leader'] is False
    assert entry['next_slot'].endswith('T02:30Z')
    assert 0 < entry['next_slot_at'] - time.time() <= 86400
    assert queue['next_slot'] == entry['next_slot']

    # The leader's info is merged in: its last slot for the entry.
    scheduler = start_daemon(['scheduler'], env, 'scheduler')
    scheduler.wait_for_output('periodic config:nightly')

    def led():
        q = client.get('/periodic')[1]['queues']['huey']
        return q if q['scheduler']['leader_present'] and \
            q['entries'][0]['run_by_leader'] else None
    from ops_helpers import wait_until
    queue = wait_until(led, what='the scheduler leader in /periodic')
    assert queue['scheduler']['host'] and queue['scheduler']['pid']
    assert queue['entries'][0]['next_slot'] == entry['next_slot']
