"""pdf.extract: text (and optionally text blocks and images) out of a PDF,
written as one JSON document under [pdf] output_root.

The input is a path below [pdf] input_root or an http(s) URL downloaded
first (with the [collect] network settings, its address policy included,
and [pdf] max_bytes).  Input that can never work (outside the root, not a
PDF, encrypted, damaged, too many pages or bytes, a URL that leads to an
address outside [collect] allow_networks) fails at once without retries;
see docs/tasks.md.

MuPDF must not be used from two threads at once, so extractions in one
process take turns (process workers extract in parallel).  pymupdf is
imported by the first extraction, not with this module: producers and the
CLI load the module only to enqueue, and the import takes most of a second
and over 100 MB.
"""
import datetime
import hashlib
import importlib
import json
import os
import signal
import tempfile
import threading
import time
from contextlib import contextmanager
from urllib.parse import unquote, urlsplit

from ..app import huey
from ..journal import sensitive
from . import paths
from .http import Fetcher, FetchError, HttpSettings
from .runtime import BuiltinTask, InputRejected, TaskRun

FORMAT = 'huey-worker/pdf.extract/1'
MAGIC_WINDOW = 1024   # %PDF- and %%EOF are found within 1 KiB of the ends
STALE_DOWNLOAD = 3600  # seconds without a write: its worker is gone

_mupdf = threading.Lock()
_pymupdf_module = None


class PdfRejected(InputRejected):
    pass


@sensitive(kwargs=('password',))   # never shown in the journal
@huey.task(context=True, name='extract', task_base=BuiltinTask)
def extract(source, output=None, *, blocks=None, images=None, password=None,
            task=None):
    """pdf.extract SOURCE: a path below [pdf] input_root or an http(s) URL.
    Returns a summary with the path of the JSON written."""
    return TaskRun.for_task(task).run(extract_pdf, source, output=output,
                                      blocks=blocks, images=images,
                                      password=password)


def extract_pdf(run, source, output=None, blocks=None, images=None,
                password=None):
    cfg = run.cfg.pdf
    blocks = cfg.blocks if blocks is None else bool(blocks)
    images = cfg.images if images is None else bool(images)
    if not isinstance(source, str) or not source.strip():
        raise PdfRejected('expected a file path or an http(s) URL, got %r'
                          % (source,))
    if _is_url(source):
        out_path = _output_path(run.cfg, output, url=source)
        with _downloaded(run, source) as (path, fetched):
            described = {'url': source, 'final_url': fetched.final_url}
            return _extract_file(run, path, described, out_path, blocks,
                                 images, password)
    root = cfg.input_root
    if not os.path.isdir(root):
        raise PdfRejected('[pdf] input_root %s is not a directory' % root)
    path = paths.resolve_under(root, source, '[pdf] input_root')
    if not os.path.isfile(path):
        raise PdfRejected('%r is not a file below [pdf] input_root (%s)' % (
            source, root))
    relative = os.path.relpath(path, os.path.realpath(root))
    out_path = _output_path(run.cfg, output, relative=relative)
    return _extract_file(run, path, {'path': relative}, out_path, blocks,
                         images, password)


# -- input -------------------------------------------------------------------

def _is_url(source):
    return source.lower().startswith(('http://', 'https://'))


@contextmanager
def _downloaded(run, url):
    cfg = run.cfg
    tmp_dir = os.path.join(cfg.pdf.output_root, '.downloads')
    os.makedirs(tmp_dir, exist_ok=True)
    _sweep_stale(tmp_dir)
    fd, tmp = tempfile.mkstemp(suffix='.pdf', dir=tmp_dir)
    os.close(fd)
    try:
        with Fetcher(HttpSettings.from_config(cfg), run) as fetcher:
            try:
                # Any content type: servers label PDFs loosely; the %PDF-
                # header decides.
                fetched = fetcher.fetch_to_file(url, tmp,
                                                max_bytes=cfg.pdf.max_bytes,
                                                content_types=())
            except FetchError as exc:
                if exc.transient:
                    raise  # Huey retries the task later
                raise PdfRejected('cannot download %s' % exc)
        yield tmp, fetched
    finally:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass


