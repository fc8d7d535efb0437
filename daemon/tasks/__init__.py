"""The built-in tasks: pdf.extract (daemon.tasks.pdf) and collect.urls /
collect.pages (daemon.tasks.collect).

Huey registers a task as `module.name`; operators use the short names.
BUILTIN_ALIASES maps one to the other for `huey-worker submit` and
POST /tasks.
"""

BUILTIN_ALIASES = {
    'pdf.extract': 'daemon.tasks.pdf.extract',
    'collect.urls': 'daemon.tasks.collect.urls',
    'collect.pages': 'daemon.tasks.collect.pages',
}
