# gem-backend: Label Studio ML backend with GEM zero-shot segmentation.
#   docker build -t gem-backend .                          # CPU image (default)
#   docker build -t gem-backend:cuda --build-arg DEVICE=cuda .   # CUDA image (run with --gpus all)
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
COPY requirements.txt ./
RUN if [ "$DEVICE" = "cpu" ]; then \
        pip install torch==2.14.1 torchvision==0.29.1 --index-url "$TORCH_CPU_INDEX"; \
    else \
        pip install torch==2.14.1 torchvision==0.29.1; \
    fi \
 && grep -vE '^(torch|torchvision)==' requirements.txt > /tmp/req.txt \
 && pip install -r /tmp/req.txt

COPY pyproject.toml README.md _wsgi.py ./
COPY gem_backend ./gem_backend
RUN pip install --no-deps . && useradd --create-home --uid 1000 gem && mkdir -p /data/models && chown -R gem /data
USER gem
VOLUME /data/models
EXPOSE 9090

HEALTHCHECK --interval=30s --timeout=5s --start-period=120s --retries=3 \
  CMD python -c "import os,urllib.request; urllib.request.urlopen('http://127.0.0.1:%s/health' % os.environ.get('PORT','9090'), timeout=4)" || exit 1

CMD ["gem-backend", "serve"]
