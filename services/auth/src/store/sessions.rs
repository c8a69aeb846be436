//! Passwords, sign-in sessions and refresh tokens: a sign-in starts a family of refresh
//! tokens, each good for one exchange; a token presented twice revokes its family.

use crm_kit::ApiError;
use crm_kit::db::{Conn, Sql};
use crm_kit::time::now_micros;
use crm_proto::auth::v1::{PasswordChanged, UserLockedOut};
use sqlx::Row;

use super::events::insert_event;
use super::identities::{Subject, load_subject};
use super::{Event, Store};
use crate::domain::{BAD_CREDENTIALS, BAD_REFRESH_TOKEN, events};

/// What a sign-in checks. Its Debug output leaves the password hash out.
#[derive(Clone)]
pub struct Credentials {
    pub user_id: String,
    pub password_hash: String,
    pub active: bool,
    pub locked_until: i64,
}

impl std::fmt::Debug for Credentials {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Credentials")
            .field("user_id", &self.user_id)
            .field("active", &self.active)
            .field("locked_until", &self.locked_until)
            .finish_non_exhaustive()
    }
}

/// A refresh token about to be stored (only its hash), and the same token sealed for the one
/// it replaces (see `secrets::seal_successor`).
#[derive(Clone)]
pub struct NewRefreshToken {
    pub hash: Vec<u8>,
    pub expires_at: i64,
    pub sealed: Vec<u8>,
}

/// What a refresh came to.
#[derive(Debug)]
pub enum Exchange {
    /// The token was exchanged for the new one.
    New(Subject),
    /// The token had just been exchanged: its successor, still unused, sealed as stored, and
    /// when it expires.
    Again { subject: Subject, sealed: Vec<u8>, expires_at: i64 },
}

/// The sealed successor of the used token `presented` and its expiry, when the token was
/// exchanged within `grace` and the successor is unused, unexpired and not revoked.
async fn successor_within(
    conn: &mut Conn,
    presented: &[u8],
    grace: std::time::Duration,
    now: i64,
) -> Result<Option<(Vec<u8>, i64)>, ApiError> {
    if grace.is_zero() {
        return Ok(None);
    }
    let since = now.saturating_sub(i64::try_from(grace.as_micros()).unwrap_or(i64::MAX));
    let mut sql = Sql::new(
        "SELECT t.successor, s.expires_at FROM refresh_tokens t \
         JOIN refresh_tokens s ON s.token_hash = t.successor_hash \
         JOIN refresh_families f ON f.id = s.family_id \
         WHERE t.token_hash = ",
    );
    sql.bind(presented.to_vec()).push(" AND t.used_at >= ").bind(since);
    sql.push(" AND s.used_at = 0 AND s.expires_at > ").bind(now).push(" AND f.revoked_at = 0");
    let Some(row) = sql.query().fetch_optional(conn).await? else { return Ok(None) };
    let sealed: Option<Vec<u8>> = row.try_get("successor")?;
    let expires_at: i64 = row.try_get("expires_at")?;
    Ok(sealed.map(|sealed| (sealed, expires_at)))
}

/// The lock-out rule applied to a failed password check.
#[derive(Debug, Clone, Copy)]
pub struct LockPolicy {
    /// Consecutive failures that lock the account.
    pub max_failures: i64,
    /// Until when a lock-out caused now lasts (epoch microseconds).
    pub lock_until: i64,
}

async fn insert_refresh_token(
    conn: &mut Conn,
    token: &NewRefreshToken,
    family_id: &str,
    user_id: &str,
    now: i64,
) -> Result<(), ApiError> {
    let mut sql =
        Sql::new("INSERT INTO refresh_tokens (token_hash, family_id, user_id, created_at, expires_at) VALUES (");
    sql.bind(token.hash.clone()).push(", ").bind(family_id).push(", ").bind(user_id);
    sql.push(", ").bind(now).push(", ").bind(token.expires_at).push(")");
    sql.query().execute(conn).await?;
    Ok(())
}

