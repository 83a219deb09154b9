# forkreload in a container: the same steps as README's first command.
FROM python:3.11-slim
WORKDIR /opt/forkreload
COPY . .
RUN python3 -m venv .venv && .venv/bin/pip install .
WORKDIR /work
CMD ["/opt/forkreload/.venv/bin/forkreload", "console"]
