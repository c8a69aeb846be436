//! The `crm` client commands (SPEC X6): sign in once (`crm login`), then call the CRM through
//! its gateway — records, reports, the live inbox — with tables for people and JSON for
//! programs.
//!
//! Every command is one or more gRPC calls made from JSON with the suite's descriptors (the
//! same proto3 JSON mapping the REST edge speaks), so a command is a method name and the JSON
//! of its request, and `crm call` reaches any method the same way. The session (the server,
//! the token pair and when the access token expires) is kept in the user's config directory,
//! readable by the user alone, and refreshed before the access token runs out.

mod commands;

use std::io::Write;
use std::path::{Path, PathBuf};

use anyhow::{Context, bail};
use bytes::Buf;
use prost::Message;
use prost_reflect::{DescriptorPool, DynamicMessage, MessageDescriptor, MethodDescriptor};
use serde_json::{Value, json};
use tonic::Code;
use tonic::codec::{Codec, DecodeBuf, Decoder, EncodeBuf, Encoder};
use tonic::transport::Channel;

pub(crate) use commands::{
    CallArgs, CompletionArgs, ContactsArgs, DealsArgs, LoginArgs, NotificationsArgs, ReportArgs, SessionArgs,
    TasksArgs, call, completion, contacts, deals, login, logout, notifications, report, tasks, whoami,
};

/// Where a client command goes and how it answers.
#[derive(clap::Args, Debug, Clone)]
#[command(next_help_heading = "Client")]
pub(crate) struct ClientArgs {
    /// The gateway, host:port or https://host:port (default: where `crm login` signed in, else
    /// 127.0.0.1:8080).
    #[arg(long, value_name = "HOST:PORT", env = "CRM_SERVER", global = true)]
    pub server: Option<String>,
    /// How answers are printed: a table for people, or JSON (proto3 JSON, as the REST API).
    #[arg(long, short = 'o', value_enum, env = "CRM_OUTPUT", default_value = "table", global = true)]
    pub output: Output,
    /// For an https:// server: PEM CA certificates to trust instead of the public ones.
    #[arg(long, value_name = "FILE", env = "CRM_CA_FILE", global = true)]
    pub ca_file: Option<PathBuf>,
}

/// How answers are printed.
#[derive(clap::ValueEnum, Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Output {
    Table,
    Json,
}

/// The session file's directory: `$CRM_CONFIG_DIR`, else `$XDG_CONFIG_HOME/crm`, else
/// `~/.config/crm`.
fn config_dir() -> anyhow::Result<PathBuf> {
    if let Some(dir) = std::env::var_os("CRM_CONFIG_DIR").filter(|d| !d.is_empty()) {
        return Ok(PathBuf::from(dir));
    }
    if let Some(dir) = std::env::var_os("XDG_CONFIG_HOME").filter(|d| !d.is_empty()) {
        return Ok(PathBuf::from(dir).join("crm"));
    }
    let home = std::env::var_os("HOME").filter(|d| !d.is_empty()).context("neither CRM_CONFIG_DIR nor HOME is set")?;
    Ok(PathBuf::from(home).join(".config").join("crm"))
}

/// A signed-in session, as kept in `session.json`.
#[derive(serde::Serialize, serde::Deserialize, Debug, Clone, PartialEq, Eq)]
pub(crate) struct Session {
    pub server: String,
    pub email: String,
    pub access_token: String,
    pub refresh_token: String,
    /// Unix seconds.
    pub access_expires_at: i64,
}

impl Session {
    fn path() -> anyhow::Result<PathBuf> {
        Ok(config_dir()?.join("session.json"))
    }

    /// The saved session, if any.
    pub(crate) fn load() -> anyhow::Result<Option<Session>> {
        Session::load_from(&Session::path()?)
    }

    fn load_from(path: &Path) -> anyhow::Result<Option<Session>> {
        match std::fs::read(path) {
            Ok(bytes) => Ok(Some(
                serde_json::from_slice(&bytes).with_context(|| format!("{} is not a session", path.display()))?,
            )),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(e).with_context(|| format!("read {}", path.display())),
        }
    }

    /// Saves it where only the user can read it (the directory 0700, the file 0600), replacing
    /// the old one at once.
    pub(crate) fn save(&self) -> anyhow::Result<()> {
        self.save_to(&Session::path()?)
    }

