//! Permissions: declared by the service whose calls check them (each role lists its own in its
//! [`RoleSpec`](crate::role::RoleSpec)), gathered into the suite's [`Catalog`], which the auth
//! service offers to roles.

use std::collections::BTreeSet;
use std::sync::Arc;

/// Who holds a permission in the organisation a fresh auth database starts with.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Grant {
    /// Every starting role, the salesperson's included.
    Everyone,
    /// The starting roles that oversee others (executive, head of department) and the
    /// administrator.
    Managers,
    /// The administrator only.
    Administrators,
}

/// A permission a role can carry: `<service>.<verb>`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Permission {
    pub name: &'static str,
    /// What it allows, for people assigning roles.
    pub about: &'static str,
    /// Who holds it at first start.
    pub grant: Grant,
    /// Whether the suite's own service account holds it (for background work across services).
    pub for_services: bool,
}

/// Every permission of the suite, in a stable order: grouped by service (the part of the name
/// before the dot), services alphabetically, each service's in the order it declares them.
#[derive(Debug, Clone)]
pub struct Catalog(Arc<[Permission]>);

impl Catalog {
    /// The permissions, each name once (the first declaration wins).
    pub fn new(permissions: impl IntoIterator<Item = Permission>) -> Catalog {
        let mut seen = BTreeSet::new();
        let mut all: Vec<Permission> = permissions.into_iter().filter(|p| seen.insert(p.name)).collect();
        all.sort_by_key(|p| p.name.split_once('.').map_or(p.name, |(service, _)| service));
        Catalog(all.into())
    }

    pub fn all(&self) -> &[Permission] {
        &self.0
    }

    pub fn names(&self) -> Vec<&'static str> {
        self.0.iter().map(|p| p.name).collect()
    }

    pub fn contains(&self, name: &str) -> bool {
        self.0.iter().any(|p| p.name == name)
    }

    /// Every permission held in any of `lists`, each once, in catalog order; names the catalog
    /// does not know are left out.
    pub fn union<'a>(&self, lists: impl IntoIterator<Item = &'a Vec<String>>) -> Vec<String> {
        let held: BTreeSet<&str> = lists.into_iter().flatten().map(String::as_str).collect();
        self.0.iter().filter(|p| held.contains(p.name)).map(|p| p.name.to_string()).collect()
    }

    /// What a starting role at `level` holds: every permission granted to that level or to a
    /// wider one ([`Grant::Administrators`] holds them all).
    pub fn granted(&self, level: Grant) -> Vec<String> {
        let holds = |grant: Grant| match level {
            Grant::Administrators => true,
            Grant::Managers => grant != Grant::Administrators,
            Grant::Everyone => grant == Grant::Everyone,
        };
        self.0.iter().filter(|p| holds(p.grant)).map(|p| p.name.to_string()).collect()
    }

    /// What the suite's own service account holds.
    pub fn for_services(&self) -> Vec<String> {
        self.0.iter().filter(|p| p.for_services).map(|p| p.name.to_string()).collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const READ: Permission = Permission { name: "x.read", about: "", grant: Grant::Everyone, for_services: true };
    const AUDIT: Permission = Permission { name: "x.audit", about: "", grant: Grant::Managers, for_services: true };
    const ADMIN: Permission =
        Permission { name: "x.admin", about: "", grant: Grant::Administrators, for_services: false };

    #[test]
    fn permissions_are_grouped_by_service() {
        let other = Permission { name: "a.write", about: "", grant: Grant::Everyone, for_services: true };
        let catalog = Catalog::new([READ, ADMIN, other]);
        assert_eq!(catalog.names(), ["a.write", "x.read", "x.admin"]);
    }

    #[test]
    fn grants_follow_levels() {
        let catalog = Catalog::new([READ, AUDIT, ADMIN, READ]);
        assert_eq!(catalog.names(), ["x.read", "x.audit", "x.admin"]);
        assert_eq!(catalog.granted(Grant::Everyone), ["x.read"]);
        assert_eq!(catalog.granted(Grant::Managers), ["x.read", "x.audit"]);
        assert_eq!(catalog.granted(Grant::Administrators), ["x.read", "x.audit", "x.admin"]);
        assert_eq!(catalog.for_services(), ["x.read", "x.audit"]);
        let a = vec!["x.admin".to_string(), "nope".to_string()];
        let b = vec!["x.read".to_string(), "x.admin".to_string()];
        assert_eq!(catalog.union([&a, &b]), ["x.read", "x.admin"]);
        assert!(catalog.contains("x.audit") && !catalog.contains("nope"));
    }
}
