"""``cellpuzzles serve``: resolve the model, start loading it, and serve it with KServe's
ModelServer, the request guard (auth, limits, cancellation, metrics), readiness that means
loaded, the slow-client limits and the OpenAI-compatible route."""

from __future__ import annotations

import os
from pathlib import Path

from kserve import model_server as kserve_model_server
from kserve.errors import InvalidInput, ModelNotFound, ModelNotReady, ServerNotReady
from kserve.model_server import app as kserve_app
from kserve.protocol.rest.server import RESTServer

from cellpuzzles.core.errors import CellPuzzlesError, short_reason
from cellpuzzles.serving.http import TOKEN_ENV, RequestGuard, log, slow_client_protocol
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
               on_start=None, *, host: str = "0.0.0.0", max_header_bytes: int | None = None,
               header_timeout_s: float | None = None, body_timeout_s: float | None = None,
               request_timeout_s: float | None = None) -> None:
    """Serve one model with KServe's ModelServer on host:port (REST only), with the request
    guard, readiness that means the model is loaded, the slow-client limits and any extra
    routes on KServe's FastAPI app. Blocks until the server stops (SIGTERM/SIGINT).
    ``on_start`` runs at the app's startup, once the server's signal handlers are in place,
    so it may stop the server with SIGTERM."""
    token = os.environ.get(TOKEN_ENV) or None
    add_readiness_route(kserve_app, model)
    if extra_routes:
        extra_routes(kserve_app)
    kserve_app.add_middleware(RequestGuard, max_body_bytes=max_body_bytes, token=token,
                              max_header_bytes=max_header_bytes, body_timeout_s=body_timeout_s,
                              request_timeout_s=request_timeout_s)
    if on_start:
        kserve_app.router.add_event_handler("startup", on_start)
    settings: dict = {"host": host}
    if header_timeout_s is not None:
        settings["http"] = slow_client_protocol(header_timeout_s)
    if max_header_bytes is not None:
        settings["h11_max_incomplete_event_size"] = max_header_bytes
    # ModelServer builds its RESTServer with 0.0.0.0 and KServe's uvicorn settings; ours
    # (host, protocol, head size) and the quiet handlers come in through this subclass
    kserve_model_server.RESTServer = type("CellPuzzlesRESTServer", (RESTServerWithSettings,),
                                          {"uvicorn_settings": settings})
    server = kserve.ModelServer(http_port=port, grpc_port=port + 1, enable_grpc=False, workers=1)
    server.register_model(model)  # registered while not ready: readiness reports the load
    server.start([])


class RESTServerWithSettings(RESTServer):
    """KServe's REST server with extra uvicorn settings, and expected client errors and
    not-ready answers logged as one line (KServe logs each with an ERROR traceback);
    unexpected errors keep KServe's handler and their traceback."""

    uvicorn_settings: dict = {}

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        for k, v in self.uvicorn_settings.items():
            setattr(self.config, k, v)

    def _add_exception_handlers(self, app) -> None:
        super()._add_exception_handlers(app)
        for exc, status in ((InvalidInput, 400), (ModelNotFound, 404), (ModelNotReady, 503), (ServerNotReady, 503)):
            app.add_exception_handler(exc, _quiet_handler(status))


def _quiet_handler(status: int):
    from fastapi.responses import JSONResponse

    async def handler(request, exc):
        log.info("%s %s: %d %s", request.method, request.url.path, status, exc)
        return JSONResponse(status_code=status, content={"error": str(exc)})

    return handler


def add_readiness_route(app, model: kserve.Model) -> None:
    """``/v2/health/ready`` answers 200 only once the model is loaded (KServe's own answers
    200 as soon as the server is up); registered before KServe's routes, so it wins."""
    from fastapi.responses import JSONResponse

    async def ready():
        if model.ready:
            return {"ready": True}
        return JSONResponse(status_code=503, content={"ready": False, "error": f"model {model.name} is still loading"})

    app.add_api_route("/v2/health/ready", ready, methods=["GET"])


def serve(opt: ServeOptions) -> int:
    """``cellpuzzles serve``: resolve the model, start loading it, serve until stopped; a
    model that fails to load stops the server and is a CellPuzzlesError naming the reason."""
    opt.check()
    folder = resolve_model(opt.model)
    model = CellPuzzlesModel(folder, opt)
    print(f"serving {folder} as '{MODEL_NAME}' on {opt.host}:{opt.port} (mode {opt.mode}, batch {opt.max_batch_size}, "
          f"wait {opt.max_wait_ms} ms); loading the model", flush=True)
    run_server(model, opt.port, opt.max_body_bytes, extra_routes=lambda app: add_openai_routes(app, model),
               on_start=model.start_loading, host=opt.host, max_header_bytes=opt.max_header_bytes,
               header_timeout_s=opt.header_timeout_s, body_timeout_s=opt.body_timeout_s,
               request_timeout_s=opt.request_timeout_s)
    if model.load_error:  # the load failed and stopped the server
        raise CellPuzzlesError(model.load_error)
    return 0
