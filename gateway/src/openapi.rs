//! The OpenAPI 3.1 document of the REST edge (`GET /openapi.json`), generated from the same
//! descriptors and HTTP rules the transcoder serves, so that Swagger UI, Postman and code
//! generators see exactly what answers: every path and method, its path, query and body
//! parameters, its answer (JSON, a raw body, or a stream of messages), the error shape, the
//! bearer-token scheme (public calls say they need none), and a schema per message and enum in
//! the proto3 JSON mapping, described by the protos' own comments.

use std::collections::{BTreeMap, HashMap};

use prost_reflect::{DescriptorPool, FieldDescriptor, Kind, MessageDescriptor};
use prost_types::FileDescriptorProto;
use serde_json::{Map, Value, json};

use crate::rest::{RestRoute, Segment};

/// The document for `routes` of `pool`; `needs_token` tells which gRPC paths need a token.
pub(crate) fn document(pool: &DescriptorPool, routes: &[RestRoute], needs_token: &dyn Fn(&str) -> bool) -> Value {
    let comments = Comments::new(pool);
    let mut schemas = Schemas { comments: &comments, done: BTreeMap::new(), todo: Vec::new() };
    // Paths the same but for their variables' names are one path to OpenAPI: the first route
    // of a shape names its variables, and the others' calls take theirs by position.
    let mut names: HashMap<String, Vec<String>> = HashMap::new();
    let mut paths: BTreeMap<String, Map<String, Value>> = BTreeMap::new();
    for route in routes {
        let shape = shape(route);
        let variables: Vec<String> = route
            .segments
            .iter()
            .filter_map(|s| match s {
                Segment::Field(f) => Some(f.clone()),
                Segment::Literal(_) => None,
            })
            .collect();
        let named = names.entry(shape).or_insert_with(|| variables.clone()).clone();
        let mut key = String::new();
        let mut index = 0;
        for segment in &route.segments {
            key.push('/');
            match segment {
                Segment::Literal(text) => key.push_str(text),
                Segment::Field(_) => {
                    key.push_str(&format!("{{{}}}", named[index]));
                    index += 1;
                }
            }
        }
        if let Some(verb) = &route.verb {
            key.push(':');
            key.push_str(verb);
        }
        let operation = operation(route, &variables, &named, &mut schemas, &comments, needs_token);
        paths.entry(key).or_default().insert(route.method.as_str().to_ascii_lowercase(), operation);
    }
    schemas.run();
    let mut components = schemas.done;
    components.insert(
        "google.rpc.Status".into(),
        json!({
            "type": "object",
            "description": "An error: its gRPC code, a message for people, and details such as \
                the field violations of a google.rpc.BadRequest or the delay of a google.rpc.RetryInfo.",
            "properties": {
                "code": {"type": "integer", "format": "int32"},
                "message": {"type": "string"},
                "details": {"type": "array", "items": {
                    "type": "object",
                    "properties": {"@type": {"type": "string"}},
                    "additionalProperties": true
                }}
            }
        }),
    );
    json!({
        "openapi": "3.1.0",
        "info": {
            "title": "CRM",
            "version": env!("CARGO_PKG_VERSION"),
            "description": "REST/JSON over the CRM's gRPC API, transcoded at the gateway from the \
                protos' google.api.http rules (proto3 JSON: camelCase names, 64-bit integers as \
                strings, enums by name). Sign in with POST /v1/auth:signIn and send the access \
                token as `Authorization: Bearer <token>`."
        },
        "servers": [{"url": "/"}],
        "security": [{"bearerAuth": []}],
        "paths": paths,
        "components": {
            "securitySchemes": {
                "bearerAuth": {"type": "http", "scheme": "bearer", "bearerFormat": "JWT"}
            },
            "schemas": components,
        }
    })
}

