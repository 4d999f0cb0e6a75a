"""Create the demo superuser (demo / demo). Refuses outside the local (demo) settings."""
from __future__ import annotations

import os
from typing import Any

from django.contrib.auth import get_user_model
from django.core.management.base import BaseCommand, CommandError

DEMO_SETTINGS = ("monitor_project.settings.local", "monitor_project.settings.test")


class Command(BaseCommand):
    help = "Create or reset the demo superuser demo/demo (demo settings only, never production)."

    def handle(self, *args: Any, **options: Any) -> None:
        if os.environ.get("DJANGO_SETTINGS_MODULE") not in DEMO_SETTINGS:
            raise CommandError("demo_user only runs with the local demo settings, never in production")
        user, created = get_user_model().objects.get_or_create(username="demo", defaults={"email": "demo@example.com"})
        user.is_staff = user.is_superuser = True
        user.set_password("demo")
        user.save()
        self.stdout.write(f"demo superuser {'created' if created else 'reset'}: demo / demo")
