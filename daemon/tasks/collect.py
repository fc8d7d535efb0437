"""collect.urls and collect.pages: web collection into [collect]
output_root, one job directory per collection.

collect.urls downloads a list of URLs in parallel (within each host's
concurrency and rate limit).  collect.pages walks a paginated JSON API, by
a next-page link or by page number, and saves each item as a JSON file.

Both resume: an item whose file exists is skipped.  An item that failed
for a reason that may pass (connection error, 5xx, 429) makes the task
fail after the others are done while Huey has retries left, so the retry
picks up only what is missing; permanent failures (404, wrong content
type, too big, redirect loop, an address outside [collect]
allow_networks) are counted and reported, not retried.
"""
import concurrent.futures
import hashlib
import json
import os
import threading
from collections import Counter
from urllib.parse import parse_qsl, unquote, urlencode, urljoin, urlsplit, \
    urlunsplit

import requests

from ..app import huey
from . import paths
from .http import Fetcher, FetchError, HttpSettings, host_key
from .manifest import Manifest
from .netguard import AddressRefused
from .runtime import BuiltinTask, InputRejected, TaskRun, log

MAX_THREADS = 32
ERRORS_IN_RESULT = 20


class CollectIncomplete(Exception):
    """Some items failed for reasons that may pass; the task is retried and
    resumes where it stopped."""


@huey.task(context=True, name='urls', task_base=BuiltinTask)
def urls(*urls, name=None, task=None):
    """collect.urls URL...: download each URL into [collect] output_root/NAME
    (default: urls/HOST/...)."""
    return TaskRun.for_task(task).run(collect_urls, _flatten(urls), name=name)


@huey.task(context=True, name='pages', task_base=BuiltinTask)
def pages(url, name=None, items_key='items', next_key='next',
          page_param=None, start_page=1, max_pages=None, id_key='id',
          task=None):
    """collect.pages URL: walk a paginated JSON API and save each item."""
    return TaskRun.for_task(task).run(
        collect_pages, url, name=name, items_key=items_key,
        next_key=next_key, page_param=page_param, start_page=start_page,
        max_pages=max_pages, id_key=id_key)


# -- shared ------------------------------------------------------------------

def _flatten(values):
    out = []
    for value in values:
        if isinstance(value, (list, tuple)):
            out.extend(_flatten(value))
        else:
            out.append(value)
    return out


def _job_dir(cfg, name):
    root = cfg.collect.output_root
    os.makedirs(root, exist_ok=True)
    if not isinstance(name, str) or not name.strip():
        raise InputRejected('name must be a directory name below [collect] '
                            'output_root, got %r' % (name,))
    job_dir = paths.resolve_under(root, name, '[collect] output_root')
    if job_dir == os.path.realpath(root):
        raise InputRejected('name %r is the output root itself; give a '
                            'directory below it' % name)
    os.makedirs(job_dir, exist_ok=True)
    return job_dir


def _check_url(url):
    if not isinstance(url, str):
        return 'not a URL: %r' % (url,)
    parts = urlsplit(url)
    if parts.scheme.lower() not in ('http', 'https') or not parts.hostname:
        return 'not an http:// or https:// URL'
    return None


def _summary(manifest, extra=None):
    errors = [{'item': key, 'error': manifest.items[key].get('error')}
              for key in manifest.failures[:ERRORS_IN_RESULT]]
    out = {'output': manifest.job_dir, 'manifest': manifest.path}
    out.update(manifest.counts)
    out['items_collected'] = manifest.items_collected
    out.update(extra or {})
    if errors:
        out['errors'] = errors
    return out


def _finish(run, manifest, transient_failures, extra=None):
    manifest.write(run.task_id)
    summary = _summary(manifest, extra)
    if transient_failures and run.task is not None and run.task.retries:
        raise CollectIncomplete(
            '%d item(s) failed for reasons that may pass (first: %s); %d '
            'saved, %d already there; the retry resumes with the missing '
            'ones' % (transient_failures, summary['errors'][0]['error'],
                      summary['saved'], summary['skipped']))
    return summary


# -- collect.urls ------------------------------------------------------------

