//! The rules of the organisation in plain Rust, without I/O: e-mail normalisation, what makes a
//! department, user, role or service account valid, field masks, permissions and data scopes,
//! and the names of security events.

pub mod secrets;

use crm_kit::Violations;
use crm_kit::auth::Catalog;
use crm_kit::mask::Mask;
use crm_proto::auth::v1::{DataScope, Department, Role, ServiceAccount, User};

pub const MAX_NAME_CHARS: usize = 200;
pub const MAX_EMAIL_CHARS: usize = 254;
pub const MAX_PHONE_CHARS: usize = 50;
pub const MAX_ROLES: usize = 100;

/// The one answer to a failed sign-in, whatever the reason: it never tells whether an e-mail
/// is registered.
pub const BAD_CREDENTIALS: &str = "the e-mail or password is incorrect, or the account is locked or deactivated";
/// The one answer to a refresh token that cannot be exchanged, whatever the reason.
pub const BAD_REFRESH_TOKEN: &str = "the refresh token is invalid, expired or revoked; sign in again";
/// The one answer to a failed service-token request, whatever the reason.
pub const BAD_CLIENT_CREDENTIALS: &str = "the client id or client secret is incorrect";

/// Security event types (SPEC A6).
pub mod events {
    pub const SIGN_IN: &str = "sign_in";
    pub const SIGN_IN_FAILED: &str = "sign_in_failed";
    pub const LOCKED_OUT: &str = "locked_out";
    pub const REFRESH_REUSE: &str = "refresh_reuse";
    pub const SIGN_OUT: &str = "sign_out";
    pub const SERVICE_TOKEN_ISSUED: &str = "service_token_issued";
    pub const SERVICE_TOKEN_FAILED: &str = "service_token_failed";
    pub const KEY_ROTATED: &str = "key_rotated";
    pub const PASSWORD_CHANGED: &str = "password_changed";
    pub const PASSWORD_CHANGE_FAILED: &str = "password_change_failed";
    pub const USER_CREATED: &str = "user_created";
    pub const USER_CHANGED: &str = "user_changed";
    pub const USER_ROLES_CHANGED: &str = "user_roles_changed";
    pub const USER_DEPARTMENT_CHANGED: &str = "user_department_changed";
    pub const USER_DEACTIVATED: &str = "user_deactivated";
    pub const USER_REACTIVATED: &str = "user_reactivated";
    pub const ROLE_CREATED: &str = "role_created";
    pub const ROLE_CHANGED: &str = "role_changed";
    pub const ROLE_DELETED: &str = "role_deleted";
    pub const DEPARTMENT_CREATED: &str = "department_created";
    pub const DEPARTMENT_CHANGED: &str = "department_changed";
    pub const DEPARTMENT_MOVED: &str = "department_moved";
    pub const DEPARTMENT_DELETED: &str = "department_deleted";
    pub const SERVICE_ACCOUNT_CREATED: &str = "service_account_created";
    pub const SERVICE_ACCOUNT_DELETED: &str = "service_account_deleted";
    pub const SERVICE_ACCOUNT_SECRET_CHANGED: &str = "service_account_secret_changed";
    pub const ORGANISATION_BOOTSTRAPPED: &str = "organisation_bootstrapped";
}

/// How wide a scope is: OWN < DEPARTMENT < DEPARTMENT_TREE < ALL; 0 for anything else.
fn scope_rank(scope: i32) -> i32 {
    match DataScope::try_from(scope) {
        Ok(DataScope::Own) => 1,
        Ok(DataScope::Department) => 2,
        Ok(DataScope::DepartmentTree) => 3,
        Ok(DataScope::All) => 4,
        _ => 0,
    }
}

/// The widest of the scopes of someone's roles; OWN without roles.
pub fn effective_scope(scopes: impl IntoIterator<Item = i32>) -> DataScope {
    scopes
        .into_iter()
        .filter(|s| scope_rank(*s) > 0)
        .max_by_key(|s| scope_rank(*s))
        .and_then(|s| DataScope::try_from(s).ok())
        .unwrap_or(DataScope::Own)
}

fn name(v: &mut Violations, field: &str, value: &mut String) {
    *value = value.trim().to_string();
    v.required(field, value);
    v.max_chars(field, value, MAX_NAME_CHARS);
}

