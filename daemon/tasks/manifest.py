"""manifest.json of a collect job directory: what was saved where, what
failed and why, and how many items the directory holds.  The files are the
truth for resuming (an item whose file exists is skipped); the manifest is
the record for people and tools."""
import datetime
import json
import os

from .paths import write_atomically

FORMAT = 'huey-worker/collect/1'
NAME = 'manifest.json'


def _now():
    return datetime.datetime.now(datetime.timezone.utc).isoformat(
        timespec='seconds')


class Manifest:
    def __init__(self, job_dir, kind, **about):
        self.job_dir = job_dir
        self.path = os.path.join(job_dir, NAME)
        self.kind = kind
        self.about = about
        self.items = {}
        self.counts = {'saved': 0, 'skipped': 0, 'failed': 0}
        self.failures = []    # keys of the items that failed in this run
        try:
            with open(self.path, encoding='utf-8') as fh:
                previous = json.load(fh)
            if isinstance(previous.get('items'), dict):
                self.items = previous['items']
        except (OSError, ValueError):
            pass  # no manifest yet, or a damaged one: the files still count

    def saved(self, key, **entry):
        self.counts['saved'] += 1
        self.items[key] = dict(entry, status='saved', at=_now())

    def skipped(self, key, **entry):
        self.counts['skipped'] += 1
        previous = self.items.get(key) or {}
        self.items[key] = dict(previous, **entry)
        self.items[key].setdefault('status', 'saved')

    def failed(self, key, error, transient, **entry):
        self.counts['failed'] += 1
        self.failures.append(key)
        self.items[key] = dict(entry, status='failed', error=error,
                               transient=transient, at=_now())

    @property
    def items_collected(self):
        """Items of this run now on disk (saved now or before): the seed's
        artworks_count."""
        return self.counts['saved'] + self.counts['skipped']

    def items_on_disk(self):
        """Items whose file is in the job directory (any run)."""
        return sum(1 for entry in self.items.values()
                   if entry.get('status') == 'saved' and entry.get('file')
                   and os.path.exists(os.path.join(self.job_dir,
                                                   entry['file'])))

    def write(self, task_id=None):
        record = {'format': FORMAT, 'kind': self.kind, 'updated_at': _now(),
                  'task_id': task_id, 'items_on_disk': self.items_on_disk(),
                  'last_run': dict(self.counts,
                                   items_collected=self.items_collected)}
        record.update(self.about)
        record['items'] = self.items
        write_atomically(self.path, json.dumps(
            record, ensure_ascii=False, indent=1, sort_keys=True)
            .encode('utf-8'))
        return record
