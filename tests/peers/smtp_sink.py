"""A real SMTP server for the end-to-end tests (aiosmtpd), receiving what the CRM sends.

Each message is written to DIR as <n>.json: the envelope, and the headers and text as Python's
own `email` package decodes them (an implementation independent of the CRM's), plus the raw
bytes in <n>.eml. A control file (JSON) makes the server misbehave on purpose:
  {"fail": N, "code": 451}  answer the next N messages with that code (4xx: try again, 5xx: no)
  {"hold": true}            take a message, write it, and hold the reply until "hold" is false
                            (written <n>.held while holding) - a sender killed meanwhile has
                            delivered without knowing it.

Usage: smtp_sink.py --port PORT --dir DIR --control FILE   (prints "ready" once listening)
"""

import argparse
import asyncio
import email
import email.policy
import json
import os
import sys

from aiosmtpd.controller import Controller


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


class Sink:
    def __init__(self, directory, control):
        self.directory = directory
        self.control = control
        self.count = 0

    async def handle_DATA(self, server, session, envelope):
        control = read_control(self.control)
        if control.get("fail", 0) > 0:
            control["fail"] -= 1
            write_control(self.control, control)
            code = int(control.get("code", 451))
            return f"{code} {'4.3.0 try again later' if code < 500 else '5.7.1 refused'}"
        self.count += 1
        n = self.count
        raw = envelope.original_content or envelope.content
        message = email.message_from_bytes(raw, policy=email.policy.default)
        body = message.get_body(preferencelist=("plain",))
        record = {
            "mail_from": envelope.mail_from,
            "rcpt_tos": envelope.rcpt_tos,
            "from": str(message["From"]),
            "to": str(message["To"]),
            "subject": str(message["Subject"]),
            "message_id": str(message["Message-ID"]),
            "content_type": message.get_content_type(),
            "charset": body.get_content_charset() if body is not None else None,
            "body": body.get_content() if body is not None else "",
        }
        with open(os.path.join(self.directory, f"{n}.eml"), "wb") as f:
            f.write(raw)
        tmp = os.path.join(self.directory, f"{n}.tmp")
        with open(tmp, "w") as f:
            json.dump(record, f, ensure_ascii=False)
        os.replace(tmp, os.path.join(self.directory, f"{n}.json"))
        if control.get("hold"):
            held = os.path.join(self.directory, f"{n}.held")
            open(held, "w").close()
            while read_control(self.control).get("hold"):
                await asyncio.sleep(0.05)
        return "250 OK"


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--dir", required=True)
    parser.add_argument("--control", required=True)
    args = parser.parse_args()
    controller = Controller(Sink(args.dir, args.control), hostname="127.0.0.1", port=args.port)
    controller.start()
    print("ready", flush=True)
    try:
        asyncio.run(asyncio.Event().wait())
    except KeyboardInterrupt:
        pass
    finally:
        controller.stop()


if __name__ == "__main__":
    sys.exit(main())
