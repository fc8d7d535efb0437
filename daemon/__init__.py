"""huey-worker: run Huey task queues on plain VMs."""
__version__ = '0.1.0'
