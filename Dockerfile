# Production image: pdserve on a Triton Inference Server release image.
#
# The same model repository and backend layout that `pdserve serve` assembles
# from PyPI's nvidia-pytriton work here, with the release image's own
# tritonserver and Python backend (24.10 = Triton 2.51, the version tested).
#
#   docker build -t pdserve .
#   docker run --rm --gpus all -p 8000:8000 -p 8001:8001 -p 8002:8002 \
#       -v $PWD/model_repository:/models pdserve
#
# For Ascend NPUs build with --build-arg PDSERVE_EXTRAS=npu,mooncake on an
# image that carries the CANN toolkit.
ARG TRITON_IMAGE=nvcr.io/nvidia/tritonserver:24.10-py3
FROM ${TRITON_IMAGE}

ARG PDSERVE_EXTRAS=mooncake
ENV PIP_NO_CACHE_DIR=1 \
    PYTHONUNBUFFERED=1

RUN apt-get update \
 && apt-get install -y --no-install-recommends libibverbs1 curl \
 && rm -rf /var/lib/apt/lists/*

WORKDIR /opt/pdserve
COPY pyproject.toml README.md ./
COPY backends ./backends
COPY kvtransfer ./kvtransfer
COPY scheduler ./scheduler
COPY model_repository /models

# The release image already has tritonserver; nvidia-pytriton (which bundles a
# second copy of it for PyPI installs) is skipped.
RUN python3 -m pip install --no-deps . \
 && python3 -m pip install torch numpy safetensors tokenizers "tritonclient[all]" \
        prometheus-client pyyaml \
 && if [ -n "${PDSERVE_EXTRAS}" ]; then \
        for extra in $(echo "${PDSERVE_EXTRAS}" | tr ',' ' '); do \
            case "$extra" in \
                npu) python3 -m pip install torch_npu ;; \
                mooncake) python3 -m pip install mooncake-transfer-engine ;; \
            esac; \
        done; \
    fi \
 && mkdir -p /opt/tritonserver/backends/pdserve \
 && cp backends/pdserve/model.py /opt/tritonserver/backends/pdserve/model.py

EXPOSE 8000 8001 8002
# Ready is not enough: a router whose stub died stays READY while every request
# fails ("Stub process ... is not healthy"; Triton 2.51 never starts it again, and
# its streams never end). So the check also sends the router its heartbeat
# (docs/controller.md): an unhealthy container is for the orchestrator to restart.
ENV PDSERVE_ROUTER=pdserve
HEALTHCHECK --interval=10s --timeout=3s --start-period=120s \
    CMD curl -fsS localhost:8000/v2/health/ready \
     && curl -fsS -o /dev/null -H 'Content-Type: application/json' \
          -d '{"control": "{\"op\": \"health\"}"}' \
          "localhost:8000/v2/models/${PDSERVE_ROUTER}/generate" \
     || exit 1

# Poll mode: the controller and operators change the deployment by editing /models.
# The Python backend's pool of each instance must exceed the router's BLS calls at
# once (stream_threads 512) by 16, and the router is told its size
# (backends/pdserve/server/config.py, POOL_ENV).
ENV PDSERVE_POOL_THREADS=528
CMD ["tritonserver", "--model-repository=/models", "--model-control-mode=poll", \
     "--repository-poll-secs=5", "--log-info=true", \
     "--backend-config=python,thread-pool-size=528"]
