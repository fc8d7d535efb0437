"""Seed 000 in small: the collector's Huey instance."""
import os

from huey import RedisHuey

from core.config import Config

huey = RedisHuey('pixcollector', url=Config.REDIS_URL,
                 immediate=os.environ.get('HUEY_IMMEDIATE') == 'true')
