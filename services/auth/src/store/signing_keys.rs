//! Signing keys: the newest key not retired signs; retired keys stay published until every
//! token they signed has expired.

use crm_kit::ApiError;
use crm_kit::auth::SigningKey;
use crm_kit::db::{Conn, Sql};
use crm_kit::time::now_micros;
use crm_proto::auth::v1::Jwk;
use sqlx::Row;

use super::events::insert_event;
use super::{Event, SIGNING_KEYS, Store};

impl Store {
    /// The key that signs now: the newest one not retired.
    pub async fn current_signing_key(&self) -> Result<Option<SigningKey>, ApiError> {
        let mut conn = self.db().pool().acquire().await?;
        current_key(&mut conn).await
    }

    /// The current key, storing `candidate` as the first one if there is none. Safe when
    /// several replicas start at once: exactly one key is stored.
    pub async fn ensure_signing_key(&self, candidate: &SigningKey) -> Result<SigningKey, ApiError> {
        if let Some(key) = self.current_signing_key().await? {
            return Ok(key);
        }
        let mut tx = self.db().begin_write().await?;
        self.db().one_writer_at_a_time(&mut tx, SIGNING_KEYS).await?;
        if let Some(key) = current_key(&mut tx).await? {
            tx.rollback().await?;
            return Ok(key);
        }
        insert_key(&mut tx, candidate, now_micros()).await?;
        tx.commit().await?;
        Ok(candidate.clone())
    }

    /// Makes `key` the current key, retiring the previous one now.
    pub async fn rotate_signing_key(&self, key: &SigningKey, event: &Event) -> Result<(), ApiError> {
        let now = now_micros();
        let mut tx = self.db().begin_write().await?;
        self.db().one_writer_at_a_time(&mut tx, SIGNING_KEYS).await?;
        let mut sql = Sql::new("UPDATE signing_keys SET retired_at = ");
        sql.bind(now).push(" WHERE retired_at = 0 RETURNING kid");
        let retired: Vec<String> =
            sql.query().fetch_all(&mut *tx).await?.iter().map(|r| r.try_get("kid")).collect::<Result<_, _>>()?;
        insert_key(&mut tx, key, now).await?;
        let detail = format!("key {} signs from now on; retired: {}", key.kid(), retired.join(", "));
        insert_event(&mut tx, &Event { detail, ..event.clone() }).await?;
        tx.commit().await?;
        Ok(())
    }

    /// The public keys of every key not retired, or retired after `retired_after`, newest first.
    pub async fn published_keys(&self, retired_after: i64) -> Result<Vec<Jwk>, ApiError> {
        let mut sql = Sql::new("SELECT kid, public_x FROM signing_keys WHERE retired_at = 0 OR retired_at > ");
        sql.bind(retired_after).push(" ORDER BY created_at DESC, kid DESC");
        let rows = sql.query().fetch_all(self.db().pool()).await?;
        rows.iter()
            .map(|row| {
                Ok(Jwk {
                    kty: "OKP".into(),
                    crv: "Ed25519".into(),
                    kid: row.try_get("kid")?,
                    x: row.try_get("public_x")?,
                    alg: "EdDSA".into(),
                    r#use: "sig".into(),
                })
            })
            .collect()
    }
}

async fn current_key(conn: &mut Conn) -> Result<Option<SigningKey>, ApiError> {
    let row =
        Sql::new("SELECT kid, pkcs8 FROM signing_keys WHERE retired_at = 0 ORDER BY created_at DESC, kid DESC LIMIT 1")
            .query()
            .fetch_optional(conn)
            .await?;
    let Some(row) = row else { return Ok(None) };
    let kid: String = row.try_get("kid")?;
    let pkcs8: Vec<u8> = row.try_get("pkcs8")?;
    SigningKey::from_pkcs8(kid, &pkcs8).map(Some).map_err(ApiError::Internal)
}

async fn insert_key(conn: &mut Conn, key: &SigningKey, now: i64) -> Result<(), ApiError> {
    let mut sql = Sql::new("INSERT INTO signing_keys (kid, pkcs8, public_x, created_at) VALUES (");
    sql.bind(key.kid()).push(", ").bind(key.pkcs8().to_vec()).push(", ").bind(key.jwk().x).push(", ").bind(now);
    sql.push(")");
    sql.query().execute(conn).await?;
    Ok(())
}
