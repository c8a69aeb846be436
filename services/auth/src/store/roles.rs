//! Roles: named sets of permissions with a data scope. Names are unique regardless of case; a
//! role somebody holds cannot be deleted.

use crm_kit::ApiError;
use crm_kit::db::{Conn, Edit, Sql, Tx};
use crm_kit::page::{Order, Page};
use crm_kit::time::{now_micros, to_timestamp};
use crm_proto::auth::v1::Role;
use crm_proto::auth::v1::{Change, RoleChanged};
use sqlx::Row;
use sqlx::any::AnyRow;

use super::events::insert_event;
use super::identities::{permissions_json, permissions_of};
use super::{Actor, Store, etag};
use crate::domain::{self, events};

pub(super) const ROLE_COLUMNS: &str = "id, name, permissions, data_scope, created_at, updated_at, version";

/// Roles are listed by name.
pub const ROLE_ORDER: Order = Order::text("name");

/// The trimmed, lower-cased name the unique index compares.
pub(super) fn role_key(name: &str) -> String {
    name.trim().to_lowercase()
}

fn role_of(row: &AnyRow) -> Result<Role, ApiError> {
    let permissions: String = row.try_get("permissions")?;
    Ok(Role {
        id: row.try_get("id")?,
        name: row.try_get("name")?,
        permissions: permissions_of(&permissions)?,
        data_scope: row.try_get::<i64, _>("data_scope")? as i32,
        create_time: to_timestamp(row.try_get("created_at")?),
        update_time: to_timestamp(row.try_get("updated_at")?),
        etag: etag(row.try_get("version")?),
    })
}

fn select(id: &str) -> Sql {
    let mut sql = Sql::new("SELECT ");
    sql.push(ROLE_COLUMNS).push(" FROM roles WHERE id = ").bind(id);
    sql
}

fn duplicate_role(name: &str) -> ApiError {
    ApiError::AlreadyExists {
        message: format!("a role named {name:?} already exists"),
        reason: "DUPLICATE_RECORD",
        metadata: vec![("field".into(), "name".into()), ("value".into(), name.to_string())],
    }
}

fn role_changed(id: &str, change: Change, name: &str) -> RoleChanged {
    RoleChanged { role_id: id.to_string(), change: change as i32, name: name.to_string() }
}

impl Store {
    /// Checks that every role exists, locking each against deletion until `tx` ends.
    pub(super) async fn check_roles(&self, tx: &mut Tx, field: &str, ids: &[String]) -> Result<(), ApiError> {
        if ids.is_empty() {
            return Ok(());
        }
        let mut sql = Sql::new("SELECT id FROM roles WHERE ");
        sql.push_in("id", ids).push(self.db().for_share());
        let found: Vec<String> =
            sql.query().fetch_all(&mut **tx).await?.iter().map(|r| r.try_get("id")).collect::<Result<_, _>>()?;
        let mut v = crm_kit::Violations::new();
        for (i, id) in ids.iter().enumerate() {
            if !found.contains(id) {
                v.add(format!("{field}[{i}]"), "no role has this id");
            }
        }
        v.check()
    }

    /// Role names by id, for audit details.
    pub(super) async fn role_names(&self, conn: &mut Conn, ids: &[String]) -> Result<Vec<String>, ApiError> {
        if ids.is_empty() {
            return Ok(Vec::new());
        }
        let mut sql = Sql::new("SELECT name FROM roles WHERE ");
        sql.push_in("id", ids).push(" ORDER BY name");
        sql.query().fetch_all(conn).await?.iter().map(|r| r.try_get("name").map_err(ApiError::from)).collect()
    }

    async fn check_role_name(&self, tx: &mut Tx, name: &str, except_id: &str) -> Result<(), ApiError> {
        let mut sql = Sql::new("SELECT id FROM roles WHERE name_key = ");
        sql.bind(role_key(name)).push(" AND id <> ").bind(except_id);
        match sql.query().fetch_optional(&mut **tx).await? {
            Some(row) => {
                let holder: String = row.try_get("id")?;
                let mut err = duplicate_role(name);
                if let ApiError::AlreadyExists { metadata, .. } = &mut err {
                    metadata.push(("record_id".into(), holder));
                }
                Err(err)
            }
            None => Ok(()),
        }
    }