/// A route's path with its variables unnamed: "/v1/deals/{}:move".
fn shape(route: &RestRoute) -> String {
    let mut out = String::new();
    for segment in &route.segments {
        out.push('/');
        match segment {
            Segment::Literal(text) => out.push_str(text),
            Segment::Field(_) => out.push_str("{}"),
        }
    }
    if let Some(verb) = &route.verb {
        out.push(':');
        out.push_str(verb);
    }
    out
}

fn operation(
    route: &RestRoute,
    variables: &[String],
    named: &[String],
    schemas: &mut Schemas<'_>,
    comments: &Comments,
    needs_token: &dyn Fn(&str) -> bool,
) -> Value {
    let method = &route.descriptor;
    let service = method.parent_service();
    let mut parameters = Vec::new();
    for (field_path, name) in variables.iter().zip(named) {
        let schema = field_at(&route.input, field_path).map_or(json!({"type": "string"}), |f| schemas.scalar(&f));
        let mut parameter = json!({"name": name, "in": "path", "required": true, "schema": schema});
        if field_path != name {
            parameter["description"] = json!(format!("The call's `{field_path}`."));
        }
        parameters.push(parameter);
    }
    if route.body.as_deref() != Some("*") {
        let mut query = Vec::new();
        query_parameters(&route.input, "", 0, &mut query);
        for (name, field) in query {
            let bound = variables.iter().any(|v| v == &name || name.starts_with(&format!("{v}.")));
            let in_body = route.body.as_deref().is_some_and(|b| name == b || name.starts_with(&format!("{b}.")));
            if bound || in_body {
                continue;
            }
            let mut parameter = json!({"name": name, "in": "query", "schema": schemas.field(&field)});
            if let Some(text) = comments.of(field.parent_message().parent_file_descriptor_proto(), field.path()) {
                parameter["description"] = json!(text);
            }
            parameters.push(parameter);
        }
    }
    let mut operation = json!({
        "operationId": format!("{}_{}", service.name(), method.name()),
        "tags": [service.name()],
        "parameters": parameters,
        "responses": responses(route, schemas),
    });
    if let Some(text) = comments.of(service.parent_file_descriptor_proto(), method.path()) {
        let summary = text.lines().next().unwrap_or_default().trim_end_matches('.').to_string();
        operation["summary"] = json!(summary);
        operation["description"] = json!(text);
    }
    match route.body.as_deref() {
        Some("*") => {
            operation["requestBody"] = json!({"required": true, "content": {"application/json": {
                "schema": schemas.message(&route.input)
            }}});
        }
        Some(field) => {
            if let Some(Kind::Message(body)) = field_at(&route.input, field).map(|f| f.kind()) {
                operation["requestBody"] = json!({"required": true, "content": {"application/json": {
                    "schema": schemas.message(&body)
                }}});
            }
        }
        None => {}
    }
    if !needs_token(&route.grpc_path) {
        operation["security"] = json!([]);
    }
    operation
}

fn responses(route: &RestRoute, schemas: &mut Schemas<'_>) -> Value {
    let content = if route.output.full_name() == "google.api.HttpBody" {
        json!({"*/*": {"schema": {"type": "string"}}})
    } else if route.streaming {
        let message = schemas.message(&route.output);
        json!({
            "application/x-ndjson": {"schema": message},
            "text/event-stream": {"schema": {"type": "string"}}
        })
    } else {
        json!({"application/json": {"schema": schemas.message(&route.output)}})
    };
    let description = if route.streaming {
        "A stream of messages: one JSON message per line, or server-sent events when the client \
         accepts text/event-stream; an error after the first message ends it as an {\"error\": …} \
         line or an error event."
    } else {
        "The call's answer."
    };
    let status = json!({"application/json": {"schema": {"$ref": "#/components/schemas/google.rpc.Status"}}});
    json!({
        "200": {"description": description, "content": content},
        "429": {
            "description": "Over the caller's rate limit; retry after the delay given.",
            "headers": {"Retry-After": {"description": "Seconds to wait.", "schema": {"type": "integer"}}},
            "content": status
        },
        "default": {"description": "An error, as a google.rpc.Status.", "content": status}
    })
}