def url_file(url):
    """Where a URL is saved inside the job directory: HOST/NAME-HASH.EXT,
    the same for the same URL every time (that is what resuming needs)."""
    parts = urlsplit(url)
    host = paths.safe_name((parts.hostname or 'host') + (
        '_%d' % parts.port if parts.port else ''))
    base = os.path.basename(unquote(parts.path.rstrip('/'))) or 'index'
    stem, ext = os.path.splitext(base)
    if not 1 < len(ext) <= 8 or not ext[1:].isalnum():
        stem, ext = base, ''
    digest = hashlib.sha1(url.encode('utf-8', 'surrogatepass')).hexdigest()
    return os.path.join(host, '%s-%s%s' % (
        paths.safe_name(stem, 60), digest[:10], ext.lower()))


def collect_urls(run, url_list, name=None):
    settings = HttpSettings.from_config(run.cfg)
    wanted = list(dict.fromkeys(str(u).strip() for u in url_list))
    if not wanted:
        raise InputRejected('no URLs given')
    job_dir = _job_dir(run.cfg, name or 'urls')
    manifest = Manifest(job_dir, 'urls')
    total, done, transient = len(wanted), 0, 0

    def report(last_url):
        run.progress(done, total, last_url,
                     items_collected=manifest.items_collected,
                     saved=manifest.counts['saved'],
                     skipped=manifest.counts['skipped'],
                     failed=manifest.counts['failed'])

    todo = []
    for url in wanted:
        problem = _check_url(url)
        if problem:
            manifest.failed(url, problem, False, url=url)
            done += 1
            continue
        relative = url_file(url)
        if os.path.exists(os.path.join(job_dir, relative)):
            manifest.skipped(url, url=url, file=relative)
            done += 1
        else:
            todo.append((url, relative))
    if done:
        report('%d already saved or invalid' % done)

    cancel = threading.Event()
    fetcher = Fetcher(settings, run, cancel)
    pool = concurrent.futures.ThreadPoolExecutor(
        max_workers=max(1, _threads(todo, settings)),
        thread_name_prefix='collect')
    try:
        futures = {pool.submit(fetcher.fetch_to_file, url,
                               os.path.join(job_dir, relative)):
                   (url, relative) for url, relative in todo}
        pending = set(futures)
        while pending:
            finished, pending = concurrent.futures.wait(
                pending, timeout=0.2,
                return_when=concurrent.futures.FIRST_COMPLETED)
            for future in finished:
                url, relative = futures[future]
                transient += _record(manifest, future, url, relative)
                done += 1
                report(url)
            run.check_timeout()
    finally:
        cancel.set()  # downloads still running stop at their next chunk
        pool.shutdown(wait=False, cancel_futures=True)
        fetcher.close()
        if done < total:
            manifest.write(run.task_id)  # what we have, before the error
    return _finish(run, manifest, transient, {'total': total})


def _threads(todo, settings):
    per_host = Counter(host_key(url) for url, _ in todo)
    return min(MAX_THREADS, sum(min(n, settings.per_host_concurrency)
                                for n in per_host.values()))


def _record(manifest, future, url, relative):
    """Note one finished download; returns 1 for a failure that may pass."""
    try:
        fetched = future.result()
    except FetchError as exc:
        manifest.failed(url, exc.problem, exc.transient, url=url,
                        attempts=exc.attempts, http_status=exc.status)
        return 1 if exc.transient else 0
    except AddressRefused as exc:
        # One item of a list fails, as a non-http URL does; the others are
        # still collected.  Logged: it may be someone probing the network.
        log.warning('collect.urls: %s', exc)
        manifest.failed(url, str(exc), False, url=url, refused=exc.address)
        return 0
    except OSError as exc:
        manifest.failed(url, 'cannot write %s: %s' % (relative, exc), True,
                        url=url)
        return 1
    entry = {'url': url, 'file': relative, 'bytes': fetched.size,
             'content_type': fetched.content_type,
             'attempts': fetched.attempts}
    if fetched.final_url != url:
        entry['final_url'] = fetched.final_url
    manifest.saved(url, **entry)
    return 0


# -- collect.pages -----------------------------------------------------------

def dig(data, dotted):
    """data['a']['b'] for 'a.b' (list indexes allowed); None if absent."""
    if dotted in (None, ''):
        return data
    for part in str(dotted).split('.'):
        if isinstance(data, dict):
            data = data.get(part)
        elif isinstance(data, list) and part.isdigit() and \
                int(part) < len(data):
            data = data[int(part)]
        else:
            return None
    return data


def with_page(url, param, number):
    parts = urlsplit(url)
    query = [(k, v) for k, v in parse_qsl(parts.query, keep_blank_values=True)
             if k != param] + [(param, str(number))]
    return urlunsplit(parts._replace(query=urlencode(query)))


