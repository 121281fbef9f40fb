"""What an unreachable MLflow costs a sweep: the time of the Tracker's first (failing) call and of every call after it.

    python benchmarks/mlflow_down.py [--deadline SECONDS] [--repeat N]

Three servers on 127.0.0.1: a closed port (connection refused), one that answers 503 to everything, and one that
accepts connections and never answers (cut at the call deadline, orchestrator.tracking.CALL_DEADLINE_S, here
--deadline). For each: the seconds the Tracker took to find out, the requests it sent, and the seconds 100 calls
took once it was offline. Numbers, not assertions (tests/test_mlflow_down.py checks the behaviour: how many
requests, that the deadline is what stops a call, that an offline Tracker sends nothing).
"""
from __future__ import annotations

import argparse
import http.server
import os
import socket
import statistics
import sys
import threading
import time
from pathlib import Path

os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


class Server:
    """status: the HTTP status of every answer; None: accept, count and never answer."""

    def __init__(self, status: int | None):
        self.requests = 0
        self._release = threading.Event()
        outer = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def handle(self):
                if status is None:
                    outer._release.wait()
                    return
                super().handle()

            def answer(self):
                outer.requests += 1
                self.send_response(status)
                self.send_header("Content-Length", "0")
                self.end_headers()

            do_GET = do_POST = answer

            def log_message(self, *args):
                pass

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.uri = f"http://127.0.0.1:{self.server.server_address[1]}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def close(self):
        self._release.set()
        self.server.shutdown()
        self.server.server_close()


def closed_port_uri() -> str:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return f"http://127.0.0.1:{s.getsockname()[1]}"


def measure(tracking, uri: str) -> tuple[float, float]:
    """(seconds until the Tracker is offline, seconds for 100 calls after that)."""
    t0 = time.perf_counter()
    tracker = tracking.Tracker(uri, "bench", None)
    first = time.perf_counter() - t0
    assert tracker.offline, "the server answered"
    t0 = time.perf_counter()
    for _ in range(20):
        tracker.start_sweep("sweep", {"sweep_id": "s"}, {"a": 1})
        tracker.log_metrics("run", {"val/mIoU": 1.0}, step=1)
        tracker.client.set_tag("run", "k", "v")
        tracker.client.log_metric("run", "m", 1.0)
        tracker.end_run("run", ok=True)
    return first, time.perf_counter() - t0


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--deadline", type=float, default=2.0, help="the call deadline for the silent server (s)")
    p.add_argument("--repeat", type=int, default=3)
    args = p.parse_args()

    import mlflow.tracking  # noqa: F401  (the import is not what we time)

    from orchestrator import tracking

    tracking.CALL_DEADLINE_S = args.deadline
    cases = [("closed port", lambda: None), ("503 to everything", lambda: Server(503)),
             ("never answers", lambda: Server(None))]
    for name, make in cases:
        firsts, afters, requests = [], [], []
        for _ in range(args.repeat):
            server = make()
            try:
                first, after = measure(tracking, server.uri if server else closed_port_uri())
            finally:
                if server:
                    requests.append(server.requests)
                    server.close()
            firsts.append(first)
            afters.append(after)
        sent = f", {statistics.median(requests):g} requests" if requests else ""
        print(f"{name}: offline after {statistics.median(firsts):.3f} s (median of {args.repeat}{sent}); "
              f"100 calls offline {1e3 * statistics.median(afters):.2f} ms", flush=True)
    print(f"call deadline {args.deadline:g} s; HTTP bounds "
          + ", ".join(f"{k}={os.environ.get(k)}" for k in tracking.HTTP_BOUNDS), flush=True)


if __name__ == "__main__":
    main()
