"""workers = auto: CPUs the process may really use, from a faked affinity
and cgroup tree, and from a real affinity mask on a real consumer."""
import os
import signal
import subprocess
import sys
import time

import pytest

from conftest import ROOT

from huey_worker import cpus


def fake_tree(tmp_path, cgroup_lines, files):
    proc = tmp_path / 'proc'
    (proc / 'self').mkdir(parents=True)
    (proc / 'self' / 'cgroup').write_text('\n'.join(cgroup_lines) + '\n')
    sys_root = tmp_path / 'sys'
    for rel, text in files.items():
        path = sys_root / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
    sys_root.mkdir(exist_ok=True)
    return {'proc_root': str(proc), 'sys_root': str(sys_root)}


def test_cgroup_v2_quota_limits_the_count(tmp_path):
    roots = fake_tree(tmp_path, ['0::/system.slice/huey-worker.service'], {
        'system.slice/huey-worker.service/cpu.max': '150000 100000\n',
        'system.slice/cpu.max': 'max 100000\n'})
    assert cpus.usable_cpus(affinity=8, **roots)[0] == 2  # 1.5 CPUs -> 2
    count, why = cpus.worker_count('auto', 'process', 4, affinity=8, **roots)
    assert count == 2 and 'cgroup quota 1.50' in why
    count, why = cpus.worker_count('auto', 'thread', 4, affinity=8, **roots)
    assert count == 8 and 'threads_per_cpu 4' in why


def test_cgroup_v2_quota_on_an_ancestor_counts(tmp_path):
    roots = fake_tree(tmp_path, ['0::/machine.slice/vm/app'], {
        'machine.slice/vm/app/cpu.max': 'max 100000\n',
        'machine.slice/cpu.max': '100000 100000\n'})
    assert cpus.usable_cpus(affinity=16, **roots)[0] == 1


def test_cgroup_v1_quota(tmp_path):
    roots = fake_tree(tmp_path, ['4:cpu,cpuacct:/docker/abc',
                                 '3:memory:/docker/abc'], {
        'cpu,cpuacct/docker/abc/cpu.cfs_quota_us': '300000\n',
        'cpu,cpuacct/docker/abc/cpu.cfs_period_us': '100000\n'})
    assert cpus.usable_cpus(affinity=8, **roots)[0] == 3


def test_no_quota_means_affinity(tmp_path):
    roots = fake_tree(tmp_path, ['0::/user.slice'], {
        'user.slice/cpu.max': 'max 100000\n'})
    count, why = cpus.usable_cpus(affinity=3, **roots)
    assert count == 3 and 'cgroup' not in why
    v1_unlimited = fake_tree(tmp_path / 'v1', ['2:cpu:/'], {
        'cpu/cpu.cfs_quota_us': '-1\n', 'cpu/cpu.cfs_period_us': '100000\n'})
    assert cpus.usable_cpus(affinity=3, **v1_unlimited)[0] == 3


def test_quota_above_affinity_does_not_raise_the_count(tmp_path):
    roots = fake_tree(tmp_path, ['0::/a'], {'a/cpu.max': '800000 100000\n'})
    assert cpus.usable_cpus(affinity=2, **roots)[0] == 2


def test_explicit_count_is_kept():
    assert cpus.worker_count(7, 'process', 4) == (7, 'set explicitly')


def test_real_affinity_mask_is_seen_by_a_real_consumer(base_env, tmp_path):
    """A real consumer started under a one-CPU mask (as taskset or systemd
    CPUAffinity= would leave it) runs one process worker, not one per host
    CPU."""
    if os.cpu_count() < 2:
        pytest.skip('the host has one CPU: a mask cannot lower it')
    env = dict(base_env, HUEY_WORKER_TYPE='process')
    log_path = tmp_path / 'consumer.log'
    with open(log_path, 'wb') as log:
        proc = subprocess.Popen(
            [sys.executable, '-m', 'huey_worker', 'consumer'], env=env, cwd=ROOT,
            stdout=log, stderr=subprocess.STDOUT,
            preexec_fn=lambda: os.sched_setaffinity(0, {0}))
    try:
        deadline = time.monotonic() + 30
        while 'consumer ready' not in log_path.read_text():
            assert proc.poll() is None, log_path.read_text()
            assert time.monotonic() < deadline, log_path.read_text()
            time.sleep(0.05)
        out = log_path.read_text()
        assert '1 process worker (auto: one process per usable CPU ' \
               '(affinity allows 1 CPU))' in out, out
    finally:
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(30) == 0
