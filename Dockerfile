# The robustness service: `robustness api` (gateway), `robustness worker` (Celery), `robustness
# migrate` (schema). One Dockerfile, two builds:
#   CPU (default):  docker build -t robustness-service .
#   GPU workers:    docker build --build-arg ONNXRUNTIME="onnxruntime-gpu[cuda,cudnn]==1.31.1" \
#                       -t robustness-service-gpu .
# The GPU build swaps onnxruntime for onnxruntime-gpu (same module; CUDA and cuDNN arrive as pip
# packages, the driver comes from the host through the NVIDIA container toolkit). It also runs
# on machines without a GPU, on the CPU. PyTorch is test-only and never installed here.
FROM python:3.11-slim

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PIP_ROOT_USER_ACTION=ignore

ARG ONNXRUNTIME=onnxruntime

WORKDIR /src

# Dependencies first, in their own layer: rebuilt only when pyproject.toml or ONNXRUNTIME change.
# Empty packages stand in for the sources so that pip can resolve the project's dependencies;
# they and setuptools' build/ go afterwards, lest a stale build/lib shadow the real sources.
# GPU build: CUDA/cuDNN from pip live in site-packages/nvidia/*/lib; ldconfig lets the loader
# find them without LD_LIBRARY_PATH, and the build fails if the CUDA provider
# is missing from the installed onnxruntime.
COPY pyproject.toml README.md ./
RUN for p in schemas service workers infra jobrunner client; do mkdir -p "$p" && touch "$p/__init__.py"; done \
 && pip install ".[server,postgres]" \
 && if [ "$ONNXRUNTIME" != "onnxruntime" ]; then \
        pip uninstall -y onnxruntime \
     && pip install "$ONNXRUNTIME" \
     && python -c "import glob, sysconfig; print('\n'.join(sorted(glob.glob(sysconfig.get_path('purelib') + '/nvidia/*/lib'))))" \
            > /etc/ld.so.conf.d/nvidia-pip.conf \
     && ldconfig \
     && python -c "import onnxruntime as o; p = o.get_available_providers(); assert 'CUDAExecutionProvider' in p, p"; \
    fi \
 && python -c "import onnxruntime as o; print('onnxruntime', o.__version__, o.get_available_providers())" \
 && rm -rf build ./*.egg-info schemas service workers infra jobrunner client

# The package itself (no dependencies: they are above); the sources are dropped, and the entry
# points must import.
COPY schemas ./schemas
COPY service ./service
COPY workers ./workers
COPY infra ./infra
COPY jobrunner ./jobrunner
COPY client ./client
RUN pip install --no-deps --force-reinstall . \
 && cd / && rm -rf /src \
 && robustness --help > /dev/null \
 && python -c "import client.cli, service.app, jobrunner.tasks"

# Non-root. /data is the blob store volume; a named volume mounted there starts with this owner.
RUN useradd --uid 10001 --user-group --create-home --home-dir /home/robustness \
        --shell /usr/sbin/nologin robustness \
 && mkdir -p /data/blobs \
 && chown -R 10001:10001 /data
USER 10001:10001
WORKDIR /home/robustness

ENV ROBUSTNESS_DATA_DIR=/data \
    ROBUSTNESS_HOST=0.0.0.0 \
    ROBUSTNESS_PORT=8000 \
    ROBUSTNESS_API_KEYS_REQUIRED=true

EXPOSE 8000
# No HEALTHCHECK here: the same image runs workers and migrations. docker-compose.yml checks the
# gateway's /readyz.
ENTRYPOINT ["robustness"]
CMD ["api"]
