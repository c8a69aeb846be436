//! Users: e-mail (unique, stored normalised), department, supervisor and roles. Deactivating a
//! user revokes their sign-ins at once.

use crm_kit::ApiError;
use crm_kit::db::{Conn, Edit, Sql, Tx};
use crm_kit::filter::{Field, FieldKind, Filter};
use crm_kit::page::{Order, Page};
use crm_kit::time::{now_micros, to_timestamp};
use crm_proto::auth::v1::User;
use crm_proto::auth::v1::{UserCreated, UserDeactivated, UserUpdated};
use sqlx::Row;
use sqlx::any::AnyRow;

use super::events::insert_event;
use super::sessions::revoke_user_sessions;
use super::{Actor, Event, Store, etag, role_links, set_role_links};
use crate::domain::events;

pub(super) const USER_COLUMNS: &str =
    "id, email, display_name, phone, department_id, supervisor_id, active, created_at, updated_at, version";

/// What `ListUsers` filters on.
pub const USER_FIELDS: &[Field] = &[
    Field { name: "department_id", column: "department_id", kind: FieldKind::Text },
    Field { name: "supervisor_id", column: "supervisor_id", kind: FieldKind::Text },
    Field { name: "active", column: "active", kind: FieldKind::Bool },
    Field { name: "email", column: "email", kind: FieldKind::Lowercase },
];

/// Users are listed by display name.
pub const USER_ORDER: Order = Order::text("display_name");

fn user_of(row: &AnyRow) -> Result<User, ApiError> {
    Ok(User {
        id: row.try_get("id")?,
        email: row.try_get("email")?,
        display_name: row.try_get("display_name")?,
        phone: row.try_get("phone")?,
        department_id: row.try_get("department_id")?,
        supervisor_id: row.try_get("supervisor_id")?,
        role_ids: Vec::new(),
        active: row.try_get::<i64, _>("active")? != 0,
        create_time: to_timestamp(row.try_get("created_at")?),
        update_time: to_timestamp(row.try_get("updated_at")?),
        etag: etag(row.try_get("version")?),
    })
}

fn select(id: &str) -> Sql {
    let mut sql = Sql::new("SELECT ");
    sql.push(USER_COLUMNS).push(" FROM users WHERE id = ").bind(id);
    sql
}

fn duplicate_email(email: &str, holder: Option<String>) -> ApiError {
    let mut metadata = vec![("field".to_string(), "email".to_string()), ("value".to_string(), email.to_string())];
    if let Some(holder) = holder {
        metadata.push(("record_id".to_string(), holder));
    }
    ApiError::AlreadyExists {
        message: format!("a user with the e-mail {email} already exists"),
        reason: "DUPLICATE_RECORD",
        metadata,
    }
}

/// The user's role ids, as stored.
async fn with_roles(conn: &mut Conn, mut user: User) -> Result<User, ApiError> {
    user.role_ids = role_links(conn, "user_roles", "user_id", std::slice::from_ref(&user.id))
        .await?
        .remove(&user.id)
        .unwrap_or_default();
    Ok(user)
}

impl Store {
    /// Checks a user's references: e-mail not taken, department, supervisor and roles exist.
    async fn check_user_references(&self, tx: &mut Tx, new: &User, old: Option<&User>) -> Result<(), ApiError> {
        if old.is_none_or(|o| o.email != new.email) {
            let mut sql = Sql::new("SELECT id FROM users WHERE email = ");
            sql.bind(new.email.as_str()).push(" AND id <> ").bind(new.id.as_str());
            if let Some(row) = sql.query().fetch_optional(&mut **tx).await? {
                return Err(duplicate_email(&new.email, Some(row.try_get("id")?)));
            }
        }
        if !new.department_id.is_empty() && old.is_none_or(|o| o.department_id != new.department_id) {
            self.check_department(tx, "user.department_id", &new.department_id).await?;
        }
        if !new.supervisor_id.is_empty() && old.is_none_or(|o| o.supervisor_id != new.supervisor_id) {
            let mut sql = Sql::new("SELECT id FROM users WHERE id = ");
            sql.bind(new.supervisor_id.as_str()).push(self.db().for_share());
            if sql.query().fetch_optional(&mut **tx).await?.is_none() {
                return Err(ApiError::invalid("user.supervisor_id", "no user has this id"));
            }
        }
        if old.is_none_or(|o| o.role_ids != new.role_ids) {
            self.check_roles(tx, "user.role_ids", &new.role_ids).await?;
        }
        Ok(())
    }