/// Revokes every refresh-token family of a user still alive.
pub(super) async fn revoke_user_sessions(conn: &mut Conn, user_id: &str, now: i64) -> Result<u64, ApiError> {
    let mut sql = Sql::new("UPDATE refresh_families SET revoked_at = ");
    sql.bind(now).push(" WHERE user_id = ").bind(user_id).push(" AND revoked_at = 0");
    Ok(sql.query().execute(conn).await?.rows_affected())
}

async fn revoke_family(conn: &mut Conn, family_id: &str, now: i64) -> Result<(), ApiError> {
    let mut sql = Sql::new("UPDATE refresh_families SET revoked_at = ");
    sql.bind(now).push(" WHERE id = ").bind(family_id).push(" AND revoked_at = 0");
    sql.query().execute(conn).await?;
    Ok(())
}

impl Store {
    /// What a sign-in with this (normalised) e-mail checks.
    pub async fn credentials(&self, email: &str) -> Result<Option<Credentials>, ApiError> {
        self.credentials_where("email", email).await
    }

    /// A user's password hash; `None` when there is no such user.
    pub async fn password_hash(&self, user_id: &str) -> Result<Option<Credentials>, ApiError> {
        self.credentials_where("id", user_id).await
    }

    async fn credentials_where(&self, column: &str, value: &str) -> Result<Option<Credentials>, ApiError> {
        let mut sql = Sql::new("SELECT id, password_hash, active, locked_until FROM users WHERE ");
        sql.push(column).push(" = ").bind(value);
        let Some(row) = sql.query().fetch_optional(self.db().pool()).await? else { return Ok(None) };
        Ok(Some(Credentials {
            user_id: row.try_get("id")?,
            password_hash: row.try_get("password_hash")?,
            active: row.try_get::<i64, _>("active")? != 0,
            locked_until: row.try_get("locked_until")?,
        }))
    }

    /// Records a failed password check: the event, and with a `policy` the failure count of
    /// `user_id`, locking the account when it reaches the limit. Answers whether it locked it.
    pub async fn password_failed(
        &self,
        user_id: &str,
        policy: Option<LockPolicy>,
        event: &Event,
    ) -> Result<bool, ApiError> {
        let mut tx = self.db().begin_write().await?;
        insert_event(&mut tx, event).await?;
        let mut locked = false;
        if let (false, Some(policy)) = (user_id.is_empty(), policy) {
            let mut sql = Sql::new("UPDATE users SET failed_sign_ins = failed_sign_ins + 1 WHERE id = ");
            sql.bind(user_id).push(" RETURNING failed_sign_ins");
            let failures: Option<i64> =
                sql.query().fetch_optional(&mut *tx).await?.map(|r| r.try_get("failed_sign_ins")).transpose()?;
            if failures.is_some_and(|n| n >= policy.max_failures) {
                let mut sql = Sql::new("UPDATE users SET failed_sign_ins = 0, locked_until = ");
                sql.bind(policy.lock_until).push(" WHERE id = ").bind(user_id);
                sql.query().execute(&mut *tx).await?;
                let detail = format!(
                    "{} failed attempts; locked until {}",
                    policy.max_failures,
                    crm_kit::time::format_rfc3339(policy.lock_until)
                );
                insert_event(&mut tx, &Event { kind: events::LOCKED_OUT, detail, ..event.clone() }).await?;
                let locked_out = UserLockedOut {
                    user_id: user_id.to_string(),
                    email: event.email.clone(),
                    failed_attempts: i32::try_from(policy.max_failures).unwrap_or(i32::MAX),
                    locked_until: crm_kit::time::to_timestamp(policy.lock_until),
                    client_address: event.client_address.clone(),
                };
                self.outbox.append(&mut tx, user_id, &event.actor_id, &locked_out).await?;
                locked = true;
            }
        }
        tx.commit().await?;
        Ok(locked)
    }