def default_pages_name(url):
    parts = urlsplit(url)
    text = (parts.netloc + parts.path).rstrip('/')
    if parts.query:
        text += '?' + parts.query
    return os.path.join('pages', paths.safe_name(text, 100))


def collect_pages(run, url, name=None, items_key='items', next_key='next',
                  page_param=None, start_page=1, max_pages=None, id_key='id'):
    problem = _check_url(url)
    if problem:
        raise InputRejected('%r: %s' % (url, problem))
    if max_pages is not None and (not isinstance(max_pages, int)
                                  or max_pages < 1):
        raise InputRejected('max_pages must be a whole number >= 1, got %r'
                            % (max_pages,))
    if page_param and not isinstance(start_page, int):
        raise InputRejected('start_page must be a whole number, got %r'
                            % (start_page,))
    job_dir = _job_dir(run.cfg, name or default_pages_name(url))
    manifest = Manifest(job_dir, 'pages', start_url=url)
    settings = HttpSettings.from_config(run.cfg)
    page_url = with_page(url, page_param, start_page) if page_param else url
    visited, page_no, seen_items = {}, 0, 0   # visited: url -> page number
    complete = False
    with Fetcher(settings, run) as fetcher:
        try:
            while page_url:
                run.check_timeout()
                if page_url in visited:
                    raise InputRejected(
                        'pagination loop: page %d links back to %s (page %d)'
                        % (page_no, page_url, visited[page_url]))
                page_no += 1
                visited[page_url] = page_no
                data, fetched = _fetch_page(fetcher, page_url, page_no)
                items = _page_items(data, items_key, page_no, page_url)
                for index, item in enumerate(items):
                    seen_items += 1
                    _save_item(manifest, job_dir, item, id_key, page_no,
                               index, page_url)
                    run.progress(seen_items, None, 'page %d, item %d' % (
                        page_no, index + 1),
                        items_collected=manifest.items_collected,
                        pages=page_no, saved=manifest.counts['saved'],
                        skipped=manifest.counts['skipped'])
                if max_pages and page_no >= max_pages:
                    break
                if page_param:
                    page_url = with_page(url, page_param,
                                         start_page + page_no) if items \
                        else None
                else:
                    page_url = _next_link(data, fetched, next_key, page_url)
            complete = True   # the last page, or max_pages, was reached
        finally:
            manifest.about['pages'] = page_no
            manifest.about['complete'] = complete
            if not complete:
                manifest.write(run.task_id)
    return _finish(run, manifest, 0, {'pages': page_no})


def _fetch_page(fetcher, page_url, page_no):
    try:
        fetched = fetcher.fetch_bytes(page_url)
    except FetchError as exc:
        if exc.transient:
            raise CollectIncomplete('page %d: %s' % (page_no, exc))
        raise InputRejected('page %d: %s' % (page_no, exc))
    try:
        data = json.loads(fetched.body.decode('utf-8-sig'))
    except (UnicodeDecodeError, ValueError) as exc:
        raise InputRejected('page %d (%s) is not JSON: %s' % (
            page_no, page_url, exc))
    return data, fetched


def _page_items(data, items_key, page_no, page_url):
    items = data if isinstance(data, list) else dig(data, items_key)
    if items is None:
        items = []
    if not isinstance(items, list):
        raise InputRejected('page %d (%s): %r is not a list of items' % (
            page_no, page_url, items_key))
    return items


def _save_item(manifest, job_dir, item, id_key, page_no, index, page_url):
    item_id = dig(item, id_key) if isinstance(item, dict) else None
    if item_id is None or isinstance(item_id, (dict, list)):
        item_id = 'p%d-%d' % (page_no, index + 1)
    key = str(item_id)
    relative = os.path.join('items', paths.safe_name(key) + '.json')
    path = os.path.join(job_dir, relative)
    if os.path.exists(path):
        manifest.skipped(key, file=relative)
        return
    paths.write_atomically(path, json.dumps(
        item, ensure_ascii=False, sort_keys=True).encode('utf-8'))
    manifest.saved(key, file=relative, page=page_no, page_url=page_url)


def _next_link(data, fetched, next_key, page_url):
    link = dig(data, next_key) if isinstance(data, dict) and next_key \
        else None
    if isinstance(link, str) and link.strip():
        return urljoin(page_url, link.strip())
    header = fetched.headers.get('Link')
    if header:
        for entry in requests.utils.parse_header_links(header):
            if 'next' in entry.get('rel', '').split():
                return urljoin(page_url, entry['url'])
    return None
