# The gateway image: `docker build -t gateway .`, then
#   docker run --rm -p 4000:4000 -e BACKEND_KIND=vllm -e BACKEND_BASE_URL=http://host:8000/v1 gateway
# The same image runs the simulated backend: `docker run --rm gateway sim --host 0.0.0.0`.

# Build stage: a wheel of the project, installed with its dependencies into a virtual environment.
FROM python:3.12-slim AS builder
ENV PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PIP_NO_CACHE_DIR=1
WORKDIR /src
RUN python -m venv /opt/venv
COPY pyproject.toml README.md ./
COPY gateway ./gateway
# Optional extras, comma-separated: `docker build --build-arg EXTRAS=otel,redis .` for traces
# (OTEL_EXPORTER_OTLP_ENDPOINT) and limits shared through Redis (REDIS_URL).
ARG EXTRAS=""
RUN /opt/venv/bin/pip wheel --no-deps --wheel-dir /wheels . \
 && wheel=$(ls /wheels/*.whl) \
 && /opt/venv/bin/pip install "${wheel}${EXTRAS:+[$EXTRAS]}"

# Runtime stage: the slim base plus that environment; no compiler, no pip cache, no sources.
FROM python:3.12-slim
ENV PATH=/opt/venv/bin:$PATH \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    GATEWAY_HOST=0.0.0.0
RUN groupadd --system --gid 10001 gateway \
 && useradd --system --uid 10001 --gid 10001 --no-create-home --shell /usr/sbin/nologin gateway
COPY --from=builder /opt/venv /opt/venv
# Settings come from the environment (compose's env_file); this directory holds no .env.
WORKDIR /app
USER 10001:10001
EXPOSE 4000
ENTRYPOINT ["gateway"]
CMD ["serve"]
