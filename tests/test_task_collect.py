"""collect.urls and collect.pages against a local HTTP server that
misbehaves: the task code called directly for the many edge cases, then
end to end through a real consumer and `huey-worker submit`.

The server listens on 127.0.0.1, which the fetch guard refuses by default:
these tests allow it with [collect] allow_networks (tests/test_fetch_guard.py
tests the refusals)."""
import json
import os
import random
import statistics
import subprocess
import sys

import pytest

from huey_worker.tasks import collect, http
from huey_worker.tasks.collect import CollectIncomplete, collect_pages, \
    collect_urls, url_file
from huey_worker.tasks.paths import OutsideRoot
from huey_worker.tasks.runtime import InputRejected, TaskRun
from misbehaving_http import Server
from task_helpers import Progress, make_cfg, wait_terminal

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
LOCAL = '127.0.0.1/32'   # where the test server listens


@pytest.fixture
def web():
    server = Server().start()
    yield server
    server.stop()


def run_urls(tmp_path, urls, progress=None, name=None, task=None, **cfg):
    cfg.setdefault('collect__allow_networks', LOCAL)
    run = TaskRun(make_cfg(tmp_path, **cfg), task=task,
                  progress=progress or Progress())
    return collect_urls(run, urls, name=name)


def job_files(summary):
    out = []
    for folder, _, files in os.walk(summary['output']):
        out += [os.path.relpath(os.path.join(folder, f), summary['output'])
                for f in files]
    return sorted(out)


def manifest_of(summary):
    with open(summary['manifest']) as fh:
        return json.load(fh)


# -- collect.urls: the normal case and resuming -------------------------------

def test_urls_are_saved_with_progress_per_item(tmp_path, web):
    urls = [web.url('/ok/a.json?type=application/json&size=50'),
            web.url('/ok/page?type=text/html;%20charset=utf-8&size=300'),
            web.url('/ok/pic.png?type=image/png&size=2000')]
    progress = Progress()
    summary = run_urls(tmp_path, urls, progress)
    assert (summary['saved'], summary['skipped'], summary['failed']) == \
        (3, 0, 0)
    assert summary['items_collected'] == 3 and summary['total'] == 3
    for url in urls:
        path = os.path.join(summary['output'], url_file(url))
        assert os.path.getsize(path) == int(url.rsplit('=', 1)[1])
    assert sorted(progress.currents) == [1, 2, 3]
    assert [c[1] for c in progress.calls] == [3, 3, 3]
    assert [c[3]['items_collected'] for c in progress.calls] == [1, 2, 3]
    manifest = manifest_of(summary)
    assert manifest['items_on_disk'] == 3
    assert manifest['items'][urls[2]]['content_type'] == 'image/png'
    assert not [f for f in job_files(summary) if f.endswith('.part')]


def test_a_second_run_skips_what_is_saved(tmp_path, web):
    urls = [web.url('/ok/one'), web.url('/ok/two')]
    run_urls(tmp_path, urls)
    more = urls + [web.url('/ok/three')]
    summary = run_urls(tmp_path, more)
    assert (summary['saved'], summary['skipped']) == (1, 2)
    assert summary['items_collected'] == 3
    assert web.count('/ok/one') == 1 and web.count('/ok/three') == 1
    assert manifest_of(summary)['items_on_disk'] == 3


def test_errors_in_the_result_are_this_runs_own(tmp_path, web):
    run_urls(tmp_path, [web.url('/wrongtype/old')])
    summary = run_urls(tmp_path, [web.url('/ok/new')])
    assert summary['failed'] == 0 and 'errors' not in summary
    assert manifest_of(summary)['items'][web.url('/wrongtype/old')][
        'status'] == 'failed'                  # still on record


def test_urls_may_come_as_lists_and_repeat(tmp_path, web):
    url = web.url('/ok/same')
    summary = run_urls(tmp_path, collect._flatten([[url], url, (url,)]))
    assert summary['total'] == 1 and summary['saved'] == 1


# -- retries ----------------------------------------------------------------

def test_5xx_is_retried_until_it_works(tmp_path, web):
    url = web.url('/flaky/a?fail=2&code=503')
    summary = run_urls(tmp_path, [url], collect__retries=3)
    assert summary['saved'] == 1
    assert web.count('/flaky/a') == 3
    assert manifest_of(summary)['items'][url]['attempts'] == 3


