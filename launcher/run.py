"""`scripts/run`: serve the model repository at once, and build the missing default models into it meanwhile.

    python -m launcher.run [--host H] [--port P] [--models-dir DIR]   # the arguments of `python -m service`

- The service (`python -m service`, a child process) starts at once on whatever the repository holds, nothing
  included. It polls the repository (LATENTSERVE_REPOSITORY_POLL_SECONDS) and serves each default model as soon
  as its export lands: ppca-mnist first, after a minute or two, the VAEs as they finish.
- Meanwhile the missing default models are fitted, two at a time, with their progress on screen (one bar per
  model in a terminal, a line per model every 15 s otherwise); the service's log lines print above the bars.
- When the service first serves a model it says where to look (the URL, /docs, the web page at / when there is
  one), and then names each model as it comes to be served.

With polling off (LATENTSERVE_REPOSITORY_POLL_SECONDS=0) the service would never see the new models: the
defaults are then built first and the service started after. Ctrl-C or SIGTERM stops the fits and the service
(which answers the requests in flight first); the exit status is the service's.
"""

from __future__ import annotations

import _thread
import json
import os
import signal
import subprocess
import sys
import threading
import urllib.error
import urllib.request
from pathlib import Path

from service.__main__ import settings_from_args
from service.settings import Settings
from training import defaults
from training.progress import Board

JOBS = min(2, os.cpu_count() or 1)  # as build-defaults: one torch thread per fit, a core each
WATCH_EVERY_S = 1.0
PREFIX = "[run] "
WATCH_REQUEST_ID = "scripts-run-watcher"


def base_url(settings: Settings) -> str:
    host = {"0.0.0.0": "127.0.0.1", "::": "[::1]", "": "127.0.0.1"}.get(settings.host, settings.host)
    return f"http://{'[' + host + ']' if ':' in host and not host.startswith('[') else host}:{settings.port}"


class Watcher(threading.Thread):
    """Asks the service what it serves, every second: says where to look once it serves, then each new model."""

    def __init__(self, settings: Settings, expected: list[str], say):
        super().__init__(name="serve-watcher", daemon=True)
        self.url, self.expected, self.say = base_url(settings), expected, say
        # Its requests are named, so that their log lines can be left out of what is shown (_pump).
        self.headers = {"X-Request-ID": WATCH_REQUEST_ID}
        if settings.api_key:
            self.headers["X-API-Key"] = settings.api_key.get_secret_value()
        self.served: set[str] = set()
        self.stop = threading.Event()

    def _get(self, path: str) -> tuple[int, str, str]:
        req = urllib.request.Request(self.url + path, headers=self.headers)
        try:
            with urllib.request.urlopen(req, timeout=5) as r:
                return r.status, r.headers.get("content-type", ""), r.read().decode(errors="replace")
        except urllib.error.HTTPError as e:
            return e.code, "", ""

    def run(self) -> None:
        while not self.stop.wait(WATCH_EVERY_S):
            try:
                status, _, body = self._get("/models")
                if status != 200:
                    continue
                served = {m["name"] for m in json.loads(body)["models"]}
            except (OSError, ValueError, KeyError, TypeError):
                continue  # not listening yet
            if served and not self.served:
                self._where(sorted(served))
            elif served - self.served:
                self.say(f"{PREFIX}now serving {', '.join(sorted(served - self.served))} (models: "
                         f"{', '.join(sorted(served))})")
            self.served = served
            if set(self.expected) <= served:
                return

    def _where(self, served: list[str]) -> None:
        lines = [f"{PREFIX}serving {', '.join(served)} at {self.url}",
                 f"{PREFIX}  API docs:  {self.url}/docs"]
        try:
            status, ctype, _ = self._get("/")
            if status == 200 and ctype.startswith("text/html"):
                lines.append(f"{PREFIX}  web page:  {self.url}/")
        except OSError:
            pass
        lines.append(f"{PREFIX}  try:       curl -s '{self.url}/sample?n=16&seed=0' -o samples.png")
        waiting = [n for n in self.expected if n not in served]
        if waiting:
            lines.append(f"{PREFIX}still training: {', '.join(waiting)}; each is served as soon as it is exported")
        for line in lines:
            self.say(line)


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    settings = settings_from_args(argv)
    if settings is None:
        return 2
    models_dir = Path(settings.models_dir)
    models_dir.mkdir(parents=True, exist_ok=True)
    todo = defaults.missing_defaults(models_dir)
    if todo and settings.repository_poll_seconds == 0:
        print(f"{PREFIX}LATENTSERVE_REPOSITORY_POLL_SECONDS is 0: the service would not see new models, so the "
              "default models are built first", flush=True)
        defaults.build_defaults(models_dir, jobs=JOBS)
        todo = []

    def terminate(signum, frame):  # as Ctrl-C: the fits stop, and the service after its requests in flight
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, terminate)
    board = Board(todo, prefix="[build-defaults] ") if todo else None
    say = board.write if board is not None else (lambda line: print(line, flush=True))
    # Its own session: a Ctrl-C in the terminal reaches it once, from here, as the SIGTERM it drains on.
    service = subprocess.Popen([sys.executable, "-m", "service", *argv], stdout=subprocess.PIPE,
                               stderr=subprocess.STDOUT, start_new_session=True)
    stopping = threading.Event()
    pump = threading.Thread(target=_pump, args=(service, say, stopping), name="service-output", daemon=True)
    pump.start()
    watcher = Watcher(settings, list(defaults.DEFAULT_MODELS), say)
    watcher.start()
    try:
        if todo:
            try:
                status = defaults.build_defaults(models_dir, jobs=JOBS, board=board)
            finally:
                board.close()
            failed = [n for n, s in status.items() if s == "failed"]
            if failed:
                print(f"{PREFIX}{', '.join(failed)} could not be built (see above); the service goes on with the "
                      "others", flush=True)
        code = service.wait()
        return 128 - code if code < 0 else code  # killed by a signal: as a shell says it
    except KeyboardInterrupt:
        stopping.set()
        defaults.stop_fits()
        if service.poll() is None:
            service.send_signal(signal.SIGTERM)
            # uvicorn ends a graceful shutdown by raising the signal again: stopped as asked, not a failure
            return 0 if service.wait() == -signal.SIGTERM else abs(service.returncode)
        return abs(service.returncode)
    finally:
        watcher.stop.set()
        pump.join(timeout=5)


def _pump(service: subprocess.Popen, say, stopping: threading.Event) -> None:
    """The service's output, line by line, through `say` (above the progress bars while they show).

    When the service exits on its own (a port in use, bad settings), the fits are stopped too: there is
    nothing to serve them."""
    assert service.stdout is not None
    for raw in service.stdout:
        line = raw.decode(errors="replace").rstrip("\n")
        if f'"request_id":"{WATCH_REQUEST_ID}"' not in line:
            say(line)
    code = service.wait()
    if not stopping.is_set():
        say(f"{PREFIX}the service exited with status {code}; stopping")
        _thread.interrupt_main()


if __name__ == "__main__":
    sys.exit(main())
