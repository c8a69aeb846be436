//! Update masks (AIP-134): an Update replaces exactly the fields its `update_mask` names.
//!
//! A resource declares its updatable fields once, with [`mask!`](crate::mask!):
//!
//! ```
//! # #[derive(Default, Clone)] struct Department { name: String, parent_id: String, id: String }
//! const DEPARTMENT: crm_kit::mask::Mask<Department> = crm_kit::mask!(Department { name, parent_id });
//! let mut stored = Department { name: "Sales".into(), ..Default::default() };
//! let patch = Department { name: "Sales East".into(), id: "ignored".into(), ..Default::default() };
//! let mut v = crm_kit::Violations::new();
//! DEPARTMENT.apply(&mut stored, &patch, &["name".to_string()], &mut v);
//! assert!(v.is_empty() && stored.name == "Sales East" && stored.id.is_empty());
//! ```

use crate::validate::Violations;

/// The updatable fields of a `T` and how to copy each from a patch.
pub struct Mask<T: 'static> {
    paths: &'static [&'static str],
    copy: fn(&mut T, &T, &str) -> bool,
}

impl<T> Mask<T> {
    /// A mask over `paths`; `copy` copies the named field from the patch and answers whether it
    /// knows the name. Use [`mask!`](crate::mask!) rather than writing both by hand.
    pub const fn new(paths: &'static [&'static str], copy: fn(&mut T, &T, &str) -> bool) -> Mask<T> {
        Mask { paths, copy }
    }

    /// The field names an update mask may name.
    pub fn paths(&self) -> &'static [&'static str] {
        self.paths
    }

    /// Copies the fields named by `paths` from `patch` into `target`. An empty mask is refused;
    /// `"*"` names every updatable field; any other name is a violation of `update_mask`.
    pub fn apply(&self, target: &mut T, patch: &T, paths: &[String], v: &mut Violations) {
        if paths.is_empty() {
            v.add("update_mask", "is required; name the fields to change, or \"*\" for all");
            return;
        }
        for path in paths {
            if path == "*" {
                for p in self.paths {
                    (self.copy)(target, patch, p);
                }
            } else if !self.paths.contains(&path.as_str()) || !(self.copy)(target, patch, path) {
                v.add(
                    "update_mask",
                    format!("unknown or read-only field '{path}'; updatable: {}", self.paths.join(", ")),
                );
            }
        }
    }
}

/// A [`Mask`] over the named fields of a struct: `mask!(User { email, display_name, active })`.
#[macro_export]
macro_rules! mask {
    ($ty:ty { $($field:ident),* $(,)? }) => {
        $crate::mask::Mask::<$ty>::new(&[$(stringify!($field)),*], |target: &mut $ty, patch: &$ty, path: &str| {
            match path {
                $(stringify!($field) => target.$field = ::std::clone::Clone::clone(&patch.$field),)*
                _ => return false,
            }
            true
        })
    };
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Debug, Default, Clone, PartialEq)]
    struct User {
        id: String,
        name: String,
        phone: String,
        active: bool,
    }

    const USER: Mask<User> = crate::mask!(User { name, phone, active });

    #[test]
    fn copies_named_fields_only() {
        let mut target = User { name: "Old".into(), phone: "1".into(), ..Default::default() };
        let patch = User { id: "x".into(), name: "New".into(), phone: "2".into(), active: true };
        let mut v = Violations::new();
        USER.apply(&mut target, &patch, &["name".into(), "active".into()], &mut v);
        assert!(v.is_empty());
        assert_eq!(target, User { name: "New".into(), phone: "1".into(), active: true, ..Default::default() });
        USER.apply(&mut target, &patch, &["id".into(), "password".into()], &mut v);
        let described: Vec<String> = v.iter().map(|(f, d)| format!("{f}: {d}")).collect();
        assert_eq!(described.len(), 2);
        assert!(described[0].contains("'id'") && described[0].contains("updatable: name, phone, active"));
        let mut v = Violations::new();
        USER.apply(&mut target, &patch, &[], &mut v);
        assert!(!v.is_empty(), "an empty mask is refused");
        let mut v = Violations::new();
        USER.apply(&mut target, &patch, &["*".into()], &mut v);
        assert!(v.is_empty());
        assert_eq!(target, User { id: String::new(), ..patch });
    }
}
