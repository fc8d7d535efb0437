"""pdf.extract on real PDFs generated here with pymupdf (many pages,
images, encrypted, truncated, damaged, not a PDF): the task code called
directly for the edge cases, then end to end through real consumers in
thread mode (cooperative timeout) and process mode (hard timeout)."""
import json
import os
import subprocess
import sys

import pymupdf
import pytest

from huey_worker.tasks import pdf
from huey_worker.tasks.http import FetchError
from huey_worker.tasks.paths import OutsideRoot
from huey_worker.tasks.pdf import PdfRejected, extract_pdf
from huey_worker.tasks.runtime import TaskRun
from misbehaving_http import Server
from task_helpers import Progress, make_cfg, wait_terminal

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


# -- generated documents ------------------------------------------------------

def text_pdf(path, pages, title='Generated report'):
    doc = pymupdf.open()
    for number in range(1, pages + 1):
        page = doc.new_page()
        page.insert_text((72, 72), 'Page %d heading' % number, fontsize=14)
        page.insert_textbox(pymupdf.Rect(72, 100, 520, 300),
                            'Body text of page %d. ' % number * 10)
    doc.set_metadata({'title': title, 'author': 'test suite'})
    _save(doc, path)
    return path


def image_pdf(path, pages=3):
    """Each page: a heading and one picture; page 3 repeats page 1's."""
    doc = pymupdf.open()
    colours = [(200, 30, 30), (30, 200, 30)]
    xrefs = []
    for number in range(1, pages + 1):
        page = doc.new_page()
        page.insert_text((72, 72), 'Picture page %d' % number)
        rect = pymupdf.Rect(100, 100, 300, 250)
        if number <= len(colours):
            pix = pymupdf.Pixmap(pymupdf.csRGB, pymupdf.IRect(0, 0, 40, 30),
                                 False)
            pix.set_rect(pix.irect, colours[number - 1])
            xrefs.append(page.insert_image(rect, pixmap=pix))
        else:
            page.insert_image(rect, xref=xrefs[0])
    _save(doc, path)
    return path


def dense_pdf(path, pages=1):
    """Pages so full of tiny text that extracting one takes seconds: a
    hard timeout must cut into a page, a cooperative one cannot."""
    doc = pymupdf.open()
    line = '(%s) Tj 0 -3.2 Td' % ('lorem ipsum dolor sit amet ' * 80)
    stream = '\n'.join(['BT /helv 3 Tf 5 13995 Td'] + [line] * 4370 +
                       ['ET']).encode()
    for _ in range(pages):
        page = doc.new_page(width=14000, height=14000)
        page.insert_text((5, 5), '.', fontname='helv', fontsize=3)
        doc.update_stream(page.get_contents()[0], stream)
    _save(doc, path)
    return path


def encrypted_pdf(path, user_pw='open sesame'):
    doc = pymupdf.open()
    doc.new_page().insert_text((72, 72), 'Top secret')
    os.makedirs(os.path.dirname(path), exist_ok=True)
    doc.save(path, encryption=pymupdf.PDF_ENCRYPT_AES_256, owner_pw='owner',
             user_pw=user_pw)
    return path


def _save(doc, path):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    doc.save(path, deflate=True)
    doc.close()


LOCAL = '127.0.0.1/32'   # the test web server's; refused by default


@pytest.fixture
def cfg(tmp_path):
    return make_cfg(tmp_path, collect__allow_networks=LOCAL)


@pytest.fixture
def inputs(tmp_path):
    path = tmp_path / 'input'
    path.mkdir()
    return path


def extract(cfg, source, progress=None, **kwargs):
    return extract_pdf(TaskRun(cfg, progress=progress or Progress()), source,
                       **kwargs)


def leftovers(directory):
    return [os.path.join(d, f) for d, _, files in os.walk(directory)
            for f in files if f.endswith('.part')]


# -- the normal case ----------------------------------------------------------