    /// Creates an active user with a (hashed) password; `user` is normalised.
    pub async fn create_user(&self, user: &User, password_hash: &str, actor: &Actor) -> Result<User, ApiError> {
        let now = now_micros();
        let mut new = User {
            id: crm_kit::id::new(),
            active: true,
            create_time: to_timestamp(now),
            update_time: to_timestamp(now),
            etag: etag(1),
            ..user.clone()
        };
        let mut tx = self.db().begin_write().await?;
        self.check_user_references(&mut tx, &new, None).await?;
        let mut sql = Sql::new("INSERT INTO users (");
        sql.push(USER_COLUMNS).push(", password_hash) VALUES ");
        sql.push_values([&new], |v, u| {
            v.bind(&u.id).bind(&u.email).bind(&u.display_name).bind(&u.phone).bind(&u.department_id);
            v.bind(&u.supervisor_id).bind(1_i64).bind(now).bind(now).bind(1_i64).bind(password_hash);
        });
        if let Err(err) = sql.query().execute(&mut *tx).await {
            return Err(if crm_kit::db::is_unique_violation(&err) {
                duplicate_email(&new.email, None)
            } else {
                err.into()
            });
        }
        set_role_links(&mut tx, "user_roles", "user_id", &new.id, &new.role_ids).await?;
        let roles = self.role_names(&mut tx, &new.role_ids).await?;
        let mut event = actor.event(events::USER_CREATED);
        event.user_id = new.id.clone();
        event.email = new.email.clone();
        event.detail = format!("department {:?}, roles [{}]", new.department_id, roles.join(", "));
        insert_event(&mut tx, &event).await?;
        let created = UserCreated {
            user_id: new.id.clone(),
            email: new.email.clone(),
            display_name: new.display_name.clone(),
            department_id: new.department_id.clone(),
            role_ids: new.role_ids.clone(),
        };
        self.publish(&mut tx, &new.id, actor, &created).await?;
        tx.commit().await?;
        new.role_ids.sort();
        Ok(new)
    }

    pub async fn get_user(&self, id: &str) -> Result<User, ApiError> {
        let mut conn = self.db().pool().acquire().await?;
        let row = select(id)
            .query()
            .fetch_optional(&mut conn)
            .await?
            .ok_or_else(|| ApiError::NotFound(format!("user {id} not found")))?;
        with_roles(&mut conn, user_of(&row)?).await
    }

    /// The users with these ids, in the order asked (each once); their roles read with one query.
    pub async fn get_users(&self, ids: &[String]) -> Result<Vec<User>, ApiError> {
        if ids.is_empty() {
            return Ok(Vec::new());
        }
        let mut sql = Sql::new("SELECT ");
        sql.push(USER_COLUMNS).push(" FROM users WHERE ").push_in("id", ids.iter().map(String::as_str));
        let mut conn = self.db().pool().acquire().await?;
        let rows = sql.query().fetch_all(&mut conn).await?;
        let mut found = rows.iter().map(user_of).collect::<Result<Vec<User>, _>>()?;
        let found_ids: Vec<String> = found.iter().map(|u| u.id.clone()).collect();
        let mut roles = role_links(&mut conn, "user_roles", "user_id", &found_ids).await?;
        for user in &mut found {
            user.role_ids = roles.remove(&user.id).unwrap_or_default();
        }
        let mut ordered = Vec::with_capacity(found.len());
        for id in ids {
            if let Some(i) = found.iter().position(|u| &u.id == id) {
                ordered.push(found.swap_remove(i));
            }
        }
        Ok(ordered)
    }

    /// One page of users by display name, their roles read with one query.
    pub async fn list_users(&self, filter: Option<&Filter>, page: &Page) -> Result<(Vec<User>, String), ApiError> {
        let mut sql = Sql::new("SELECT ");
        sql.push(USER_COLUMNS).push(" FROM users WHERE 1=1");
        if let Some(filter) = filter {
            filter.push_onto(&mut sql);
        }
        page.push_keyset(&mut sql, &USER_ORDER);
        let mut conn = self.db().pool().acquire().await?;
        let rows = sql.query().fetch_all(&mut conn).await?;
        let (mut users, next) = page.finish(&rows, &USER_ORDER, user_of)?;
        let ids: Vec<String> = users.iter().map(|u| u.id.clone()).collect();
        let mut roles = role_links(&mut conn, "user_roles", "user_id", &ids).await?;
        for user in &mut users {
            user.role_ids = roles.remove(&user.id).unwrap_or_default();
        }
        Ok((users, next))
    }