    fn save_to(&self, path: &Path) -> anyhow::Result<()> {
        let dir = path.parent().context("the session file has a directory")?;
        create_private_dir(dir)?;
        let temporary = dir.join(".session.json.tmp");
        let mut file = private_file(&temporary)?;
        file.write_all(&serde_json::to_vec_pretty(self)?)?;
        file.sync_all()?;
        std::fs::rename(&temporary, path).with_context(|| format!("write {}", path.display()))?;
        Ok(())
    }

    /// Forgets the session.
    pub(crate) fn remove() -> anyhow::Result<bool> {
        Session::remove_at(&Session::path()?)
    }

    fn remove_at(path: &Path) -> anyhow::Result<bool> {
        match std::fs::remove_file(path) {
            Ok(()) => Ok(true),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(false),
            Err(e) => Err(e).with_context(|| format!("remove {}", path.display())),
        }
    }

    /// A session from a `TokenPair` answer.
    fn from_pair(server: &str, email: &str, pair: &Value) -> anyhow::Result<Session> {
        let text = |name: &str| pair[name].as_str().map(str::to_string).context("the answer has no token pair");
        let expires = text("accessTokenExpireTime")?;
        let expires = chrono::DateTime::parse_from_rfc3339(&expires).context("the token's expiry")?.timestamp();
        Ok(Session {
            server: server.to_string(),
            email: email.to_string(),
            access_token: text("accessToken")?,
            refresh_token: text("refreshToken")?,
            access_expires_at: expires,
        })
    }
}

#[cfg(unix)]
fn create_private_dir(dir: &Path) -> anyhow::Result<()> {
    use std::os::unix::fs::DirBuilderExt;
    if !dir.exists() {
        std::fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(dir)
            .with_context(|| format!("create {}", dir.display()))?;
    }
    Ok(())
}

#[cfg(not(unix))]
fn create_private_dir(dir: &Path) -> anyhow::Result<()> {
    std::fs::create_dir_all(dir).with_context(|| format!("create {}", dir.display()))
}

#[cfg(unix)]
fn private_file(path: &Path) -> anyhow::Result<std::fs::File> {
    use std::os::unix::fs::OpenOptionsExt;
    std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(path)
        .with_context(|| format!("create {}", path.display()))
}

#[cfg(not(unix))]
fn private_file(path: &Path) -> anyhow::Result<std::fs::File> {
    std::fs::File::create(path).with_context(|| format!("create {}", path.display()))
}

/// Seconds before its expiry when an access token is refreshed.
const REFRESH_BEFORE: i64 = 60;

/// Calls the CRM: the descriptors, a channel to the gateway and the session.
pub(crate) struct Client {
    pool: DescriptorPool,
    channel: Channel,
    server: String,
    session: Option<Session>,
    refreshed: bool,
    pub(crate) output: Output,
}

impl Client {
    /// A client of the gateway `args` name (or the session's, or the default).
    pub(crate) fn new(args: &ClientArgs) -> anyhow::Result<Client> {
        let session = Session::load()?;
        let server = args
            .server
            .clone()
            .or_else(|| session.as_ref().map(|s| s.server.clone()))
            .unwrap_or_else(|| "127.0.0.1:8080".to_string());
        let uri = if server.contains("://") { server.clone() } else { format!("http://{server}") };
        let mut endpoint = Channel::from_shared(uri.clone())
            .with_context(|| format!("{server:?} is not a server address"))?
            .connect_timeout(std::time::Duration::from_secs(5));
        if uri.starts_with("https://") {
            let tls = tonic::transport::ClientTlsConfig::new();
            let tls = match &args.ca_file {
                Some(file) => {
                    let pem = std::fs::read(file).with_context(|| format!("--ca-file {}", file.display()))?;
                    tls.ca_certificate(tonic::transport::Certificate::from_pem(pem))
                }
                None => tls.with_webpki_roots(),
            };
            endpoint = endpoint.tls_config(tls).context("TLS settings")?;
        }
        let channel = endpoint.connect_lazy();
        let pool = DescriptorPool::decode(crm_proto::FILE_DESCRIPTOR_SET).context("the suite's descriptors")?;
        // A session signed in elsewhere is not sent to this server.
        let session = session.filter(|s| s.server == server);
        Ok(Client { pool, channel, server, session, refreshed: false, output: args.output })
    }

    pub(crate) fn server(&self) -> &str {
        &self.server
    }

