//! The gRPC surface: decode and validate each request, check what only other services know (an
//! assignee with auth, a customer with contacts — one batched call), call the store, map the
//! result back. Errors become statuses in `crm_kit::error`.

use std::sync::Arc;
use std::time::Duration;

use crm_kit::auth::{Principal, ScopeCache, UserDirectory, UserStatus};
use crm_kit::customers::Customers;
use crm_kit::db::idempotency::MAX_REQUEST_ID_CHARS;
use crm_kit::page::Page;
use crm_kit::time::now_micros;
use crm_kit::{ApiError, Violations, respond};
use crm_proto::contacts::v1::{CustomerKey, RecordType};
use crm_proto::google::api::HttpBody;
use crm_proto::tasks::v1::tasks_service_server::TasksService;
use crm_proto::tasks::v1::*;
use tonic::{Request, Response, Status};

use crate::permissions::{READ, WRITE};
use crate::store::activities::{self, ActivityQuery, CountQuery};
use crate::store::comments::{self, Subject};
use crate::store::{Schedule, Store, TaskQuery, Viewer};
use crate::{domain, feed};

/// The fields UpdateTask may replace.
const TASK_MASK: crm_kit::mask::Mask<Task> = crm_kit::mask!(Task {
    title,
    description,
    kind,
    assignee_id,
    due_time,
    time_zone,
    priority,
    reminders,
    customer,
    deal_id
});

/// The fields UpdateEvent may replace.
const EVENT_MASK: crm_kit::mask::Mask<CalendarEvent> = crm_kit::mask!(CalendarEvent {
    kind,
    title,
    description,
    location,
    start_time,
    end_time,
    time_zone,
    attendee_ids,
    customer,
    deal_id
});

/// Most days one CountActivities call spans.
pub const MAX_COUNT_DAYS: i64 = 366;
/// Most authors one CountActivities call names.
pub const MAX_COUNT_AUTHORS: usize = 1_000;

/// Every call runs as the signed-in caller: reads need `tasks.read`, changes `tasks.write`, and
/// the store sees only what the caller's data scope allows.
#[derive(Clone)]
pub struct TasksApi {
    store: Store,
    scopes: ScopeCache,
    users: Arc<dyn UserDirectory>,
    customers: Arc<dyn Customers>,
    grace: Duration,
}

impl std::fmt::Debug for TasksApi {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TasksApi").field("grace", &self.grace).finish_non_exhaustive()
    }
}

struct Caller {
    principal: Principal,
    viewer: Viewer,
}

impl TasksApi {
    /// `users` checks assignees, `customers` names linked customers; `grace`: how long after its due time an open task escalates to the assignee's supervisor.
    pub fn new(
        store: Store,
        scopes: ScopeCache,
        users: Arc<dyn UserDirectory>,
        customers: Arc<dyn Customers>,
        grace: Duration,
    ) -> TasksApi {
        TasksApi { store, scopes, users, customers, grace }
    }

    async fn caller<T>(&self, request: &Request<T>, permission: &str) -> Result<Caller, ApiError> {
        let principal = crm_kit::auth::principal(request)?;
        principal.require(permission)?;
        let scope = self.scopes.resolve(&principal).await?;
        let viewer = Viewer { id: principal.subject.clone(), scope };
        Ok(Caller { principal, viewer })
    }

    fn grace_micros(&self) -> i64 {
        i64::try_from(self.grace.as_micros()).unwrap_or(i64::MAX)
    }

    /// An assignee: the caller, or an active user.
    async fn check_assignee(&self, caller: &Caller, assignee_id: &str) -> Result<(), ApiError> {
        crm_kit::auth::require_active(&*self.users, &caller.principal, "task.assignee_id", assignee_id, "tasks").await
    }

    /// Names `customer` from contacts, asked as the caller: a customer that does not exist or
    /// that the caller may not see is INVALID_ARGUMENT on `field`.
    async fn resolve_customer(
        &self,
        caller: &Caller,
        customer: &mut Option<CustomerRef>,
        field: &str,
    ) -> Result<(), ApiError> {
        let Some(c) = customer else { return Ok(()) };
        let keys = vec![CustomerKey { record_type: c.record_type, id: c.id.clone() }];
        match self.customers.find(&caller.principal, keys).await?.into_iter().next() {
            Some(summary) => {
                c.display_name = summary.display_name;
                Ok(())
            }
            None => {
                let noun = if c.record_type == RecordType::Company as i32 { "company" } else { "person" };
                Err(ApiError::invalid(format!("{field}.id"), format!("no {noun} with this id that you may see")))
            }
        }
    }

