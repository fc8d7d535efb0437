"""The built-in tasks: pdf.extract (huey_worker.tasks.pdf) and collect.urls /
collect.pages (huey_worker.tasks.collect).

Huey registers a task as `module.name`; operators use the short names.
BUILTIN_ALIASES maps one to the other for `huey-worker submit` and
POST /tasks.
"""

BUILTIN_ALIASES = {
    'pdf.extract': 'huey_worker.tasks.pdf.extract',
    'collect.urls': 'huey_worker.tasks.collect.urls',
    'collect.pages': 'huey_worker.tasks.collect.pages',
}