    /// A method by "package.Service/Method" or "Service/Method" (e.g. "DealsService/GetDeal").
    pub(crate) fn method(&self, name: &str) -> anyhow::Result<MethodDescriptor> {
        let trimmed = name.trim_start_matches('/');
        let (service, method) = trimmed
            .rsplit_once('/')
            .or_else(|| trimmed.rsplit_once('.'))
            .context("name a method as Service/Method, e.g. DealsService/GetDeal")?;
        let service = self
            .pool
            .services()
            .find(|s| s.full_name() == service || s.name() == service)
            .with_context(|| format!("no service {service:?}"))?;
        let found = service.methods().find(|m| m.name() == method);
        found.with_context(|| format!("{} has no method {method:?}", service.full_name()))
    }

    /// The JSON of `method`'s request as its message.
    fn request(&self, method: &MethodDescriptor, request: Value) -> anyhow::Result<DynamicMessage> {
        DynamicMessage::deserialize(method.input(), request)
            .with_context(|| format!("not a request of {}", method.full_name()))
    }

    /// A token valid for a minute more, refreshed (and saved) when it is not.
    async fn token(&mut self) -> anyhow::Result<String> {
        let Some(session) = &self.session else {
            bail!("not signed in to {}: run `crm login`", self.server);
        };
        if session.access_expires_at - REFRESH_BEFORE <= chrono::Utc::now().timestamp() {
            self.refresh().await?;
        }
        Ok(self.session.as_ref().map(|s| s.access_token.clone()).unwrap_or_default())
    }

    /// Exchanges the refresh token for a new pair and saves it.
    pub(crate) async fn refresh(&mut self) -> anyhow::Result<()> {
        let Some(session) = self.session.clone() else { bail!("not signed in: run `crm login`") };
        self.refreshed = true;
        let method = self.method("crm.auth.v1.AuthService/Refresh")?;
        let request = self.request(&method, json!({"refreshToken": session.refresh_token}))?;
        let pair = match self.unary(&method, request, None).await {
            Ok(pair) => pair,
            Err(status) if status.code() == Code::Unauthenticated => {
                bail!("the session has ended ({}): run `crm login`", status.message())
            }
            Err(status) => return Err(failure(&status)),
        };
        let renewed = Session::from_pair(&session.server, &session.email, &pair)?;
        renewed.save()?;
        self.session = Some(renewed);
        Ok(())
    }

    /// Signs in and saves the session.
    pub(crate) async fn login(&mut self, email: &str, password: &str) -> anyhow::Result<Session> {
        let method = self.method("crm.auth.v1.AuthService/SignIn")?;
        let request = self.request(&method, json!({"email": email, "password": password}))?;
        let pair = self.unary(&method, request, None).await.map_err(|s| failure(&s))?;
        let session = Session::from_pair(&self.server, email, &pair)?;
        session.save()?;
        self.session = Some(session.clone());
        Ok(session)
    }

    /// Signs out (the refresh token is revoked) and forgets the session.
    pub(crate) async fn logout(&mut self) -> anyhow::Result<bool> {
        if let Some(session) = self.session.take() {
            let method = self.method("crm.auth.v1.AuthService/SignOut")?;
            let request = self.request(&method, json!({"refreshToken": session.refresh_token}))?;
            if let Err(status) = self.unary(&method, request, None).await {
                eprintln!("warning: the server did not take the sign-out: {}", status.message());
            }
        }
        Session::remove()
    }

    /// Calls `method` (see [`Client::method`]) with the JSON `request` as the signed-in user;
    /// the answer as JSON. An access token refused as expired is refreshed once.
    pub(crate) async fn call(&mut self, method: &str, request: Value) -> anyhow::Result<Value> {
        let method = self.method(method)?;
        let message = self.request(&method, request)?;
        let token = self.token().await?;
        match self.unary(&method, message.clone(), Some(&token)).await {
            Ok(answer) => Ok(answer),
            Err(status) if status.code() == Code::Unauthenticated && !self.refreshed => {
                self.refresh().await?;
                let token = self.token().await?;
                self.unary(&method, message, Some(&token)).await.map_err(|s| failure(&s))
            }
            Err(status) => Err(failure(&status)),
        }
    }