def test_5xx_beyond_the_retries_fails_the_item(tmp_path, web):
    url = web.url('/flaky/b?fail=50')
    summary = run_urls(tmp_path, [url, web.url('/ok/fine')],
                       collect__retries=2)
    assert (summary['saved'], summary['failed']) == (1, 1)
    assert web.count('/flaky/b') == 3
    entry = manifest_of(summary)['items'][url]
    assert entry['status'] == 'failed' and entry['transient'] is True
    assert 'HTTP 500' in entry['error'] and entry['http_status'] == 500
    assert summary['errors'][0]['item'] == url


class HalfOfTheBound:
    """Stands in for the jitter's random generator: records each draw's
    bounds and returns their middle."""

    def __init__(self):
        self.draws = []

    def uniform(self, low, high):
        self.draws.append((low, high))
        return (low + high) / 2


@pytest.fixture
def waits(monkeypatch):
    """The waits of every Fetcher (gates and retries), in seconds."""
    seen = []
    original = http.Fetcher.wait

    def wait(self, seconds):
        seen.append(seconds)
        return original(self, seconds)

    monkeypatch.setattr(http.Fetcher, 'wait', wait)
    return seen


def test_retries_back_off_exponentially_with_full_jitter(tmp_path, web,
                                                         monkeypatch, waits):
    jitter = HalfOfTheBound()
    monkeypatch.setattr(http, '_jitter', jitter)
    url = web.url('/flaky/backoff?fail=4')
    summary = run_urls(tmp_path, [url], collect__retries=4,
                       collect__retry_delay=0.1, collect__retry_max_delay=0.3)
    assert summary['saved'] == 1 and web.count('/flaky/backoff') == 5
    # Bounds double from retry_delay up to retry_max_delay; the wait is
    # what was drawn below them.
    assert jitter.draws == [(0, 0.1), (0, 0.2), (0, 0.3), (0, 0.3)]
    assert [w for w in waits if w] == [0.05, 0.1, 0.15, 0.15]


def test_backoff_draws_spread_over_the_whole_range():
    # A statistical check that no fixed delay can pass: 4000 draws for the
    # third retry (bound 0.5 * 2**2 = 2 s) must cover [0, 2] evenly.
    bound = 2.0
    draws = [http.backoff_delay(3, 0.5, 120) for _ in range(4000)]
    assert all(0 <= d <= bound for d in draws)
    assert min(draws) < 0.02 * bound and max(draws) > 0.98 * bound
    assert abs(statistics.mean(draws) - bound / 2) < 0.05 * bound
    assert abs(statistics.pstdev(draws) - bound / 12 ** 0.5) < 0.05 * bound
    assert len(set(draws)) > 3900
    # Every retry number has its own bound, capped by retry_max_delay.
    for retry, expected in ((1, 0.5), (2, 1.0), (8, 60.0), (30, 60.0),
                            (100, 60.0)):
        draws = [http.backoff_delay(retry, 0.5, 60) for _ in range(500)]
        assert max(draws) <= expected and max(draws) > 0.9 * expected
    # A seeded random module in a task does not line the retries up.
    random.seed(7)
    first = http.backoff_delay(5, 1, 120)
    random.seed(7)
    assert http.backoff_delay(5, 1, 120) != first


def test_429_waits_as_long_as_retry_after_says(tmp_path, web, monkeypatch,
                                               waits):
    jitter = HalfOfTheBound()
    monkeypatch.setattr(http, '_jitter', jitter)
    url = web.url('/ratelimited/x?after=1')
    summary = run_urls(tmp_path, [url], collect__retry_delay=0.01)
    assert summary['saved'] == 1 and web.count('/ratelimited/x') == 2
    # Retry-After wins over the backoff: nothing drawn, 1 s waited.
    assert jitter.draws == [] and [w for w in waits if w] == [1.0]


def test_retry_after_longer_than_allowed_fails_the_item(tmp_path, web):
    url = web.url('/ratelimited/y?after=300')
    summary = run_urls(tmp_path, [url], collect__retry_max_delay=1)
    assert summary['failed'] == 1 and web.count('/ratelimited/y') == 1
    assert 'Retry-After' in summary['errors'][0]['error']


def test_connection_refused_is_a_transient_failure(tmp_path, web):
    import socket
    with socket.socket() as s:
        s.bind(('127.0.0.1', 0))
        port = s.getsockname()[1]      # nothing listens there once closed
    url = 'http://127.0.0.1:%d/nothing' % port
    summary = run_urls(tmp_path, [url], collect__retries=1)
    entry = manifest_of(summary)['items'][url]
    assert entry['transient'] is True and entry['attempts'] == 2
    assert 'connection failed' in entry['error']