    async fn create_task(&self, caller: Caller, r: CreateTaskRequest) -> Result<Task, ApiError> {
        let mut task = r.task.ok_or_else(|| ApiError::invalid("task", "is required"))?;
        // A retry of a create that did commit gets its task, even once its reminders have passed.
        let request_id = r.request_id.trim();
        if request_id.chars().count() <= MAX_REQUEST_ID_CHARS
            && let Some(created) =
                self.store.created_by_request(&caller.principal.subject, request_id, &caller.viewer).await?
        {
            return Ok(created);
        }
        let now = now_micros();
        let mut v = Violations::new();
        v.max_chars("request_id", &r.request_id, MAX_REQUEST_ID_CHARS);
        domain::normalize_task(&mut task, &mut v);
        let times = domain::reminder_times(&task, now, &mut v);
        if task.assignee_id.is_empty() && caller.principal.service_account {
            v.add("task.assignee_id", "is required when a service account creates a task");
        }
        v.check()?;
        if task.assignee_id.is_empty() {
            task.assignee_id = caller.principal.subject.clone();
        }
        self.check_assignee(&caller, &task.assignee_id).await?;
        self.resolve_customer(&caller, &mut task.customer, "task.customer").await?;
        task.status = TaskStatus::Open as i32;
        let schedule = Schedule::of(&task, &times, now, self.grace_micros());
        let me = caller.principal.subject.clone();
        self.store.create_task(task, &schedule, &me, request_id, &caller.viewer).await
    }

    async fn update_task(&self, caller: Caller, r: UpdateTaskRequest) -> Result<Task, ApiError> {
        let patch = r.task.ok_or_else(|| ApiError::invalid("task", "is required"))?;
        let mut v = Violations::new();
        v.uuid("task.id", &patch.id);
        let paths = r.update_mask.map(|m| m.paths).unwrap_or_default();
        // The mask is applied to a scratch copy first, so that an assignee and a customer are
        // checked with auth and contacts before the row is locked.
        let mut probe = Task::default();
        TASK_MASK.apply(&mut probe, &patch, &paths, &mut v);
        v.check()?;
        let touches = |field: &str| paths.iter().any(|p| p == field || p == "*");
        let current = self.store.get_task(&patch.id, &caller.viewer).await?;
        let mut assignee = None;
        if touches("assignee_id") {
            let id = patch.assignee_id.trim();
            if id.is_empty() {
                return Err(ApiError::invalid("task.assignee_id", "is required: a task always has an assignee"));
            }
            if id != current.assignee_id && uuid::Uuid::parse_str(id).is_ok() {
                self.check_assignee(&caller, id).await?;
            }
            assignee = Some(id.to_string());
        }
        let mut customer = patch.customer.clone();
        let new_customer = touches("customer")
            && customer.as_ref().map(|c| (c.record_type, c.id.trim()))
                != current.customer.as_ref().map(|c| (c.record_type, c.id.as_str()));
        if new_customer {
            let mut cv = Violations::new();
            let mut check = Task { customer: customer.clone(), title: "x".into(), ..Task::default() };
            domain::normalize_task(&mut check, &mut cv);
            if let Some((field, why)) = cv.iter().find(|(f, _)| f.starts_with("task.customer")) {
                return Err(ApiError::invalid(field.clone(), why.clone()));
            }
            customer = check.customer;
            self.resolve_customer(&caller, &mut customer, "task.customer").await?;
        }
        let grace = self.grace_micros();
        let me = caller.principal.subject.clone();
        self.store
            .edit_task(&patch.id, &patch.etag, &me, &caller.viewer, |task, now| {
                let old = task.clone();
                let mut v = Violations::new();
                TASK_MASK.apply(task, &patch, &paths, &mut v);
                domain::normalize_task(task, &mut v);
                if let Some(id) = &assignee {
                    task.assignee_id = id.clone();
                }
                if touches("customer") {
                    task.customer = if new_customer { customer } else { old.customer.clone() };
                }
                let timing_changed =
                    task.due_time != old.due_time || task.reminders != old.reminders || task.time_zone != old.time_zone;
                let times = if timing_changed { domain::reminder_times(task, now, &mut v) } else { Vec::new() };
                v.check()?;
                Ok(timing_changed.then(|| Schedule::of(task, &times, now, grace)))
            })
            .await
    }

