//! E-mail to users over SMTP (lettre): the address and name come from the auth service at send
//! time, the template is the one in use then, and the attempt is logged with the server's reply
//! code (the job around it: [`crate::deliver`]). A 4xx reply or no connection is worth another
//! attempt; a 5xx reply or a user without an address is not; a connection that broke mid-way
//! leaves the outcome unknown. Every message of a delivery carries the same `Message-ID`
//! (`<delivery-id@crm>`), so a receiver can recognise an administrator's retry.

use std::str::FromStr;
use std::sync::Arc;
use std::time::Duration;

use crm_kit::auth::RemoteDirectory;
use crm_kit::time::now_micros;
use crm_proto::notifications::v1::Channel;
use lettre::message::header::ContentType;
use lettre::message::{Mailbox, Message};
use lettre::transport::smtp::authentication::Credentials;
use lettre::transport::smtp::client::{Tls, TlsParameters};
use lettre::{AsyncSmtpTransport, AsyncTransport, Tokio1Executor};

use crate::render::Rendered;
use crate::store::{Attempt, AttemptResult, CUSTOMER_MESSAGE, Store};

/// How the connection to the SMTP server is protected.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum SmtpTls {
    /// Plain connection upgraded with STARTTLS, which the server must offer (port 587).
    Starttls,
    /// TLS from the first byte (port 465).
    Tls,
    /// No encryption: only for a relay on the same host or a test server.
    None,
}

/// Where and how e-mail is sent.
#[derive(Clone)]
pub struct SmtpSettings {
    pub host: String,
    pub port: u16,
    pub tls: SmtpTls,
    pub username: Option<String>,
    pub password: Option<String>,
    pub from: Mailbox,
    pub timeout: Duration,
}

impl std::fmt::Debug for SmtpSettings {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SmtpSettings")
            .field("host", &self.host)
            .field("port", &self.port)
            .field("tls", &self.tls)
            .field("username", &self.username)
            .field("from", &self.from.to_string())
            .finish_non_exhaustive()
    }
}

/// A connection pool to the SMTP server.
#[derive(Clone)]
pub struct Mailer {
    transport: AsyncSmtpTransport<Tokio1Executor>,
    from: Mailbox,
}

impl Mailer {
    pub fn new(settings: &SmtpSettings) -> Result<Mailer, String> {
        let tls = |host: &str| TlsParameters::new(host.to_string()).map_err(|e| format!("SMTP TLS settings: {e}"));
        let tls = match settings.tls {
            SmtpTls::Starttls => Tls::Required(tls(&settings.host)?),
            SmtpTls::Tls => Tls::Wrapper(tls(&settings.host)?),
            SmtpTls::None => Tls::None,
        };
        let mut builder = AsyncSmtpTransport::<Tokio1Executor>::builder_dangerous(settings.host.as_str())
            .port(settings.port)
            .tls(tls)
            .timeout(Some(settings.timeout));
        if let (Some(user), Some(password)) = (&settings.username, &settings.password) {
            builder = builder.credentials(Credentials::new(user.clone(), password.clone()));
        }
        Ok(Mailer { transport: builder.build(), from: settings.from.clone() })
    }
}

/// Sends e-mail deliveries.
pub struct EmailSender {
    store: Store,
    directory: Arc<RemoteDirectory>,
    mailer: Mailer,
    default_locale: String,
}

impl EmailSender {
    pub fn new(store: Store, directory: Arc<RemoteDirectory>, mailer: Mailer, default_locale: String) -> EmailSender {
        EmailSender { store, directory, mailer, default_locale }
    }

    /// One attempt: who, what, and the send itself, before `lease_until`.
    pub async fn attempt(&self, attempt: &Attempt, lease_until: i64) -> AttemptResult {
        self.send(attempt, lease_until).await.unwrap_or_else(|failure| failure)
    }

    async fn send(&self, attempt: &Attempt, lease_until: i64) -> Result<AttemptResult, AttemptResult> {
        let (email, name, out) = if attempt.event_type == CUSTOMER_MESSAGE {
            let draft = crate::deliver::customer_draft(attempt)?;
            (draft.to, draft.to_name, Rendered { subject: draft.subject, body: draft.body })
        } else {
            let user = crate::deliver::recipient_user(&self.directory, &attempt.recipient_id).await?;
            let recipient = crate::render::recipient(Channel::Email, &user.id, &user.display_name, &user.email);
            let out = crate::deliver::render_for(&self.store, attempt, Channel::Email, recipient, &self.default_locale)
                .await
                .map_err(|(permanent, error)| AttemptResult::failed(permanent, error))?;
            (user.email, user.display_name, out)
        };
        let address = lettre::Address::from_str(email.trim())
            .map_err(|e| AttemptResult::failed(true, format!("the recipient has no usable e-mail address ({e})")))?;
        let to = Mailbox::new((!name.is_empty()).then_some(name), address.clone());
        let message = Message::builder()
            .from(self.mailer.from.clone())
            .to(to)
            .subject(out.subject.clone())
            .message_id(Some(format!("<{}@crm>", attempt.delivery_id)))
            .header(ContentType::TEXT_PLAIN)
            .body(out.body)
            .map_err(|e| AttemptResult::failed(true, format!("building the message: {e}")))?;
        let mut result =
            AttemptResult { address: address.to_string(), subject: out.subject, ..AttemptResult::default() };
        // The send must be over while the job is still this runner's (the transport's own
        // timeout bounds each step of it).
        let left = Duration::from_micros((lease_until - now_micros() - 2_000_000).max(1_000_000) as u64);
        match tokio::time::timeout(left, self.mailer.transport.send(message)).await {
            Ok(Ok(response)) => {
                result.sent = true;
                result.response_code = code(&response.code().to_string());
                Ok(result)
            }
            Ok(Err(err)) => {
                result.response_code = err.status().map(|c| code(&c.to_string())).unwrap_or_default();
                result.error = err.to_string();
                result.permanent = err.is_permanent() || err.is_client();
                result.unknown = !(err.is_transient() || err.is_permanent() || err.is_client() || not_connected(&err));
                Err(result)
            }
            Err(_) => {
                result.error = "the SMTP server did not finish in time".into();
                result.unknown = true;
                Err(result)
            }
        }
    }
}

/// Whether the message never reached the server: no connection was made (refused, unreachable,
/// no TLS agreed), so it is safe to send again.
fn not_connected(err: &lettre::transport::smtp::Error) -> bool {
    err.is_tls() || err.is_transport_shutdown() || err.to_string().starts_with("Connection error")
}

fn code(text: &str) -> i32 {
    text.trim().parse().unwrap_or_default()
}