# -- what the server does wrong -----------------------------------------------

def test_a_slow_server_hits_the_read_timeout(tmp_path, web):
    url = web.url('/slow/s?delay=3')
    summary = run_urls(tmp_path, [url], collect__read_timeout=0.3,
                       collect__retries=1)
    assert summary['failed'] == 1 and web.count('/slow/s') == 2
    assert 'no response within 0.3s' in summary['errors'][0]['error']


def test_a_truncated_body_is_retried_then_failed_leaving_nothing(
        tmp_path, web):
    url = web.url('/truncated/t?declared=100000&sent=5000')
    summary = run_urls(tmp_path, [url], collect__retries=1)
    assert summary['failed'] == 1 and web.count('/truncated/t') == 2
    error = summary['errors'][0]['error']
    assert 'truncated' in error or 'connection broken' in error
    assert job_files(summary) == ['manifest.json']


def test_a_declared_oversized_body_is_refused_without_reading(tmp_path, web):
    url = web.url('/oversized/big?size=5000')
    summary = run_urls(tmp_path, [url], collect__max_body_bytes=1000)
    assert summary['failed'] == 1 and web.count('/oversized/big') == 1
    assert 'larger than the limit of 1000 bytes' in \
        summary['errors'][0]['error']
    assert job_files(summary) == ['manifest.json']


def test_an_undeclared_oversized_body_is_cut_off(tmp_path, web):
    url = web.url('/oversized/stream?size=300000&length=0')
    summary = run_urls(tmp_path, [url], collect__max_body_bytes=100000)
    assert summary['failed'] == 1 and web.count('/oversized/stream') == 1
    assert 'body larger than the limit' in summary['errors'][0]['error']
    assert job_files(summary) == ['manifest.json']


def test_a_redirect_loop_is_named_and_not_retried(tmp_path, web):
    url = web.url('/loop/a')
    summary = run_urls(tmp_path, [url])
    error = summary['errors'][0]['error']
    assert 'redirect loop' in error and '/loop/b' in error
    assert web.count('/loop/a') == 1 and web.count('/loop/b') == 1


def test_redirects_are_followed_up_to_the_limit(tmp_path, web):
    near, far = web.url('/chain/2'), web.url('/chain/5')
    summary = run_urls(tmp_path, [near, far], collect__max_redirects=3)
    assert (summary['saved'], summary['failed']) == (1, 1)
    items = manifest_of(summary)['items']
    assert items[near]['final_url'] == web.url('/chain/0')
    assert 'more than 3 redirects' in items[far]['error']
    assert web.count('/chain/1') == 1  # the far chain stopped at /chain/1


def test_a_wrong_content_type_is_refused(tmp_path, web):
    url = web.url('/wrongtype/setup.exe')
    summary = run_urls(tmp_path, [url])
    entry = manifest_of(summary)['items'][url]
    assert entry['transient'] is False
    assert "'application/x-msdownload' is not allowed" in entry['error']
    assert job_files(summary) == ['manifest.json']


def test_bad_urls_fail_alone_and_no_urls_is_an_error(tmp_path, web):
    summary = run_urls(tmp_path, ['ftp://example.org/x', 'not a url',
                                  {'url': 'x'}, web.url('/ok/good')])
    assert (summary['saved'], summary['failed']) == (1, 3)
    with pytest.raises(InputRejected, match='no URLs given'):
        run_urls(tmp_path, [])


def test_the_job_name_stays_inside_the_output_root(tmp_path, web):
    with pytest.raises(OutsideRoot, match=r'\[collect\] output_root'):
        run_urls(tmp_path, [web.url('/ok/x')], name='../../elsewhere')
    summary = run_urls(tmp_path, [web.url('/ok/x')], name='nightly/run1')
    assert summary['output'].endswith(os.path.join('collect', 'nightly',
                                                   'run1'))


# -- per-host limits ----------------------------------------------------------

def test_per_host_concurrency_is_respected(tmp_path, web):
    urls = [web.url('/inflight/%d?delay=0.3' % i) for i in range(8)]
    summary = run_urls(tmp_path, urls, collect__per_host_concurrency=2)
    assert summary['saved'] == 8
    assert web.max_in_flight == 2


