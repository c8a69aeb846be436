//! Request messages checked on the wire, before any service decodes them: every text field of
//! every request (nested messages, repeated fields and map entries included) must be UTF-8
//! without control characters other than tab, line feed and carriage return, and the message
//! must be well-formed protobuf. The walk follows the message's shape from the suite's
//! descriptor set, reads each byte once and allocates nothing unless it finds a fault, so one
//! check at the edge of every service covers every field of every call, present and future.

use std::collections::HashMap;
use std::sync::OnceLock;

use prost::Message;
use prost_types::field_descriptor_proto::{Label, Type};

use crate::validate::Violations;

/// Nesting deeper than this is refused (prost's own decoding limit).
const MAX_DEPTH: usize = 100;

/// What a request message was found to be.
#[derive(Debug, PartialEq, Eq)]
pub enum Fault {
    /// Text fields with characters that are not text; each field once.
    Text(Violations),
    /// Not a valid protobuf encoding of the method's request message.
    Malformed(String),
}

/// The shape of every request message of the suite's methods.
#[derive(Debug, Default)]
pub struct Schema {
    /// `/package.Service/Method` → the index of its request message.
    methods: HashMap<String, usize>,
    messages: Vec<Shape>,
}

#[derive(Debug)]
struct Shape {
    name: String,
    fields: HashMap<u32, Field>,
}

#[derive(Debug)]
struct Field {
    name: String,
    repeated: bool,
    kind: Kind,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Kind {
    Text,
    Message(usize),
    /// Numbers, bytes, enums: nothing to check beyond the framing.
    Other,
}

impl Schema {
    /// The suite's schema (from `crm_proto::FILE_DESCRIPTOR_SET`), built once.
    pub fn suite() -> &'static Schema {
        static SCHEMA: OnceLock<Schema> = OnceLock::new();
        SCHEMA.get_or_init(|| {
            let set = prost_types::FileDescriptorSet::decode(crm_proto::FILE_DESCRIPTOR_SET)
                .expect("the suite's descriptor set decodes");
            Schema::from_descriptors(&set)
        })
    }

    pub fn from_descriptors(set: &prost_types::FileDescriptorSet) -> Schema {
        // Every message by full name first, so that fields can point at any of them.
        let mut index: HashMap<String, usize> = HashMap::new();
        let mut descriptors = Vec::new();
        for file in &set.file {
            let package = file.package();
            for message in &file.message_type {
                collect(package, message, &mut index, &mut descriptors);
            }
        }
        let messages = descriptors
            .iter()
            .map(|(name, message): &(String, &prost_types::DescriptorProto)| Shape {
                name: name.clone(),
                fields: message
                    .field
                    .iter()
                    .map(|f| {
                        let kind = match f.r#type() {
                            Type::String => Kind::Text,
                            Type::Message => index
                                .get(f.type_name().trim_start_matches('.'))
                                .map_or(Kind::Other, |&i| Kind::Message(i)),
                            _ => Kind::Other,
                        };
                        let field = Field { name: f.name().to_string(), repeated: f.label() == Label::Repeated, kind };
                        (f.number() as u32, field)
                    })
                    .collect(),
            })
            .collect();
        let mut methods = HashMap::new();
        for file in &set.file {
            for service in &file.service {
                for method in &service.method {
                    if let Some(&i) = index.get(method.input_type().trim_start_matches('.')) {
                        methods.insert(format!("/{}.{}/{}", file.package(), service.name(), method.name()), i);
                    }
                }
            }
        }
        Schema { methods, messages }
    }

    /// The request message of the method at `path`, when the suite defines it.
    pub fn request(&self, path: &str) -> Option<Request<'_>> {
        self.methods.get(path).map(|&message| Request { schema: self, message })
    }
}

fn collect<'a>(
    scope: &str,
    message: &'a prost_types::DescriptorProto,
    index: &mut HashMap<String, usize>,
    out: &mut Vec<(String, &'a prost_types::DescriptorProto)>,
) {
    let name = if scope.is_empty() { message.name().to_string() } else { format!("{scope}.{}", message.name()) };
    index.insert(name.clone(), out.len());
    out.push((name.clone(), message));
    for nested in &message.nested_type {
        collect(&name, nested, index, out);
    }
}

/// The request message of one method.
#[derive(Debug, Clone, Copy)]
pub struct Request<'a> {
    schema: &'a Schema,
    message: usize,
}

impl Request<'_> {
    /// The message's full name.
    pub fn name(&self) -> &str {
        &self.schema.messages[self.message].name
    }

    /// Checks one encoded request message.
    pub fn check(&self, bytes: &[u8]) -> Result<(), Fault> {
        let mut walk = Walk { schema: self.schema, path: Vec::new(), violations: Violations::new() };
        walk.message(self.message, bytes, 0).map_err(|why| Fault::Malformed(format!("{}: {why}", self.name())))?;
        if walk.violations.is_empty() { Ok(()) } else { Err(Fault::Text(walk.violations)) }
    }
}

struct Walk<'a> {
    schema: &'a Schema,
    /// The fields entered: name and, for a repeated one, the element's index.
    path: Vec<(&'a str, Option<usize>)>,
    violations: Violations,
}