    async fn change_status(
        &self,
        caller: Caller,
        r: ChangeTaskStatusRequest,
        to: TaskStatus,
    ) -> Result<Task, ApiError> {
        let mut v = Violations::new();
        v.uuid("id", &r.id);
        v.check()?;
        let grace = self.grace_micros();
        let me = caller.principal.subject.clone();
        self.store
            .edit_task(&r.id, &r.etag, &me, &caller.viewer, |task, now| {
                let from = TaskStatus::try_from(task.status).unwrap_or(TaskStatus::Unspecified);
                match (from, to) {
                    // Asked twice: nothing more to do.
                    (a, b) if a == b => Ok(None),
                    (TaskStatus::Open, TaskStatus::Done | TaskStatus::Cancelled) => {
                        task.status = to as i32;
                        task.close_time = crm_kit::time::to_timestamp(now);
                        Ok(Some(Schedule::default()))
                    }
                    (TaskStatus::Done | TaskStatus::Cancelled, TaskStatus::Open) => {
                        task.status = TaskStatus::Open as i32;
                        task.close_time = None;
                        // Reminders already past stay silent; the escalation comes back.
                        let times = domain::reminder_times(task, now, &mut Violations::new());
                        Ok(Some(Schedule::of(task, &times, now, grace)))
                    }
                    (from, _) => Err(ApiError::FailedPrecondition(format!(
                        "task {} is {}; reopen it first",
                        task.id,
                        match from {
                            TaskStatus::Done => "done",
                            _ => "cancelled",
                        }
                    ))),
                }
            })
            .await
    }

    async fn list_tasks(&self, caller: Caller, r: ListTasksRequest) -> Result<ListTasksResponse, ApiError> {
        let filter = crm_kit::filter::parse(&r.filter, crate::store::TASK_FIELDS)?;
        let order = crate::store::task_order(&r.order_by)?;
        let overdue = if r.overdue { "overdue" } else { "" };
        let page = Page::decode(&["tasks", &r.filter, &r.order_by, overdue], r.page_size, &r.page_token, &order)?;
        let query = TaskQuery { filter, order, page, overdue_at: r.overdue.then(now_micros) };
        let (tasks, next_page_token) = self.store.list_tasks(&query, &caller.viewer).await?;
        Ok(ListTasksResponse { tasks, next_page_token })
    }

    async fn log_activity(&self, caller: Caller, r: LogActivityRequest) -> Result<Activity, ApiError> {
        let mut activity = r.activity.ok_or_else(|| ApiError::invalid("activity", "is required"))?;
        let mut v = Violations::new();
        v.max_chars("request_id", &r.request_id, MAX_REQUEST_ID_CHARS);
        domain::normalize_activity(&mut activity, now_micros(), &mut v);
        v.check()?;
        if !activity.task_id.is_empty() {
            match self.store.get_task(&activity.task_id, &caller.viewer).await {
                Ok(_) => {}
                Err(ApiError::NotFound(_)) => {
                    return Err(ApiError::invalid("activity.task_id", "no task with this id that you may see"));
                }
                Err(other) => return Err(other),
            }
        }
        self.resolve_customer(&caller, &mut activity.customer, "activity.customer").await?;
        let p = &caller.principal;
        self.store.log_activity(activity, &p.subject, &p.department_id, r.request_id.trim(), &caller.viewer).await
    }

    async fn count_activities(
        &self,
        caller: Caller,
        r: CountActivitiesRequest,
    ) -> Result<CountActivitiesResponse, ApiError> {
        let mut v = Violations::new();
        let start = domain::parse_date(&r.start_date);
        let end = domain::parse_date(&r.end_date);
        if start.is_none() {
            v.add("start_date", "must be a day as YYYY-MM-DD");
        }
        if end.is_none() {
            v.add("end_date", "must be a day as YYYY-MM-DD");
        }
        if let (Some(start), Some(end)) = (start, end) {
            let days = (end - start).num_days() + 1;
            if days < 1 {
                v.add("end_date", "must not come before start_date");
            } else if days > MAX_COUNT_DAYS {
                v.add("end_date", format!("spans {days} days; at most {MAX_COUNT_DAYS}"));
            }
        }
        v.optional_uuid("department_id", r.department_id.trim());
        v.max_items("author_ids", &r.author_ids, MAX_COUNT_AUTHORS);
        for (i, id) in r.author_ids.iter().enumerate().take(MAX_COUNT_AUTHORS) {
            v.uuid(&format!("author_ids[{i}]"), id);
        }
        v.check()?;
        let query = CountQuery {
            start_date: start.expect("checked").format("%Y-%m-%d").to_string(),
            end_date: end.expect("checked").format("%Y-%m-%d").to_string(),
            department_id: r.department_id.trim().to_string(),
            author_ids: r.author_ids,
        };
        let days = self.store.count_activities(&query, &caller.viewer).await?;
        Ok(CountActivitiesResponse { days })
    }