    /// Calls a server-streaming `method`; each message as JSON to `each` until the stream ends.
    pub(crate) async fn stream(
        &mut self,
        method: &str,
        request: Value,
        mut each: impl FnMut(Value) -> anyhow::Result<()>,
    ) -> anyhow::Result<()> {
        let method = self.method(method)?;
        let message = self.request(&method, request)?;
        let token = self.token().await?;
        let mut grpc = tonic::client::Grpc::new(self.channel.clone());
        grpc.ready().await.map_err(|e| anyhow::anyhow!("cannot reach {}: {e}", self.server))?;
        let path = format!("/{}/{}", method.parent_service().full_name(), method.name()).parse()?;
        let mut stream = grpc
            .server_streaming(authorized(message, Some(&token))?, path, DynamicCodec(method.output()))
            .await
            .map_err(|s| failure(&s))?
            .into_inner();
        while let Some(message) = stream.message().await.map_err(|s| failure(&s))? {
            each(serde_json::to_value(&message)?)?;
        }
        Ok(())
    }

    async fn unary(
        &self,
        method: &MethodDescriptor,
        request: DynamicMessage,
        token: Option<&str>,
    ) -> Result<Value, tonic::Status> {
        let mut grpc = tonic::client::Grpc::new(self.channel.clone());
        grpc.ready().await.map_err(|e| tonic::Status::unavailable(format!("cannot reach {}: {e}", self.server)))?;
        let path = format!("/{}/{}", method.parent_service().full_name(), method.name())
            .parse()
            .map_err(|_| tonic::Status::internal("bad method path"))?;
        let request = authorized(request, token).map_err(|e| tonic::Status::internal(e.to_string()))?;
        let answer = grpc.unary(request, path, DynamicCodec(method.output())).await?.into_inner();
        serde_json::to_value(&answer).map_err(|e| tonic::Status::internal(e.to_string()))
    }
}

fn authorized(message: DynamicMessage, token: Option<&str>) -> anyhow::Result<tonic::Request<DynamicMessage>> {
    let mut request = tonic::Request::new(message);
    request.set_timeout(std::time::Duration::from_secs(60));
    if let Some(token) = token {
        request.metadata_mut().insert("authorization", format!("Bearer {token}").parse()?);
    }
    Ok(request)
}

/// A refused call as an error people can act on: the code, the message, and each field
/// violation on its own line.
pub(crate) fn failure(status: &tonic::Status) -> anyhow::Error {
    use tonic_types::StatusExt;
    let mut text = format!("{} ({:?})", status.message(), status.code());
    if let Some(bad) = status.get_details_bad_request() {
        let one = |v: &tonic_types::FieldViolation| format!("{}: {}", v.field, v.description);
        // A single violation is usually the message itself.
        if !(bad.field_violations.len() == 1 && status.message() == one(&bad.field_violations[0])) {
            for violation in &bad.field_violations {
                text.push_str(&format!("\n  {}", one(violation)));
            }
        }
    }
    if let Some(retry) = status.get_details_retry_info()
        && let Some(delay) = retry.retry_delay
    {
        text.push_str(&format!("\n  retry in {} ms", delay.as_millis()));
    }
    anyhow::anyhow!(text)
}

/// Messages of the suite as the descriptors say, encoded and decoded without generated types.
#[derive(Clone)]
struct DynamicCodec(MessageDescriptor);

impl Codec for DynamicCodec {
    type Encode = DynamicMessage;
    type Decode = DynamicMessage;
    type Encoder = DynamicEncoder;
    type Decoder = DynamicDecoder;

    fn encoder(&mut self) -> DynamicEncoder {
        DynamicEncoder
    }

    fn decoder(&mut self) -> DynamicDecoder {
        DynamicDecoder(self.0.clone())
    }
}

struct DynamicEncoder;

impl Encoder for DynamicEncoder {
    type Item = DynamicMessage;
    type Error = tonic::Status;

    fn encode(&mut self, item: DynamicMessage, dst: &mut EncodeBuf<'_>) -> Result<(), tonic::Status> {
        dst.reserve(item.encoded_len());
        item.encode(dst).map_err(|e| tonic::Status::internal(e.to_string()))
    }
}

struct DynamicDecoder(MessageDescriptor);

impl Decoder for DynamicDecoder {
    type Item = DynamicMessage;
    type Error = tonic::Status;

    fn decode(&mut self, src: &mut DecodeBuf<'_>) -> Result<Option<DynamicMessage>, tonic::Status> {
        let bytes = src.copy_to_bytes(src.remaining());
        DynamicMessage::decode(self.0.clone(), bytes).map(Some).map_err(|e| tonic::Status::internal(e.to_string()))
    }
}

