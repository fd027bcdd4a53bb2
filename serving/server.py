"""``cellpuzzles serve``: resolve the model, start loading it, and serve it with KServe's
ModelServer, the request guard (auth, body limit, metrics) and the OpenAI-compatible route."""

from __future__ import annotations

import os
from pathlib import Path

from kserve.model_server import app as kserve_app

from cellpuzzles.core.errors import CellPuzzlesError, short_reason
from cellpuzzles.serving.http import TOKEN_ENV, RequestGuard
from cellpuzzles.serving.model import CellPuzzlesModel, kserve
from cellpuzzles.serving.openai import add_openai_routes
from cellpuzzles.serving.options import ServeOptions
from cellpuzzles.serving.protocol import MODEL_NAME


def resolve_model(uri: str, dest: str | os.PathLike | None = None) -> Path:
    """A local model folder for ``models:/NAME@ALIAS`` (downloaded with MLflow from
    MLFLOW_TRACKING_URI), ``models:/NAME/VERSION``, or a folder used as is."""
    from cellpuzzles.inference.folder import check_folder

    if uri.startswith("models:/"):
        import mlflow

        try:
            local = mlflow.artifacts.download_artifacts(artifact_uri=uri, dst_path=str(dest) if dest else None)
        except Exception as e:  # noqa: BLE001 - MLflow raises many types; the user needs one line
            raise CellPuzzlesError(f"--model {uri}: cannot download from MLflow at "
                                   f"{mlflow.get_tracking_uri()} ({short_reason(e)}); check MLFLOW_TRACKING_URI and the "
                                   "model name/alias") from None
        path = Path(local)
        # a version whose source is a folder holding the model folder: step into it
        if not (path / "config.json").is_file():
            subs = [p for p in path.iterdir() if (p / "config.json").is_file()] if path.is_dir() else []
            if len(subs) == 1:
                path = subs[0]
        return check_folder(path)
    return check_folder(uri)


def run_server(model: kserve.Model, port: int, max_body_bytes: int, extra_routes=None,
               on_start=None) -> None:
    """Serve one model with KServe's ModelServer on 0.0.0.0:port (REST only), with the
    gate middleware and any extra routes on KServe's FastAPI app. Blocks until the server
    stops (SIGTERM/SIGINT). ``on_start`` runs at the app's startup, once the server's signal
    handlers are in place, so it may stop the server with SIGTERM."""
    token = os.environ.get(TOKEN_ENV) or None
    if extra_routes:
        extra_routes(kserve_app)
    kserve_app.add_middleware(RequestGuard, max_body_bytes=max_body_bytes, token=token)
    if on_start:
        kserve_app.router.add_event_handler("startup", on_start)
    server = kserve.ModelServer(http_port=port, grpc_port=port + 1, enable_grpc=False, workers=1)
    server.register_model(model)  # registered while not ready: readiness reports the load
    server.start([])


def serve(opt: ServeOptions) -> int:
    """``cellpuzzles serve``: resolve the model, start loading it, serve until stopped; a
    model that fails to load stops the server and is a CellPuzzlesError naming the reason."""
    opt.check()
    folder = resolve_model(opt.model)
    model = CellPuzzlesModel(folder, opt)
    print(f"serving {folder} as '{MODEL_NAME}' on port {opt.port} (mode {opt.mode}, batch {opt.max_batch_size}, "
          f"wait {opt.max_wait_ms} ms); loading the model", flush=True)
    run_server(model, opt.port, opt.max_body_bytes, extra_routes=lambda app: add_openai_routes(app, model),
               on_start=model.start_loading)
    if model.load_error:  # the load failed and stopped the server
        raise CellPuzzlesError(f"--model {folder}: {model.load_error}")
    return 0
