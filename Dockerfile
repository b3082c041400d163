# The resolver as a user would run it: `docker run -p 53:53/udp -p 53:53/tcp bns`.
# It listens on every address of the container but answers only loopback and the private ranges (server.allow):
# give it the customers' networks, e.g. `docker run … bns serve --listen 0.0.0.0:53 --allow 203.0.113.0/24`,
# or a config file with [server] allow = [...] (docs/operations.md, "Exposure"). Never ["0.0.0.0/0"] on the internet.
FROM python:3.11-slim
WORKDIR /app
COPY pyproject.toml README.md ./
COPY resolver resolver
COPY blocklists blocklists
RUN pip install --no-cache-dir . && useradd --system --uid 10053 --no-create-home bns
# Docker 20.10+ sets net.ipv4.ip_unprivileged_port_start=0 inside containers, so port 53 needs no root.
USER bns
EXPOSE 53/udp 53/tcp
ENTRYPOINT ["bns"]
CMD ["serve", "--listen", "0.0.0.0:53"]
