//! E-mail to users over SMTP (lettre), as a leased external job per delivery: the address and
//! name come from the auth service at send time, the template is the one in use then, and the
//! attempt is logged with the server's reply code. A delivery is tried on the retry schedule,
//! then parked as dead; a refused recipient or a user without an address is dead at once.
//!
//! At most one e-mail per delivery: an attempt is retried only when the message surely did not
//! reach the server (a 4xx reply, no connection). When the outcome is unknown — the connection
//! broke or timed out mid-way, or the sender died — the server may have the message, so the
//! delivery is parked as dead with the reason, for an administrator to retry. Every message of
//! a delivery carries the same `Message-ID` (`<delivery-id@crm>`), so a receiver can recognise
//! such a retry.

use std::str::FromStr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use crm_kit::auth::RemoteDirectory;
use crm_kit::db::Db;
use crm_kit::events::HandlerError;
use crm_kit::jobs::{ExternalJobHandler, Job, Next};
use crm_kit::time::now_micros;
use crm_proto::notifications::v1::Channel;
use futures_util::future::BoxFuture;
use lettre::message::header::ContentType;
use lettre::message::{Mailbox, Message};
use lettre::transport::smtp::authentication::Credentials;
use lettre::transport::smtp::client::{Tls, TlsParameters};
use lettre::{AsyncSmtpTransport, AsyncTransport, Tokio1Executor};
use serde_json::Value;

use crate::store::{Attempt, AttemptResult, Start, Store};
use crate::templates;

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

/// The job that sends e-mail deliveries.
pub struct EmailJob {
    store: Store,
    directory: Arc<RemoteDirectory>,
    mailer: Mailer,
    /// Pauses after each failed attempt; one attempt more than pauses.
    schedule: Vec<Duration>,
    default_locale: String,
}

impl EmailJob {
    pub fn new(
        store: Store,
        directory: Arc<RemoteDirectory>,
        mailer: Mailer,
        schedule: Vec<Duration>,
        default_locale: String,
    ) -> EmailJob {
        EmailJob { store, directory, mailer, schedule, default_locale }
    }

    /// One attempt: who, what, and the send itself.
    async fn attempt(&self, attempt: &Attempt, lease_until: i64) -> AttemptResult {
        let started = Instant::now();
        let mut result = self.send(attempt, lease_until).await.unwrap_or_else(|failure| failure);
        result.latency_micros = started.elapsed().as_micros() as i64;
        result
    }

    async fn send(&self, attempt: &Attempt, lease_until: i64) -> Result<AttemptResult, AttemptResult> {
        let failed = |permanent: bool, error: String| AttemptResult { permanent, error, ..AttemptResult::default() };
        let user = match self.directory.user(&attempt.recipient_id).await {
            Ok(Some(user)) => user,
            Ok(None) => return Err(failed(true, "the recipient is no longer a user".into())),
            Err(err) => return Err(failed(false, format!("looking the recipient up: {err}"))),
        };
        if !user.active {
            return Err(failed(true, "the recipient is deactivated".into()));
        }
        let address = lettre::Address::from_str(user.email.trim())
            .map_err(|e| failed(true, format!("the recipient has no usable e-mail address ({e})")))?;
        let prefs = self.store.prefs(&attempt.recipient_id).await.map_err(|e| failed(false, e.to_string()))?;
        let mut context: Value =
            serde_json::from_str(&attempt.variables).map_err(|e| failed(true, format!("stored variables: {e}")))?;
        context["recipient"] = crate::render::recipient(Channel::Email, &user.id, &user.display_name, &user.email);
        let mut conn = self.store.db().pool().acquire().await.map_err(|e| failed(false, e.to_string()))?;
        let chosen = templates::choose(
            &self.store,
            &mut conn,
            &attempt.event_type,
            Channel::Email,
            &prefs.locale,
            &self.default_locale,
        )
        .await
        .map_err(|e| failed(false, e.to_string()))?
        .ok_or_else(|| failed(true, format!("no e-mail template for {}", attempt.event_type)))?;
        drop(conn);
        let out = templates::render_chosen(&chosen, &attempt.event_type, Channel::Email, &context)
            .map_err(|e| failed(true, format!("template: {e}")))?;
        let to = Mailbox::new((!user.display_name.is_empty()).then(|| user.display_name.clone()), address.clone());
        let message = Message::builder()
            .from(self.mailer.from.clone())
            .to(to)
            .subject(out.subject.clone())
            .message_id(Some(format!("<{}@crm>", attempt.delivery_id)))
            .header(ContentType::TEXT_PLAIN)
            .body(out.body)
            .map_err(|e| failed(true, format!("building the message: {e}")))?;
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
                if result.unknown {
                    result.error = format!("outcome unknown, the server may have it; not sent again by itself: {err}");
                }
                Err(result)
            }
            Err(_) => {
                result.error =
                    "outcome unknown: the SMTP server did not finish in time; not sent again by itself".into();
                result.unknown = true;
                Err(result)
            }
        }
    }

    /// When to try again after failed attempt `round` of this round; `None`: never.
    fn retry_at(&self, round: i64) -> Option<i64> {
        let pause = *self.schedule.get(usize::try_from(round - 1).ok()?)?;
        let jitter = rand_jitter(pause);
        Some(now_micros() + (pause + jitter).as_micros() as i64)
    }
}

