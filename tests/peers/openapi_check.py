"""Checks the gateway's OpenAPI document with tools independent of the CRM, for the end-to-end
tests: the document is validated with openapi-spec-validator (OpenAPI 3.1), then a generic
client that knows nothing but the document drives calls by their operationId - it places each
argument where the document says (path, query or body), sends the token where the document
asks for one, and validates every answer (success or error) against the document's schema for
that status with jsonschema.

Usage: openapi_check.py --gateway HOST:PORT --email EMAIL --password PASSWORD
Prints one JSON line: the document's version, its operation count and each call made.
"""

import argparse
import json
import sys
import urllib.error
import urllib.parse
import urllib.request

import jsonschema
from openapi_spec_validator import validate


class Client:
    """Calls operations of an OpenAPI document by operationId, validating what comes back."""

    def __init__(self, spec, base):
        self.spec = spec
        self.base = base
        self.token = None
        self.operations = {}
        for path, methods in spec["paths"].items():
            for method, op in methods.items():
                self.operations[op["operationId"]] = (path, method.upper(), op)
        self.calls = []

    def call(self, operation_id, args=None, body=None, expect=200):
        path, method, op = self.operations[operation_id]
        args = dict(args or {})
        query = []
        for parameter in op.get("parameters", []):
            name = parameter["name"]
            if name not in args:
                if parameter.get("required"):
                    raise SystemExit(f"{operation_id}: missing required {name}")
                continue
            value = args.pop(name)
            if parameter["in"] == "path":
                path = path.replace("{" + name + "}", urllib.parse.quote(str(value), safe=""))
            elif parameter["in"] == "query":
                for v in value if isinstance(value, list) else [value]:
                    query.append((name, str(v)))
        if args:
            raise SystemExit(f"{operation_id}: the document has no parameters {sorted(args)}")
        url = self.base + path + ("?" + urllib.parse.urlencode(query) if query else "")
        headers = {"Accept": "application/json"}
        data = None
        if body is not None:
            if "requestBody" not in op:
                raise SystemExit(f"{operation_id}: the document takes no body")
            self.check(operation_id, "request", op["requestBody"]["content"]["application/json"]["schema"], body)
            data = json.dumps(body).encode()
            headers["Content-Type"] = "application/json"
        security = op.get("security", self.spec.get("security", []))
        if security and self.token:
            headers["Authorization"] = "Bearer " + self.token
        request = urllib.request.Request(url, data=data, method=method, headers=headers)
        try:
            with urllib.request.urlopen(request, timeout=30) as response:
                status, raw, content_type = response.status, response.read(), response.headers.get_content_type()
        except urllib.error.HTTPError as error:
            status, raw, content_type = error.code, error.read(), error.headers.get_content_type()
        if status != expect:
            raise SystemExit(f"{operation_id} {method} {url}: {status}, expected {expect}: {raw[:500]!r}")
        answer = op["responses"].get(str(status)) or op["responses"]["default"]
        media = answer["content"].get(content_type)
        if media is None:
            raise SystemExit(f"{operation_id}: answered {content_type}, the document says {list(answer['content'])}")
        value = json.loads(raw)
        self.check(operation_id, "answer", media["schema"], value)
        self.calls.append({"operation": operation_id, "status": status})
        return value

    def check(self, operation_id, what, schema, value):
        """Validates `value` against `schema` of the document (its references resolved there)."""
        schema = dict(schema, components=self.spec["components"])
        try:
            jsonschema.Draft202012Validator(schema).validate(value)
        except jsonschema.ValidationError as error:
            raise SystemExit(f"{operation_id}: the {what} does not match the document: {error.message} at "
                             f"{list(error.absolute_path)}: {json.dumps(value)[:500]}")


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--gateway", required=True)
    parser.add_argument("--email", required=True)
    parser.add_argument("--password", required=True)
    args = parser.parse_args()
    base = "http://" + args.gateway
    with urllib.request.urlopen(base + "/openapi.json", timeout=30) as response:
        spec = json.load(response)
    validate(spec)

    client = Client(spec, base)
    tokens = client.call("AuthService_SignIn", body={"email": args.email, "password": args.password})
    client.token = tokens["accessToken"]
    me = client.call("AuthService_GetMe")
    person = client.call("ContactsService_CreatePerson", body={"fullName": "Generic Client", "ownerId": me["subject"]})
    client.call("ContactsService_GetPerson", {"id": person["id"]})
    client.call("DealsService_ListPipelines")
    deal = client.call("DealsService_CreateDeal", body={
        "title": "From the document", "personId": person["id"],
        "amount": {"currencyCode": "EUR", "minorUnits": "2500"}})
    client.call("DealsService_GetDeal", {"id": deal["id"]})
    renamed = client.call("DealsService_UpdateDeal", {"id": deal["id"], "update_mask": "title"},
                          body={"title": "Renamed from the document"})
    assert renamed["title"] == "Renamed from the document", renamed
    listed = client.call("DealsService_ListDeals", {"page_size": 100, "order_by": "create_time desc"})
    assert deal["id"] in [d["id"] for d in listed["deals"]], listed
    client.call("DealsService_GetDeal", {"id": "0190a000-0000-7000-8000-000000000000"}, expect=404)
    bad = client.call("DealsService_CreateDeal", body={"title": " "}, expect=400)
    assert bad["details"][0]["fieldViolations"][0]["field"] == "deal.title", bad
    operations = len(client.operations)
    print(json.dumps({"openapi": spec["openapi"], "operations": operations, "calls": client.calls}))


if __name__ == "__main__":
    sys.exit(main())
