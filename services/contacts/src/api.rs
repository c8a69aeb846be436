//! The gRPC surface: decode and validate each request, apply the domain rules, call the store,
//! map the result back to protobuf. Errors become statuses in `crm_kit::error`.

use crm_kit::page::page_size;
use crm_kit::{ApiError, Violations};
use crm_proto::contacts::v1::contacts_service_server::ContactsService;
use crm_proto::contacts::v1::*;
use tonic::{Request, Response, Status};

use crate::domain::{self, Key, Kind, Record, Rules};
use crate::store::{ListQuery, Store};

/// Who the revision history names for a change. Calls carry no identity until sign-in exists
/// in the suite; then this becomes the signed-in principal.
const ANONYMOUS: &str = "anonymous";
const MAX_REQUEST_ID: usize = 100;
const MAX_QUERY: usize = 200;

#[derive(Clone, Debug)]
pub struct ContactsApi {
    store: Store,
    rules: Rules,
}

impl ContactsApi {
    pub fn new(store: Store, rules: Rules) -> Self {
        ContactsApi { store, rules }
    }

    async fn create<R: Record>(&self, record: Option<R>, request_id: &str) -> Result<R, ApiError> {
        let mut v = Violations::new();
        let Some(mut record) = record else {
            return Err(ApiError::invalid(R::FIELD, "is required"));
        };
        v.max_chars("request_id", request_id, MAX_REQUEST_ID);
        record.clear_meta();
        record.normalize(&self.rules, &mut v);
        v.check()?;
        self.store.create(record, request_id.trim(), ANONYMOUS).await
    }

    async fn get<R: Record>(&self, id: &str) -> Result<R, ApiError> {
        let mut v = Violations::new();
        v.uuid("id", id);
        v.check()?;
        self.store.get(id).await
    }

    async fn update<R: Record>(&self, patch: Option<R>, mask: Option<prost_types::FieldMask>) -> Result<R, ApiError> {
        let Some(patch) = patch else {
            return Err(ApiError::invalid(R::FIELD, "is required"));
        };
        let mut v = Violations::new();
        v.uuid(&format!("{}.id", R::FIELD), patch.id());
        let paths = mask.map(|m| m.paths).unwrap_or_default();
        v.check()?;
        let rules = self.rules.clone();
        let id = patch.id().to_string();
        let etag = patch.etag().to_string();
        self.store
            .update(&id, &etag, ANONYMOUS, move |record: &mut R| {
                let mut v = Violations::new();
                domain::apply_mask(record, &patch, &paths, &mut v);
                v.check()?;
                let mut v = Violations::new();
                record.normalize(&rules, &mut v);
                v.check()
            })
            .await
    }

    async fn delete<R: Record>(&self, id: &str, etag: &str) -> Result<(), ApiError> {
        let mut v = Violations::new();
        v.uuid("id", id);
        v.check()?;
        self.store.delete::<R>(id, etag, ANONYMOUS).await
    }

    async fn list<R: Record>(
        &self,
        page_size_requested: i32,
        page_token: String,
        filter: String,
        order_by: String,
        query: String,
    ) -> Result<(Vec<R>, String), ApiError> {
        let size = page_size(page_size_requested, "page_size")?;
        if query.chars().count() > MAX_QUERY {
            return Err(ApiError::invalid("query", format!("must be at most {MAX_QUERY} characters")));
        }
        self.store.list(&ListQuery { filter, query, order_by, page_size: size, page_token }).await
    }
}

fn ok<T>(result: Result<T, ApiError>) -> Result<Response<T>, Status> {
    result.map(Response::new).map_err(Status::from)
}

#[tonic::async_trait]
impl ContactsService for ContactsApi {
    async fn create_company(&self, request: Request<CreateCompanyRequest>) -> Result<Response<Company>, Status> {
        let r = request.into_inner();
        ok(self.create(r.company, &r.request_id).await)
    }

    async fn get_company(&self, request: Request<GetCompanyRequest>) -> Result<Response<Company>, Status> {
        ok(self.get(&request.into_inner().id).await)
    }

    async fn update_company(&self, request: Request<UpdateCompanyRequest>) -> Result<Response<Company>, Status> {
        let r = request.into_inner();
        ok(self.update(r.company, r.update_mask).await)
    }

    async fn delete_company(&self, request: Request<DeleteCompanyRequest>) -> Result<Response<()>, Status> {
        let r = request.into_inner();
        ok(self.delete::<Company>(&r.id, &r.etag).await)
    }

    async fn list_companies(
        &self,
        request: Request<ListCompaniesRequest>,
    ) -> Result<Response<ListCompaniesResponse>, Status> {
        let r = request.into_inner();
        ok(self
            .list(r.page_size, r.page_token, r.filter, r.order_by, r.query)
            .await
            .map(|(companies, next_page_token)| ListCompaniesResponse { companies, next_page_token }))
    }

    async fn create_person(&self, request: Request<CreatePersonRequest>) -> Result<Response<Person>, Status> {
        let r = request.into_inner();
        ok(self.create(r.person, &r.request_id).await)
    }

    async fn get_person(&self, request: Request<GetPersonRequest>) -> Result<Response<Person>, Status> {
        ok(self.get(&request.into_inner().id).await)
    }

    async fn update_person(&self, request: Request<UpdatePersonRequest>) -> Result<Response<Person>, Status> {
        let r = request.into_inner();
        ok(self.update(r.person, r.update_mask).await)
    }

    async fn delete_person(&self, request: Request<DeletePersonRequest>) -> Result<Response<()>, Status> {
        let r = request.into_inner();
        ok(self.delete::<Person>(&r.id, &r.etag).await)
    }

    async fn list_people(&self, request: Request<ListPeopleRequest>) -> Result<Response<ListPeopleResponse>, Status> {
        let r = request.into_inner();
        ok(self
            .list(r.page_size, r.page_token, r.filter, r.order_by, r.query)
            .await
            .map(|(people, next_page_token)| ListPeopleResponse { people, next_page_token }))
    }

    async fn check_duplicates(
        &self,
        request: Request<CheckDuplicatesRequest>,
    ) -> Result<Response<CheckDuplicatesResponse>, Status> {
        let r = request.into_inner();
        ok(self.check_duplicates(r).await)
    }

    async fn list_revisions(
        &self,
        request: Request<ListRevisionsRequest>,
    ) -> Result<Response<ListRevisionsResponse>, Status> {
        let r = request.into_inner();
        let result = async {
            let mut v = Violations::new();
            v.uuid("record_id", &r.record_id);
            v.check()?;
            let size = page_size(r.page_size, "page_size")?;
            let (revisions, next_page_token) = self.store.revisions(&r.record_id, size, &r.page_token).await?;
            Ok(ListRevisionsResponse { revisions, next_page_token })
        };
        ok(result.await)
    }
}

impl ContactsApi {
    async fn check_duplicates(&self, r: CheckDuplicatesRequest) -> Result<CheckDuplicatesResponse, ApiError> {
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
            match domain::normalize::email(email) {
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
                owner_id: d.owner_id,
                display_name: d.display_name,
            })
            .collect();
        Ok(CheckDuplicatesResponse { matches })
    }
}
