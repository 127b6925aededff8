# One image for every process; the service's command picks it (`apigw proxy`, `apigw collector`...).
FROM python:3.11-slim

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1

WORKDIR /app
# Only what the package needs (no .venv, var/ or .git in the build context's copy).
COPY pyproject.toml README.md ./
COPY apigw ./apigw
COPY proxy ./proxy
COPY collector ./collector
COPY analytics ./analytics
COPY dashboard ./dashboard
COPY examples ./examples
RUN pip install . \
    && useradd --system --uid 10001 --home-dir /var/lib/apigw apigw \
    && mkdir -p /var/lib/apigw \
    && chown apigw /var/lib/apigw

USER apigw
ENV APIGW_DATA_DIR=/var/lib/apigw \
    HOME=/var/lib/apigw
# proxy, proxy admin, collector admin, analytics admin, control-plane API, dashboard
EXPOSE 8080 9090 9091 9092 8088 8501
ENTRYPOINT ["apigw"]
CMD ["--help"]
