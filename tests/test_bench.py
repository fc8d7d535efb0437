"""`make bench` in miniature: bench/run.py --quick runs every section
against its own private Redis and prints the one table (its figures mean
nothing at this size; docs/benchmarks.md has real ones)."""
import os
import re
import subprocess
import sys

import pytest

pytestmark = pytest.mark.slow

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

SECTIONS = ('Throughput, no-op tasks/s', 'CPU per no-op task', 'Memory, MiB',
            'Start-up, seconds from spawn', 'Pickup latency',
            'Where the pickup time goes',
            'Enqueue rate', 'Status endpoint', 'PDF text extraction',
            'Crash recovery')


def test_quick_bench_fills_every_section_of_the_table(tmp_path):
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(('HUEY_', 'REDIS_', 'NOTIFY_SOCKET'))}
    markdown = tmp_path / 'bench.md'
    done = subprocess.run(
        [sys.executable, os.path.join(ROOT, 'bench', 'run.py'), '--quick',
         '--markdown', str(markdown)], cwd=ROOT, env=env,
        capture_output=True, text=True, timeout=240)
    assert done.returncode == 0, done.stdout + done.stderr
    table = done.stdout
    assert 'FAILED' not in table
    for title in SECTIONS:
        assert title in table, title
    rows = {line.strip().split('  ')[0]: line for line in table.splitlines()
            if line.startswith('  ')}
    # Real figures in the rows that matter, for both consumers.
    for mode in ('thread x4', 'process x%d' % len(os.sched_getaffinity(0))):
        cells = rows[mode].split()
        assert any(c.replace('.', '').isdigit() for c in cells[2:4]), \
            rows[mode]
    assert rows['p99'].split()[1][0].isdigit()
    # The pickup's parts come from the consumers' own clock marks: the
    # suite's three of them, huey's two (its first transaction is none).
    for part in ('queue read returns -> task body starts',
                 'of which: -> first transaction sent',
                 'the first transaction (round trip)'):
        cells = re.split(r'\s{2,}', rows[part].strip())[1:]
        assert cells[0][0].isdigit() and cells[1][0].isdigit(), rows[part]
    assert rows['queue read returns -> task body starts'].split()[-1][0] \
        .isdigit()
    assert rows['/tasks/<id>'].split()[1][0].isdigit()
    # Plain huey's consumer loses a task killed with it; the suite's
    # comes back.
    assert 'lost in 1 of 1 runs' in table
    assert rows['suite, restarted at once (same identity)'].split()[-1][0] \
        .isdigit()
    assert markdown.read_text().count('|') > 50