def test_rate_limit_spaces_request_starts(tmp_path, web):
    urls = [web.url('/ok/rate%d' % i) for i in range(5)]
    summary = run_urls(tmp_path, urls, collect__rate_limit=5,
                       collect__per_host_concurrency=4)
    assert summary['saved'] == 5
    starts = sorted(web.arrivals('/ok/rate'))
    gaps = [b - a for a, b in zip(starts, starts[1:])]
    assert min(gaps) >= 0.15, gaps   # 1/5 s apart, minus network jitter


def test_idle_host_gates_are_forgotten(monkeypatch):
    from huey_worker.tasks import http
    monkeypatch.setattr(http, '_gates', {})
    monkeypatch.setattr(http, 'MAX_IDLE_GATES', 10)
    busy = http.gate_for('http://busy.example/', 1, 0)
    with busy.slot(lambda seconds: None):
        for n in range(50):
            http.gate_for('http://host%d.example/' % n, 1, 0)
        assert len(http._gates) <= 10
        assert http._gates['busy.example:80'] is busy   # in use: kept


# -- task-level retries: resume later -----------------------------------------

def test_transient_failures_make_the_task_retry_while_it_may(tmp_path, web,
                                                             producer):
    url_bad, url_ok = web.url('/flaky/later?fail=1'), web.url('/ok/now')
    task = collect.urls.s(url_bad, url_ok, retries=2)
    with pytest.raises(CollectIncomplete, match='1 item.*may pass'):
        run_urls(tmp_path, [url_bad, url_ok], task=task, collect__retries=0)
    task.retries = 0   # the last attempt: report what there is
    summary = run_urls(tmp_path, [url_bad, url_ok], task=task,
                       collect__retries=0)
    assert (summary['saved'], summary['skipped']) == (1, 1)


def test_builtin_tasks_take_retries_from_the_config(producer, monkeypatch):
    from huey_worker import config
    monkeypatch.setenv('HUEY_RETRIES', '5')
    monkeypatch.setenv('HUEY_RETRY_DELAY', '7')
    producer.configure(config.load())
    task = collect.urls.s('http://example.org/')
    assert (task.retries, task.retry_delay, task.retry_backoff) == (5, 7, 2)
    explicit = collect.urls.s('http://example.org/', retries=0)
    assert explicit.retries == 0


# -- collect.pages ------------------------------------------------------------

def run_pages(tmp_path, url, progress=None, **kwargs):
    cfg = {k: kwargs.pop(k) for k in list(kwargs) if '__' in k}
    cfg.setdefault('collect__allow_networks', LOCAL)
    run = TaskRun(make_cfg(tmp_path, **cfg), progress=progress or Progress())
    return collect_pages(run, url, **kwargs)


def item_files(summary):
    return sorted(f for f in job_files(summary) if f.startswith('items'))


def test_pages_follow_next_links_and_save_each_item(tmp_path, web):
    progress = Progress()
    summary = run_pages(tmp_path, web.url('/api/next?pages=3&per=4'),
                        progress)
    assert summary['pages'] == 3 and summary['saved'] == 12
    assert len(item_files(summary)) == 12
    with open(os.path.join(summary['output'], 'items',
                           'item-2-3.json')) as fh:
        assert json.load(fh)['title'] == 'Item 3 of page 2'
    assert progress.currents == list(range(1, 13))
    assert progress.calls[-1][3]['items_collected'] == 12
    assert progress.calls[-1][3]['pages'] == 3
    manifest = manifest_of(summary)
    assert manifest['complete'] is True and manifest['items_on_disk'] == 12


def test_pages_by_page_number_until_an_empty_page(tmp_path, web):
    summary = run_pages(tmp_path, web.url('/api/number?pages=2&per=3'),
                        page_param='page', items_key='data.items')
    assert summary['pages'] == 3        # the third one was empty
    assert summary['saved'] == 6
    assert web.count('/api/number') == 3


def test_pages_by_link_header_with_items_as_the_page(tmp_path, web):
    summary = run_pages(tmp_path, web.url('/api/link?pages=3'))
    assert summary['pages'] == 3 and summary['saved'] == 6


def test_pages_resume_and_stop_at_max_pages(tmp_path, web):
    url = web.url('/api/next?pages=5&per=2')
    first = run_pages(tmp_path, url, max_pages=2)
    assert (first['pages'], first['saved']) == (2, 4)
    second = run_pages(tmp_path, url)
    assert (second['saved'], second['skipped']) == (6, 4)
    assert second['items_collected'] == 10