impl<'a> Walk<'a> {
    fn message(&mut self, message: usize, mut bytes: &[u8], depth: usize) -> Result<(), &'static str> {
        if depth > MAX_DEPTH {
            return Err("nested too deeply");
        }
        let shape = &self.schema.messages[message];
        // Elements seen so far of each repeated field (small: a message has few of them).
        let mut counts: Vec<(u32, usize)> = Vec::new();
        while !bytes.is_empty() {
            let key = varint(&mut bytes)?;
            let (number, wire) = ((key >> 3) as u32, key & 7);
            if number == 0 {
                return Err("field number 0");
            }
            match wire {
                0 => {
                    varint(&mut bytes)?;
                }
                1 => skip(&mut bytes, 8)?,
                5 => skip(&mut bytes, 4)?,
                2 => {
                    let len = usize::try_from(varint(&mut bytes)?).map_err(|_| "length out of range")?;
                    if len > bytes.len() {
                        return Err("a field runs past the end of the message");
                    }
                    let (value, rest) = bytes.split_at(len);
                    bytes = rest;
                    let Some(field) = shape.fields.get(&number) else { continue };
                    let element = field.repeated.then(|| match counts.iter_mut().find(|(n, _)| *n == number) {
                        Some((_, count)) => {
                            *count += 1;
                            *count - 1
                        }
                        None => {
                            counts.push((number, 1));
                            0
                        }
                    });
                    match field.kind {
                        Kind::Text => {
                            let text = std::str::from_utf8(value).map_err(|_| "a text field is not UTF-8")?;
                            if let Some(c) = text.chars().find(|c| c.is_control() && !matches!(c, '\t' | '\n' | '\r')) {
                                self.path.push((&field.name, element));
                                let why = format!("must not contain control characters (found U+{:04X})", c as u32);
                                self.violations.add(self.field_path(), why);
                                self.path.pop();
                            }
                        }
                        Kind::Message(inner) => {
                            self.path.push((&field.name, element));
                            let result = self.message(inner, value, depth + 1);
                            self.path.pop();
                            result?;
                        }
                        Kind::Other => {}
                    }
                }
                _ => return Err("an unknown wire type"),
            }
        }
        Ok(())
    }

    fn field_path(&self) -> String {
        let mut out = String::new();
        for (i, (name, element)) in self.path.iter().enumerate() {
            if i > 0 {
                out.push('.');
            }
            out.push_str(name);
            if let Some(element) = element {
                out.push_str(&format!("[{element}]"));
            }
        }
        out
    }
}

fn varint(bytes: &mut &[u8]) -> Result<u64, &'static str> {
    let mut value = 0u64;
    for i in 0..10 {
        let (&b, rest) = bytes.split_first().ok_or("the message ends inside a number")?;
        *bytes = rest;
        value |= u64::from(b & 0x7f) << (7 * i);
        if b < 0x80 {
            return Ok(value);
        }
    }
    Err("a number longer than 10 bytes")
}

fn skip(bytes: &mut &[u8], n: usize) -> Result<(), &'static str> {
    if bytes.len() < n {
        return Err("the message ends inside a number");
    }
    *bytes = &bytes[n..];
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crm_proto::contacts::v1::{CreatePersonRequest, CustomValue, Email, ListPeopleRequest, Person, custom_value};

    fn fields(fault: Fault) -> Vec<String> {
        match fault {
            Fault::Text(v) => v.iter().map(|(f, _)| f.clone()).collect(),
            Fault::Malformed(why) => panic!("malformed: {why}"),
        }
    }

    #[test]
    fn finds_control_characters_in_any_text_field() {
        let create = Schema::suite().request("/crm.contacts.v1.ContactsService/CreatePerson").expect("known method");
        assert_eq!(create.name(), "crm.contacts.v1.CreatePersonRequest");
        let mut person = Person {
            full_name: "Anna\0".into(),
            tags: vec!["ok".into(), "b\u{7}ad".into()],
            notes: "line one\nline two\ttabbed\r\n".into(),
            emails: vec![
                Email { address: "a@b.c".into(), ..Default::default() },
                Email { address: "x\u{1b}@b.c".into(), ..Default::default() },
            ],
            ..Default::default()
        };
        let value = CustomValue { kind: Some(custom_value::Kind::StringValue("v\u{85}".into())) };
        person.custom_fields.insert("k".into(), value);
        let request = CreatePersonRequest { person: Some(person), request_id: "r\0".into() };
        let found = fields(create.check(&request.encode_to_vec()).unwrap_err());
        assert_eq!(
            found,
            [
                "person.full_name",
                "person.emails[1].address",
                "person.tags[1]",
                "person.custom_fields[0].value.string_value",
                "request_id"
            ]
        );
        let clean = CreatePersonRequest {
            person: Some(Person { full_name: "Анна 李 Müller\n".into(), ..Default::default() }),
            request_id: String::new(),
        };
        assert_eq!(create.check(&clean.encode_to_vec()), Ok(()));
    }

    #[test]
    fn refuses_what_is_not_protobuf() {
        let list = Schema::suite().request("/crm.contacts.v1.ContactsService/ListPeople").expect("known method");
        let good = ListPeopleRequest { query: "anna".into(), page_size: 10, ..Default::default() }.encode_to_vec();
        assert_eq!(list.check(&good), Ok(()));
        for bad in [&good[..good.len() - 1], &[0xff; 11][..], &[0x0b][..], &[0x00, 0x01][..]] {
            assert!(matches!(list.check(bad), Err(Fault::Malformed(_))), "{bad:?}");
        }
        // A text field that is not UTF-8.
        let mut invalid = good.clone();
        let at = invalid.iter().position(|&b| b == b'a').unwrap();
        invalid[at] = 0xff;
        assert!(matches!(list.check(&invalid), Err(Fault::Malformed(_))));
        // Unknown fields are skipped, as protobuf requires.
        let mut unknown = good;
        unknown.extend([0xf8, 0x07, 0x01]);
        assert_eq!(list.check(&unknown), Ok(()));
        assert!(Schema::suite().request("/crm.contacts.v1.ContactsService/Nope").is_none());
    }
}
