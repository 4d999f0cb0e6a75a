# The Celery app is loaded with Django so that @shared_task binds to it and `celery -A monitor_project` finds it.
from monitor_project.celery import app as celery_app

__all__ = ("celery_app",)