def test_text_of_every_page_with_progress_per_page(cfg, inputs):
    text_pdf(str(inputs / 'reports' / '2024' / 'q1.pdf'), 40)
    progress = Progress()
    summary = extract(cfg, 'reports/2024/q1.pdf', progress)
    out = os.path.join(cfg.pdf.output_root, 'reports', '2024', 'q1.json')
    assert summary['output'] == out and summary['pages'] == 40
    with open(out) as fh:
        doc = json.load(fh)
    assert doc['page_count'] == 40 and len(doc['pages']) == 40
    assert doc['metadata']['title'] == 'Generated report'
    assert doc['metadata']['author'] == 'test suite'
    assert doc['source']['path'] == os.path.join('reports', '2024', 'q1.pdf')
    assert len(doc['source']['sha256']) == 64
    for number, page in enumerate(doc['pages'], 1):
        assert page['number'] == number
        assert page['text'].startswith('Page %d heading' % number)
        assert 'Body text of page %d.' % number in page['text']
    assert summary['characters'] == sum(len(p['text']) for p in doc['pages'])
    assert progress.currents == list(range(1, 41))
    assert {c[1] for c in progress.calls} == {40}
    assert leftovers(cfg.pdf.output_root) == []


def test_blocks_with_bounding_boxes_and_images_as_files(cfg, inputs):
    image_pdf(str(inputs / 'pictures.pdf'))
    summary = extract(cfg, 'pictures.pdf', blocks=True, images=True)
    with open(summary['output']) as fh:
        doc = json.load(fh)
    assert summary['images'] == 2          # page 3 reuses page 1's picture
    first = doc['pages'][0]
    text_blocks = [b for b in first['blocks'] if b['type'] == 'text']
    assert text_blocks[0]['text'].startswith('Picture page 1')
    x0, y0, x1, y1 = text_blocks[0]['bbox']
    assert 0 <= x0 < x1 <= first['width'] and 0 <= y0 < y1 <= first['height']
    pictures = [p['images'] for p in doc['pages']]
    assert [len(p) for p in pictures] == [1, 1, 1]
    assert pictures[2][0]['file'] == pictures[0][0]['file']
    assert pictures[0][0]['bbox'] == [[100.0, 100.0, 300.0, 250.0]]
    out_dir = os.path.dirname(summary['output'])
    for entry in doc['images']:
        path = os.path.join(out_dir, entry['file'])
        assert os.path.getsize(path) == entry['bytes'] > 0
        assert (entry['width'], entry['height']) == (40, 30)
    assert sorted(os.listdir(summary['images_dir'])) == sorted(
        os.path.basename(e['file']) for e in doc['images'])


def test_without_options_no_blocks_and_no_images(cfg, inputs):
    image_pdf(str(inputs / 'plain.pdf'))
    summary = extract(cfg, 'plain.pdf')
    with open(summary['output']) as fh:
        doc = json.load(fh)
    assert 'blocks' not in doc['pages'][0] and 'images' not in doc
    assert not os.path.exists(summary['output'][:-5] + '.images')


def test_options_default_from_the_config(tmp_path, inputs):
    image_pdf(str(inputs / 'configured.pdf'))
    cfg = make_cfg(tmp_path, pdf__blocks='true', pdf__images='true')
    summary = extract(cfg, 'configured.pdf')
    with open(summary['output']) as fh:
        doc = json.load(fh)
    assert 'blocks' in doc['pages'][0] and len(doc['images']) == 2


def test_an_output_name_and_an_absolute_input_inside_the_root(cfg, inputs):
    path = text_pdf(str(inputs / 'abs.pdf'), 2)
    summary = extract(cfg, path, output='named/result')
    assert summary['output'] == os.path.join(cfg.pdf.output_root, 'named',
                                             'result.json')
    with pytest.raises(OutsideRoot, match=r'\[pdf\] output_root'):
        extract(cfg, path, output='../../escape')


def test_a_rerun_replaces_the_output_and_its_images(cfg, inputs):
    image_pdf(str(inputs / 'again.pdf'))
    first = extract(cfg, 'again.pdf', images=True)
    image_pdf(str(inputs / 'again.pdf'), pages=1)
    second = extract(cfg, 'again.pdf', images=True)
    assert second['output'] == first['output'] and second['pages'] == 1
    assert len(os.listdir(second['images_dir'])) == 1
    assert leftovers(cfg.pdf.output_root) == []
    parent = os.path.dirname(second['images_dir'])
    assert [n for n in os.listdir(parent) if n.startswith('.')] == []