    /// Starts a session after a correct password: clears the failure count, stores the first
    /// refresh token of a new family and records the sign-in. Fails (UNAUTHENTICATED) if the
    /// account was deactivated or locked meanwhile.
    pub async fn start_session(
        &self,
        user_id: &str,
        token: &NewRefreshToken,
        event: &Event,
    ) -> Result<Subject, ApiError> {
        let now = now_micros();
        let mut tx = self.db().begin_write().await?;
        let mut sql = Sql::new("UPDATE users SET failed_sign_ins = 0, locked_until = 0 WHERE id = ");
        sql.bind(user_id).push(" AND active = 1 AND locked_until <= ").bind(now);
        if sql.query().execute(&mut *tx).await?.rows_affected() != 1 {
            return Err(ApiError::unauthenticated(BAD_CREDENTIALS));
        }
        let subject =
            load_subject(&mut tx, user_id, false).await?.ok_or_else(|| ApiError::unauthenticated(BAD_CREDENTIALS))?;
        let family = crm_kit::id::new();
        let mut sql = Sql::new("INSERT INTO refresh_families (id, user_id, created_at) VALUES (");
        sql.bind(family.as_str()).push(", ").bind(user_id).push(", ").bind(now).push(")");
        sql.query().execute(&mut *tx).await?;
        insert_refresh_token(&mut tx, token, &family, user_id, now).await?;
        insert_event(&mut tx, event).await?;
        tx.commit().await?;
        Ok(subject)
    }

    /// Exchanges the refresh token whose hash is `presented` for `next` in the same family and
    /// answers who it belongs to, as they are now. A token presented a second time revokes its
    /// family (and every token in it) and records `refresh_reuse` — unless it was exchanged
    /// within `grace` and its successor is still unused: then the answer is that same successor
    /// ([`Exchange::Again`]), for the clients (browser tabs) that raced to refresh. Every refusal
    /// is the same UNAUTHENTICATED.
    pub async fn refresh(
        &self,
        presented: &[u8],
        next: &NewRefreshToken,
        grace: std::time::Duration,
        client_address: &str,
    ) -> Result<Exchange, ApiError> {
        let now = now_micros();
        let mut tx = self.db().begin_write().await?;
        let mut sql = Sql::new(
            "SELECT t.family_id, t.user_id, t.expires_at, f.revoked_at FROM refresh_tokens t \
             JOIN refresh_families f ON f.id = t.family_id WHERE t.token_hash = ",
        );
        sql.bind(presented.to_vec());
        let Some(row) = sql.query().fetch_optional(&mut *tx).await? else {
            return Err(ApiError::unauthenticated(BAD_REFRESH_TOKEN));
        };
        let family: String = row.try_get("family_id")?;
        let user_id: String = row.try_get("user_id")?;
        let revoked_at: i64 = row.try_get("revoked_at")?;
        let expires_at: i64 = row.try_get("expires_at")?;
        if revoked_at != 0 || expires_at <= now {
            return Err(ApiError::unauthenticated(BAD_REFRESH_TOKEN));
        }
        // Mark it used only if nobody did: of two concurrent exchanges one wins, and the other is
        // a second presentation (which sees the winner's successor once the winner commits).
        let mut sql = Sql::new("UPDATE refresh_tokens SET used_at = ");
        sql.bind(now)
            .push(", successor_hash = ")
            .bind(next.hash.clone())
            .push(", successor = ")
            .bind(next.sealed.clone());
        sql.push(" WHERE token_hash = ").bind(presented.to_vec()).push(" AND used_at = 0");
        if sql.query().execute(&mut *tx).await?.rows_affected() != 1 {
            if let Some(again) = successor_within(&mut tx, presented, grace, now).await? {
                let subject = match load_subject(&mut tx, &user_id, false).await? {
                    Some(subject) if subject.active => subject,
                    _ => return Err(ApiError::unauthenticated(BAD_REFRESH_TOKEN)),
                };
                tx.commit().await?;
                return Ok(Exchange::Again { subject, sealed: again.0, expires_at: again.1 });
            }
            revoke_family(&mut tx, &family, now).await?;
            let event = Event {
                kind: events::REFRESH_REUSE,
                actor_id: user_id.clone(),
                user_id: user_id.clone(),
                client_address: client_address.to_string(),
                detail: format!("a used refresh token was presented again; sign-in {family} revoked"),
                ..Event::default()
            };
            insert_event(&mut tx, &event).await?;
            tx.commit().await?;
            return Err(ApiError::unauthenticated(BAD_REFRESH_TOKEN));
        }
        let subject = match load_subject(&mut tx, &user_id, false).await? {
            Some(subject) if subject.active => subject,
            _ => return Err(ApiError::unauthenticated(BAD_REFRESH_TOKEN)),
        };
        insert_refresh_token(&mut tx, next, &family, &user_id, now).await?;
        tx.commit().await?;
        Ok(Exchange::New(subject))
    }

