"""How many CPUs this process may really use.

Not the host total: the CPU affinity mask (taskset, systemd CPUAffinity=)
and the cgroup CPU quota (systemd CPUQuota=, container limits; cgroup v2
cpu.max or v1 cpu.cfs_quota_us) each lower it.  The roots are parameters so
tests can point them at a fake /proc and /sys.
"""
import math
import os


def affinity_count():
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        return os.cpu_count() or 1


def _cgroup_paths(proc_root):
    """Map controller -> cgroup path for this process ('' key: cgroup v2)."""
    paths = {}
    try:
        with open(os.path.join(proc_root, 'self/cgroup')) as fh:
            for line in fh:
                parts = line.rstrip('\n').split(':', 2)
                if len(parts) != 3:
                    continue
                _, controllers, path = parts
                for c in (controllers.split(',') if controllers else ['']):
                    paths[c] = path
    except OSError:
        pass
    return paths


def _read(path):
    try:
        with open(path) as fh:
            return fh.read().strip()
    except OSError:
        return None


def _ancestors(base, path):
    """The cgroup directory and each of its parents up to the mount root:
    a quota on any ancestor limits this process too."""
    parts = [p for p in path.split('/') if p]
    for depth in range(len(parts), -1, -1):
        yield os.path.join(base, *parts[:depth])


def cgroup_quota(proc_root='/proc', sys_root='/sys/fs/cgroup'):
    """The tightest CPU quota as a number of CPUs (float), or None."""
    paths = _cgroup_paths(proc_root)
    limits = []
    if '' in paths:  # cgroup v2 (unified)
        for directory in _ancestors(sys_root, paths['']):
            text = _read(os.path.join(directory, 'cpu.max'))
            if text:
                quota, _, period = text.partition(' ')
                if quota != 'max' and period:
                    limits.append(int(quota) / int(period))
    for controller in ('cpu', 'cpu,cpuacct'):
        if controller not in paths:
            continue
        for mount in ('cpu', 'cpu,cpuacct', 'cpuacct,cpu'):
            base = os.path.join(sys_root, mount)
            if not os.path.isdir(base):
                continue
            for directory in _ancestors(base, paths[controller]):
                quota = _read(os.path.join(directory, 'cpu.cfs_quota_us'))
                period = _read(os.path.join(directory, 'cpu.cfs_period_us'))
                if quota and period and int(quota) > 0 and int(period) > 0:
                    limits.append(int(quota) / int(period))
            break
    return min(limits) if limits else None


def usable_cpus(proc_root='/proc', sys_root='/sys/fs/cgroup',
                affinity=None):
    """(count, reason): whole CPUs this process may use, at least 1."""
    count = affinity if affinity is not None else affinity_count()
    reason = 'affinity allows %d CPU%s' % (count, '' if count == 1 else 's')
    quota = cgroup_quota(proc_root, sys_root)
    if quota is not None and math.ceil(quota) < count:
        count = max(1, math.ceil(quota))
        reason += ', cgroup quota %.2f CPUs -> %d' % (quota, count)
    return count, reason


def worker_count(setting, worker_type, threads_per_cpu, **roots):
    """(count, explanation) for the `workers` setting."""
    if setting != 'auto':
        return setting, 'set explicitly'
    cpus, reason = usable_cpus(**roots)
    if worker_type == 'process':
        return cpus, 'auto: one process per usable CPU (%s)' % reason
    count = cpus * threads_per_cpu
    return count, 'auto: %d usable CPU%s x threads_per_cpu %d for I/O-bound ' \
        'work (%s)' % (cpus, '' if cpus == 1 else 's', threads_per_cpu, reason)
