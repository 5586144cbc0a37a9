# PiggyBong Realtime: a small image of the same server `make run` starts.
FROM python:3.11-slim AS build
WORKDIR /src
COPY pyproject.toml README.md ./
COPY realtime ./realtime
COPY notifications ./notifications
COPY loadtest ./loadtest
RUN pip install --no-cache-dir --prefix=/install .

FROM python:3.11-slim
RUN useradd --system --uid 10001 --no-create-home realtime
COPY --from=build /install /usr/local
ENV PYTHONUNBUFFERED=1 \
    REALTIME_HOST=0.0.0.0 \
    REALTIME_PORT=8000
USER realtime
EXPOSE 8000
HEALTHCHECK --interval=10s --timeout=3s --start-period=5s --retries=3 \
  CMD python -c "import os,urllib.request; urllib.request.urlopen('http://127.0.0.1:%s/healthz' % os.environ.get('REALTIME_PORT','8000'), timeout=2)" || exit 1
STOPSIGNAL SIGTERM
ENTRYPOINT ["realtime"]
CMD ["serve"]