def _sweep_stale(directory, idle=STALE_DOWNLOAD):
    """Remove downloads left by a worker that died mid-way (a live one
    writes to its file all the time)."""
    cutoff = time.time() - idle
    for entry in os.scandir(directory):
        try:
            if entry.is_file() and entry.stat().st_mtime < cutoff:
                os.unlink(entry.path)
        except FileNotFoundError:
            pass


def _check_file(path, max_bytes, shown):
    size = os.path.getsize(path)
    if size > max_bytes:
        raise PdfRejected('%s is %d bytes, more than [pdf] max_bytes (%d)'
                          % (shown, size, max_bytes))
    with open(path, 'rb') as fh:
        head = fh.read(MAGIC_WINDOW)
        fh.seek(max(0, size - MAGIC_WINDOW))
        tail = fh.read(MAGIC_WINDOW)
    if b'%PDF-' not in head:
        what = 'an empty file' if size == 0 else 'no %PDF- header'
        raise PdfRejected('%s is not a PDF (%s)' % (shown, what))
    if b'%%EOF' not in tail:
        raise PdfRejected('%s is damaged: truncated (no %%%%EOF marker at '
                          'the end)' % shown)
    return size


def _sha256(path):
    digest = hashlib.sha256()
    with open(path, 'rb') as fh:
        for block in iter(lambda: fh.read(1 << 20), b''):
            digest.update(block)
    return digest.hexdigest()


def _output_path(cfg, output, relative=None, url=None):
    root = cfg.pdf.output_root
    if output:
        name = output if output.endswith('.json') else output + '.json'
    elif relative is not None:
        stem, ext = os.path.splitext(relative)
        name = (stem if ext.lower() == '.pdf' else relative) + '.json'
    else:
        parts = urlsplit(url)
        base = os.path.basename(unquote(parts.path)) or 'index'
        stem = os.path.splitext(base)[0] or 'index'
        name = os.path.join('urls', paths.safe_name(parts.netloc), '%s-%s.json'
                            % (paths.safe_name(stem, 60),
                               hashlib.sha1(url.encode()).hexdigest()[:8]))
    os.makedirs(root, exist_ok=True)
    return paths.resolve_under(root, name, '[pdf] output_root')


# -- extraction --------------------------------------------------------------

def _extract_file(run, path, source, out_path, blocks, images, password):
    cfg = run.cfg.pdf
    shown = source.get('path') or source['url']
    size = _check_file(path, cfg.max_bytes, shown)
    sha256 = _sha256(path)
    pymupdf = _pymupdf()
    with _mupdf_turn(run):
        try:
            doc = pymupdf.open(path, filetype='pdf')
        # MuPDF's own errors only: a TaskTimeout must go through as it is.
        except (RuntimeError, ValueError) as exc:
            raise PdfRejected('%s is damaged: MuPDF cannot open it (%s)' % (
                shown, exc))
        try:
            _unlock(doc, password, shown)
            if doc.page_count > cfg.max_pages:
                raise PdfRejected('%s has %d pages, more than [pdf] max_pages '
                                  '(%d)' % (shown, doc.page_count,
                                            cfg.max_pages))
            if doc.page_count == 0:
                raise PdfRejected('%s is damaged: no pages' % shown)
            images_dir = os.path.splitext(out_path)[0] + '.images'
            if images:
                with paths.staged_directory(images_dir) as staging:
                    record = _extract_doc(run, doc, shown, blocks, staging,
                                          os.path.basename(images_dir))
            else:
                record = _extract_doc(run, doc, shown, blocks, None, None)
        finally:
            doc.close()
    record['source'] = dict(source, bytes=size, sha256=sha256)
    data = json.dumps(record, ensure_ascii=False,
                      separators=(',', ':')).encode('utf-8')
    paths.write_atomically(out_path, data)
    summary = {
        'output': out_path,
        'source': shown,
        'pages': record['page_count'],
        'characters': sum(len(p['text']) for p in record['pages']),
        'images': len(record.get('images', ())),
        'bytes': size,
    }
    if images:
        summary['images_dir'] = images_dir
    return summary


