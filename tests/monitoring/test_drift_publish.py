"""The check's drift metrics are posted to the monitor service's /drift endpoint, and a monitor that
is down is said, not failed."""
import json
import threading


def test_the_checks_metrics_are_posted_to_the_monitors_drift_endpoint():
    from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

    from monitoring.publish import drift_url, post_drift

    received = []

    class Handler(BaseHTTPRequestHandler):
        def do_POST(self):
            received.append((self.path, json.loads(self.rfile.read(int(self.headers["Content-Length"])))))
            body = json.dumps({"gauges": 2, "model_version": "7"}).encode()
            self.send_response(200)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args):
            pass

    httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    try:
        url = f"http://127.0.0.1:{httpd.server_address[1]}/events"
        assert drift_url(url) == url.removesuffix("/events") + "/drift"
        line = post_drift(url, "7", {"psi_age": 0.35, "rows": 600.0})
        assert line.startswith("metrics: 2 gauges set at ") and line.endswith("/drift")
        assert received == [("/drift", {"model_version": "7", "metrics": {"psi_age": 0.35, "rows": 600.0}})]
    finally:
        httpd.shutdown()
        httpd.server_close()
    # a monitor that is down does not fail the check: it is said
    assert post_drift(url, "7", {"rows": 1.0}, timeout=2).startswith("metrics: not posted to ")
