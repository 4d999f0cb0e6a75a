"""Production: secrets have no default, DEBUG is off unless asked for."""
from monitor_project.settings.base import *  # noqa: F401,F403
from monitor_project.settings.base import env

SECRET_KEY = env.str("SECRET_KEY")
DEBUG = env.bool("DEBUG", default=False)
ALLOWED_HOSTS = env.list("ALLOWED_HOSTS")
