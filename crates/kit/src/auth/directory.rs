//! Who the organisation's users are, as another service needs to know them: whether an id
//! names an active user (an owner a record may be given to). Asked of the auth service with
//! the suite's own service account, since the caller need not be allowed to read the
//! organisation.

use std::collections::HashMap;

use crm_proto::auth::v1::org_service_client::OrgServiceClient;
use crm_proto::auth::v1::{
    BatchGetUsersRequest, GetDepartmentRequest, GetUserRequest, ListDepartmentMembersRequest, User,
};
use futures_util::future::BoxFuture;

use super::{OwnerScope, Principal};
use crate::error::ApiError;
use crate::peer::Peer;

/// What the organisation says about a user id.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum UserStatus {
    Active,
    Deactivated,
    /// No user has this id.
    Unknown,
}

/// Where a service looks users up.
pub trait UserDirectory: Send + Sync + 'static {
    fn status<'a>(&'a self, user_id: &'a str) -> BoxFuture<'a, Result<UserStatus, ApiError>>;

    /// The status of each of `user_ids`, in their order, asked at once.
    fn statuses<'a>(&'a self, user_ids: &'a [String]) -> BoxFuture<'a, Result<Vec<UserStatus>, ApiError>>;

    /// The users of the department `department_id` and of every department below it, active or
    /// not: whom a department's figures are about. INVALID_ARGUMENT on `department_id` when no
    /// department has this id.
    fn department_members<'a>(&'a self, department_id: &'a str) -> BoxFuture<'a, Result<Vec<String>, ApiError>>;

    /// The display names of those of `user_ids` that exist, by id.
    fn names<'a>(&'a self, user_ids: &'a [String]) -> BoxFuture<'a, Result<HashMap<String, String>, ApiError>>;
}

/// INVALID_ARGUMENT on `field` unless `user_id` names an active user: someone `what` ("tasks",
/// "records") may go to. The caller's own id needs no lookup: their token vouches for them.
pub async fn require_active(
    users: &dyn UserDirectory,
    caller: &Principal,
    field: &str,
    user_id: &str,
    what: &str,
) -> Result<(), ApiError> {
    if user_id == caller.subject {
        return Ok(());
    }
    match users.status(user_id).await? {
        UserStatus::Active => Ok(()),
        UserStatus::Deactivated => {
            Err(ApiError::invalid(field, format!("is a deactivated user; {what} go only to active users")))
        }
        UserStatus::Unknown => Err(ApiError::invalid(field, "no user has this id")),
    }
}

/// An owner the caller may give `what` ("records", "deals") to: a user in the caller's data
/// `scope` (PERMISSION_DENIED otherwise), and an active one ([`require_active`]).
pub async fn check_owner(
    users: &dyn UserDirectory,
    caller: &Principal,
    scope: &OwnerScope,
    field: &str,
    owner_id: &str,
    what: &str,
) -> Result<(), ApiError> {
    if !scope.allows(owner_id) {
        return Err(ApiError::PermissionDenied(format!(
            "{field}: {owner_id} is outside your data scope; {what} can go only to users you may see"
        )));
    }
    require_active(users, caller, field, owner_id, what).await
}

/// The auth service's `GetUser`, called as the suite's service account.
pub struct RemoteDirectory {
    auth: Peer,
}

impl RemoteDirectory {
    pub fn new(auth: Peer) -> RemoteDirectory {
        RemoteDirectory { auth }
    }

    /// The user `user_id` as the organisation has them now (e-mail, phone, supervisor…);
    /// `None` when no user has this id.
    pub async fn user(&self, user_id: &str) -> Result<Option<User>, ApiError> {
        let mut client = OrgServiceClient::new(self.auth.as_service().await?);
        match client.get_user(GetUserRequest { id: user_id.to_string() }).await {
            Ok(user) => Ok(Some(user.into_inner())),
            Err(status) => match status.code() {
                tonic::Code::NotFound | tonic::Code::InvalidArgument => Ok(None),
                tonic::Code::PermissionDenied => Err(ApiError::Internal(format!(
                    "the suite's service account may not read users (it needs org.read): {}",
                    status.message()
                ))),
                code => Err(ApiError::Unavailable(format!("auth service GetUser: {} ({code:?})", status.message()))),
            },
        }
    }
}

/// Most users one `BatchGetUsers` names.
const MAX_BATCH: usize = 500;

