//! The gRPC surface: decode and validate each request into typed values (a list's filter,
//! order, page and search terms are decoded once, here), apply the domain rules, call the store,
//! map the result back to protobuf. Errors become statuses in `crm_kit::error`.

use std::sync::Arc;

use crm_kit::auth::{OwnerScope, Principal, ScopeCache, UserDirectory};
use crm_kit::db::idempotency::MAX_REQUEST_ID_CHARS;
use crm_kit::page::Page;
use crm_kit::{ApiError, Violations, respond};
use crm_proto::contacts::v1::contacts_service_server::ContactsService;
use crm_proto::contacts::v1::*;
use tonic::{Request, Response, Status};

use crate::domain::{self, Key, Kind, Record, Rules};
use crate::permissions::{READ, WRITE};
use crate::store::{self, ListQuery, ListRequest, Store};

/// Most customers one BatchGetCustomers call may ask for.
pub const MAX_BATCH: usize = 500;

/// Every call runs as the signed-in caller (`crm_kit::auth::Principal`, put there by the
/// server's authentication layer): reads need `contacts.read`, changes `contacts.write`, and the
/// store sees only the owners the caller's data scope allows (resolved by the auth service,
/// cached by [`ScopeCache`]). A record's owner must be an active user ([`UserDirectory`]).
#[derive(Clone)]
pub struct ContactsApi {
    store: Store,
    rules: Rules,
    scopes: ScopeCache,
    users: Arc<dyn UserDirectory>,
}

impl std::fmt::Debug for ContactsApi {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ContactsApi").field("rules", &self.rules).field("scopes", &self.scopes).finish_non_exhaustive()
    }
}

/// The caller of a call, and whose records they may see.
struct Caller {
    principal: Principal,
    scope: OwnerScope,
}

/// A list request's parts as they came, from `ListCompaniesRequest` or `ListPeopleRequest`.
macro_rules! list_request {
    ($r:expr) => {
        ListRequest {
            page_size: $r.page_size,
            page_token: $r.page_token,
            filter: $r.filter,
            order_by: $r.order_by,
            query: $r.query,
        }
    };
}

impl ContactsApi {
    pub fn new(store: Store, rules: Rules, scopes: ScopeCache, users: Arc<dyn UserDirectory>) -> Self {
        ContactsApi { store, rules, scopes, users }
    }

    async fn caller<T>(&self, request: &Request<T>, permission: &str) -> Result<Caller, ApiError> {
        let principal = crm_kit::auth::principal(request)?;
        principal.require(permission)?;
        let scope = self.scopes.resolve(&principal).await?;
        Ok(Caller { principal, scope })
    }

    /// An owner the caller may give a record to: a user in their scope, and an active one.
    async fn check_owner(&self, caller: &Caller, field: &str, owner_id: &str) -> Result<(), ApiError> {
        crm_kit::auth::check_owner(&*self.users, &caller.principal, &caller.scope, field, owner_id, "records").await
    }

    async fn create<R: Record>(&self, caller: Caller, record: Option<R>, request_id: &str) -> Result<R, ApiError> {
        let mut v = Violations::new();
        let Some(mut record) = record else {
            return Err(ApiError::invalid(R::FIELD, "is required"));
        };
        v.max_chars("request_id", request_id, MAX_REQUEST_ID_CHARS);
        record.clear_meta();
        record.normalize(&self.rules, &mut v);
        v.check()?;
        if record.owner_id().is_empty() {
            record.set_owner_id(caller.principal.subject.clone());
        }
        self.check_owner(&caller, &format!("{}.owner_id", R::FIELD), record.owner_id()).await?;
        self.store.create(record, request_id.trim(), &caller.principal.subject, &caller.scope).await
    }

    async fn get<R: Record>(&self, caller: Caller, id: &str) -> Result<R, ApiError> {
        let mut v = Violations::new();
        v.uuid("id", id);
        v.check()?;
        self.store.get(id, &caller.scope).await
    }