/// The field at a dotted path of `message`, by proto or JSON names.
fn field_at(message: &MessageDescriptor, path: &str) -> Option<FieldDescriptor> {
    let (head, rest) = match path.split_once('.') {
        Some((h, r)) => (h, Some(r)),
        None => (path, None),
    };
    let field = message.get_field_by_name(head).or_else(|| message.get_field_by_json_name(head))?;
    match (rest, field.kind()) {
        (None, _) => Some(field),
        (Some(rest), Kind::Message(inner)) => field_at(&inner, rest),
        (Some(_), _) => None,
    }
}

/// The fields a query can set (scalars, enums, field masks, lists of them, and those of nested
/// messages as `a.b`), as the transcoder reads them.
fn query_parameters(message: &MessageDescriptor, prefix: &str, depth: usize, out: &mut Vec<(String, FieldDescriptor)>) {
    for field in message.fields() {
        let name = format!("{prefix}{}", field.name());
        match field.kind() {
            _ if field.is_map() => {}
            Kind::Message(m) if m.full_name() == "google.protobuf.FieldMask" => out.push((name, field)),
            Kind::Message(m) if !field.is_list() && depth < 2 && !m.full_name().starts_with("google.") => {
                query_parameters(&m, &format!("{name}."), depth + 1, out);
            }
            Kind::Message(_) => {}
            _ => out.push((name, field)),
        }
    }
}

/// The schema of every message and enum used, each once under its full name.
struct Schemas<'a> {
    comments: &'a Comments,
    done: BTreeMap<String, Value>,
    todo: Vec<Named>,
}

enum Named {
    Message(MessageDescriptor),
    Enum(prost_reflect::EnumDescriptor),
}

impl Schemas<'_> {
    /// A reference to a message's schema (or the JSON form of a well-known type).
    fn message(&mut self, message: &MessageDescriptor) -> Value {
        if let Some(known) = well_known(message.full_name()) {
            return known;
        }
        let name = message.full_name().to_string();
        if !self.done.contains_key(&name) {
            self.done.insert(name.clone(), Value::Null);
            self.todo.push(Named::Message(message.clone()));
        }
        json!({"$ref": format!("#/components/schemas/{name}")})
    }

    /// A field's schema: its kind's, a list of them, or a map.
    fn field(&mut self, field: &FieldDescriptor) -> Value {
        if field.is_map()
            && let Kind::Message(entry) = field.kind()
        {
            let value = entry.map_entry_value_field();
            return json!({"type": "object", "additionalProperties": self.field(&value)});
        }
        let single = self.scalar(field);
        if field.is_list() { json!({"type": "array", "items": single}) } else { single }
    }

    /// One value of a field's kind.
    fn scalar(&mut self, field: &FieldDescriptor) -> Value {
        match field.kind() {
            Kind::String => json!({"type": "string"}),
            Kind::Bool => json!({"type": "boolean"}),
            Kind::Int32 | Kind::Sint32 | Kind::Sfixed32 => json!({"type": "integer", "format": "int32"}),
            Kind::Uint32 | Kind::Fixed32 => json!({"type": "integer", "minimum": 0, "maximum": 4_294_967_295_u64}),
            Kind::Int64 | Kind::Sint64 | Kind::Sfixed64 => json!({"type": "string", "format": "int64"}),
            Kind::Uint64 | Kind::Fixed64 => json!({"type": "string", "format": "uint64"}),
            Kind::Float => json!({"type": "number", "format": "float"}),
            Kind::Double => json!({"type": "number", "format": "double"}),
            Kind::Bytes => json!({"type": "string", "contentEncoding": "base64"}),
            Kind::Enum(e) => {
                let name = e.full_name().to_string();
                if !self.done.contains_key(&name) {
                    self.done.insert(name.clone(), Value::Null);
                    self.todo.push(Named::Enum(e.clone()));
                }
                json!({"$ref": format!("#/components/schemas/{name}")})
            }
            Kind::Message(m) => self.message(&m),
        }
    }

    /// Writes the schemas of everything referenced, and of what they reference.
    fn run(&mut self) {
        while let Some(next) = self.todo.pop() {
            let (name, schema) = match next {
                Named::Message(message) => {
                    let mut properties = Map::new();
                    for field in message.fields() {
                        let mut schema = self.field(&field);
                        if let Some(text) = self.comments.of(message.parent_file_descriptor_proto(), field.path()) {
                            schema = with_description(schema, text);
                        }
                        properties.insert(field.json_name().to_string(), schema);
                    }
                    // proto3 JSON parsers refuse unknown fields, and answers carry only these.
                    let mut schema = json!({"type": "object", "properties": properties, "additionalProperties": false});
                    if let Some(text) = self.comments.of(message.parent_file_descriptor_proto(), message.path()) {
                        schema["description"] = json!(text);
                    }
                    (message.full_name().to_string(), schema)
                }
                Named::Enum(e) => {
                    let values: Vec<String> = e.values().map(|v| v.name().to_string()).collect();
                    let mut schema = json!({"type": "string", "enum": values});
                    if let Some(text) = self.comments.of(e.parent_file_descriptor_proto(), e.path()) {
                        schema["description"] = json!(text);
                    }
                    (e.full_name().to_string(), schema)
                }
            };
            self.done.insert(name, schema);
        }
    }
}

