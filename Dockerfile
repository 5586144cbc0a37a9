# PiggyBong Realtime: a small image of the same server `make run` starts, installed from
# uv.lock (the versions and hashes CI tested) without the dev group.
FROM python:3.11-slim AS build
# A C compiler: the per-delivery path is compiled with mypyc (realtime/native.py).
RUN apt-get update && apt-get install -y --no-install-recommends gcc libc6-dev \
    && rm -rf /var/lib/apt/lists/*
WORKDIR /app
ENV UV_PROJECT_ENVIRONMENT=/app/.venv \
    UV_PYTHON_DOWNLOADS=never \
    UV_COMPILE_BYTECODE=1 \
    UV_LINK_MODE=copy
COPY requirements-uv.txt ./
RUN pip install --no-cache-dir --require-hashes --no-deps -r requirements-uv.txt
COPY pyproject.toml uv.lock README.md ./
COPY clients/python ./clients/python
RUN uv sync --locked --no-dev --no-install-project --no-editable
COPY realtime ./realtime
COPY notifications ./notifications
COPY loadtest ./loadtest
RUN uv sync --locked --no-dev --no-editable
# Compile it into the installed package (-P: that one, not ./realtime), check that it is the
# one that runs, then drop the compiler's packages (the `native` group) from the image.
RUN uv sync --locked --no-dev --no-editable --group native \
    && .venv/bin/python -P -m realtime.native_build \
    && uv sync --locked --no-dev --no-editable \
    && .venv/bin/python -P -m realtime.native_build status | grep -q "compiled: "

FROM python:3.11-slim
RUN useradd --system --uid 10001 --no-create-home realtime
COPY --from=build /app/.venv /app/.venv
ENV PATH=/app/.venv/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    REALTIME_HOST=0.0.0.0 \
    REALTIME_PORT=8000
USER realtime
EXPOSE 8000
HEALTHCHECK --interval=10s --timeout=3s --start-period=5s --retries=3 \
  CMD python -c "import os,urllib.request; urllib.request.urlopen('http://127.0.0.1:%s/healthz' % os.environ.get('REALTIME_PORT','8000'), timeout=2)" || exit 1
STOPSIGNAL SIGTERM
ENTRYPOINT ["realtime"]
CMD ["serve"]
