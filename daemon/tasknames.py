"""Finding a registered task by the name an operator types, and enqueueing
it by name (huey-worker submit, POST /tasks).

Huey registers a task as `module.function`.  Accepted, in this order:
the full registered name; an alias (the built-in short names such as
pdf.extract, and any added with register_alias); a dotted suffix of exactly
one registered name (`add` or `sample_tasks.add` for sample_tasks.add).
"""
import difflib

ALIASES = {}


class TaskNameError(LookupError):
    """The name matches no task (unknown) or several (ambiguous)."""

    def __init__(self, message, name, candidates=()):
        super().__init__(message)
        self.name, self.candidates = name, list(candidates)


class UnknownTask(TaskNameError):
    pass


class AmbiguousTask(TaskNameError):
    pass


def register_alias(short, full):
    ALIASES[short] = full


def _aliases():
    aliases = dict(ALIASES)
    try:
        from .tasks import BUILTIN_ALIASES
    except ImportError:
        BUILTIN_ALIASES = {}
    for short, full in BUILTIN_ALIASES.items():
        aliases.setdefault(short, full)
    return aliases


def registered(app):
    return dict(app._registry._registry)


def resolve_task(app, name):
    """The registered name of the task `name` means; raises UnknownTask or
    AmbiguousTask with a message naming the choices."""
    name = (name or '').strip()
    tasks = registered(app)
    if name in tasks:
        return name
    alias = _aliases().get(name)
    if alias in tasks:
        return alias
    matches = sorted(full for full in tasks if full.endswith('.' + name))
    if len(matches) == 1:
        return matches[0]
    if matches:
        raise AmbiguousTask('task name %r is ambiguous: it could be %s' % (
            name, ', '.join(matches)), name, matches)
    known = sorted(set(tasks) | {a for a, full in _aliases().items()
                                 if full in tasks})
    close = difflib.get_close_matches(name, known, n=3, cutoff=0.6)
    hint = ' (did you mean %s?)' % ' or '.join(close) if close else ''
    raise UnknownTask('no registered task named %r%s; registered: %s' % (
        name, hint, ', '.join(sorted(tasks)) or 'none'), name, close)


def task_class(app, name):
    return registered(app)[resolve_task(app, name)]


def submit(app, name, args=(), kwargs=None, delay=None, task_id=None,
           priority=None):
    """Enqueue the task `name` resolves to; returns (task id, full name).
    The journal records it as pending (or scheduled with a delay).
    `priority` (a number, higher runs first) overrides the task's own."""
    full = resolve_task(app, name)
    cls = registered(app)[full]
    eta = None
    if delay:
        from huey.utils import normalize_time
        eta = normalize_time(delay=delay, utc=app.utc)
    task = cls(tuple(args or ()), dict(kwargs or {}), id=task_id, eta=eta,
               priority=priority)
    app.enqueue(task)
    return task.id, full
