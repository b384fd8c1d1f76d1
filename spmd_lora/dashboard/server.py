"""The dashboard's HTTP server (standard library ``http.server``, one thread per request).

Routes (everything else is 404; a path with ``..`` in any spelling is 400):

* ``GET /``, ``GET /static/app.js``, ``GET /static/style.css``: the page, from the package;
* ``GET /api/runs``: the runs (index, name, path, status);
* ``GET /api/runs/N/metrics?since=K``: metric rows from row K on (the page polls this);
* ``GET /api/runs/N/summary``: config, mesh, memory, census, checkpoints, message;
* ``GET /api/runs/N/log?offset=B``: ``train.log`` from byte B (runs started from the page);
* ``GET /api/new-run-template``: settings to prefill the form with (the newest run's);
* ``POST /api/runs``: the "new run" form (JSON); only on a loopback address, and only with the
  ``X-Spmd-Lora: 1`` header (a cross-site form cannot send it);
* ``POST /api/runs/N/generate``: ``{"prompt": ...}`` -> a completion from the run's adapter
  (same header; loopback only, as it starts a process).

A request whose handler fails answers 500 with ``{"error": "..."}``; the failure is one line on
stderr, printed once however often the page repeats the request (never a traceback per poll).

Runs are addressed by their index in the list, never by a path from the URL, so no request can
name a file outside the run directories. On a loopback address, a request whose ``Host`` header
is not a loopback name is refused (403): a web page that rebinds its own domain name to
127.0.0.1 can then neither read the runs nor start one.
"""
from __future__ import annotations

import ipaddress
import json
import os
import re
import sys
import threading
import urllib.parse
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from importlib import resources
from pathlib import Path

from ..errors import ConfigError, SpmdLoraError
from ..paths import ensure_writable_dir
from . import generation, launcher, runs

STATIC = {"/": ("index.html", "text/html; charset=utf-8"),
          "/static/app.js": ("app.js", "text/javascript; charset=utf-8"),
          "/static/style.css": ("style.css", "text/css; charset=utf-8")}
RUN_ROUTE = re.compile(r"^/api/runs/(\d{1,6})/(metrics|summary|log)$")
GENERATE_ROUTE = re.compile(r"^/api/runs/(\d{1,6})/generate$")


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


class OnceLog:
    """Writes each distinct line to stderr once (a request the page polls every second that
    fails the same way every time is reported once)."""

    def __init__(self):
        self.seen: set[str] = set()
        self.lock = threading.Lock()

    def __call__(self, line: str) -> None:
        with self.lock:
            if line in self.seen:
                return
            self.seen.add(line)
        print(line, file=sys.stderr, flush=True)


class Dashboard:
    """The runs shown (given on the command line plus those started from the page)."""

    def __init__(self, run_dirs, new_runs_dir, allow_launch: bool):
        self.runs = [Path(d).resolve() for d in run_dirs]
        self.children: dict[int, object] = {}
        self.new_runs_dir = Path(new_runs_dir)
        self.allow_launch = allow_launch
        self.lock = threading.Lock()
        self.log_error = OnceLog()

    def run_list(self):
        return [{"id": i, "name": runs.display_name(d), "path": str(d),
                 "status": runs.run_status(d, self._child_running(i))}
                for i, d in enumerate(self.runs)]

    def _child_running(self, i: int) -> bool:
        child = self.children.get(i)
        return child is not None and child.poll() is None

    def run_dir(self, i: int) -> Path | None:
        return self.runs[i] if 0 <= i < len(self.runs) else None

    def new_run(self, form) -> dict:
        if not self.allow_launch:
            raise PermissionError("starting runs is only offered on a loopback address")
        with self.lock:
            run_dir, cfg = launcher.prepare_run(form, self.new_runs_dir)
            ensure_writable_dir(self.new_runs_dir, "--new-runs-dir")
            child = launcher.launch(run_dir, cfg)
            self.runs.append(run_dir)
            i = len(self.runs) - 1
            self.children[i] = child
        return {"id": i, "path": str(run_dir), "pid": child.pid}

    def generate(self, i: int, form) -> dict:
        if not self.allow_launch:
            raise PermissionError("generation is only offered on a loopback address")
        run_dir = self.run_dir(i)
        if run_dir is None:
            raise LookupError(i)
        if not isinstance(form, dict):
            raise ConfigError("post a JSON object with a prompt")
        return generation.generate(run_dir, form.get("prompt"), form.get("max_new_tokens", 48))

    def stop_children(self):
        for child in self.children.values():
            if child.poll() is None:
                child.terminate()


