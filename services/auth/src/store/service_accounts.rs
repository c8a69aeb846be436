//! Service accounts: client credentials for internal services (SPEC A3). The secret is kept
//! only as its SHA-256.

use crm_kit::ApiError;
use crm_kit::db::Sql;
use crm_kit::page::{Order, Page};
use crm_kit::time::{now_micros, to_timestamp};
use crm_proto::auth::v1::ServiceAccount;
use sqlx::Row;
use sqlx::any::AnyRow;

use super::events::insert_event;
use super::{Actor, Store, role_links, set_role_links};
use crate::domain::events;

/// Service accounts are listed by name.
pub const SERVICE_ACCOUNT_ORDER: Order = Order::text("name");

/// A new service account, its secret already hashed.
pub struct NewServiceAccount {
    pub name: String,
    pub client_id: String,
    pub secret_hash: Vec<u8>,
    pub role_ids: Vec<String>,
}

impl Store {
    fn service_account_of(row: &AnyRow) -> Result<ServiceAccount, ApiError> {
        Ok(ServiceAccount {
            id: row.try_get("id")?,
            name: row.try_get("name")?,
            client_id: row.try_get("client_id")?,
            role_ids: Vec::new(),
            create_time: to_timestamp(row.try_get("created_at")?),
        })
    }

    pub async fn create_service_account(
        &self,
        new: &NewServiceAccount,
        actor: &Actor,
    ) -> Result<ServiceAccount, ApiError> {
        let now = now_micros();
        let id = crm_kit::id::new();
        let mut tx = self.db().begin_write().await?;
        self.check_roles(&mut tx, "service_account.role_ids", &new.role_ids).await?;
        let mut sql = Sql::new("INSERT INTO service_accounts (id, name, client_id, secret_hash, created_at) VALUES (");
        sql.bind(id.as_str()).push(", ").bind(new.name.as_str()).push(", ").bind(new.client_id.as_str());
        sql.push(", ").bind(new.secret_hash.clone()).push(", ").bind(now).push(")");
        sql.query().execute(&mut *tx).await?;
        set_role_links(&mut tx, "service_account_roles", "account_id", &id, &new.role_ids).await?;
        let roles = self.role_names(&mut tx, &new.role_ids).await?;
        let mut event = actor.event(events::SERVICE_ACCOUNT_CREATED);
        event.detail =
            format!("service account {id} {:?}, client id {}, roles [{}]", new.name, new.client_id, roles.join(", "));
        insert_event(&mut tx, &event).await?;
        tx.commit().await?;
        Ok(ServiceAccount {
            id,
            name: new.name.clone(),
            client_id: new.client_id.clone(),
            role_ids: new.role_ids.clone(),
            create_time: to_timestamp(now),
        })
    }

    /// One page of service accounts by name, their roles read with one query.
    pub async fn list_service_accounts(&self, page: &Page) -> Result<(Vec<ServiceAccount>, String), ApiError> {
        let mut sql = Sql::new("SELECT id, name, client_id, created_at FROM service_accounts WHERE 1=1");
        page.push_keyset(&mut sql, &SERVICE_ACCOUNT_ORDER);
        let mut conn = self.db().pool().acquire().await?;
        let rows = sql.query().fetch_all(&mut conn).await?;
        let (mut accounts, next) = page.finish(&rows, &SERVICE_ACCOUNT_ORDER, Self::service_account_of)?;
        let ids: Vec<String> = accounts.iter().map(|a| a.id.clone()).collect();
        let mut roles = role_links(&mut conn, "service_account_roles", "account_id", &ids).await?;
        for account in &mut accounts {
            account.role_ids = roles.remove(&account.id).unwrap_or_default();
        }
        Ok((accounts, next))
    }

    pub async fn delete_service_account(&self, id: &str, actor: &Actor) -> Result<(), ApiError> {
        let mut tx = self.db().begin_write().await?;
        let mut sql = Sql::new("SELECT name, client_id FROM service_accounts WHERE id = ");
        sql.bind(id).push(self.db().for_update());
        let row = sql
            .query()
            .fetch_optional(&mut *tx)
            .await?
            .ok_or_else(|| ApiError::NotFound(format!("service account {id} not found")))?;
        let (name, client_id): (String, String) = (row.try_get("name")?, row.try_get("client_id")?);
        let mut sql = Sql::new("DELETE FROM service_account_roles WHERE account_id = ");
        sql.bind(id);
        sql.query().execute(&mut *tx).await?;
        let mut sql = Sql::new("DELETE FROM service_accounts WHERE id = ");
        sql.bind(id);
        sql.query().execute(&mut *tx).await?;
        let mut event = actor.event(events::SERVICE_ACCOUNT_DELETED);
        event.detail = format!("service account {id} {name:?}, client id {client_id}");
        insert_event(&mut tx, &event).await?;
        tx.commit().await?;
        Ok(())
    }

    /// A service account's id and secret hash by client id.
    pub async fn service_credentials(&self, client_id: &str) -> Result<Option<(String, Vec<u8>)>, ApiError> {
        let mut sql = Sql::new("SELECT id, secret_hash FROM service_accounts WHERE client_id = ");
        sql.bind(client_id);
        let Some(row) = sql.query().fetch_optional(self.db().pool()).await? else { return Ok(None) };
        Ok(Some((row.try_get("id")?, row.try_get("secret_hash")?)))
    }
}
