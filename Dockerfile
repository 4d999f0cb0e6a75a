# One image for every Django service (web, stream_events, celery worker and beat, migrate); only the command
# differs. Build: docker build -t genesys-conversation-monitor .
FROM python:3.11-slim

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    # The source tree in /app comes first, so BASE_DIR (templates, static files) is /app.
    PYTHONPATH=/app \
    DJANGO_SETTINGS_MODULE=monitor_project.settings.production

WORKDIR /app
RUN useradd --system --uid 10001 --user-group --home-dir /app --shell /usr/sbin/nologin monitor

# Dependencies first, in their own layer: a code change does not reinstall them. The lock file pins every
# package with its hashes; the simulator and the test tools are not in it.
COPY requirements/production.txt ./requirements/
RUN pip install --require-hashes --no-deps -r requirements/production.txt

COPY manage.py ./
COPY monitor_project ./monitor_project
COPY conversations ./conversations
COPY templates ./templates

# Static files are baked into the image and served by WhiteNoise; the values here exist only for this step.
RUN SECRET_KEY=collectstatic-only ALLOWED_HOSTS=localhost python manage.py collectstatic --noinput

USER monitor
EXPOSE 8000
CMD ["daphne", "-b", "0.0.0.0", "-p", "8000", "monitor_project.asgi:application"]