/// Trims and validates a department (its own fields; references are checked by the store).
pub fn normalize_department(d: &mut Department, v: &mut Violations) {
    name(v, "department.name", &mut d.name);
    d.parent_id = d.parent_id.trim().to_string();
    v.optional_uuid("department.parent_id", &d.parent_id);
    if !d.parent_id.is_empty() && d.parent_id == d.id {
        v.add("department.parent_id", "cannot be the department itself");
    }
    d.head_id = d.head_id.trim().to_string();
    v.optional_uuid("department.head_id", &d.head_id);
}

/// Normalises and validates a user's own fields; role ids come out sorted, each once.
pub fn normalize_user(u: &mut User, v: &mut Violations) {
    u.email = crm_kit::validate::normalize_email(&u.email);
    if u.email.is_empty() {
        v.add("user.email", "is required");
    } else if !crm_kit::validate::is_email(&u.email) {
        v.add("user.email", "is not an e-mail address");
    }
    name(v, "user.display_name", &mut u.display_name);
    u.phone = u.phone.trim().to_string();
    v.max_chars("user.phone", &u.phone, MAX_PHONE_CHARS);
    u.department_id = u.department_id.trim().to_string();
    v.optional_uuid("user.department_id", &u.department_id);
    u.supervisor_id = u.supervisor_id.trim().to_string();
    v.optional_uuid("user.supervisor_id", &u.supervisor_id);
    if !u.supervisor_id.is_empty() && u.supervisor_id == u.id {
        v.add("user.supervisor_id", "cannot be the user themselves");
    }
    role_ids(v, "user.role_ids", &mut u.role_ids);
}

fn role_ids(v: &mut Violations, field: &str, ids: &mut Vec<String>) {
    v.max_items(field, ids, MAX_ROLES);
    for (i, id) in ids.iter_mut().enumerate() {
        *id = id.trim().to_string();
        v.uuid(&format!("{field}[{i}]"), id);
    }
    ids.sort();
    ids.dedup();
}

/// Validates a role: a name, permissions of the suite's `catalog` (kept each once, in catalog
/// order) and a data scope.
pub fn normalize_role(r: &mut Role, catalog: &Catalog, v: &mut Violations) {
    name(v, "role.name", &mut r.name);
    for (i, permission) in r.permissions.iter().enumerate() {
        if !catalog.contains(permission.trim()) {
            v.add(
                format!("role.permissions[{i}]"),
                format!("unknown permission; one of: {}", catalog.names().join(", ")),
            );
        }
    }
    let held: Vec<String> = r.permissions.iter().map(|p| p.trim().to_string()).collect();
    r.permissions = catalog.union([&held]);
    if scope_rank(r.data_scope) == 0 {
        v.add(
            "role.data_scope",
            "is required: DATA_SCOPE_OWN, DATA_SCOPE_DEPARTMENT, DATA_SCOPE_DEPARTMENT_TREE or DATA_SCOPE_ALL",
        );
    }
}

/// Validates a new service account.
pub fn normalize_service_account(s: &mut ServiceAccount, v: &mut Violations) {
    name(v, "service_account.name", &mut s.name);
    role_ids(v, "service_account.role_ids", &mut s.role_ids);
}

/// Validates a new password.
pub fn check_new_password(v: &mut Violations, field: &str, password: &str) {
    let chars = password.chars().count();
    if chars < secrets::MIN_PASSWORD_CHARS {
        v.add(field, format!("must be at least {} characters", secrets::MIN_PASSWORD_CHARS));
    } else if chars > secrets::MAX_PASSWORD_CHARS {
        v.add(field, format!("must be at most {} characters", secrets::MAX_PASSWORD_CHARS));
    }
}

/// The updatable fields of each record.
pub const DEPARTMENT_MASK: Mask<Department> = crm_kit::mask!(Department { name, parent_id, head_id });
pub const USER_MASK: Mask<User> =
    crm_kit::mask!(User { email, display_name, phone, department_id, supervisor_id, role_ids, active });
pub const ROLE_MASK: Mask<Role> = crm_kit::mask!(Role { name, permissions, data_scope });

