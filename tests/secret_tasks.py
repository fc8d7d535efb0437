"""Tasks of tests/test_secrets.py: arguments that must never be shown."""
from huey_worker import huey
from huey_worker.journal import sensitive


@sensitive
@huey.task()
def sign_in(user, password):
    """Fails, with a traceback, after a Redis call of its own."""
    huey.storage.conn.incr('test:sign-in')
    raise PermissionError('sign-in refused for %s' % user)


@huey.task(sensitive_args=('token',))
def call_api(url, token=None):
    return url
