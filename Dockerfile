# Kurs production image: one image for web, qcluster, fetcher and migrations (docker-compose.yml).
# Slim Debian base pinned to an exact tag; the app runs as an unprivileged user.
FROM python:3.11.11-slim-bookworm

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PIP_NO_CACHE_DIR=1 \
    KURS_HOST=0.0.0.0 \
    KURS_PORT=8000 \
    KURS_WEB_WORKERS=1

WORKDIR /app
COPY requirements.txt .
RUN pip install -r requirements.txt

COPY . .
# collectstatic needs settings but no secrets or services: a throwaway key is enough here.
RUN DJANGO_SECRET_KEY=build-only python manage.py collectstatic --no-input -v 0 \
    && useradd --system --uid 10001 --home /app kurs \
    && mkdir -p /app/var && chown -R kurs /app/var

USER 10001
EXPOSE 8000
# Prints the local-defaults warning when compose runs without a .env, then runs the command.
ENTRYPOINT ["scripts/docker-entrypoint.sh"]
# The production web server, as `make run` serves it (uvicorn with uvloop and httptools).
CMD ["scripts/serve.sh"]
