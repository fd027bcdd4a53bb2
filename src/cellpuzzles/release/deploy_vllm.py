"""The vLLM serving topology: KServe's Hugging Face runtime on the vLLM backend as the
predictor, and the project's code as the KServe transformer in front of it.

The transformer (``cellpuzzles serve-transformer``) turns puzzles into requests to the
predictor's OpenAI routes: greedy text on the chat route, and in constrained mode the prompt
logprobs of every candidate at every slot (``/completions`` with ``prompt_logprobs``). It needs
the served model's tokenizer and prompt options (``cellpuzzles.json``): KServe's storage
initializer fetches the same storageUri into the transformer's /mnt/models (the container's
``STORAGE_URI`` variable) and ``--model-dir /mnt/models`` reads them, so no flag can disagree
with the model. bf16 is set explicitly (``--dtype=bfloat16``) rather than left to vLLM's guess.
"""

from __future__ import annotations

SERVED_MODEL_NAME = "cellpuzzles"
MODEL_DIR = "/mnt/models"  # where KServe's storage initializer puts a container's STORAGE_URI
VLLM_ARGS = ("--backend=vllm", "--dtype=bfloat16", f"--model_name={SERVED_MODEL_NAME}")


def predictor_url(service: str, namespace: str) -> str:
    """The in-cluster address of the predictor's OpenAI-compatible API."""
    return f"http://{service}-predictor.{namespace}/openai/v1"


def vllm_predictor_model(storage_uri: str, resources):
    import kserve

    return kserve.V1beta1ModelSpec(name="kserve-container", model_format=kserve.V1beta1ModelFormat(name="huggingface"),
                                   args=list(VLLM_ARGS), storage_uri=storage_uri, resources=resources)


def transformer_spec(service: str, namespace: str, image: str, resources, min_replicas: int, max_replicas: int,
                     service_account: str | None = None, storage_uri: str | None = None):
    """The transformer; with ``storage_uri`` (the predictor's) the model folder is fetched into
    MODEL_DIR for its tokenizer and prompt options."""
    import kserve
    from kubernetes import client as k8s

    command = ["cellpuzzles", "serve-transformer", "--predictor-url", predictor_url(service, namespace),
               "--model-dir", MODEL_DIR, "--port", "8080"]
    env = [k8s.V1EnvVar(name="STORAGE_URI", value=storage_uri)] if storage_uri else None
    return kserve.V1beta1TransformerSpec(
        min_replicas=min_replicas, max_replicas=max_replicas, service_account_name=service_account,
        containers=[k8s.V1Container(name="kserve-container", image=image, command=command, resources=resources,
                                    env=env, ports=[k8s.V1ContainerPort(container_port=8080, protocol="TCP")])],
    )
