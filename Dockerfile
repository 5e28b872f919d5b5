# gem-backend: Label Studio ML backend with GEM zero-shot segmentation.
#   docker build -t gem-backend .                                # CPU image (default)
#   docker build -t gem-backend:cuda --build-arg DEVICE=cuda .   # CUDA image (run with --gpus all;
#                                          the default-index torch 2.14.1 wheels need a CUDA 13 driver)
# Every pip step installs with -c constraints.txt, the exact versions the tests ran with.
FROM python:3.11-slim

ARG DEVICE=cpu
# CPU-only torch wheels are much smaller than the default CUDA ones
ARG TORCH_CPU_INDEX=https://download.pytorch.org/whl/cpu

ENV PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    MODEL_DIR=/data/models \
    HF_HOME=/data/models/huggingface \
    PORT=9090 \
    WORKERS=1 \
    THREADS=8

WORKDIR /app
COPY requirements.txt requirements-sam2.txt constraints.txt ./

# 1. torch + torchvision and their dependencies: the biggest layer, kept across code changes.
#    CPU: the wheels come from the CPU index without dependencies (that index need not carry
#    numpy & co at our pins); the second pip call then adds torch's dependencies from the
#    default index, keeping the +cpu build (it satisfies torch==2.14.1).
RUN set -eu; \
    case "$DEVICE" in cpu|cuda) ;; *) echo "DEVICE must be cpu or cuda, not '$DEVICE'" >&2; exit 1;; esac; \
    if [ "$DEVICE" = cpu ]; then \
        pip install --no-deps -c constraints.txt torch==2.14.1 torchvision==0.29.1 --index-url "$TORCH_CPU_INDEX"; \
    fi; \
    pip install -c constraints.txt torch==2.14.1 torchvision==0.29.1

# 2. the other requirements, same constraints: nothing of layer 1 is replaced (check_pins fails
#    the build when any installed package differs from constraints.txt)
COPY docker/check_pins.py ./docker/
RUN pip install -c constraints.txt -r requirements.txt \
 && python docker/check_pins.py constraints.txt
# 2b. the SAM 2 extra (GEM_REGIONS=sam2): Meta's code, hash-pinned, built against the torch above
#     without the optional CUDA extension (pure Python; its default build would fetch a second torch)
RUN pip install -c constraints.txt "setuptools>=61" \
 && SAM2_BUILD_CUDA=0 pip install --no-build-isolation --no-deps --require-hashes -r requirements-sam2.txt \
 && pip check

# 3. the project itself, built from a copy outside /app so no build/ or *.egg-info stays behind
COPY pyproject.toml README.md /tmp/gem-src/
COPY gem_backend /tmp/gem-src/gem_backend
RUN pip install --no-deps /tmp/gem-src && rm -rf /tmp/gem-src \
 && useradd --create-home --uid 1000 gem && mkdir -p /data/models && chown -R gem /data
COPY _wsgi.py ./
COPY docker/healthcheck.py ./docker/

USER gem
VOLUME /data/models
EXPOSE 9090

# GET /health on $PORT, with basic auth when BASIC_AUTH_USER/BASIC_AUTH_PASS are set; healthy
# only on 200 + status UP (4 s timeout inside the script)
HEALTHCHECK --interval=30s --timeout=5s --start-period=120s --retries=3 \
  CMD ["python", "/app/docker/healthcheck.py"]

CMD ["gem-backend", "serve"]
