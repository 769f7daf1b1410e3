# Kurs production image: one image for web, qcluster, fetcher and migrations.
FROM python:3.11-slim-bookworm

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PIP_NO_CACHE_DIR=1

WORKDIR /app
COPY requirements.txt .
RUN pip install -r requirements.txt

COPY . .
# collectstatic needs settings but no secrets or services: a throwaway key is enough here.
RUN DJANGO_SECRET_KEY=build-only python manage.py collectstatic --no-input -v 0 \
    && useradd --system --uid 10001 --home /app kurs \
    && mkdir -p /app/var && chown -R kurs /app/var

USER kurs
EXPOSE 8000
CMD ["uvicorn", "config.asgi:application", "--host", "0.0.0.0", "--port", "8000", \
     "--lifespan", "on", "--proxy-headers", "--forwarded-allow-ips", "*", "--no-access-log"]