/// Up to a tenth of `pause`, so that deliveries failed together do not retry together.
fn rand_jitter(pause: Duration) -> Duration {
    let max = (pause.as_millis() / 10) as u64;
    let nanos = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap_or_default().subsec_nanos();
    Duration::from_millis(if max == 0 { 0 } else { u64::from(nanos) % (max + 1) })
}

/// Whether the message never reached the server: no connection was made (refused, unreachable,
/// no TLS agreed), so it is safe to send again.
fn not_connected(err: &lettre::transport::smtp::Error) -> bool {
    err.is_tls() || err.is_transport_shutdown() || err.to_string().starts_with("Connection error")
}

fn code(text: &str) -> i32 {
    text.trim().parse().unwrap_or_default()
}

impl ExternalJobHandler for EmailJob {
    fn run<'a>(&'a self, _db: &'a Db, job: &'a Job) -> BoxFuture<'a, Result<Next, HandlerError>> {
        Box::pin(async move {
            let id = String::from_utf8_lossy(&job.payload).to_string();
            let attempt = match self.store.start_attempt(&id).await? {
                Start::Go(attempt) => attempt,
                Start::Finished => return Ok(Next::Done),
                Start::Interrupted { number } => {
                    tracing::error!(delivery = %id, attempt = number,
                        "an e-mail attempt stopped before its outcome was known; parked as dead, not resent");
                    return Ok(Next::Done);
                }
            };
            let result = self.attempt(&attempt, job.lease_until()).await;
            let retry_at =
                if result.sent || result.permanent || result.unknown { None } else { self.retry_at(attempt.round) };
            if result.sent {
                tracing::info!(delivery = %id, attempt = attempt.number, "e-mail sent");
            } else {
                tracing::warn!(delivery = %id, attempt = attempt.number, error = %result.error,
                    retry = retry_at.is_some(), "e-mail not sent");
            }
            // The outcome must be recorded: a delivery left "sending" is parked as interrupted.
            let mut tries = 0;
            loop {
                match self.store.finish_attempt(&attempt, &result, retry_at).await {
                    Ok(()) => break,
                    Err(err) if tries < 5 => {
                        tries += 1;
                        tracing::warn!(delivery = %id, error = %err, "recording an e-mail attempt failed; retrying");
                        tokio::time::sleep(Duration::from_millis(200 * tries)).await;
                    }
                    Err(err) => return Err(err.into()),
                }
            }
            Ok(retry_at.map_or(Next::Done, Next::RetryAt))
        })
    }
}
