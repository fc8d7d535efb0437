"""Benchmark: text extraction through pdf.extract against pymupdf called
directly, on the same generated document.

    .venv/bin/python bench/pdf_extract.py [--pages N] [--runs N]

"direct" opens the document and calls page.get_text() on every page;
"suite" runs the task's code (huey_worker.tasks.pdf.extract_pdf: checks, SHA-256,
per-page progress and timeout checks, JSON written atomically) on the same
file.  Runs alternate between the two (first one, then the other) so machine
noise hits both alike.

Throughput is measured twice: pages per second of wall-clock time and
pages per second of this process's CPU time.  On a busy shared machine the
wall clock mostly measures the neighbours, so the verdict uses CPU time;
both are printed (median, min, max).  The ratio is the median of the
suite/direct ratios of back-to-back pairs; exit status 1 when it is below
--target (default 0.95).
"""
import argparse
import os
import statistics
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import pymupdf  # noqa: E402

from huey_worker import config  # noqa: E402
from huey_worker.tasks.pdf import extract_pdf  # noqa: E402
from huey_worker.tasks.runtime import TaskRun  # noqa: E402

PARAGRAPH = ('The quick brown fox jumps over the lazy dog; pack my box with '
             'five dozen liquor jugs. ') * 40


def make_document(path, pages):
    doc = pymupdf.open()
    for number in range(1, pages + 1):
        page = doc.new_page()
        page.insert_text((72, 60), 'Page %d' % number, fontsize=14)
        page.insert_textbox(pymupdf.Rect(72, 80, 540, 780), PARAGRAPH,
                            fontsize=10)
    doc.save(path, deflate=True)
    doc.close()


def direct(path):
    doc = pymupdf.open(path, filetype='pdf')
    texts = [page.get_text() for page in doc]
    count = len(texts)
    doc.close()
    return count


def suite(cfg, name):
    return extract_pdf(TaskRun(cfg), name)['pages']


def timed(fn, *args):
    wall, cpu = time.perf_counter(), time.process_time()
    pages = fn(*args)
    return (pages / (time.perf_counter() - wall),
            pages / (time.process_time() - cpu))


def describe(label, rates):
    return '%-13s median %7.1f pages/s  (min %.1f, max %.1f, %d runs)' % (
        label, statistics.median(rates), min(rates), max(rates), len(rates))


def pair_ratio(suite_rates, direct_rates):
    return statistics.median(s / d for s, d in zip(suite_rates,
                                                   direct_rates))


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    parser.add_argument('--pages', type=int, default=600)
    parser.add_argument('--runs', type=int, default=21)
    parser.add_argument('--target', type=float, default=0.95)
    args = parser.parse_args(argv)

    with tempfile.TemporaryDirectory(prefix='bench-pdf-') as tmp:
        input_root = os.path.join(tmp, 'input')
        os.makedirs(input_root)
        path = os.path.join(input_root, 'bench.pdf')
        make_document(path, args.pages)
        empty = os.path.join(tmp, 'empty.ini')
        open(empty, 'w').close()
        cfg = config.load(empty, environ={}, overrides={
            'pdf.input_root': input_root,
            'pdf.output_root': os.path.join(tmp, 'output'),
            'pdf.max_pages': str(args.pages)})
        direct(path)           # warm up: page cache, fonts, imports
        suite(cfg, 'bench.pdf')
        wall = {'direct': [], 'suite': []}
        cpu = {'direct': [], 'suite': []}
        contenders = [('direct', direct, (path,)),
                      ('suite', suite, (cfg, 'bench.pdf'))]
        for run in range(args.runs):
            # Swap the order every pair: neither always runs second.
            for label, fn, fn_args in contenders[::1 if run % 2 else -1]:
                by_wall, by_cpu = timed(fn, *fn_args)
                wall[label].append(by_wall)
                cpu[label].append(by_cpu)
    print('pdf.extract benchmark: %d pages, pymupdf %s' % (
        args.pages, pymupdf.VersionBind))
    print(describe('direct wall', wall['direct']))
    print(describe('suite wall', wall['suite']))
    print(describe('direct cpu', cpu['direct']))
    print(describe('suite cpu', cpu['suite']))
    wall_ratio = pair_ratio(wall['suite'], wall['direct'])
    ratio = pair_ratio(cpu['suite'], cpu['direct'])
    print('ratio (wall)  %.3f' % wall_ratio)
    print('ratio (cpu)   %.3f (suite / direct, target >= %.2f): %s' % (
        ratio, args.target, 'ok' if ratio >= args.target else 'BELOW TARGET'))
    return 0 if ratio >= args.target else 1


if __name__ == '__main__':
    sys.exit(main())
