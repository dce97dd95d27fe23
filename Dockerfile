# Valkyrie control-plane image: every handler, the gateway and the reference runner (see compose.yaml).
FROM python:3.11-slim

ENV PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1

WORKDIR /src
COPY pyproject.toml README.md ./
COPY schemas ./schemas
COPY valkyrie ./valkyrie
COPY handlers ./handlers
RUN pip install . \
    && useradd --create-home --uid 10001 valkyrie

# Runners execute the commands they are sent: never as root.
USER valkyrie
WORKDIR /home/valkyrie
# In a container the metrics endpoint must listen beyond loopback to be scraped.
ENV VALKYRIE_METRICS_HOST=0.0.0.0
CMD ["valkyrie", "--help"]
