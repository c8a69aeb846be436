"""A real HTTP server for the end-to-end tests, receiving the CRM's webhooks and SMS requests.

Each request is written to DIR as <n>.json: path, headers (lower-case), body, and - when the
control file holds a webhook secret - whether the Standard Webhooks library (the `standardwebhooks`
package, an implementation independent of the CRM's) verifies its signature, and why not. The
control file (JSON) also makes it fail on purpose:
  {"secret": "whsec_...", "fail": N, "status": 503}   answer the next N requests with that status
  {"fail_path": "/hooks"}                            ...only those whose path starts so

Usage: http_sink.py --port PORT --dir DIR --control FILE   (prints "ready" once listening)
"""

import argparse
import json
import os
import sys
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

from standardwebhooks.webhooks import Webhook

LOCK = threading.Lock()


def read_control(path):
    try:
        with open(path) as f:
            return json.load(f)
    except (OSError, ValueError):
        return {}


def write_control(path, control):
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        json.dump(control, f)
    os.replace(tmp, path)


def make_handler(directory, control_path):
    state = {"count": 0}

    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def log_message(self, format, *args):
            sys.stdout.write("%s\n" % (format % args))
            sys.stdout.flush()

        def do_POST(self):
            length = int(self.headers.get("content-length", "0"))
            body = self.rfile.read(length)
            headers = {k.lower(): v for k, v in self.headers.items()}
            with LOCK:
                control = read_control(control_path)
                if control.get("fail", 0) > 0 and self.path.startswith(control.get("fail_path", "")):
                    control["fail"] -= 1
                    write_control(control_path, control)
                    status = int(control.get("status", 503))
                else:
                    status = 200
                state["count"] += 1
                n = state["count"]
            record = {"path": self.path, "headers": headers, "body": body.decode("utf-8"), "status": status}
            secret = control.get("secret")
            if secret:
                try:
                    Webhook(secret).verify(body, headers)
                    record["verified"] = True
                except Exception as e:  # the library's verification error, or a malformed header
                    record["verified"] = False
                    record["verify_error"] = repr(e)
            tmp = os.path.join(directory, f"{n}.tmp")
            with open(tmp, "w") as f:
                json.dump(record, f, ensure_ascii=False)
            os.replace(tmp, os.path.join(directory, f"{n}.json"))
            reply = b"ok" if status == 200 else b"try again later"
            self.send_response(status)
            self.send_header("content-type", "text/plain")
            self.send_header("content-length", str(len(reply)))
            self.end_headers()
            self.wfile.write(reply)

    return Handler


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--dir", required=True)
    parser.add_argument("--control", required=True)
    args = parser.parse_args()
    server = ThreadingHTTPServer(("127.0.0.1", args.port), make_handler(args.dir, args.control))
    print("ready", flush=True)
    server.serve_forever()


if __name__ == "__main__":
    sys.exit(main())