    /// Revokes the family of the refresh token whose hash is `presented`; records `event` (its
    /// user filled in) when there was one. Unknown tokens change nothing.
    pub async fn sign_out(&self, presented: &[u8], event: &Event) -> Result<(), ApiError> {
        let mut tx = self.db().begin_write().await?;
        let mut sql = Sql::new("SELECT family_id, user_id FROM refresh_tokens WHERE token_hash = ");
        sql.bind(presented.to_vec());
        let Some(row) = sql.query().fetch_optional(&mut *tx).await? else {
            tx.rollback().await?;
            return Ok(());
        };
        let (family, user_id): (String, String) = (row.try_get("family_id")?, row.try_get("user_id")?);
        revoke_family(&mut tx, &family, now_micros()).await?;
        let event = Event { actor_id: user_id.clone(), user_id, ..event.clone() };
        insert_event(&mut tx, &event).await?;
        tx.commit().await?;
        Ok(())
    }

    /// Deletes refresh tokens that expired before `before`, and the sign-ins left without any.
    pub async fn purge_expired(&self, before: i64) -> Result<u64, ApiError> {
        let mut tx = self.db().begin_write().await?;
        let mut sql = Sql::new("DELETE FROM refresh_tokens WHERE expires_at < ");
        sql.bind(before);
        let deleted = sql.query().execute(&mut *tx).await?.rows_affected();
        let mut sql = Sql::new(
            "DELETE FROM refresh_families WHERE NOT EXISTS \
             (SELECT 1 FROM refresh_tokens t WHERE t.family_id = refresh_families.id) AND created_at < ",
        );
        sql.bind(before);
        sql.query().execute(&mut *tx).await?;
        tx.commit().await?;
        Ok(deleted)
    }

    /// Sets a user's password hash, clears a lock-out and revokes their refresh tokens.
    pub async fn set_password(&self, user_id: &str, password_hash: &str, event: &Event) -> Result<(), ApiError> {
        let now = now_micros();
        let mut tx = self.db().begin_write().await?;
        let mut sql = Sql::new("UPDATE users SET password_hash = ");
        sql.bind(password_hash).push(", failed_sign_ins = 0, locked_until = 0, updated_at = ").bind(now);
        sql.push(" WHERE id = ").bind(user_id);
        if sql.query().execute(&mut *tx).await?.rows_affected() != 1 {
            return Err(ApiError::NotFound(format!("user {user_id} not found")));
        }
        let revoked = revoke_user_sessions(&mut tx, user_id, now).await?;
        let changed = PasswordChanged {
            user_id: user_id.to_string(),
            by_self: event.actor_id == user_id,
            revoked_sessions: i32::try_from(revoked).unwrap_or(i32::MAX),
        };
        self.outbox.append(&mut tx, user_id, &event.actor_id, &changed).await?;
        let event = Event { detail: format!("{revoked} sign-in(s) revoked"), ..event.clone() };
        insert_event(&mut tx, &event).await?;
        tx.commit().await?;
        Ok(())
    }
}
