// A real gRPC-Web client calling the CRM's gateway, for the end-to-end tests: Connect-ES with
// its gRPC-Web transport (binary protobuf over fetch), its messages and services taken at run
// time from the suite's descriptor set - no generated code, nothing of the CRM's own.
//
// Usage: node check.mjs --gateway HOST:PORT --descriptors FILE --email EMAIL --password PASSWORD
// Prints one JSON line: what each call returned.

import { readFileSync } from "node:fs";
import { parseArgs } from "node:util";

import { createFileRegistry, fromBinary, toJson } from "@bufbuild/protobuf";
import { FileDescriptorSetSchema } from "@bufbuild/protobuf/wkt";
import { Code, ConnectError, createClient } from "@connectrpc/connect";
import { createGrpcWebTransport } from "@connectrpc/connect-web";

const { values: args } = parseArgs({
  options: {
    gateway: { type: "string" },
    descriptors: { type: "string" },
    email: { type: "string" },
    password: { type: "string" },
  },
});

const registry = createFileRegistry(fromBinary(FileDescriptorSetSchema, readFileSync(args.descriptors)));
const transport = createGrpcWebTransport({ baseUrl: `http://${args.gateway}`, useBinaryFormat: true });
const service = (name) => createClient(registry.getService(name), transport);

const auth = service("crm.auth.v1.AuthService");
const pair = await auth.signIn({ email: args.email, password: args.password });
const headers = { authorization: `Bearer ${pair.accessToken}` };

const contacts = service("crm.contacts.v1.ContactsService");
const created = await contacts.createPerson(
  { person: { fullName: "Web Client", emails: [{ address: "web@example.com" }] } },
  { headers },
);
const fetched = await contacts.getPerson({ id: created.id }, { headers });
const personSchema = registry.getMessage("crm.contacts.v1.Person");

let refused = null;
try {
  await contacts.createPerson({ person: { fullName: " " } }, { headers });
} catch (error) {
  if (!(error instanceof ConnectError)) throw error;
  refused = {
    code: Code[error.code],
    message: error.rawMessage,
    details: error.details.map((d) => ("desc" in d ? d.desc.typeName : d.type)),
  };
}

let unauthenticated = null;
try {
  await contacts.getPerson({ id: created.id });
} catch (error) {
  unauthenticated = Code[error.code];
}

console.log(
  JSON.stringify({
    signedIn: pair.accessToken.length > 0,
    created: toJson(personSchema, created),
    fetched: toJson(personSchema, fetched),
    refused,
    unauthenticated,
  }),
);