/// The value at a dotted `path` of a JSON answer ("amount.currencyCode", "emails.0.address").
fn at<'a>(value: &'a Value, path: &str) -> Option<&'a Value> {
    path.split('.').try_fold(value, |v, key| match key.parse::<usize>() {
        Ok(i) => v.get(i),
        Err(_) => v.get(key),
    })
}

/// A cell: text as is, lists joined, nothing as "-"; at most 48 characters.
fn cell(value: Option<&Value>) -> String {
    let text = match value {
        None | Some(Value::Null) => "-".to_string(),
        Some(Value::String(s)) if s.is_empty() => "-".to_string(),
        Some(Value::String(s)) => s.clone(),
        Some(Value::Array(items)) if items.is_empty() => "-".to_string(),
        Some(Value::Array(items)) => items.iter().map(|i| cell(Some(i))).collect::<Vec<_>>().join(", "),
        Some(other) => other.to_string(),
    };
    let text = text.replace(['\n', '\t'], " ");
    if text.chars().count() > 48 { format!("{}…", text.chars().take(47).collect::<String>()) } else { text }
}

/// A column of a table: its header and how a row's cell is found.
pub(crate) struct Column {
    pub header: &'static str,
    pub value: fn(&Value) -> String,
}

/// A column showing the value at a JSON path.
macro_rules! col {
    ($header:expr, $path:expr) => {
        $crate::client::Column { header: $header, value: |v| $crate::client::cell_at(v, $path) }
    };
}
pub(crate) use col;

pub(crate) fn cell_at(value: &Value, path: &str) -> String {
    cell(at(value, path))
}

/// Rows under aligned headers.
pub(crate) fn table(rows: &[Value], columns: &[Column]) -> String {
    let cells: Vec<Vec<String>> = rows.iter().map(|r| columns.iter().map(|c| (c.value)(r)).collect()).collect();
    let headers: Vec<String> = columns.iter().map(|c| c.header.to_string()).collect();
    grid(&headers, &cells)
}

/// Text in aligned columns (the last one unpadded).
pub(crate) fn grid(headers: &[String], rows: &[Vec<String>]) -> String {
    let width = |i: usize| {
        rows.iter().map(|r| r.get(i).map_or(0, |c| c.chars().count())).chain([headers[i].chars().count()]).max()
    };
    let widths: Vec<usize> = (0..headers.len()).map(|i| width(i).unwrap_or(0)).collect();
    let line = |cells: &[String]| {
        let mut out = String::new();
        for (i, c) in cells.iter().enumerate() {
            if i + 1 == cells.len() {
                out.push_str(c);
            } else {
                out.push_str(c);
                out.push_str(&" ".repeat(widths[i] - c.chars().count() + 2));
            }
        }
        out.trim_end().to_string()
    };
    let mut out = line(headers);
    out.push('\n');
    for row in rows {
        out.push_str(&line(row));
        out.push('\n');
    }
    out
}

/// One record as "field: value" lines.
pub(crate) fn record(value: &Value, columns: &[Column]) -> String {
    let width = columns.iter().map(|c| c.header.len()).max().unwrap_or(0);
    columns.iter().map(|c| format!("{:width$}  {}\n", c.header, (c.value)(value))).collect()
}

/// An amount of money from its JSON (`{"currencyCode": "EUR", "minorUnits": "1999"}`) as
/// "19.99 EUR".
pub(crate) fn money(value: &Value) -> String {
    let Some(currency) = value.get("currencyCode").and_then(Value::as_str) else { return "-".into() };
    let minor: i64 = value.get("minorUnits").and_then(Value::as_str).and_then(|m| m.parse().ok()).unwrap_or(0);
    let digits = crm_deals::reports::minor_digits(currency);
    if digits == 0 {
        return format!("{minor} {currency}");
    }
    let scale = 10_i64.pow(digits);
    let sign = if minor < 0 { "-" } else { "" };
    let (whole, part) = (minor.unsigned_abs() / scale as u64, minor.unsigned_abs() % scale as u64);
    format!("{sign}{whole}.{part:0width$} {currency}", width = digits as usize)
}