impl RemoteDirectory {
    /// The users of `user_ids` that exist, in one call (`BatchGetUsers`, at most 500 ids).
    pub async fn users(&self, user_ids: &[String]) -> Result<Vec<User>, ApiError> {
        if user_ids.is_empty() {
            return Ok(Vec::new());
        }
        let mut client = OrgServiceClient::new(self.auth.as_service().await?);
        match client.batch_get_users(BatchGetUsersRequest { ids: user_ids.to_vec() }).await {
            Ok(found) => Ok(found.into_inner().users),
            Err(status) => match status.code() {
                tonic::Code::PermissionDenied => Err(ApiError::Internal(format!(
                    "the suite's service account may not read users (it needs org.read): {}",
                    status.message()
                ))),
                tonic::Code::InvalidArgument => {
                    Err(ApiError::Internal(format!("auth BatchGetUsers: {}", status.message())))
                }
                code => {
                    Err(ApiError::Unavailable(format!("auth service BatchGetUsers: {} ({code:?})", status.message())))
                }
            },
        }
    }
}

impl RemoteDirectory {
    /// Whom `user_id`'s work escalates to: their supervisor; without one, the head of their
    /// department, else of the nearest department above it with a head (never the user).
    /// Empty when there is nobody.
    pub async fn escalation_of(&self, user_id: &str) -> Result<String, ApiError> {
        let Some(user) = self.user(user_id).await? else { return Ok(String::new()) };
        if !user.supervisor_id.is_empty() {
            return Ok(user.supervisor_id);
        }
        let mut department_id = user.department_id;
        // The tree is shallow; a bound keeps a broken one from looping.
        for _ in 0..16 {
            if department_id.is_empty() {
                break;
            }
            let mut client = OrgServiceClient::new(self.auth.as_service().await?);
            let department = match client.get_department(GetDepartmentRequest { id: department_id.clone() }).await {
                Ok(d) => d.into_inner(),
                Err(status) if status.code() == tonic::Code::NotFound => break,
                Err(status) => {
                    return Err(ApiError::Unavailable(format!("auth service GetDepartment: {}", status.message())));
                }
            };
            if !department.head_id.is_empty() && department.head_id != user_id {
                return Ok(department.head_id);
            }
            department_id = department.parent_id;
        }
        Ok(String::new())
    }
}

impl UserDirectory for RemoteDirectory {
    fn statuses<'a>(&'a self, user_ids: &'a [String]) -> BoxFuture<'a, Result<Vec<UserStatus>, ApiError>> {
        Box::pin(async move {
            let found = self.users(user_ids).await?;
            Ok(user_ids
                .iter()
                .map(|id| match found.iter().find(|u| &u.id == id) {
                    Some(user) if user.active => UserStatus::Active,
                    Some(_) => UserStatus::Deactivated,
                    None => UserStatus::Unknown,
                })
                .collect())
        })
    }

    fn department_members<'a>(&'a self, department_id: &'a str) -> BoxFuture<'a, Result<Vec<String>, ApiError>> {
        Box::pin(async move {
            let mut client = OrgServiceClient::new(self.auth.as_service().await?);
            let request = ListDepartmentMembersRequest { department_id: department_id.to_string() };
            match client.list_department_members(request).await {
                Ok(members) => Ok(members.into_inner().user_ids),
                Err(status) => Err(match status.code() {
                    tonic::Code::NotFound | tonic::Code::InvalidArgument => {
                        ApiError::invalid("department_id", "no department has this id")
                    }
                    tonic::Code::PermissionDenied => ApiError::Internal(format!(
                        "the suite's service account may not read the organisation (it needs org.read): {}",
                        status.message()
                    )),
                    code => ApiError::Unavailable(format!(
                        "auth service ListDepartmentMembers: {} ({code:?})",
                        status.message()
                    )),
                }),
            }
        })
    }

    fn names<'a>(&'a self, user_ids: &'a [String]) -> BoxFuture<'a, Result<HashMap<String, String>, ApiError>> {
        Box::pin(async move {
            let mut names = HashMap::with_capacity(user_ids.len());
            for chunk in user_ids.chunks(MAX_BATCH) {
                for user in self.users(chunk).await? {
                    names.insert(user.id, user.display_name);
                }
            }
            Ok(names)
        })
    }

    fn status<'a>(&'a self, user_id: &'a str) -> BoxFuture<'a, Result<UserStatus, ApiError>> {
        Box::pin(async move {
            Ok(match self.user(user_id).await? {
                Some(user) if user.active => UserStatus::Active,
                Some(_) => UserStatus::Deactivated,
                None => UserStatus::Unknown,
            })
        })
    }
}