/// A scope's name without its prefix ("DEPARTMENT_TREE"), for audit details.
pub fn scope_name(scope: i32) -> &'static str {
    match DataScope::try_from(scope) {
        Ok(s) => s.as_str_name().trim_start_matches("DATA_SCOPE_"),
        Err(_) => "UNKNOWN",
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_widest_scope_wins() {
        use DataScope::*;
        assert_eq!(effective_scope([]), Own);
        assert_eq!(effective_scope([Own as i32, DepartmentTree as i32, Department as i32]), DepartmentTree);
        assert_eq!(effective_scope([All as i32, Own as i32]), All);
        assert_eq!(effective_scope([0, 99]), Own);
        assert_eq!(scope_name(DepartmentTree as i32), "DEPARTMENT_TREE");
    }

    fn catalog() -> Catalog {
        use crm_kit::auth::{Grant, Permission};
        let p = |name, grant| Permission { name, about: "", grant, for_services: true };
        Catalog::new([
            p("contacts.read", Grant::Everyone),
            p("contacts.write", Grant::Everyone),
            p("org.read", Grant::Managers),
            p("org.admin", Grant::Administrators),
        ])
    }

    #[test]
    fn permissions_are_validated_and_united() {
        let mut role = Role {
            name: "  Sales ".into(),
            permissions: vec!["contacts.write".into(), "contacts.read".into(), "contacts.write".into()],
            data_scope: DataScope::Own as i32,
            ..Default::default()
        };
        let mut v = Violations::new();
        normalize_role(&mut role, &catalog(), &mut v);
        assert!(v.is_empty());
        assert_eq!(role.name, "Sales");
        assert_eq!(role.permissions, ["contacts.read", "contacts.write"]);

        let mut bad = Role { permissions: vec!["contacts.read".into(), "root".into()], ..Default::default() };
        let mut v = Violations::new();
        normalize_role(&mut bad, &catalog(), &mut v);
        let fields: Vec<&str> = v.iter().map(|(f, _)| f.as_str()).collect();
        assert_eq!(fields, ["role.name", "role.permissions[1]", "role.data_scope"]);

        let a = vec!["org.admin".to_string(), "contacts.read".to_string()];
        let b = vec!["contacts.read".to_string(), "org.read".to_string()];
        assert_eq!(catalog().union([&a, &b]), ["contacts.read", "org.read", "org.admin"]);
    }

    #[test]
    fn users_are_normalised() {
        let mut user = User {
            id: crm_kit::id::new(),
            email: " Boss@Example.com".into(),
            display_name: " Boss ".into(),
            role_ids: vec![crm_kit::id::new()],
            ..Default::default()
        };
        user.supervisor_id = user.id.clone();
        let mut v = Violations::new();
        normalize_user(&mut user, &mut v);
        assert_eq!(user.email, "boss@example.com");
        assert_eq!(user.display_name, "Boss");
        let fields: Vec<&str> = v.iter().map(|(f, _)| f.as_str()).collect();
        assert_eq!(fields, ["user.supervisor_id"]);

        let mut bad = User { email: "nope".into(), role_ids: vec!["x".into()], ..Default::default() };
        let mut v = Violations::new();
        normalize_user(&mut bad, &mut v);
        let fields: Vec<&str> = v.iter().map(|(f, _)| f.as_str()).collect();
        assert_eq!(fields, ["user.email", "user.display_name", "user.role_ids[0]"]);
    }

    #[test]
    fn masks_copy_named_fields_only() {
        let mut target = User { display_name: "Old".into(), phone: "1".into(), ..Default::default() };
        let patch = User { display_name: "New".into(), phone: "2".into(), active: true, ..Default::default() };
        let mut v = Violations::new();
        USER_MASK.apply(&mut target, &patch, &["display_name".into(), "active".into()], &mut v);
        assert!(v.is_empty());
        assert_eq!((target.display_name.as_str(), target.phone.as_str(), target.active), ("New", "1", true));
        USER_MASK.apply(&mut target, &patch, &["id".into(), "password".into()], &mut v);
        assert_eq!(v.iter().count(), 2);
        let mut v = Violations::new();
        ROLE_MASK.apply(&mut Role::default(), &Role::default(), &[], &mut v);
        assert!(!v.is_empty());
        let mut d = Department::default();
        let mut v = Violations::new();
        DEPARTMENT_MASK.apply(&mut d, &Department { name: "X".into(), ..Default::default() }, &["*".into()], &mut v);
        assert!(v.is_empty());
        assert_eq!(d.name, "X");
    }

    #[test]
    fn passwords_have_bounds() {
        let mut v = Violations::new();
        check_new_password(&mut v, "password", "short");
        check_new_password(&mut v, "password", &"x".repeat(1025));
        check_new_password(&mut v, "password", "long enough!");
        assert_eq!(v.iter().count(), 2);
    }
}