# -- refused input: clear errors, never retried -------------------------------

def test_paths_outside_the_input_root_are_refused(cfg, inputs, tmp_path):
    secret = text_pdf(str(tmp_path / 'outside' / 'secret.pdf'), 1)
    os.symlink(secret, str(inputs / 'link.pdf'))
    os.symlink(os.path.dirname(secret), str(inputs / 'linkdir'))
    with pytest.raises(OutsideRoot, match=r"'\.\./outside/secret.pdf' leads "
                                          r"outside \[pdf\] input_root"):
        extract(cfg, '../outside/secret.pdf')
    with pytest.raises(OutsideRoot, match='outside'):
        extract(cfg, secret)
    with pytest.raises(OutsideRoot, match='through a symlink outside'):
        extract(cfg, 'link.pdf')
    with pytest.raises(OutsideRoot, match='through a symlink outside'):
        extract(cfg, 'linkdir/secret.pdf')
    with pytest.raises(PdfRejected, match='is not a file below'):
        extract(cfg, 'missing.pdf')
    assert not os.path.exists(cfg.pdf.output_root) or \
        os.listdir(cfg.pdf.output_root) == []


def test_encrypted_needs_the_password(cfg, inputs):
    encrypted_pdf(str(inputs / 'locked.pdf'))
    with pytest.raises(PdfRejected, match='locked.pdf is encrypted: it needs '
                                          'a password'):
        extract(cfg, 'locked.pdf')
    with pytest.raises(PdfRejected, match='password given is wrong'):
        extract(cfg, 'locked.pdf', password='guess')
    summary = extract(cfg, 'locked.pdf', password='open sesame')
    with open(summary['output']) as fh:
        doc = json.load(fh)
    assert doc['encrypted'] is True
    assert doc['pages'][0]['text'].strip() == 'Top secret'