def _pymupdf():
    global _pymupdf_module
    if _pymupdf_module is None:
        with _alarm_held():
            _pymupdf_module = importlib.import_module('pymupdf')
    return _pymupdf_module


@contextmanager
def _alarm_held():
    """Hold back the SIGALRM time limit of a process worker while this
    block runs, then let it strike: an import cut short by an exception
    leaves a half-initialised extension module behind for every later task
    of the process."""
    if threading.current_thread() is not threading.main_thread():
        yield   # thread workers have no alarm
        return
    fired = []
    previous = signal.signal(signal.SIGALRM, lambda *_: fired.append(1))
    try:
        yield
    finally:
        signal.signal(signal.SIGALRM, previous)
    if fired and callable(previous):
        previous(signal.SIGALRM, None)


@contextmanager
def _mupdf_turn(run):
    while not _mupdf.acquire(timeout=0.2):
        run.check_timeout()
    try:
        yield
    finally:
        _mupdf.release()


def _unlock(doc, password, shown):
    if not doc.needs_pass:
        return
    if password is None:
        raise PdfRejected('%s is encrypted: it needs a password (pass '
                          'password=...)' % shown)
    if not doc.authenticate(password):
        raise PdfRejected('%s is encrypted and the password given is wrong'
                          % shown)


def _extract_doc(run, doc, shown, blocks, images_dir, images_rel):
    pymupdf = _pymupdf()
    total = doc.page_count
    meta = {k: v for k, v in (doc.metadata or {}).items() if v}
    pages = []
    saved_images = {}
    for index in range(total):
        run.check_timeout()
        try:
            page = doc.load_page(index)
            pages.append(_extract_page(doc, page, blocks, images_dir,
                                       images_rel, saved_images))
        except InputRejected:
            raise
        except RuntimeError as exc:  # MuPDF errors
            raise PdfRejected('%s is damaged: page %d cannot be read (%s)' % (
                shown, index + 1, exc))
        # Per page: the journal itself limits how often Redis is written.
        run.progress(index + 1, total, 'page %d of %d' % (index + 1, total))
    record = {
        'format': FORMAT,
        'extracted_at': datetime.datetime.now(datetime.timezone.utc)
        .isoformat(timespec='seconds'),
        'extractor': {'pymupdf': pymupdf.VersionBind},
        'metadata': meta,
        'encrypted': bool(doc.is_encrypted or meta.get('encryption')),
        'repaired': bool(doc.is_repaired),
        'page_count': total,
        'pages': pages,
    }
    if images_dir is not None:
        record['images'] = sorted(saved_images.values(),
                                  key=lambda i: i['xref'])
    return record


def _bbox(rect):
    return [round(float(v), 2) for v in rect]


def _extract_page(doc, page, blocks, images_dir, images_rel, saved_images):
    rect = page.rect
    entry = {'number': page.number + 1, 'width': round(rect.width, 2),
             'height': round(rect.height, 2)}
    if blocks:
        textpage = page.get_textpage()
        entry['text'] = page.get_text('text', textpage=textpage)
        entry['blocks'] = [
            {'bbox': _bbox(b[:4]), 'type': 'image' if b[6] else 'text',
             'text': b[4] if not b[6] else ''}
            for b in page.get_text('blocks', textpage=textpage)]
    else:
        entry['text'] = page.get_text('text')
    if images_dir is not None:
        entry['images'] = _page_images(doc, page, images_dir, images_rel,
                                       saved_images)
    return entry


def _page_images(doc, page, images_dir, images_rel, saved_images):
    found = []
    for info in page.get_images(full=True):
        xref = info[0]
        if xref not in saved_images:
            image = doc.extract_image(xref)
            if not image:
                continue
            name = 'x%d.%s' % (xref, image['ext'])
            with open(os.path.join(images_dir, name), 'wb') as fh:
                fh.write(image['image'])
            saved_images[xref] = {
                'xref': xref, 'file': '%s/%s' % (images_rel, name),
                'width': image['width'], 'height': image['height'],
                'ext': image['ext'], 'bytes': len(image['image'])}
        found.append({'xref': xref, 'file': saved_images[xref]['file'],
                      'bbox': [_bbox(r) for r in page.get_image_rects(xref)]})
    return found