def make_handler(dash: Dashboard):
    class Handler(BaseHTTPRequestHandler):
        server_version = "spmd-lora-dashboard"

        def log_message(self, fmt, *args):       # quiet: the terminal shows the URL only
            pass

        def _send(self, code: int, body: bytes, ctype: str):
            self.send_response(code)
            self.send_header("Content-Type", ctype)
            self.send_header("Content-Length", str(len(body)))
            self.send_header("Cache-Control", "no-store")
            self.send_header("X-Content-Type-Options", "nosniff")
            self.end_headers()
            self.wfile.write(body)

        def _json(self, code: int, obj):
            self._send(code, json.dumps(obj).encode(), "application/json")

        def _route(self):
            """(path, query), or None after answering 403 for a foreign Host header or 400 for
            a traversal attempt."""
            host = urllib.parse.urlsplit("//" + self.headers.get("Host", "")).hostname or ""
            if dash.allow_launch and not is_loopback(host):
                self._json(403, {"error": "Host must be a loopback address"})
                return None
            parts = urllib.parse.urlsplit(self.path)
            decoded = parts.path
            for _ in range(3):                   # %252e%252e and friends
                decoded = urllib.parse.unquote(decoded)
            if ".." in decoded or "\\" in decoded or "\x00" in decoded:
                self._json(400, {"error": "path refused"})
                return None
            return parts.path, urllib.parse.parse_qs(parts.query)

        def _answer(self, handle):
            """Run ``handle``; an exception it raises answers 500 ``{"error": ...}`` and is
            logged once, in one line. A client that went away gets no answer."""
            try:
                handle()
            except ConnectionError:
                pass
            except Exception as e:                # noqa: BLE001 - the page shows it, we go on
                text = (f"{type(e).__name__}: {e}".splitlines() or [""])[0]
                where = urllib.parse.urlsplit(self.path).path
                dash.log_error(f"dashboard: {self.command} {where} failed: {text}")
                try:
                    self._json(500, {"error": text})
                except OSError:
                    pass

        def do_GET(self):
            self._answer(self._get)

        def do_POST(self):
            self._answer(self._post)

        def _get(self):
            routed = self._route()
            if routed is None:
                return
            path, query = routed
            if path in STATIC:
                name, ctype = STATIC[path]
                body = resources.files(__package__).joinpath("static", name).read_bytes()
                return self._send(200, body, ctype)
            if path == "/api/runs":
                return self._json(200, dash.run_list())
            if path == "/api/new-run-template":
                return self._json(200, launcher.form_template(dash.runs))
            m = RUN_ROUTE.match(path)
            run_dir = dash.run_dir(int(m.group(1))) if m else None
            if run_dir is None:
                return self._json(404, {"error": "not found"})
            try:
                number = int(query.get("since", query.get("offset", ["0"]))[0])
            except ValueError:
                return self._json(400, {"error": "since/offset must be an integer"})
            number = max(number, 0)
            kind = m.group(2)
            if kind == "metrics":
                rows = runs.read_metrics(run_dir, number)
                return self._json(200, {"rows": rows, "next": number + len(rows)})
            if kind == "summary":
                return self._json(200, runs.summary(run_dir, dash._child_running(int(m.group(1)))))
            return self._json(200, runs.read_log(run_dir, number))

        def _post(self):
            routed = self._route()
            if routed is None:
                return
            gen = GENERATE_ROUTE.match(routed[0])
            if routed[0] != "/api/runs" and gen is None:
                return self._json(404, {"error": "not found"})
            if self.headers.get("X-Spmd-Lora") != "1":
                return self._json(403, {"error": "missing X-Spmd-Lora header"})
            try:
                length = int(self.headers.get("Content-Length", "0"))
                form = json.loads(self.rfile.read(min(length, 1 << 20)) or b"null")
                if gen is not None:
                    return self._json(200, dash.generate(int(gen.group(1)), form))
                return self._json(200, dash.new_run(form))
            except LookupError:
                return self._json(404, {"error": "not found"})
            except PermissionError as e:
                return self._json(403, {"error": str(e)})
            except (ValueError, SpmdLoraError) as e:
                return self._json(400, {"error": str(e)})

    return Handler


class Server(ThreadingHTTPServer):
    """A thread per request; a failure outside the handlers (a client that resets the
    connection while its request is read) is a line in ``log_error``, not a traceback."""

    daemon_threads = True

    def __init__(self, address, handler, log_error: OnceLog):
        self.log_error = log_error
        super().__init__(address, handler)

    def handle_error(self, request, client_address):
        e = sys.exc_info()[1]
        if not isinstance(e, ConnectionError):
            self.log_error(f"dashboard: request from {client_address[0]} failed: "
                           + (f"{type(e).__name__}: {e}".splitlines() or [""])[0])


def make_server(run_dirs, host: str = "127.0.0.1", port: int = 0,
                new_runs_dir="spmd_lora_runs") -> tuple[Server, Dashboard]:
    for d in map(Path, run_dirs):
        if d.exists() and not d.is_dir():
            raise ConfigError(f"RUN_DIR {d} is a file, not a run directory (give the "
                              f"--output-dir of a spmd-lora train run)")
        if d.is_dir() and not os.access(d, os.R_OK | os.X_OK):
            raise ConfigError(f"RUN_DIR {d} cannot be read (permission denied)")
    dash = Dashboard(run_dirs, new_runs_dir, allow_launch=is_loopback(host))
    try:
        server = Server((host, port), make_handler(dash), dash.log_error)
    except OSError as e:
        raise ConfigError(f"cannot listen on {host}:{port} ({e.strerror}); pick another --port "
                          f"(0 = any free one)") from None
    return server, dash


def serve(run_dirs, host: str = "127.0.0.1", port: int = 8050, new_runs_dir="spmd_lora_runs") -> int:
    """Serve until interrupted (``spmd-lora dashboard``)."""
    server, dash = make_server(run_dirs, host, port, new_runs_dir)
    h, p = server.server_address[:2]
    print(f"dashboard of {len(dash.runs)} run(s) at http://{h}:{p}/  (Ctrl-C stops it and the "
          f"runs started from its form; --resume continues them)", flush=True)
    if not dash.allow_launch:
        print(f"note: {host} is not a loopback address: the new-run form is disabled",
              file=sys.stderr)
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        server.server_close()
        dash.stop_children()
    return 0