    async fn add_comment(&self, caller: Caller, r: AddCommentRequest) -> Result<Comment, ApiError> {
        let mut v = Violations::new();
        let subject = Subject::from_proto(r.subject_type);
        if subject.is_none() {
            v.add("subject_type", "must be SUBJECT_TYPE_TASK or SUBJECT_TYPE_ACTIVITY");
        }
        v.uuid("subject_id", &r.subject_id);
        let body = r.body.trim();
        v.required("body", body);
        v.max_chars("body", body, domain::MAX_COMMENT);
        v.max_chars("request_id", &r.request_id, MAX_REQUEST_ID_CHARS);
        v.check()?;
        let p = &caller.principal;
        let subject = subject.expect("checked");
        self.store
            .add_comment(subject, &r.subject_id, body, &p.subject, &p.name, r.request_id.trim(), &caller.viewer)
            .await
    }

    async fn list_comments(&self, caller: Caller, r: ListCommentsRequest) -> Result<ListCommentsResponse, ApiError> {
        let mut v = Violations::new();
        let subject = Subject::from_proto(r.subject_type);
        if subject.is_none() {
            v.add("subject_type", "must be SUBJECT_TYPE_TASK or SUBJECT_TYPE_ACTIVITY");
        }
        v.uuid("subject_id", &r.subject_id);
        v.check()?;
        let kind = r.subject_type.to_string();
        let page = Page::decode(&["comments", &kind, &r.subject_id], r.page_size, &r.page_token, &comments::ORDER)?;
        let (comments, next_page_token) =
            self.store.list_comments(subject.expect("checked"), &r.subject_id, &page, &caller.viewer).await?;
        Ok(ListCommentsResponse { comments, next_page_token })
    }
}

impl TasksApi {
    /// Attendees must be active users: asked of auth in one call.
    async fn check_attendees(&self, ids: &[String]) -> Result<(), ApiError> {
        let statuses = self.users.statuses(ids).await?;
        let mut v = Violations::new();
        for (i, status) in statuses.iter().enumerate() {
            match status {
                UserStatus::Active => {}
                UserStatus::Deactivated => v.add(format!("event.attendee_ids[{i}]"), "is a deactivated user"),
                UserStatus::Unknown => v.add(format!("event.attendee_ids[{i}]"), "no user has this id"),
            }
        }
        v.check()
    }

    async fn create_event(&self, caller: Caller, r: CreateEventRequest) -> Result<CalendarEvent, ApiError> {
        let mut event = r.event.ok_or_else(|| ApiError::invalid("event", "is required"))?;
        let me = caller.principal.subject.clone();
        event.organizer_id = me.clone();
        let mut v = Violations::new();
        v.max_chars("request_id", &r.request_id, MAX_REQUEST_ID_CHARS);
        domain::normalize_event(&mut event, &mut v);
        v.check()?;
        self.check_attendees(&event.attendee_ids).await?;
        self.resolve_customer(&caller, &mut event.customer, "event.customer").await?;
        self.store.create_event(event, &me, r.request_id.trim(), &caller.viewer).await
    }