def test_items_without_ids_are_numbered(tmp_path, web):
    summary = run_pages(tmp_path, web.url('/api/next?pages=1&per=2'),
                        id_key='no.such.key')
    assert item_files(summary) == [os.path.join('items', 'p1-1.json'),
                                   os.path.join('items', 'p1-2.json')]


def test_a_pagination_loop_is_refused(tmp_path, web):
    with pytest.raises(InputRejected, match='pagination loop'):
        run_pages(tmp_path, web.url('/api/loop'))


def test_a_page_that_is_not_json_is_refused(tmp_path, web):
    with pytest.raises(InputRejected, match='page 1 .* is not JSON'):
        run_pages(tmp_path, web.url('/api/notjson'))


def test_a_page_that_keeps_failing_is_retried_later(tmp_path, web):
    with pytest.raises(CollectIncomplete, match='page 1: .*HTTP 500'):
        run_pages(tmp_path, web.url('/flaky/api?fail=9'),
                  collect__retries=1)
    with pytest.raises(InputRejected, match='HTTP 404'):
        run_pages(tmp_path, web.url('/api/missing'))


# -- end to end ---------------------------------------------------------------

def consumer_env(base_env, tmp_path, **extra):
    env = dict(base_env)
    env.update({
        'HUEY_WORKER_TASKS_BUILTIN': 'true',
        'HUEY_WORKER_COLLECT_OUTPUT_ROOT': str(tmp_path / 'collected'),
        'HUEY_WORKER_COLLECT_RATE_LIMIT': '0',
        'HUEY_WORKER_COLLECT_RETRY_DELAY': '0.01',
        'HUEY_WORKER_COLLECT_ALLOW_NETWORKS': LOCAL,
        'HUEY_WORKERS': '2',
    })
    env.update(extra)
    return env


def test_collect_urls_through_a_consumer_resumes_on_the_task_retry(
        tmp_path, web, base_env, start_daemon, producer):
    env = consumer_env(base_env, tmp_path, HUEY_WORKER_COLLECT_RETRIES='0')
    consumer = start_daemon(['consumer'], env, 'consumer')
    consumer.wait_for_output('consumer ready')
    flaky, fine = web.url('/flaky/e2e?fail=1'), web.url('/ok/e2e')
    # The first attempt saves `fine` and fails on `flaky` (one 500, no
    # request retries); Huey retries the task, which skips `fine`.
    result = collect.urls(flaky, fine, retries=1, retry_delay=0)
    record = wait_terminal(producer, result.id)
    assert record['state'] == 'complete', record
    summary = result.get()
    assert (summary['saved'], summary['skipped'], summary['failed']) == \
        (1, 1, 0)
    assert web.count('/ok/e2e') == 1 and web.count('/flaky/e2e') == 2
    assert record['attempt'] == 2
    assert record['metadata']['items_collected'] == 2
    assert record['progress']['current'] == record['progress']['total'] == 2
    assert os.path.isdir(tmp_path / 'collected' / 'urls')


def test_submit_collect_pages_and_urls_from_the_command_line(
        tmp_path, web, base_env, start_daemon):
    env = consumer_env(base_env, tmp_path)
    consumer = start_daemon(['consumer'], env, 'consumer')
    consumer.wait_for_output('consumer ready')
    done = subprocess.run(
        [sys.executable, '-m', 'huey_worker', 'submit', 'collect.pages',
         web.url('/api/next?pages=2&per=3'), '--kwargs', '{"name": "api"}',
         '--wait'], env=env, cwd=ROOT, capture_output=True, text=True,
        timeout=60)
    assert done.returncode == 0, done.stderr
    summary = json.loads(done.stdout.strip().splitlines()[-1])
    assert (summary['pages'], summary['saved']) == (2, 6)
    assert summary['output'] == str(tmp_path / 'collected' / 'api')

    submitted = subprocess.run(
        [sys.executable, '-m', 'huey_worker', 'submit', 'collect.urls',
         web.url('/ok/cli1'), web.url('/ok/cli2')], env=env, cwd=ROOT,
        capture_output=True, text=True, timeout=60)
    assert submitted.returncode == 0, submitted.stderr
    task_id = submitted.stdout.strip()
    waited = subprocess.run(
        [sys.executable, '-m', 'huey_worker', 'wait', task_id, '--json'], env=env,
        cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert waited.returncode == 0, waited.stderr
    record = json.loads(waited.stdout)
    assert record['result']['saved'] == 2
    assert record['name'] == 'huey_worker.tasks.collect.urls'