    /// Changes a user; `change` applies the request (and validates the result). Deactivation
    /// revokes their refresh tokens.
    pub async fn update_user<F>(&self, id: &str, etag_sent: &str, actor: &Actor, change: F) -> Result<User, ApiError>
    where
        F: FnOnce(&mut User) -> Result<(), ApiError>,
    {
        let tx = self.db().begin_write().await?;
        let (mut edit, row) = Edit::lock(self.db(), tx, "users", "user", id, select(id)).await?;
        edit.require_etag(etag_sent)?;
        let old = with_roles(edit.tx(), user_of(&row)?).await?;
        let mut new = old.clone();
        change(&mut new)?;
        if new == old {
            edit.abandon().await?;
            return Ok(old);
        }
        self.check_user_references(edit.tx(), &new, Some(&old)).await?;
        let now = now_micros();
        let mut assignments = Sql::new("email = ");
        assignments.bind(new.email.as_str()).push(", display_name = ").bind(new.display_name.as_str());
        assignments.push(", phone = ").bind(new.phone.as_str());
        assignments.push(", department_id = ").bind(new.department_id.as_str());
        assignments.push(", supervisor_id = ").bind(new.supervisor_id.as_str());
        assignments.push(", active = ").bind(i64::from(new.active));
        let version = edit.save_unique(assignments, now, |_| duplicate_email(&new.email, None)).await?;
        let user_event = |kind| Event { user_id: id.to_string(), email: new.email.clone(), ..actor.event(kind) };
        if new.role_ids != old.role_ids {
            set_role_links(edit.tx(), "user_roles", "user_id", id, &new.role_ids).await?;
            let before = self.role_names(edit.tx(), &old.role_ids).await?;
            let after = self.role_names(edit.tx(), &new.role_ids).await?;
            let mut event = user_event(events::USER_ROLES_CHANGED);
            event.detail = format!("roles [{}] -> [{}]", before.join(", "), after.join(", "));
            insert_event(edit.tx(), &event).await?;
        }
        if new.department_id != old.department_id {
            let mut event = user_event(events::USER_DEPARTMENT_CHANGED);
            event.detail = format!("department {:?} -> {:?}", old.department_id, new.department_id);
            insert_event(edit.tx(), &event).await?;
        }
        if new.active != old.active {
            let mut event = user_event(if new.active { events::USER_REACTIVATED } else { events::USER_DEACTIVATED });
            if !new.active {
                let revoked = revoke_user_sessions(edit.tx(), id, now).await?;
                event.detail = format!("{revoked} sign-in(s) revoked");
            }
            insert_event(edit.tx(), &event).await?;
        }
        let changed: Vec<&str> = [
            ("email", new.email != old.email),
            ("display_name", new.display_name != old.display_name),
            ("phone", new.phone != old.phone),
            ("supervisor_id", new.supervisor_id != old.supervisor_id),
        ]
        .into_iter()
        .filter_map(|(field, differs)| differs.then_some(field))
        .collect();
        if !changed.is_empty() {
            let mut event = user_event(events::USER_CHANGED);
            event.detail = format!("changed {}", changed.join(", "));
            if new.email != old.email {
                event.detail.push_str(&format!("; e-mail was {}", old.email));
            }
            insert_event(edit.tx(), &event).await?;
        }
        let mut changed_fields: Vec<String> = changed.iter().map(|f| f.to_string()).collect();
        for (field, differs) in [
            ("department_id", new.department_id != old.department_id),
            ("role_ids", new.role_ids != old.role_ids),
            ("active", new.active != old.active),
        ] {
            if differs {
                changed_fields.push(field.to_string());
            }
        }
        let updated = UserUpdated {
            user_id: id.to_string(),
            changed_fields,
            email: new.email.clone(),
            display_name: new.display_name.clone(),
            department_id: new.department_id.clone(),
            role_ids: new.role_ids.clone(),
            active: new.active,
        };
        self.publish(edit.tx(), id, actor, &updated).await?;
        if old.active && !new.active {
            self.publish(edit.tx(), id, actor, &UserDeactivated { user_id: id.to_string() }).await?;
        }
        edit.commit().await?;
        new.update_time = to_timestamp(now);
        new.etag = etag(version);
        Ok(new)
    }
}
