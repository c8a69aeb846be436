//! The organisation a fresh database starts with: four roles, one department and an
//! administrator, created once (by whichever replica gets there first); and the suite's own
//! service account, made sure of at every start.

use crm_kit::auth::{Catalog, Grant, ServiceCredentials};
use crm_proto::auth::v1::{DataScope, Role};

use crate::AuthError;
use crate::domain::{self, secrets};
use crate::store::{BootstrapPlan, Store, SuiteAccount, SuiteAccountPlan};

pub const ADMINISTRATOR: &str = "Administrator";
pub const EXECUTIVE: &str = "Executive";
pub const HEAD_OF_DEPARTMENT: &str = "Head of department";
pub const SALESPERSON: &str = "Salesperson";
pub const HEAD_OFFICE: &str = "Head office";
/// The role and the service account with which the suite's services call each other.
pub const SUITE_SERVICES: &str = "Suite services";

/// What [`bootstrap`] did. Its Debug output never shows the password.
#[derive(Clone, PartialEq, Eq)]
pub struct Bootstrap {
    /// Whether this call created the organisation (false: it already had users).
    pub created: bool,
    /// The administrator's e-mail, normalised.
    pub email: String,
    /// The administrator's password when it was generated (no password was given); show it
    /// to the operator once.
    pub generated_password: Option<String>,
}

impl std::fmt::Debug for Bootstrap {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Bootstrap")
            .field("created", &self.created)
            .field("email", &self.email)
            .field("generated_password", &self.generated_password.as_ref().map(|_| "<redacted>"))
            .finish()
    }
}

/// The roles a new organisation starts with; each holds the suite's permissions granted to its
/// level (every service declares who holds its permissions at first start).
pub fn starting_roles(catalog: &Catalog) -> Vec<Role> {
    let role = |name: &str, level: Grant, scope: DataScope| Role {
        name: name.into(),
        permissions: catalog.granted(level),
        data_scope: scope as i32,
        ..Default::default()
    };
    vec![
        role(ADMINISTRATOR, Grant::Administrators, DataScope::All),
        role(EXECUTIVE, Grant::Managers, DataScope::All),
        role(HEAD_OF_DEPARTMENT, Grant::Managers, DataScope::DepartmentTree),
        role(SALESPERSON, Grant::Everyone, DataScope::Own),
    ]
}

/// When the database has no users, creates in one transaction the starting roles, the
/// department "Head office" and the administrator (`admin_email`, role Administrator) with
/// `admin_password`, or a generated password returned in [`Bootstrap::generated_password`].
/// When users exist it does nothing. Safe when several replicas run it at once.
pub async fn bootstrap(
    store: &Store,
    catalog: &Catalog,
    admin_email: &str,
    admin_password: Option<String>,
) -> Result<Bootstrap, AuthError> {
    let email = crm_kit::validate::normalize_email(admin_email);
    if !crm_kit::validate::is_email(&email) {
        return Err(AuthError::BadSetting(format!(
            "the administrator's e-mail {admin_email:?} is not an e-mail address"
        )));
    }
    if store.has_users().await? {
        return Ok(Bootstrap { created: false, email, generated_password: None });
    }
    let (password, generated) = match admin_password.filter(|p| !p.is_empty()) {
        Some(password) => {
            let mut v = crm_kit::Violations::new();
            domain::check_new_password(&mut v, "CRM_ADMIN_PASSWORD", &password);
            if let Some((field, why)) = v.iter().next() {
                return Err(AuthError::BadSetting(format!("{field} {why}")));
            }
            (password, false)
        }
        None => (secrets::generate_password(), true),
    };
    let plan = BootstrapPlan {
        roles: starting_roles(catalog),
        department_name: HEAD_OFFICE.into(),
        admin_email: email.clone(),
        admin_display_name: "Administrator".into(),
        admin_password_hash: secrets::hash_password_async(&password).await?,
        admin_role: ADMINISTRATOR.into(),
    };
    let created = store.bootstrap(&plan).await?;
    Ok(Bootstrap { created, email, generated_password: (created && generated).then_some(password) })
}

/// Makes sure the suite's service account exists with `credentials`, holding the role
/// [`SUITE_SERVICES`]: every permission the catalog gives services, scope ALL. Safe when several
/// replicas start at once.
pub async fn ensure_suite_account(
    store: &Store,
    catalog: &Catalog,
    credentials: &ServiceCredentials,
) -> Result<SuiteAccount, AuthError> {
    let plan = SuiteAccountPlan {
        role_name: SUITE_SERVICES.into(),
        permissions: catalog.for_services(),
        account_name: SUITE_SERVICES.into(),
        client_id: credentials.client_id().to_string(),
        secret_hash: secrets::token_hash(credentials.secret()),
    };
    Ok(store.ensure_suite_account(&plan).await?)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn starting_roles_are_valid() {
        let catalog = crate::suite_catalog_for_tests();
        for mut role in starting_roles(&catalog) {
            let before = role.clone();
            let mut v = crm_kit::Violations::new();
            domain::normalize_role(&mut role, &catalog, &mut v);
            assert!(v.is_empty(), "{}", before.name);
            assert_eq!(role, before, "already normalised");
        }
    }

    #[test]
    fn debug_hides_the_password() {
        let b = Bootstrap { created: true, email: "a@b.c".into(), generated_password: Some("hunter2hunter2".into()) };
        assert!(!format!("{b:?}").contains("hunter2"));
    }
}
