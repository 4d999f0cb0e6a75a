"""The WSGI entry point (HTTP only; the live pages need the ASGI one, monitor_project.asgi)."""
import os

from django.core.wsgi import get_wsgi_application

from monitor_project.settings.environment import load_settings_or_exit

os.environ.setdefault("DJANGO_SETTINGS_MODULE", "monitor_project.settings.production")
load_settings_or_exit()
application = get_wsgi_application()
