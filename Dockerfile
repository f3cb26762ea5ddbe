# httpsdump in a container. Build:  docker build -t httpsdump .
# Run (publish on the host's loopback only; the CA lives in the volume):
#   docker run --rm -p 127.0.0.1:8080:8080 -v httpsdump-ca:/home/httpsdump/.httpsdump httpsdump
# Inside the container the proxy must listen on 0.0.0.0 to be reachable through the published port;
# keep the publish address 127.0.0.1 so nothing beyond this host can use the proxy.

FROM python:3.11-slim AS build
RUN apt-get update \
 && apt-get install -y --no-install-recommends gcc libc6-dev libssl-dev swig \
 && rm -rf /var/lib/apt/lists/*
WORKDIR /src
COPY pyproject.toml README.md ./
COPY proxy ./proxy
COPY ca ./ca
RUN python -m venv /opt/httpsdump \
 && /opt/httpsdump/bin/pip install --no-cache-dir -q setuptools wheel \
 && /opt/httpsdump/bin/pip install --no-cache-dir -q --no-build-isolation "M2Crypto>=0.51" \
 && /opt/httpsdump/bin/pip install --no-cache-dir -q --no-build-isolation ".[compiled]"
# The compiled build of the hot modules (proxy/accel.py), checked complete; Cython is not needed after.
RUN cd / && /opt/httpsdump/bin/python -m proxy.accel_build \
 && /opt/httpsdump/bin/python -m proxy.accel_build --status \
 && /opt/httpsdump/bin/pip uninstall -y -q cython

FROM python:3.11-slim
RUN apt-get update \
 && apt-get install -y --no-install-recommends libssl3 ca-certificates \
 && rm -rf /var/lib/apt/lists/* \
 && useradd --create-home --uid 10001 httpsdump
COPY --from=build /opt/httpsdump /opt/httpsdump
ENV PATH=/opt/httpsdump/bin:$PATH PYTHONUNBUFFERED=1
USER httpsdump
RUN mkdir -m 700 /home/httpsdump/.httpsdump
VOLUME ["/home/httpsdump/.httpsdump"]
EXPOSE 8080
HEALTHCHECK --interval=30s --timeout=5s --start-period=20s \
  CMD python -c "import socket; socket.create_connection(('127.0.0.1', 8080), 3).close()"
ENTRYPOINT ["httpsdump"]
CMD ["--listen-host", "0.0.0.0", "--listen-port", "8080", "--allow-any-client"]
