"""An app module whose dependency is missing on this host."""
import no_such_dependency_for_adoption  # noqa: F401

from huey import RedisHuey

huey = RedisHuey('broken')
