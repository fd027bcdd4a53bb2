"""The vLLM serving topology: KServe's Hugging Face runtime on the vLLM backend as the
predictor, and the project's code as the KServe transformer in front of it.

The transformer (``cellpuzzles serve-transformer``) turns puzzles into chat requests to
the predictor's OpenAI route and scores/constrains the answers; the predictor only
generates. bf16 is set explicitly (``--dtype=bfloat16``) rather than left to vLLM's guess.
"""

from __future__ import annotations

SERVED_MODEL_NAME = "cellpuzzles"
VLLM_ARGS = ("--backend=vllm", "--dtype=bfloat16", f"--model_name={SERVED_MODEL_NAME}")


def predictor_url(service: str, namespace: str) -> str:
    """The in-cluster address of the predictor's OpenAI-compatible API."""
    return f"http://{service}-predictor.{namespace}/openai/v1"


def vllm_predictor_model(storage_uri: str, resources):
    import kserve

    return kserve.V1beta1ModelSpec(name="kserve-container", model_format=kserve.V1beta1ModelFormat(name="huggingface"),
                                   args=list(VLLM_ARGS), storage_uri=storage_uri, resources=resources)


def transformer_spec(service: str, namespace: str, image: str, resources, min_replicas: int, max_replicas: int,
                     service_account: str | None = None):
    import kserve
    from kubernetes import client as k8s

    command = ["cellpuzzles", "serve-transformer", "--predictor-url", predictor_url(service, namespace), "--port", "8080"]
    return kserve.V1beta1TransformerSpec(
        min_replicas=min_replicas, max_replicas=max_replicas, service_account_name=service_account,
        containers=[k8s.V1Container(name="kserve-container", image=image, command=command, resources=resources,
                                    ports=[k8s.V1ContainerPort(container_port=8080, protocol="TCP")])],
    )