    pub async fn create_role(&self, r: &Role, actor: &Actor) -> Result<Role, ApiError> {
        let now = now_micros();
        let id = crm_kit::id::new();
        let mut tx = self.db().begin_write().await?;
        self.check_role_name(&mut tx, &r.name, "").await?;
        let mut sql = Sql::new("INSERT INTO roles (");
        sql.push(ROLE_COLUMNS).push(", name_key) VALUES ");
        sql.push_values([r], |v, r| {
            v.bind(id.as_str()).bind(&r.name).bind(permissions_json(&r.permissions)).bind(i64::from(r.data_scope));
            v.bind(now).bind(now).bind(1_i64).bind(role_key(&r.name));
        });
        if let Err(err) = sql.query().execute(&mut *tx).await {
            return Err(if crm_kit::db::is_unique_violation(&err) { duplicate_role(&r.name) } else { err.into() });
        }
        let mut event = actor.event(events::ROLE_CREATED);
        event.detail = format!(
            "role {id} {:?}: permissions [{}], scope {}",
            r.name,
            r.permissions.join(", "),
            domain::scope_name(r.data_scope)
        );
        insert_event(&mut tx, &event).await?;
        self.publish(&mut tx, &id, actor, &role_changed(&id, Change::Created, &r.name)).await?;
        tx.commit().await?;
        Ok(Role {
            id,
            name: r.name.clone(),
            permissions: r.permissions.clone(),
            data_scope: r.data_scope,
            create_time: to_timestamp(now),
            update_time: to_timestamp(now),
            etag: etag(1),
        })
    }

    pub async fn get_role(&self, id: &str) -> Result<Role, ApiError> {
        let row = select(id)
            .query()
            .fetch_optional(self.db().pool())
            .await?
            .ok_or_else(|| ApiError::NotFound(format!("role {id} not found")))?;
        role_of(&row)
    }

    /// One page of roles by name.
    pub async fn list_roles(&self, page: &Page) -> Result<(Vec<Role>, String), ApiError> {
        let mut sql = Sql::new("SELECT ");
        sql.push(ROLE_COLUMNS).push(" FROM roles WHERE 1=1");
        page.push_keyset(&mut sql, &ROLE_ORDER);
        let rows = sql.query().fetch_all(self.db().pool()).await?;
        page.finish(&rows, &ROLE_ORDER, role_of)
    }

    /// Changes a role; `change` applies the request (and validates the result).
    pub async fn update_role<F>(&self, id: &str, etag_sent: &str, actor: &Actor, change: F) -> Result<Role, ApiError>
    where
        F: FnOnce(&mut Role) -> Result<(), ApiError>,
    {
        let tx = self.db().begin_write().await?;
        let (mut edit, row) = Edit::lock(self.db(), tx, "roles", "role", id, select(id)).await?;
        edit.require_etag(etag_sent)?;
        let old = role_of(&row)?;
        let mut new = old.clone();
        change(&mut new)?;
        if new == old {
            edit.abandon().await?;
            return Ok(old);
        }
        if role_key(&new.name) != role_key(&old.name) {
            self.check_role_name(edit.tx(), &new.name, id).await?;
        }
        let now = now_micros();
        let mut assignments = Sql::new("name = ");
        assignments.bind(new.name.as_str()).push(", name_key = ").bind(role_key(&new.name));
        assignments.push(", permissions = ").bind(permissions_json(&new.permissions));
        assignments.push(", data_scope = ").bind(i64::from(new.data_scope));
        let version = edit.save_unique(assignments, now, |_| duplicate_role(&new.name)).await?;
        let mut changes = Vec::new();
        if new.name != old.name {
            changes.push(format!("name {:?} -> {:?}", old.name, new.name));
        }
        if new.permissions != old.permissions {
            changes.push(format!("permissions [{}] -> [{}]", old.permissions.join(", "), new.permissions.join(", ")));
        }
        if new.data_scope != old.data_scope {
            changes.push(format!(
                "scope {} -> {}",
                domain::scope_name(old.data_scope),
                domain::scope_name(new.data_scope)
            ));
        }
        let mut event = actor.event(events::ROLE_CHANGED);
        event.detail = format!("role {id}: {}", changes.join("; "));
        insert_event(edit.tx(), &event).await?;
        self.publish(edit.tx(), id, actor, &role_changed(id, Change::Updated, &new.name)).await?;
        edit.commit().await?;
        new.update_time = to_timestamp(now);
        new.etag = etag(version);
        Ok(new)
    }

    /// Deletes a role nobody holds.
    pub async fn delete_role(&self, id: &str, etag_sent: &str, actor: &Actor) -> Result<(), ApiError> {
        let tx = self.db().begin_write().await?;
        let (mut edit, row) = Edit::lock(self.db(), tx, "roles", "role", id, select(id)).await?;
        edit.require_etag(etag_sent)?;
        let old = role_of(&row)?;
        for (statement, holders) in [
            ("SELECT user_id FROM user_roles WHERE role_id = ", "users"),
            ("SELECT account_id FROM service_account_roles WHERE role_id = ", "service accounts"),
        ] {
            let mut probe = Sql::new(statement);
            probe.bind(id);
            edit.refuse_if_referenced(probe, || {
                format!("role {id} is still held by {holders}; take it from them first")
            })
            .await?;
        }
        edit.delete().await?;
        let mut event = actor.event(events::ROLE_DELETED);
        event.detail = format!("role {id} {:?}", old.name);
        insert_event(edit.tx(), &event).await?;
        self.publish(edit.tx(), id, actor, &role_changed(id, Change::Deleted, &old.name)).await?;
        edit.commit().await
    }
}