    async fn update<R: Record>(
        &self,
        caller: Caller,
        patch: Option<R>,
        mask: Option<prost_types::FieldMask>,
    ) -> Result<R, ApiError> {
        let Some(patch) = patch else {
            return Err(ApiError::invalid(R::FIELD, "is required"));
        };
        let mut v = Violations::new();
        v.uuid(&format!("{}.id", R::FIELD), patch.id());
        let paths = mask.map(|m| m.paths).unwrap_or_default();
        v.check()?;
        let id = patch.id().to_string();
        let owner_field = format!("{}.owner_id", R::FIELD);
        // A new owner is checked with the auth service before the record is locked; the change
        // below refuses any other new owner (one that appeared meanwhile).
        let new_owner = patch.owner_id().trim().to_string();
        let sets_owner = paths.iter().any(|p| p == "owner_id" || p == "*");
        let mut checked_owner = None;
        if sets_owner && !new_owner.is_empty() && uuid::Uuid::parse_str(&new_owner).is_ok() {
            let current: R = self.store.get(&id, &caller.scope).await?;
            if current.owner_id() != new_owner {
                self.check_owner(&caller, &owner_field, &new_owner).await?;
                checked_owner = Some(new_owner);
            }
        }
        let rules = self.rules.clone();
        let etag = patch.etag().to_string();
        let scope = caller.scope.clone();
        self.store
            .update(&id, &etag, &caller.principal.subject, &caller.scope, |record: &mut R| {
                let before = record.owner_id().to_string();
                let mut v = Violations::new();
                R::MASK.apply(record, &patch, &paths, &mut v);
                v.check()?;
                let mut v = Violations::new();
                record.normalize(&rules, &mut v);
                v.check()?;
                if record.owner_id().is_empty() {
                    return Err(ApiError::invalid(owner_field, "is required"));
                }
                if !scope.allows(record.owner_id()) {
                    return Err(ApiError::PermissionDenied(format!(
                        "{owner_field}: {} is outside your data scope; records can go only to users you may see",
                        record.owner_id()
                    )));
                }
                if record.owner_id() != before && checked_owner.as_deref() != Some(record.owner_id()) {
                    return Err(ApiError::Aborted(format!(
                        "{} {id} changed owner concurrently; read it again and retry",
                        R::KIND.noun()
                    )));
                }
                Ok(())
            })
            .await
    }

    async fn delete<R: Record>(&self, caller: Caller, id: &str, etag: &str) -> Result<(), ApiError> {
        let mut v = Violations::new();
        v.uuid("id", id);
        v.check()?;
        self.store.delete::<R>(id, etag, &caller.principal.subject, &caller.scope).await
    }

    async fn list<R: Record>(&self, caller: Caller, r: ListRequest) -> Result<(Vec<R>, String), ApiError> {
        let query = ListQuery::parse(R::KIND, &r, &self.rules, caller.scope)?;
        self.store.list(&query).await
    }
}

#[tonic::async_trait]
impl ContactsService for ContactsApi {
    async fn create_company(&self, request: Request<CreateCompanyRequest>) -> Result<Response<Company>, Status> {
        let caller = self.caller(&request, WRITE.name).await?;
        let r = request.into_inner();
        respond(self.create(caller, r.company, &r.request_id).await)
    }

    async fn get_company(&self, request: Request<GetCompanyRequest>) -> Result<Response<Company>, Status> {
        let caller = self.caller(&request, READ.name).await?;
        respond(self.get(caller, &request.into_inner().id).await)
    }

    async fn update_company(&self, request: Request<UpdateCompanyRequest>) -> Result<Response<Company>, Status> {
        let caller = self.caller(&request, WRITE.name).await?;
        let r = request.into_inner();
        respond(self.update(caller, r.company, r.update_mask).await)
    }

    async fn delete_company(&self, request: Request<DeleteCompanyRequest>) -> Result<Response<()>, Status> {
        let caller = self.caller(&request, WRITE.name).await?;
        let r = request.into_inner();
        respond(self.delete::<Company>(caller, &r.id, &r.etag).await)
    }

    async fn list_companies(
        &self,
        request: Request<ListCompaniesRequest>,
    ) -> Result<Response<ListCompaniesResponse>, Status> {
        let caller = self.caller(&request, READ.name).await?;
        let r = request.into_inner();
        respond(
            self.list(caller, list_request!(r))
                .await
                .map(|(companies, next_page_token)| ListCompaniesResponse { companies, next_page_token }),
        )
    }

    async fn create_person(&self, request: Request<CreatePersonRequest>) -> Result<Response<Person>, Status> {
        let caller = self.caller(&request, WRITE.name).await?;
        let r = request.into_inner();
        respond(self.create(caller, r.person, &r.request_id).await)
    }

    async fn get_person(&self, request: Request<GetPersonRequest>) -> Result<Response<Person>, Status> {
        let caller = self.caller(&request, READ.name).await?;
        respond(self.get(caller, &request.into_inner().id).await)
    }

    async fn update_person(&self, request: Request<UpdatePersonRequest>) -> Result<Response<Person>, Status> {
        let caller = self.caller(&request, WRITE.name).await?;
        let r = request.into_inner();
        respond(self.update(caller, r.person, r.update_mask).await)
    }

    async fn delete_person(&self, request: Request<DeletePersonRequest>) -> Result<Response<()>, Status> {
        let caller = self.caller(&request, WRITE.name).await?;
        let r = request.into_inner();
        respond(self.delete::<Person>(caller, &r.id, &r.etag).await)
    }

    async fn list_people(&self, request: Request<ListPeopleRequest>) -> Result<Response<ListPeopleResponse>, Status> {
        let caller = self.caller(&request, READ.name).await?;
        let r = request.into_inner();
        respond(
            self.list(caller, list_request!(r))
                .await
                .map(|(people, next_page_token)| ListPeopleResponse { people, next_page_token }),
        )
    }

