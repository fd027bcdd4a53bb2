"""The lifecycle the test stand-ins share: a threaded HTTP server on 127.0.0.1, a free port."""

import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer


class QuietJSONHandler(BaseHTTPRequestHandler):
    """The request handler the stand-ins share: no access log in test output, JSON replies."""

    def log_message(self, *args):  # keep test output quiet
        pass

    def _send(self, status: int, body: dict) -> None:
        data = json.dumps(body).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)


class LocalHTTPServer:
    def _serve(self, handler_class) -> None:
        """Bind (call at the end of __init__); ``start`` begins serving."""
        self._server = ThreadingHTTPServer(("127.0.0.1", 0), handler_class)
        self._server.daemon_threads = True
        self.port = self._server.server_address[1]
        self._thread = threading.Thread(target=self._server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)

    def start(self):
        self._thread.start()
        return self

    def stop(self) -> None:
        self._server.shutdown()
        self._server.server_close()
        self._thread.join(timeout=5)

    def __enter__(self):
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()