    async fn update_event(&self, caller: Caller, r: UpdateEventRequest) -> Result<CalendarEvent, ApiError> {
        let patch = r.event.ok_or_else(|| ApiError::invalid("event", "is required"))?;
        let mut v = Violations::new();
        v.uuid("event.id", &patch.id);
        let paths = r.update_mask.map(|m| m.paths).unwrap_or_default();
        let mut probe = CalendarEvent::default();
        EVENT_MASK.apply(&mut probe, &patch, &paths, &mut v);
        v.check()?;
        let touches = |field: &str| paths.iter().any(|p| p == field || p == "*");
        let current = self.store.get_event(&patch.id, &caller.viewer).await?;
        // New attendees and a new customer are checked before the row is locked.
        let mut check = CalendarEvent {
            organizer_id: current.organizer_id.clone(),
            attendee_ids: patch.attendee_ids.clone(),
            customer: patch.customer.clone(),
            ..current.clone()
        };
        let mut cv = Violations::new();
        domain::normalize_event(&mut check, &mut cv);
        if let Some((field, why)) =
            cv.iter().find(|(f, _)| f.starts_with("event.attendee_ids") || f.starts_with("event.customer"))
        {
            return Err(ApiError::invalid(field.clone(), why.clone()));
        }
        if touches("attendee_ids") {
            let added: Vec<String> =
                check.attendee_ids.iter().filter(|a| !current.attendee_ids.contains(a)).cloned().collect();
            self.check_attendees(&added).await?;
        }
        let new_customer = touches("customer")
            && check.customer.as_ref().map(|c| (c.record_type, c.id.as_str()))
                != current.customer.as_ref().map(|c| (c.record_type, c.id.as_str()));
        let mut customer = check.customer.clone();
        if new_customer {
            self.resolve_customer(&caller, &mut customer, "event.customer").await?;
        }
        self.store
            .edit_event(&patch.id, &patch.etag, &caller.viewer, |event| {
                let old = event.clone();
                let mut v = Violations::new();
                EVENT_MASK.apply(event, &patch, &paths, &mut v);
                domain::normalize_event(event, &mut v);
                if touches("customer") {
                    event.customer = if new_customer { customer } else { old.customer.clone() };
                }
                v.check()
            })
            .await
    }

    async fn get_agenda(&self, caller: Caller, r: GetAgendaRequest) -> Result<Agenda, ApiError> {
        let mut v = Violations::new();
        let user =
            if r.user_id.trim().is_empty() { caller.principal.subject.clone() } else { r.user_id.trim().to_string() };
        v.uuid("user_id", &user);
        let tz = domain::zone(&r.time_zone);
        if tz.is_none() {
            v.add("time_zone", "is not an IANA time zone such as Europe/Berlin or Asia/Shanghai");
        }
        let start = if r.start_date.trim().is_empty() { None } else { domain::parse_date(&r.start_date) };
        if !r.start_date.trim().is_empty() && start.is_none() {
            v.add("start_date", "must be a day as YYYY-MM-DD");
        }
        let days = if r.days == 0 { 1 } else { i64::from(r.days) };
        if !(1..=domain::MAX_AGENDA_DAYS).contains(&days) {
            v.add("days", format!("must be 1 to {}", domain::MAX_AGENDA_DAYS));
        }
        v.check()?;
        if user != caller.principal.subject && !caller.viewer.scope.allows(&user) {
            return Err(ApiError::PermissionDenied(format!(
                "user_id: {user} is outside your data scope; you may see your own agenda and those of users you supervise"
            )));
        }
        let tz = tz.expect("checked");
        let start = start.unwrap_or_else(|| domain::today(tz));
        let (from, to) = domain::day_range(start, days, tz);
        let (events, tasks) = self.store.agenda(&user, from, to).await?;
        let spans: Vec<(String, i64, i64)> = events
            .iter()
            .map(|e| {
                let at =
                    |t: &Option<prost_types::Timestamp>| t.as_ref().map(crm_kit::time::from_timestamp).unwrap_or(0);
                (e.id.clone(), at(&e.start_time), at(&e.end_time))
            })
            .collect();
        let overlaps = domain::overlaps(&spans)
            .into_iter()
            .map(|(first_event_id, second_event_id)| Overlap { first_event_id, second_event_id })
            .collect();
        let mut items: Vec<(i64, AgendaItem)> = Vec::with_capacity(events.len() + tasks.len());
        for (event, (_, start, _)) in events.into_iter().zip(&spans) {
            let item = AgendaItem {
                time: event.start_time,
                local_time: domain::local_time(*start, tz),
                item: Some(agenda_item::Item::Event(event)),
            };
            items.push((*start, item));
        }
        for task in tasks {
            let due = domain::due_at(&task);
            let item = AgendaItem {
                time: task.due_time,
                local_time: domain::local_time(due, tz),
                item: Some(agenda_item::Item::Task(task)),
            };
            items.push((due, item));
        }
        items.sort_by_key(|(at, _)| *at);
        let end = start.checked_add_days(chrono::Days::new(days as u64 - 1)).unwrap_or(start);
        Ok(Agenda {
            user_id: user,
            time_zone: tz.name().to_string(),
            start_date: start.format("%Y-%m-%d").to_string(),
            end_date: end.format("%Y-%m-%d").to_string(),
            items: items.into_iter().map(|(_, item)| item).collect(),
            overlaps,
        })
    }