/// A schema with a description: beside a `$ref` (which 3.1 allows) or in the schema itself.
fn with_description(mut schema: Value, text: &str) -> Value {
    if let Some(object) = schema.as_object_mut() {
        object.insert("description".into(), json!(text));
    }
    schema
}

/// The proto3 JSON form of the well-known types.
fn well_known(full_name: &str) -> Option<Value> {
    let nullable = |kind: &str| json!({"type": [kind, "null"]});
    Some(match full_name {
        "google.protobuf.Timestamp" => json!({"type": "string", "format": "date-time"}),
        "google.protobuf.Duration" => json!({"type": "string", "pattern": "^-?[0-9]+(\\.[0-9]{1,9})?s$"}),
        "google.protobuf.FieldMask" => {
            json!({"type": "string", "description": "Field paths, comma-separated (\"title,notes\")."})
        }
        "google.protobuf.Empty" => json!({"type": "object"}),
        "google.protobuf.Struct" => json!({"type": "object", "additionalProperties": true}),
        "google.protobuf.Value" => json!({}),
        "google.protobuf.ListValue" => json!({"type": "array"}),
        "google.protobuf.Any" => json!({
            "type": "object",
            "properties": {"@type": {"type": "string"}},
            "additionalProperties": true
        }),
        "google.protobuf.StringValue" | "google.protobuf.BytesValue" => nullable("string"),
        "google.protobuf.Int64Value" | "google.protobuf.UInt64Value" => nullable("string"),
        "google.protobuf.Int32Value" | "google.protobuf.UInt32Value" => nullable("integer"),
        "google.protobuf.DoubleValue" | "google.protobuf.FloatValue" => nullable("number"),
        "google.protobuf.BoolValue" => nullable("boolean"),
        _ => return None,
    })
}

/// The protos' leading comments, by file and descriptor path.
struct Comments(HashMap<(String, Vec<i32>), String>);

impl Comments {
    fn new(pool: &DescriptorPool) -> Comments {
        let mut out = HashMap::new();
        for file in pool.files() {
            let proto = file.file_descriptor_proto();
            let Some(info) = &proto.source_code_info else { continue };
            for location in &info.location {
                let Some(text) = location.leading_comments.as_deref() else { continue };
                let text = text.lines().map(str::trim).collect::<Vec<_>>().join("\n").trim().to_string();
                if !text.is_empty() {
                    out.insert((proto.name().to_string(), location.path.clone()), text);
                }
            }
        }
        Comments(out)
    }

