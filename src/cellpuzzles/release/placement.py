"""Where the pipeline's steps run: images and the GPU node pool, declared once.

infra/ builds these images and defines the node pool whose labels and taint match
GPU_NODE_SELECTOR and GPU_TOLERATION (tests check that they agree)."""

from cellpuzzles import __version__

REGISTRY = "ghcr.io/cellpuzzles"
CPU_IMAGE = f"{REGISTRY}/cellpuzzles-cpu:{__version__}"  # light steps: validate, puzzles, register, gate, deploy
TRAIN_IMAGE = f"{REGISTRY}/cellpuzzles-train:{__version__}"  # CUDA: distill (local teacher), sft, rl, evaluate
SERVE_IMAGE = f"{REGISTRY}/cellpuzzles-serve:{__version__}"  # the KServe predictor

GPU_ACCELERATOR = "nvidia.com/gpu"
GPU_NODE_POOL = "cellpuzzles-gpu-h100"
GPU_NODE_SELECTOR = {"cloud.google.com/gke-nodepool": GPU_NODE_POOL}
GPU_TOLERATION = {"key": "nvidia.com/gpu", "operator": "Equal", "value": "present", "effect": "NoSchedule"}

# Kubernetes secrets the steps read as environment variables: secret name -> {key: ENV_VAR}
TEACHER_SECRET = ("cellpuzzles-teacher", {"api-key": "OPENAI_API_KEY"})
MLFLOW_SECRET = ("mlflow-credentials", {"username": "MLFLOW_TRACKING_USERNAME", "password": "MLFLOW_TRACKING_PASSWORD"})
PIPELINE_SERVICE_ACCOUNT = "cellpuzzles-pipeline"