    async fn calendar_feed(&self, r: GetCalendarFeedRequest) -> Result<HttpBody, ApiError> {
        let token = r.token.trim();
        if token.is_empty() || token.len() > 100 {
            return Err(ApiError::invalid("token", "is not a calendar feed token"));
        }
        let owner = self.store.feed_owner(&feed::token_hash(token)).await?;
        let owner = owner.ok_or_else(|| ApiError::NotFound("no calendar feed at this address (revoked?)".into()))?;
        let now = now_micros();
        let day = 86_400_000_000_i64;
        let (events, tasks) =
            self.store.agenda(&owner, now - feed::PAST_DAYS * day, now + feed::AHEAD_DAYS * day).await?;
        let text = feed::render("CRM agenda", &events, &tasks);
        Ok(HttpBody {
            content_type: "text/calendar; charset=utf-8".into(),
            data: text.into_bytes(),
            extensions: vec![],
        })
    }
}

fn check_id(id: &str) -> Result<(), ApiError> {
    let mut v = Violations::new();
    v.uuid("id", id);
    v.check()
}

#[tonic::async_trait]
impl TasksService for TasksApi {
    async fn create_task(&self, request: Request<CreateTaskRequest>) -> Result<Response<Task>, Status> {
        let caller = self.caller(&request, WRITE.name).await?;
        respond(self.create_task(caller, request.into_inner()).await)
    }

    async fn get_task(&self, request: Request<GetTaskRequest>) -> Result<Response<Task>, Status> {
        let caller = self.caller(&request, READ.name).await?;
        let r = request.into_inner();
        respond(
            async {
                check_id(&r.id)?;
                self.store.get_task(&r.id, &caller.viewer).await
            }
            .await,
        )
    }

    async fn update_task(&self, request: Request<UpdateTaskRequest>) -> Result<Response<Task>, Status> {
        let caller = self.caller(&request, WRITE.name).await?;
        respond(self.update_task(caller, request.into_inner()).await)
    }

    async fn complete_task(&self, request: Request<ChangeTaskStatusRequest>) -> Result<Response<Task>, Status> {
        let caller = self.caller(&request, WRITE.name).await?;
        respond(self.change_status(caller, request.into_inner(), TaskStatus::Done).await)
    }

    async fn cancel_task(&self, request: Request<ChangeTaskStatusRequest>) -> Result<Response<Task>, Status> {
        let caller = self.caller(&request, WRITE.name).await?;
        respond(self.change_status(caller, request.into_inner(), TaskStatus::Cancelled).await)
    }

    async fn reopen_task(&self, request: Request<ChangeTaskStatusRequest>) -> Result<Response<Task>, Status> {
        let caller = self.caller(&request, WRITE.name).await?;
        respond(self.change_status(caller, request.into_inner(), TaskStatus::Open).await)
    }

    async fn delete_task(&self, request: Request<DeleteTaskRequest>) -> Result<Response<()>, Status> {
        let caller = self.caller(&request, WRITE.name).await?;
        let r = request.into_inner();
        respond(
            async {
                check_id(&r.id)?;
                self.store.delete_task(&r.id, &r.etag, &caller.viewer).await
            }
            .await,
        )
    }

    async fn list_tasks(&self, request: Request<ListTasksRequest>) -> Result<Response<ListTasksResponse>, Status> {
        let caller = self.caller(&request, READ.name).await?;
        respond(self.list_tasks(caller, request.into_inner()).await)
    }

    async fn create_event(&self, request: Request<CreateEventRequest>) -> Result<Response<CalendarEvent>, Status> {
        let caller = self.caller(&request, WRITE.name).await?;
        respond(self.create_event(caller, request.into_inner()).await)
    }

    async fn get_event(&self, request: Request<GetEventRequest>) -> Result<Response<CalendarEvent>, Status> {
        let caller = self.caller(&request, READ.name).await?;
        let r = request.into_inner();
        respond(
            async {
                check_id(&r.id)?;
                self.store.get_event(&r.id, &caller.viewer).await
            }
            .await,
        )
    }

