"""Put pip into a venv made with --without-pip, on machines whose Python
has no ensurepip (Debian and Ubuntu without python3-venv).  Standard library
only: fetches pip's wheel from PyPI, checks its sha256, and lets that wheel
install itself.

    python3 deploy/bootstrap-pip.py .venv/bin/python
"""
import hashlib
import json
import os
import subprocess
import sys
import tempfile
import urllib.parse
import urllib.request

INDEX = os.environ.get('HUEY_WORKER_PIP_JSON', 'https://pypi.org/pypi/pip/json')


def main(venv_python):
    with urllib.request.urlopen(INDEX, timeout=60) as response:
        release = json.load(response)
    wheel = next(u for u in release['urls'] if u['packagetype'] == 'bdist_wheel')
    url = urllib.parse.urljoin(INDEX, wheel['url'])
    with urllib.request.urlopen(url, timeout=120) as response:
        data = response.read()
    if hashlib.sha256(data).hexdigest() != wheel['digests']['sha256']:
        sys.exit('bootstrap-pip: %s does not match its sha256' % url)
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, wheel['filename'])
        with open(path, 'wb') as fh:
            fh.write(data)
        # A wheel is a zip Python can import from: pip installs itself.
        subprocess.run([venv_python, os.path.join(path, 'pip'), 'install',
                        '--quiet', '--no-index', path], check=True)


if __name__ == '__main__':
    if len(sys.argv) != 2:
        sys.exit('usage: bootstrap-pip.py VENV_PYTHON')
    main(sys.argv[1])