    async fn batch_get_customers(
        &self,
        request: Request<BatchGetCustomersRequest>,
    ) -> Result<Response<BatchGetCustomersResponse>, Status> {
        let caller = self.caller(&request, READ.name).await?;
        let r = request.into_inner();
        let result = async {
            let mut v = Violations::new();
            v.max_items("customers", &r.customers, MAX_BATCH);
            let mut keys = Vec::with_capacity(r.customers.len());
            for (i, key) in r.customers.iter().enumerate() {
                let kind = Kind::from_record_type(i64::from(key.record_type));
                if kind.is_none() {
                    v.add(format!("customers[{i}].record_type"), "must be RECORD_TYPE_COMPANY or RECORD_TYPE_PERSON");
                }
                v.uuid(&format!("customers[{i}].id"), &key.id);
                if let Some(kind) = kind
                    && !keys.contains(&(kind, key.id.clone()))
                {
                    keys.push((kind, key.id.clone()));
                }
            }
            v.check()?;
            let found = self.store.summaries(&keys, &caller.scope).await?;
            let customers = found
                .into_iter()
                .map(|s| CustomerSummary {
                    record_type: s.kind.record_type() as i32,
                    id: s.id,
                    display_name: s.display_name,
                    owner_id: s.owner_id,
                    do_not_contact: s.do_not_contact,
                    last_activity_time: crm_kit::time::to_timestamp(s.last_activity_at),
                    last_activity_summary: s.last_activity_summary,
                    source: s.source,
                })
                .collect();
            Ok(BatchGetCustomersResponse { customers })
        };
        respond(result.await)
    }

    async fn check_duplicates(
        &self,
        request: Request<CheckDuplicatesRequest>,
    ) -> Result<Response<CheckDuplicatesResponse>, Status> {
        let caller = self.caller(&request, READ.name).await?;
        let r = request.into_inner();
        respond(self.check_duplicates(r, &caller.scope).await)
    }

    async fn list_revisions(
        &self,
        request: Request<ListRevisionsRequest>,
    ) -> Result<Response<ListRevisionsResponse>, Status> {
        let caller = self.caller(&request, READ.name).await?;
        let r = request.into_inner();
        let result = async {
            let mut v = Violations::new();
            v.uuid("record_id", &r.record_id);
            v.check()?;
            let order = store::revision_order();
            let page = Page::decode(&["revisions", &r.record_id], r.page_size, &r.page_token, &order)?;
            let (revisions, next_page_token) = self.store.revisions(&r.record_id, &page, &caller.scope).await?;
            Ok(ListRevisionsResponse { revisions, next_page_token })
        };
        respond(result.await)
    }
}

impl ContactsApi {
    /// Every record holding one of the values; the name only of those the caller may see.
    async fn check_duplicates(
        &self,
        r: CheckDuplicatesRequest,
        scope: &OwnerScope,
    ) -> Result<CheckDuplicatesResponse, ApiError> {
        let mut v = Violations::new();
        let kind = Kind::from_record_type(i64::from(r.record_type));
        if kind.is_none() {
            v.add("record_type", "must be RECORD_TYPE_COMPANY or RECORD_TYPE_PERSON");
        }
        v.max_items("phones", &r.phones, domain::MAX_LIST);
        v.max_items("emails", &r.emails, domain::MAX_LIST);
        let mut keys = Vec::new();
        for (i, phone) in r.phones.iter().enumerate() {
            match domain::normalize::phone_e164(phone, &self.rules.default_calling_code) {
                Ok(e164) => keys.push(Key { field: "phone", value: e164 }),
                Err(e) => v.add(format!("phones[{i}]"), e.describe()),
            }
        }
        for (i, email) in r.emails.iter().enumerate() {
            match crm_kit::validate::email(email) {
                Some(address) => keys.push(Key { field: "email", value: address }),
                None => v.add(format!("emails[{i}]"), "is not an e-mail address"),
            }
        }
        if !r.company_name.trim().is_empty() {
            if kind == Some(Kind::Person) {
                v.add("company_name", "applies to companies only");
            }
            keys.push(Key { field: "name", value: domain::normalize::company_name(&r.company_name) });
        }
        v.check()?;
        let kind = kind.expect("checked above");
        let matches = self
            .store
            .find_duplicates(kind, &keys)
            .await?
            .into_iter()
            .map(|d| DuplicateMatch {
                field: d.field,
                value: d.value,
                record_type: d.kind.record_type() as i32,
                record_id: d.record_id,
                display_name: if scope.allows(&d.owner_id) { d.display_name } else { String::new() },
                owner_id: d.owner_id,
            })
            .collect();
        Ok(CheckDuplicatesResponse { matches })
    }
}