    async fn update_event(&self, request: Request<UpdateEventRequest>) -> Result<Response<CalendarEvent>, Status> {
        let caller = self.caller(&request, WRITE.name).await?;
        respond(self.update_event(caller, request.into_inner()).await)
    }

    async fn delete_event(&self, request: Request<DeleteEventRequest>) -> Result<Response<()>, Status> {
        let caller = self.caller(&request, WRITE.name).await?;
        let r = request.into_inner();
        respond(
            async {
                check_id(&r.id)?;
                self.store.delete_event(&r.id, &r.etag, &caller.viewer).await
            }
            .await,
        )
    }

    async fn get_agenda(&self, request: Request<GetAgendaRequest>) -> Result<Response<Agenda>, Status> {
        let caller = self.caller(&request, READ.name).await?;
        respond(self.get_agenda(caller, request.into_inner()).await)
    }

    async fn create_calendar_feed(
        &self,
        request: Request<CreateCalendarFeedRequest>,
    ) -> Result<Response<CalendarFeed>, Status> {
        let caller = self.caller(&request, READ.name).await?;
        let result = async {
            if caller.principal.service_account {
                return Err(ApiError::FailedPrecondition("a service account has no calendar".into()));
            }
            let token = feed::new_token();
            let at = self.store.set_feed(&caller.principal.subject, &feed::token_hash(&token)).await?;
            let path = format!("{}{token}", feed::PATH_PREFIX);
            Ok(CalendarFeed { token, path, create_time: crm_kit::time::to_timestamp(at) })
        };
        respond(result.await)
    }

    async fn revoke_calendar_feed(&self, request: Request<RevokeCalendarFeedRequest>) -> Result<Response<()>, Status> {
        let caller = self.caller(&request, READ.name).await?;
        let result = async {
            if self.store.revoke_feed(&caller.principal.subject).await? {
                Ok(())
            } else {
                Err(ApiError::NotFound("you have no calendar feed".into()))
            }
        };
        respond(result.await)
    }

    async fn get_calendar_feed(&self, request: Request<GetCalendarFeedRequest>) -> Result<Response<HttpBody>, Status> {
        respond(self.calendar_feed(request.into_inner()).await)
    }

    async fn log_activity(&self, request: Request<LogActivityRequest>) -> Result<Response<Activity>, Status> {
        let caller = self.caller(&request, WRITE.name).await?;
        respond(self.log_activity(caller, request.into_inner()).await)
    }

    async fn get_activity(&self, request: Request<GetActivityRequest>) -> Result<Response<Activity>, Status> {
        let caller = self.caller(&request, READ.name).await?;
        let r = request.into_inner();
        respond(
            async {
                check_id(&r.id)?;
                self.store.get_activity(&r.id, &caller.viewer).await
            }
            .await,
        )
    }

    async fn list_activities(
        &self,
        request: Request<ListActivitiesRequest>,
    ) -> Result<Response<ListActivitiesResponse>, Status> {
        let caller = self.caller(&request, READ.name).await?;
        let r = request.into_inner();
        let result = async {
            let filter = crm_kit::filter::parse(&r.filter, activities::FIELDS)?;
            let page = Page::decode(&["activities", &r.filter], r.page_size, &r.page_token, &activities::ORDER)?;
            let (activities, next_page_token) =
                self.store.list_activities(&ActivityQuery { filter, page }, &caller.viewer).await?;
            Ok(ListActivitiesResponse { activities, next_page_token })
        };
        respond(result.await)
    }

    async fn count_activities(
        &self,
        request: Request<CountActivitiesRequest>,
    ) -> Result<Response<CountActivitiesResponse>, Status> {
        let caller = self.caller(&request, READ.name).await?;
        respond(self.count_activities(caller, request.into_inner()).await)
    }

    async fn add_comment(&self, request: Request<AddCommentRequest>) -> Result<Response<Comment>, Status> {
        let caller = self.caller(&request, WRITE.name).await?;
        respond(self.add_comment(caller, request.into_inner()).await)
    }

    async fn list_comments(
        &self,
        request: Request<ListCommentsRequest>,
    ) -> Result<Response<ListCommentsResponse>, Status> {
        let caller = self.caller(&request, READ.name).await?;
        respond(self.list_comments(caller, request.into_inner()).await)
    }
}
