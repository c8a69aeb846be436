//! Users and service accounts as tokens and data scopes see them: from the records as they are
//! now, not as a token remembers them.

use std::collections::BTreeSet;

use crm_kit::ApiError;
use crm_kit::db::{Conn, Sql};
use crm_proto::auth::v1::DataScope;
use sqlx::Row;

use super::Store;
use crate::domain;

/// A user or a service account as access tokens and visibility see them.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Subject {
    pub id: String,
    pub service_account: bool,
    pub name: String,
    pub email: String,
    pub department_id: String,
    pub active: bool,
    /// Every permission of every role, each once, sorted.
    pub permissions: Vec<String>,
    /// The widest scope of their roles (OWN without roles).
    pub data_scope: DataScope,
}

pub(super) fn permissions_of(json: &str) -> Result<Vec<String>, ApiError> {
    serde_json::from_str(json).map_err(|e| ApiError::Internal(format!("stored role permissions do not decode: {e}")))
}

pub(super) fn permissions_json(permissions: &[String]) -> String {
    serde_json::to_string(permissions).expect("strings serialize")
}

pub(super) async fn load_subject(
    conn: &mut Conn,
    id: &str,
    service_account: bool,
) -> Result<Option<Subject>, ApiError> {
    let mut sql = if service_account {
        Sql::new("SELECT name AS display_name, '' AS email, '' AS department_id, 1 AS active FROM service_accounts")
    } else {
        Sql::new("SELECT display_name, email, department_id, active FROM users")
    };
    sql.push(" WHERE id = ").bind(id);
    let Some(row) = sql.query().fetch_optional(&mut *conn).await? else { return Ok(None) };
    let mut roles = if service_account {
        Sql::new(
            "SELECT r.permissions, r.data_scope FROM service_account_roles l JOIN roles r ON r.id = l.role_id \
             WHERE l.account_id = ",
        )
    } else {
        Sql::new(
            "SELECT r.permissions, r.data_scope FROM user_roles l JOIN roles r ON r.id = l.role_id WHERE l.user_id = ",
        )
    };
    roles.bind(id);
    let mut permissions = BTreeSet::new();
    let mut scopes = Vec::new();
    for role in roles.query().fetch_all(&mut *conn).await? {
        permissions.extend(permissions_of(&role.try_get::<String, _>("permissions")?)?);
        scopes.push(role.try_get::<i64, _>("data_scope")? as i32);
    }
    Ok(Some(Subject {
        id: id.to_string(),
        service_account,
        name: row.try_get("display_name")?,
        email: row.try_get("email")?,
        department_id: row.try_get("department_id")?,
        active: row.try_get::<i64, _>("active")? != 0,
        permissions: permissions.into_iter().collect(),
        data_scope: domain::effective_scope(scopes),
    }))
}

impl Store {
    /// A user or service account as it is now; `None` if it does not exist.
    pub async fn subject(&self, id: &str, service_account: bool) -> Result<Option<Subject>, ApiError> {
        let mut conn = self.db().pool().acquire().await?;
        load_subject(&mut conn, id, service_account).await
    }

    /// Ids of the users (active or not) in a department, or in it and every department below.
    pub async fn department_members(&self, department_id: &str, with_subtree: bool) -> Result<Vec<String>, ApiError> {
        let mut sql = if with_subtree {
            let mut sql = Sql::new("WITH RECURSIVE tree (id) AS (SELECT id FROM departments WHERE id = ");
            sql.bind(department_id).push(
                " UNION SELECT d.id FROM departments d JOIN tree t ON d.parent_id = t.id) \
                 SELECT u.id FROM users u WHERE u.department_id IN (SELECT id FROM tree)",
            );
            sql
        } else {
            let mut sql = Sql::new("SELECT id FROM users WHERE department_id = ");
            sql.bind(department_id);
            sql
        };
        sql.push(" ORDER BY 1");
        let rows = sql.query().fetch_all(self.db().pool()).await?;
        rows.iter().map(|r| r.try_get::<String, _>("id").map_err(ApiError::from)).collect()
    }
}
