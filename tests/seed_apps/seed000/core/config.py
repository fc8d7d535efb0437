"""Seed 000's settings, from the environment (.env)."""
import os


class Config:
    REDIS_URL = os.environ.get('PIXCOLLECTOR_REDIS_URL') or \
        'redis://%s:%s/%s' % (os.environ.get('REDIS_HOST', 'localhost'),
                              os.environ.get('REDIS_PORT', '6379'),
                              os.environ.get('REDIS_DB', '0'))
