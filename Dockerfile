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
    && useradd --create-home --uid 10001 valkyrie \
    && install -d -o valkyrie -g valkyrie -m 0700 /var/lib/valkyrie /var/lib/valkyrie/auth \
        /runner-creds

# Runners execute the commands they are sent: never as root.
USER valkyrie
WORKDIR /home/valkyrie
# In a container the metrics endpoint must listen beyond loopback to be scraped. The data dir
# (NATS identities under auth/, a volume in compose.yaml) is owned by the valkyrie user: a named
# volume mounted there starts with this ownership and mode.
ENV VALKYRIE_METRICS_HOST=0.0.0.0 \
    VALKYRIE_DATA_DIR=/var/lib/valkyrie
CMD ["valkyrie", "--help"]
