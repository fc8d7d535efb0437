"""Seed 000's collection task."""
from core.huey import huey


@huey.task(retries=1, retry_delay=0)
def collect_task(job_id, urls):
    return {'job': job_id, 'collected': len(urls)}
