"""Paths the built-in tasks read and write: always inside a configured
root, and outputs written atomically (a reader sees the old file or the
complete new one, never half of it)."""
import hashlib
import os
import re
import shutil
import tempfile
from contextlib import contextmanager

from .runtime import InputRejected


class OutsideRoot(InputRejected):
    pass


def resolve_under(root, name, setting):
    """The real path of `name` (relative to `root`, or absolute) if it lies
    inside `root` once every symlink is followed; OutsideRoot otherwise.
    `setting` ('[pdf] input_root') names the root in the error."""
    if not isinstance(name, str) or not name.strip():
        raise InputRejected('expected a path, got %r' % (name,))
    if '\x00' in name:
        raise InputRejected('path contains a NUL byte: %r' % (name,))
    real_root = os.path.realpath(root)
    candidate = name if os.path.isabs(name) else os.path.join(real_root, name)
    real = os.path.realpath(candidate)
    if not _inside(real, real_root):
        lexical = os.path.normpath(candidate)
        via_link = _inside(lexical, real_root) or _inside(
            lexical, os.path.normpath(os.path.abspath(root)))
        raise OutsideRoot('%r leads %soutside %s (%s); only files below it '
                          'are accepted' % (name, 'through a symlink ' if
                                            via_link else '', setting,
                                            real_root))
    return real


def _inside(path, root):
    return path == root or os.path.commonpath([path, root]) == root


SAFE_CHARS = re.compile(r'[^A-Za-z0-9._-]+')


def safe_name(text, limit=80):
    """A file name made of [A-Za-z0-9._-] from `text`; when anything had to
    be changed a short hash of the original keeps distinct texts apart."""
    text = str(text)
    cleaned = SAFE_CHARS.sub('_', text).strip('._') or 'item'
    if cleaned != text or len(cleaned) > limit:
        digest = hashlib.sha1(text.encode('utf-8', 'surrogatepass')) \
            .hexdigest()[:8]
        cleaned = '%s-%s' % (cleaned[:limit - 9], digest)
    return cleaned


@contextmanager
def atomic_file(path, mode='wb'):
    """Write to a temporary file beside `path`; it replaces `path` only
    when the block ends without an exception, after being synced."""
    directory = os.path.dirname(path)
    os.makedirs(directory, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix='.%s.' % os.path.basename(path)[:60],
                               suffix='.part', dir=directory)
    try:
        with os.fdopen(fd, mode) as fh:
            yield fh
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        raise


def write_atomically(path, data):
    with atomic_file(path) as fh:
        fh.write(data)


@contextmanager
def staged_directory(path):
    """A fresh temporary directory that becomes `path` (replacing what was
    there) when the block succeeds, and disappears when it fails."""
    parent = os.path.dirname(path)
    os.makedirs(parent, exist_ok=True)
    tmp = tempfile.mkdtemp(prefix='.%s.' % os.path.basename(path)[:60],
                           suffix='.part', dir=parent)
    try:
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    old = None
    if os.path.lexists(path):
        old = tempfile.mkdtemp(prefix='.%s.' % os.path.basename(path)[:60],
                               suffix='.old', dir=parent)
        os.rename(path, os.path.join(old, 'previous'))
    os.rename(tmp, path)
    if old:
        shutil.rmtree(old, ignore_errors=True)