/// "19.99" in `currency` as its minor units (1999); at most the currency's digits.
pub(crate) fn parse_money(text: &str, currency: &str) -> anyhow::Result<i64> {
    let digits = crm_deals::reports::minor_digits(currency) as usize;
    let bad = || anyhow::anyhow!("{text:?} is not an amount of {currency} (e.g. 1500 or 19.99)");
    let (sign, text) = match text.trim().strip_prefix('-') {
        Some(rest) => (-1, rest),
        None => (1, text.trim()),
    };
    let (whole, part) = text.split_once('.').unwrap_or((text, ""));
    if whole.is_empty() || part.len() > digits || !whole.bytes().chain(part.bytes()).all(|b| b.is_ascii_digit()) {
        return Err(bad());
    }
    let whole: i64 = whole.parse().map_err(|_| bad())?;
    let part: i64 = if part.is_empty() { 0 } else { format!("{part:0<digits$}").parse().map_err(|_| bad())? };
    let minor = whole.checked_mul(10_i64.pow(digits as u32)).and_then(|w| w.checked_add(part)).ok_or_else(bad)?;
    Ok(sign * minor)
}

/// Prints an answer: `table` renders it for people; with `--output json`, the JSON itself.
pub(crate) fn print(output: Output, value: &Value, table: impl FnOnce(&Value) -> String) -> anyhow::Result<()> {
    let text = match output {
        Output::Json => format!("{}\n", serde_json::to_string_pretty(value)?),
        Output::Table => table(value),
    };
    let mut stdout = std::io::stdout().lock();
    // A closed pipe (`| head`) is not an error.
    match stdout.write_all(text.as_bytes()).and_then(|()| stdout.flush()) {
        Err(e) if e.kind() == std::io::ErrorKind::BrokenPipe => Ok(()),
        other => Ok(other?),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn money_is_read_and_written_in_the_currency_s_digits() {
        assert_eq!(parse_money("19.99", "EUR").unwrap(), 1999);
        assert_eq!(parse_money("19.9", "EUR").unwrap(), 1990);
        assert_eq!(parse_money("1500", "JPY").unwrap(), 1500);
        assert_eq!(parse_money("-0.5", "KWD").unwrap(), -500);
        for bad in ["", "1.234", "1,5", "abc", "1e3", ".5", "99999999999999999999"] {
            assert!(parse_money(bad, "EUR").is_err(), "{bad:?}");
        }
        assert!(parse_money("1.5", "JPY").is_err());
        assert_eq!(money(&json!({"currencyCode": "EUR", "minorUnits": "1999"})), "19.99 EUR");
        assert_eq!(money(&json!({"currencyCode": "EUR", "minorUnits": "-5"})), "-0.05 EUR");
        assert_eq!(money(&json!({"currencyCode": "JPY", "minorUnits": "1500"})), "1500 JPY");
        assert_eq!(money(&json!({})), "-");
    }

    #[test]
    fn tables_align_and_cells_are_short() {
        let rows = vec![
            json!({"id": "a", "name": "Anna", "tags": ["x", "y"]}),
            json!({"id": "bb", "name": "Bo\nb", "tags": []}),
        ];
        let columns = [col!("ID", "id"), col!("NAME", "name"), col!("TAGS", "tags")];
        assert_eq!(table(&rows, &columns), "ID  NAME  TAGS\na   Anna  x, y\nbb  Bo b  -\n");
        assert_eq!(cell(Some(&json!("x".repeat(60)))).chars().count(), 48);
        assert_eq!(cell_at(&json!({"emails": [{"address": "a@b"}]}), "emails.0.address"), "a@b");
        assert_eq!(record(&rows[0], &columns[..2]), "ID    a\nNAME  Anna\n");
    }

    #[test]
    fn sessions_are_private() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("crm").join("session.json");
        assert_eq!(Session::load_from(&path).unwrap(), None);
        let session = Session {
            server: "127.0.0.1:8080".into(),
            email: "a@example.com".into(),
            access_token: "a".into(),
            refresh_token: "r".into(),
            access_expires_at: 1,
        };
        session.save_to(&path).unwrap();
        assert_eq!(Session::load_from(&path).unwrap(), Some(session));
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            let mode = |p: &Path| std::fs::metadata(p).unwrap().permissions().mode() & 0o777;
            assert_eq!(mode(&dir.path().join("crm")), 0o700);
            assert_eq!(mode(&dir.path().join("crm").join("session.json")), 0o600);
        }
        assert!(Session::remove_at(&path).unwrap());
        assert!(!Session::remove_at(&path).unwrap());
    }
}
