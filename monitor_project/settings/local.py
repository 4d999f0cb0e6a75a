"""The embedded defaults: SQLite, DEBUG on, everything in one process. For trying it out, never production."""
from monitor_project.settings.base import *  # noqa: F401,F403
from monitor_project.settings.base import env

DEBUG = env.boolean("DEBUG", True)