def test_truncated_damaged_and_not_a_pdf(cfg, inputs):
    whole = open(text_pdf(str(inputs / 'whole.pdf'), 20), 'rb').read()
    (inputs / 'truncated.pdf').write_bytes(whole[:len(whole) * 6 // 10])
    (inputs / 'garbage.pdf').write_bytes(
        b'%PDF-1.7\n' + bytes(range(256)) * 20 + b'\n%%EOF\n')
    (inputs / 'notes.pdf').write_text('just some text, no PDF at all\n' * 9)
    (inputs / 'empty.pdf').write_bytes(b'')
    pix = pymupdf.Pixmap(pymupdf.csRGB, pymupdf.IRect(0, 0, 8, 8), False)
    (inputs / 'picture.pdf').write_bytes(pix.tobytes('png'))
    cases = {
        'truncated.pdf': r'truncated.pdf is damaged: truncated \(no %%EOF',
        'garbage.pdf': r'garbage.pdf is damaged: MuPDF cannot open it',
        'notes.pdf': r'notes.pdf is not a PDF \(no %PDF- header\)',
        'empty.pdf': r'empty.pdf is not a PDF \(an empty file\)',
        'picture.pdf': r'picture.pdf is not a PDF',
    }
    for name, message in cases.items():
        with pytest.raises(PdfRejected, match=message):
            extract(cfg, name)
    assert leftovers(cfg.pdf.output_root) == []


def test_page_and_size_limits_from_the_config(tmp_path, inputs):
    path = text_pdf(str(inputs / 'long.pdf'), 12)
    cfg = make_cfg(tmp_path, pdf__max_pages=10)
    with pytest.raises(PdfRejected, match=r'has 12 pages, more than \[pdf\] '
                                          r'max_pages \(10\)'):
        extract(cfg, 'long.pdf')
    size = os.path.getsize(path)
    cfg = make_cfg(tmp_path, pdf__max_bytes=size - 1)
    with pytest.raises(PdfRejected, match=r'is %d bytes, more than \[pdf\] '
                                          r'max_bytes' % size):
        extract(cfg, 'long.pdf')


def test_refused_input_is_not_retried_by_huey(cfg, inputs, producer):
    (inputs / 'notes.pdf').write_text('plain text')
    task = pdf.extract.s('notes.pdf', retries=3)
    with pytest.raises(PdfRejected):
        TaskRun(cfg, task, Progress()).run(extract_pdf, 'notes.pdf')
    assert task.retries == 0
    assert repr(PdfRejected('x is not a PDF')) == 'PdfRejected: x is not a PDF'


def test_the_password_never_reaches_the_journal(producer):
    from task_helpers import journal_record
    queued = pdf.extract('locked.pdf', password='open sesame')
    record = journal_record(producer, queued.id)
    assert record['state'] == 'pending'
    assert record['args']['kwargs']['password'] == '********'
    assert 'open sesame' not in json.dumps(record)


def test_a_hard_time_limit_waits_for_the_pymupdf_import_to_finish():
    import time
    from huey.exceptions import TaskTimeout
    from huey_worker.worker import AlarmTimeout
    import signal
    finished = []
    previous = signal.getsignal(signal.SIGALRM)
    try:
        with pytest.raises(TaskTimeout):
            with AlarmTimeout()(0.05):     # what a process worker installs
                with pdf._alarm_held():    # around the first import
                    time.sleep(0.3)        # the alarm goes off in here
                    finished.append(True)
    finally:
        signal.signal(signal.SIGALRM, previous)  # a worker keeps it; we don't
    assert finished == [True]


# -- from a URL ---------------------------------------------------------------

@pytest.fixture
def web():
    server = Server().start()
    yield server
    server.stop()


def test_a_pdf_from_a_url(cfg, tmp_path, web):
    data = open(text_pdf(str(tmp_path / 'src' / 'remote.pdf'), 3), 'rb').read()
    url = web.serve_bytes('remote.pdf', data, 'application/octet-stream')
    summary = extract(cfg, url)
    assert summary['pages'] == 3 and summary['source'] == url
    assert summary['output'].startswith(os.path.join(cfg.pdf.output_root,
                                                     'urls', '127.0.0.1_'))
    with open(summary['output']) as fh:
        doc = json.load(fh)
    assert doc['source']['url'] == url and doc['source']['bytes'] == len(data)
    downloads = os.path.join(cfg.pdf.output_root, '.downloads')
    assert os.listdir(downloads) == []
    # A download left behind by a worker that died is swept away later.
    stale = os.path.join(downloads, 'tmpdead.pdf')
    open(stale, 'wb').close()
    os.utime(stale, (1, 1))
    extract(cfg, url)
    assert os.listdir(downloads) == []


def test_url_failures_permanent_or_for_a_retry(cfg, tmp_path, web):
    with pytest.raises(PdfRejected, match='cannot download .*HTTP 404'):
        extract(cfg, web.url('/file/absent.pdf'))
    with pytest.raises(FetchError, match='HTTP 500') as failure:
        extract(make_cfg(tmp_path, collect__retries=0,
                         collect__allow_networks=LOCAL),
                web.url('/flaky/pdf?fail=5'))
    assert failure.value.transient
    web.serve_bytes('page.html', b'<html>not a pdf</html>', 'text/html')
    with pytest.raises(PdfRejected, match='is not a PDF'):
        extract(cfg, web.url('/file/page.html'))


# -- end to end through real consumers ----------------------------------------

def consumer_env(base_env, tmp_path, **extra):
    env = dict(base_env)
    env.update({
        'HUEY_WORKER_TASKS_BUILTIN': 'true',
        'HUEY_WORKER_PDF_INPUT_ROOT': str(tmp_path / 'input'),
        'HUEY_WORKER_PDF_OUTPUT_ROOT': str(tmp_path / 'output'),
        'HUEY_WORKERS': '2',
    })
    env.update(extra)
    return env


def test_through_a_thread_consumer_with_a_cooperative_timeout(
        tmp_path, inputs, base_env, start_daemon, producer):
    image_pdf(str(inputs / 'ok.pdf'), pages=6)
    encrypted_pdf(str(inputs / 'locked.pdf'))
    dense_pdf(str(inputs / 'dense.pdf'), pages=4)
    env = consumer_env(base_env, tmp_path, HUEY_WORKER_TYPE='thread',
                       HUEY_TASK_TIMEOUT='1', HUEY_RESULT_TIMEOUT='4321')
    start_daemon(['consumer'], env, 'consumer').wait_for_output(
        'consumer ready')
    # ok and locked get a limit of their own: in thread mode they may wait
    # for the MuPDF turn while dense.pdf holds it.
    ok = pdf.extract('ok.pdf', images=True, timeout=60)
    locked = pdf.extract('locked.pdf', retries=3, retry_delay=0, timeout=60)
    slow = pdf.extract('dense.pdf', retries=0)

    record = wait_terminal(producer, ok.id)
    assert record['state'] == 'complete', record
    summary = ok.get()
    assert summary['pages'] == 6 and summary['images'] == 2
    assert os.path.exists(tmp_path / 'output' / 'ok.json')
    assert record['progress']['current'] == record['progress']['total'] == 6
    ttl = producer.storage.conn.ttl(producer.storage.result_key(ok.id))
    assert 4000 < ttl <= 4321   # HUEY_RESULT_TIMEOUT of the consumer

    record = wait_terminal(producer, locked.id)
    assert record['state'] == 'failed' and record['attempt'] == 1, record
    assert 'locked.pdf is encrypted' in record['error']['message']

    record = wait_terminal(producer, slow.id)
    assert record['state'] == 'failed', record
    assert record['error']['type'] == 'TaskTimeout'
    # Stopped part way: between pages by its own check, or wherever the
    # consumer's TaskTimeout reached its thread (not inside one page).
    assert (record['progress'] or {}).get('current', 0) < 4
    assert not os.path.exists(tmp_path / 'output' / 'dense.json')
    assert leftovers(str(tmp_path / 'output')) == []


def test_through_a_process_consumer_the_timeout_is_hard(
        tmp_path, inputs, base_env, start_daemon, producer):
    dense_pdf(str(inputs / 'dense.pdf'), pages=1)
    text_pdf(str(inputs / 'small.pdf'), 5)
    env = consumer_env(base_env, tmp_path, HUEY_WORKER_TYPE='process',
                       HUEY_TASK_TIMEOUT='1', HUEY_WORKERS='1')
    start_daemon(['consumer'], env, 'consumer').wait_for_output(
        'consumer ready')
    # First a small one with a limit of its own, which also loads pymupdf
    # into the worker process (the import alone takes most of a second).
    small = pdf.extract('small.pdf', retries=0, timeout=60)
    assert wait_terminal(producer, small.id)['state'] == 'complete'
    assert small.get()['pages'] == 5
    slow = pdf.extract('dense.pdf', retries=0)
    record = wait_terminal(producer, slow.id)
    assert record['state'] == 'failed', record
    assert record['error']['type'] == 'TaskTimeout'
    # One page only: no check between pages could have stopped it; the
    # alarm cut into the page.
    assert record['progress'] is None
    assert not os.path.exists(tmp_path / 'output' / 'dense.json')
    # The worker survives its timeout and goes on working.
    again = pdf.extract('small.pdf', output='again', retries=0, timeout=60)
    assert wait_terminal(producer, again.id)['state'] == 'complete'


def test_submit_pdf_extract_from_the_command_line(
        tmp_path, inputs, base_env, start_daemon):
    text_pdf(str(inputs / 'cli.pdf'), 7)
    env = consumer_env(base_env, tmp_path)
    start_daemon(['consumer'], env, 'consumer').wait_for_output(
        'consumer ready')
    done = subprocess.run(
        [sys.executable, '-m', 'huey_worker', 'submit', 'pdf.extract', 'cli.pdf',
         '--wait'], env=env, cwd=ROOT, capture_output=True, text=True,
        timeout=60)
    assert done.returncode == 0, done.stderr
    lines = done.stdout.strip().splitlines()
    task_id = lines[0]                  # submit prints the id first
    assert lines[1].startswith('%s complete' % task_id)
    summary = json.loads(lines[-1])
    assert summary['pages'] == 7
    assert summary['output'] == str(tmp_path / 'output' / 'cli.json')
    assert '7/7' in done.stderr        # the progress shown while waiting

    refused = subprocess.run(
        [sys.executable, '-m', 'huey_worker', 'submit', 'pdf.extract',
         '../etc/passwd', '--wait'], env=env, cwd=ROOT, capture_output=True,
        text=True, timeout=60)
    assert refused.returncode == 1
    assert 'outside [pdf] input_root' in refused.stdout
