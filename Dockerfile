# fedvault: one image for every role (SuperLink + Fleet proxy, partner node,
# gateway). CPU-only torch: the CUDA build is multi-GB and unused here.
FROM python:3.11-slim

# MALLOC_ARENA_MAX=2: with glibc's default per-thread arenas a 10-minute
# gateway soak (bench/soak.py) grew RSS by 113 MiB of freed-but-kept memory;
# with two arenas, 1.2 MiB.
ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    FLWR_TELEMETRY_ENABLED=0 \
    MALLOC_ARENA_MAX=2

RUN pip install torch==2.13.0 --index-url https://download.pytorch.org/whl/cpu

WORKDIR /opt/fedvault
COPY pyproject.toml README.md ./
COPY fedvault ./fedvault
COPY server ./server
COPY clients ./clients
COPY secure ./secure
RUN pip install .
COPY deploy/healthcheck.py /opt/fedvault/healthcheck.py

# Non-root, fixed uid: kits' 0600 keys written by the init service stay
# readable by the node services, which run as the same user.
RUN useradd --system --uid 10001 --user-group --create-home --home-dir /home/fedvault fedvault \
    && mkdir -p /state /kits /kit /data /var/lib/fedvault \
    && chown fedvault:fedvault /state /kits /kit /data /var/lib/fedvault
USER fedvault

# Each service sets FEDVAULT_HEALTH_URL (https, checked against FEDVAULT_HEALTH_CA)
# or FEDVAULT_HEALTH_TCP (host:port); see deploy/healthcheck.py.
HEALTHCHECK --interval=15s --timeout=5s --start-period=60s --retries=3 \
    CMD ["python", "/opt/fedvault/healthcheck.py"]

ENTRYPOINT ["fedvault"]
CMD ["--help"]