    fn of(&self, file: &FileDescriptorProto, path: &[i32]) -> Option<&str> {
        self.0.get(&(file.name().to_string(), path.to_vec())).map(String::as_str)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::rest::{routes, suite_pool};

    fn doc() -> Value {
        let pool = suite_pool();
        document(&pool, &routes(&pool), &|path| !path.ends_with("/SignIn") && !path.contains("CalendarFeed"))
    }

    #[test]
    fn every_route_is_an_operation() {
        let doc = doc();
        let pool = suite_pool();
        let count: usize = doc["paths"].as_object().unwrap().values().map(|p| p.as_object().unwrap().len()).sum();
        assert_eq!(count, routes(&pool).len(), "one operation per route");
        let get = &doc["paths"]["/v1/deals/{id}"]["get"];
        assert_eq!(get["operationId"], "DealsService_GetDeal");
        assert_eq!(
            get["parameters"][0],
            json!({"name": "id", "in": "path", "required": true, "schema": {"type": "string"}})
        );
        assert_eq!(
            get["responses"]["200"]["content"]["application/json"]["schema"]["$ref"],
            "#/components/schemas/crm.deals.v1.Deal"
        );
        // The same path with another variable name: named as the first, described.
        let patch = &doc["paths"]["/v1/deals/{id}"]["patch"];
        assert_eq!(patch["parameters"][0]["name"], "id");
        assert_eq!(patch["parameters"][0]["description"], "The call's `deal.id`.");
        let query: Vec<&str> = patch["parameters"]
            .as_array()
            .unwrap()
            .iter()
            .filter(|p| p["in"] == "query")
            .map(|p| p["name"].as_str().unwrap())
            .collect();
        assert!(query.contains(&"update_mask"), "{query:?}");
        assert!(!query.iter().any(|q| q.starts_with("deal.")), "the body's fields are not query parameters: {query:?}");
        assert_eq!(
            patch["requestBody"]["content"]["application/json"]["schema"]["$ref"],
            "#/components/schemas/crm.deals.v1.Deal"
        );
        // A list: its query parameters, with enums and descriptions.
        let list = &doc["paths"]["/v1/deals"]["get"];
        let names: Vec<&str> =
            list["parameters"].as_array().unwrap().iter().map(|p| p["name"].as_str().unwrap()).collect();
        assert!(names.contains(&"page_size") && names.contains(&"filter"), "{names:?}");
        // Public calls need no token; the stream and raw bodies say what they answer.
        assert_eq!(doc["paths"]["/v1/auth:signIn"]["post"]["security"], json!([]));
        assert!(doc["paths"]["/v1/deals"]["get"].get("security").is_none());
        let subscribe = &doc["paths"]["/v1/notifications:subscribe"]["get"]["responses"]["200"]["content"];
        assert!(subscribe.get("application/x-ndjson").is_some() && subscribe.get("text/event-stream").is_some());
        assert!(doc["paths"]["/calendar/{token}"]["get"]["responses"]["200"]["content"].get("*/*").is_some());
        // Every reference resolves.
        let text = doc.to_string();
        let schemas = doc["components"]["schemas"].as_object().unwrap();
        for reference in text.split("\"#/components/schemas/").skip(1) {
            let name = &reference[..reference.find('"').unwrap()];
            assert!(schemas.get(name).is_some_and(|s| !s.is_null()), "{name} is referenced and defined");
        }
        let deal = &schemas["crm.deals.v1.Deal"];
        assert_eq!(deal["type"], "object");
        assert!(deal["properties"]["createTime"]["format"] == "date-time", "{}", deal["properties"]["createTime"]);
    }
}
