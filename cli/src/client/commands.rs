//! The client commands: each builds the JSON of a call (or a few) from its arguments and
//! prints the answer.

use std::io::{BufRead, IsTerminal};

use anyhow::{Context, bail};
use serde_json::{Map, Value, json};

use super::{Client, ClientArgs, Column, Output, col, money, parse_money, print, record, table};

/// `crm login`.
#[derive(clap::Args, Debug)]
pub(crate) struct LoginArgs {
    /// The e-mail to sign in with (asked for when not given).
    #[arg(long, env = "CRM_EMAIL")]
    email: Option<String>,
    /// Read the password from the first line of standard input (for scripts); otherwise it is
    /// asked for without echo, or taken from CRM_PASSWORD.
    #[arg(long)]
    password_stdin: bool,
    #[command(flatten)]
    client: ClientArgs,
}

/// `crm logout` and `crm whoami`.
#[derive(clap::Args, Debug)]
pub(crate) struct SessionArgs {
    #[command(flatten)]
    client: ClientArgs,
}

/// How many records a list shows.
#[derive(clap::Args, Debug, Clone)]
struct ListArgs {
    /// A filter in the list's filter language (see the README's Filters), e.g. 'stage = LEAD'.
    #[arg(long)]
    filter: Option<String>,
    /// Sort, e.g. "create_time desc".
    #[arg(long)]
    order_by: Option<String>,
    /// Most records shown (fetched page by page).
    #[arg(long, default_value_t = 50)]
    limit: usize,
}

/// `crm contacts …`: people.
#[derive(clap::Args, Debug)]
pub(crate) struct ContactsArgs {
    #[command(subcommand)]
    command: ContactsCommand,
    #[command(flatten)]
    client: ClientArgs,
}

#[derive(clap::Subcommand, Debug)]
enum ContactsCommand {
    /// People I may see, newest first unless sorted otherwise.
    List {
        #[command(flatten)]
        list: ListArgs,
        /// Words, an e-mail or phone digits to search for.
        #[arg(long)]
        search: Option<String>,
    },
    /// One person.
    Get { id: String },
    /// A new person.
    Create {
        /// Full name.
        name: String,
        #[command(flatten)]
        fields: PersonFields,
    },
    /// Changes the fields given (and only those).
    Update {
        id: String,
        /// Full name.
        #[arg(long)]
        name: Option<String>,
        #[command(flatten)]
        fields: PersonFields,
    },
    /// Deletes a person.
    Delete { id: String },
}

#[derive(clap::Args, Debug)]
struct PersonFields {
    /// An e-mail address (repeat for more; on update, replaces them all).
    #[arg(long = "email")]
    emails: Vec<String>,
    /// A phone number (repeat for more; on update, replaces them all).
    #[arg(long = "phone")]
    phones: Vec<String>,
    /// The company's id.
    #[arg(long)]
    company: Option<String>,
    /// The owner's user id (default on create: me).
    #[arg(long)]
    owner: Option<String>,
    /// Lifecycle stage: LEAD, PROSPECT, CUSTOMER… (or its full name).
    #[arg(long)]
    stage: Option<String>,
    /// A tag (repeat for more; on update, replaces them all).
    #[arg(long = "tag")]
    tags: Vec<String>,
    #[arg(long)]
    notes: Option<String>,
}

impl PersonFields {
    /// The person's JSON and the mask of what was given (JSON names, as a JSON field mask is).
    fn json(&self, name: Option<&str>) -> (Map<String, Value>, Vec<&'static str>) {
        let mut person = Map::new();
        let mut mask = Vec::new();
        let mut set = |field: &'static str, value: Value| {
            person.insert(field.into(), value);
            mask.push(field);
        };
        if let Some(name) = name {
            set("fullName", json!(name));
        }
        if !self.emails.is_empty() {
            set("emails", self.emails.iter().map(|e| json!({"address": e})).collect());
        }
        if !self.phones.is_empty() {
            set("phones", self.phones.iter().map(|p| json!({"number": p})).collect());
        }
        if let Some(company) = &self.company {
            set("companyId", json!(company));
        }
        if let Some(owner) = &self.owner {
            set("ownerId", json!(owner));
        }
        if let Some(stage) = &self.stage {
            set("stage", json!(enum_name("LIFECYCLE_STAGE_", stage)));
        }
        if !self.tags.is_empty() {
            set("tags", json!(self.tags));
        }
        if let Some(notes) = &self.notes {
            set("notes", json!(notes));
        }
        (person, mask)
    }
}

/// "lead" → "LIFECYCLE_STAGE_LEAD"; a full name stays as it is.
fn enum_name(prefix: &str, text: &str) -> String {
    let upper = text.trim().to_ascii_uppercase().replace('-', "_");
    if upper.starts_with(prefix) { upper } else { format!("{prefix}{upper}") }
}

fn person_columns() -> Vec<Column> {
    vec![
        col!("ID", "id"),
        col!("NAME", "fullName"),
        col!("EMAIL", "emails.0.address"),
        col!("PHONE", "phones.0.number"),
        Column { header: "STAGE", value: |v| short_enum(&super::cell_at(v, "stage"), "LIFECYCLE_STAGE_") },
        col!("OWNER", "ownerId"),
    ]
}

fn short_enum(text: &str, prefix: &str) -> String {
    text.strip_prefix(prefix).unwrap_or(text).to_string()
}

/// `crm deals …`.
#[derive(clap::Args, Debug)]
pub(crate) struct DealsArgs {
    #[command(subcommand)]
    command: DealsCommand,
    #[command(flatten)]
    client: ClientArgs,
}

#[derive(clap::Subcommand, Debug)]
enum DealsCommand {
    /// Deals I may see.
    List {
        #[command(flatten)]
        list: ListArgs,
    },
    /// One deal.
    Get { id: String },
    /// A new deal (in the first pipeline's first stage unless told otherwise).
    Create {
        title: String,
        #[command(flatten)]
        fields: DealFields,
        /// Its pipeline's id.
        #[arg(long)]
        pipeline: Option<String>,
    },
    /// Changes the fields given (and only those).
    Update {
        id: String,
        #[arg(long)]
        title: Option<String>,
        #[command(flatten)]
        fields: DealFields,
    },
    /// Moves a deal to another stage of its pipeline (a lost stage needs --lost-reason).
    Move {
        id: String,
        /// The stage's id (`crm deals pipelines` lists them).
        stage: String,
        #[arg(long)]
        lost_reason: Option<String>,
    },
    /// Pipelines and their stages.
    Pipelines,
}

#[derive(clap::Args, Debug)]
struct DealFields {
    /// Its value, e.g. 1500 or 19.99 (with --currency).
    #[arg(long, requires = "currency")]
    amount: Option<String>,
    /// ISO 4217 currency of --amount, e.g. EUR.
    #[arg(long, requires = "amount")]
    currency: Option<String>,
    /// The customer: a person's id.
    #[arg(long)]
    person: Option<String>,
    /// The customer: a company's id.
    #[arg(long)]
    company: Option<String>,
    /// The owner's user id (default on create: me).
    #[arg(long)]
    owner: Option<String>,
    /// Expected close date, YYYY-MM-DD.
    #[arg(long)]
    close_date: Option<String>,
    #[arg(long)]
    notes: Option<String>,
}

impl DealFields {
    fn json(&self, title: Option<&str>) -> anyhow::Result<(Map<String, Value>, Vec<&'static str>)> {
        let mut deal = Map::new();
        let mut mask = Vec::new();
        let mut set = |field: &'static str, value: Value| {
            deal.insert(field.into(), value);
            mask.push(field);
        };
        if let Some(title) = title {
            set("title", json!(title));
        }
        if let (Some(amount), Some(currency)) = (&self.amount, &self.currency) {
            let currency = currency.trim().to_ascii_uppercase();
            let minor = parse_money(amount, &currency)?;
            set("amount", json!({"currencyCode": currency, "minorUnits": minor.to_string()}));
        }
        for (value, field) in [
            (&self.person, "personId"),
            (&self.company, "companyId"),
            (&self.owner, "ownerId"),
            (&self.close_date, "expectedCloseDate"),
            (&self.notes, "notes"),
        ] {
            if let Some(value) = value {
                set(field, json!(value));
            }
        }
        Ok((deal, mask))
    }
}

fn deal_columns() -> Vec<Column> {
    vec![
        col!("ID", "id"),
        col!("TITLE", "title"),
        Column { header: "AMOUNT", value: |v| v.get("amount").map_or("-".into(), money) },
        Column { header: "STATUS", value: |v| short_enum(&super::cell_at(v, "status"), "DEAL_STATUS_") },
        col!("STAGE", "stageId"),
        col!("OWNER", "ownerId"),
    ]
}

/// `crm tasks …`.
#[derive(clap::Args, Debug)]
pub(crate) struct TasksArgs {
    #[command(subcommand)]
    command: TasksCommand,
    #[command(flatten)]
    client: ClientArgs,
}

#[derive(clap::Subcommand, Debug)]
enum TasksCommand {
    /// Tasks I may see (by default my open ones, by due time).
    List {
        #[command(flatten)]
        list: ListArgs,
        /// Only open tasks past their due time.
        #[arg(long)]
        overdue: bool,
    },
    /// A new task.
    Create {
        title: String,
        /// Due time, RFC 3339 (2026-12-14T09:00:00+01:00).
        #[arg(long)]
        due: Option<String>,
        /// IANA time zone of the due time, e.g. Europe/Berlin.
        #[arg(long)]
        time_zone: Option<String>,
        /// Whose task it is (default: mine).
        #[arg(long)]
        assignee: Option<String>,
        /// The person it is about.
        #[arg(long)]
        person: Option<String>,
        /// The deal it is about.
        #[arg(long)]
        deal: Option<String>,
        #[arg(long)]
        description: Option<String>,
    },
    /// Marks a task done.
    Complete { id: String },
}

fn task_columns() -> Vec<Column> {
    vec![
        col!("ID", "id"),
        col!("TITLE", "title"),
        col!("DUE", "dueTime"),
        Column { header: "STATUS", value: |v| short_enum(&super::cell_at(v, "status"), "TASK_STATUS_") },
        col!("ASSIGNEE", "assigneeId"),
    ]
}

/// `crm notifications …`.
#[derive(clap::Args, Debug)]
pub(crate) struct NotificationsArgs {
    #[command(subcommand)]
    command: NotificationsCommand,
    #[command(flatten)]
    client: ClientArgs,
}

#[derive(clap::Subcommand, Debug)]
enum NotificationsCommand {
    /// My inbox, newest first.
    List {
        /// Only unread ones.
        #[arg(long)]
        unread: bool,
        #[arg(long, default_value_t = 50)]
        limit: usize,
    },
    /// Marks notifications read: those named, or all.
    Read {
        ids: Vec<String>,
        #[arg(long, conflicts_with = "ids")]
        all: bool,
    },
    /// Prints each new notification as it arrives, until interrupted.
    Watch {
        /// Start after this notification (the last one seen), to miss nothing across reconnects.
        #[arg(long)]
        after: Option<String>,
    },
}

fn notification_columns() -> Vec<Column> {
    vec![
        col!("TIME", "createTime"),
        col!("TITLE", "title"),
        Column { header: "READ", value: |v| if v["read"] == json!(true) { "yes".into() } else { "no".into() } },
        col!("ID", "id"),
    ]
}

/// `crm report KIND`.
#[derive(clap::Args, Debug)]
pub(crate) struct ReportArgs {
    /// Which report.
    #[arg(value_enum)]
    kind: ReportKind,
    /// First day, YYYY-MM-DD (default: twelve months back; the forecast: this month).
    #[arg(long)]
    from: Option<String>,
    /// Last day, YYYY-MM-DD.
    #[arg(long)]
    to: Option<String>,
    /// IANA time zone the days are counted in (default UTC).
    #[arg(long)]
    time_zone: Option<String>,
    /// Only this department (and those below it).
    #[arg(long)]
    department: Option<String>,
    /// Only these owners (repeat).
    #[arg(long = "owner")]
    owners: Vec<String>,
    /// Only this pipeline (the funnel's default: the first).
    #[arg(long)]
    pipeline: Option<String>,
    /// Only deals in this currency.
    #[arg(long)]
    currency: Option<String>,
    /// Print the report as CSV (as downloaded) instead of a table.
    #[arg(long)]
    csv: bool,
    #[command(flatten)]
    client: ClientArgs,
}

#[derive(clap::ValueEnum, Debug, Clone, Copy)]
enum ReportKind {
    Funnel,
    WonLost,
    LostReasons,
    WonBySource,
    Leaderboard,
    Conversion,
    Forecast,
}

impl ReportKind {
    fn proto(self) -> &'static str {
        match self {
            ReportKind::Funnel => "REPORT_KIND_FUNNEL",
            ReportKind::WonLost => "REPORT_KIND_WON_LOST",
            ReportKind::LostReasons => "REPORT_KIND_LOST_REASONS",
            ReportKind::WonBySource => "REPORT_KIND_WON_BY_SOURCE",
            ReportKind::Leaderboard => "REPORT_KIND_LEADERBOARD",
            ReportKind::Conversion => "REPORT_KIND_CONVERSION",
            ReportKind::Forecast => "REPORT_KIND_FORECAST",
        }
    }
}

/// `crm call METHOD [JSON]`.
#[derive(clap::Args, Debug)]
pub(crate) struct CallArgs {
    /// The method: Service/Method (DealsService/GetDeal) or its full name.
    method: String,
    /// The request as proto3 JSON (default {}; "-" reads it from standard input).
    request: Option<String>,
    #[command(flatten)]
    client: ClientArgs,
}

/// `crm completion SHELL`.
#[derive(clap::Args, Debug)]
pub(crate) struct CompletionArgs {
    /// The shell to complete in.
    #[arg(value_enum)]
    shell: clap_complete::Shell,
}

/// `crm logout`.
pub(crate) async fn logout(args: SessionArgs) -> anyhow::Result<()> {
    let mut client = Client::new(&args.client)?;
    let had = client.logout().await?;
    println!("{}", if had { "signed out" } else { "not signed in" });
    Ok(())
}

/// `crm whoami`.
pub(crate) async fn whoami(args: SessionArgs) -> anyhow::Result<()> {
    let mut client = Client::new(&args.client)?;
    let me = client.call("AuthService/GetMe", json!({})).await?;
    let server = client.server().to_string();
    print(client.output, &me, |me| {
        let mut shown = me.clone();
        shown["server"] = json!(server);
        record(
            &shown,
            &[
                col!("Name", "displayName"),
                col!("E-mail", "email"),
                col!("Id", "subject"),
                col!("Department", "departmentId"),
                col!("Server", "server"),
            ],
        )
    })
}

/// `crm call`.
pub(crate) async fn call(args: CallArgs) -> anyhow::Result<()> {
    let mut client = Client::new(&args.client)?;
    let text = match args.request.as_deref() {
        None => "{}".to_string(),
        Some("-") => std::io::read_to_string(std::io::stdin()).context("read the request")?,
        Some(text) => text.to_string(),
    };
    let request: Value = serde_json::from_str(&text).context("the request is not JSON")?;
    let answer = client.call(&args.method, request).await?;
    println!("{}", serde_json::to_string_pretty(&answer)?);
    Ok(())
}

/// `crm completion`: the script for `command`.
pub(crate) fn completion(args: CompletionArgs, mut command: clap::Command) {
    clap_complete::generate(args.shell, &mut command, "crm", &mut std::io::stdout());
}

/// `crm login`.
pub(crate) async fn login(args: LoginArgs) -> anyhow::Result<()> {
    let stdin = std::io::stdin();
    let email = match args.email {
        Some(email) => email,
        None if stdin.is_terminal() => {
            eprint!("E-mail: ");
            let mut line = String::new();
            stdin.lock().read_line(&mut line)?;
            line.trim().to_string()
        }
        None => bail!("give --email (or CRM_EMAIL)"),
    };
    let password = if args.password_stdin {
        let mut line = String::new();
        stdin.lock().read_line(&mut line).context("read the password")?;
        line.trim_end_matches(['\r', '\n']).to_string()
    } else if let Ok(password) = std::env::var("CRM_PASSWORD") {
        password
    } else if stdin.is_terminal() {
        rpassword::prompt_password("Password: ").context("read the password")?
    } else {
        bail!("no password: use --password-stdin, CRM_PASSWORD, or a terminal")
    };
    let mut client = Client::new(&args.client)?;
    let session = client.login(&email, &password).await?;
    let until = chrono::DateTime::from_timestamp(session.access_expires_at, 0).unwrap_or_default();
    println!("signed in to {} as {email} (the access token is renewed as needed; it expires {until})", session.server);
    Ok(())
}

/// Pages through a list call until `limit` records: the records (under `field`).
async fn list(
    client: &mut Client,
    method: &str,
    mut request: Map<String, Value>,
    field: &str,
    limit: usize,
) -> anyhow::Result<Value> {
    let mut records = Vec::new();
    loop {
        request.insert("pageSize".into(), json!(limit.saturating_sub(records.len()).clamp(1, 500)));
        let page = client.call(method, Value::Object(request.clone())).await?;
        if let Some(Value::Array(items)) = page.get(field) {
            records.extend(items.iter().cloned());
        }
        let next = page.get("nextPageToken").and_then(Value::as_str).unwrap_or_default();
        if next.is_empty() || records.len() >= limit {
            break;
        }
        request.insert("pageToken".into(), json!(next));
    }
    records.truncate(limit);
    Ok(Value::Array(records))
}

fn list_request(list: &ListArgs) -> Map<String, Value> {
    let mut request = Map::new();
    if let Some(filter) = &list.filter {
        request.insert("filter".into(), json!(filter));
    }
    if let Some(order) = &list.order_by {
        request.insert("orderBy".into(), json!(order));
    }
    request
}

fn rows(value: &Value) -> &[Value] {
    value.as_array().map(Vec::as_slice).unwrap_or_default()
}

/// `crm contacts`.
pub(crate) async fn contacts(args: ContactsArgs) -> anyhow::Result<()> {
    let mut client = Client::new(&args.client)?;
    let output = client.output;
    let columns = person_columns();
    match args.command {
        ContactsCommand::List { list: options, search } => {
            let mut request = list_request(&options);
            if let Some(search) = search {
                request.insert("query".into(), json!(search));
            }
            let people = list(&mut client, "ContactsService/ListPeople", request, "people", options.limit).await?;
            print(output, &people, |p| table(rows(p), &columns))
        }
        ContactsCommand::Get { id } => {
            let person = client.call("ContactsService/GetPerson", json!({"id": id})).await?;
            print(output, &person, |p| record(p, &columns))
        }
        ContactsCommand::Create { name, fields } => {
            let (person, _) = fields.json(Some(&name));
            let person = client.call("ContactsService/CreatePerson", json!({"person": person})).await?;
            print(output, &person, |p| record(p, &columns))
        }
        ContactsCommand::Update { id, name, fields } => {
            let (mut person, mask) = fields.json(name.as_deref());
            if mask.is_empty() {
                bail!("nothing to change: give at least one field (crm contacts update --help)");
            }
            person.insert("id".into(), json!(id));
            let request = json!({"person": person, "updateMask": mask.join(",")});
            let person = client.call("ContactsService/UpdatePerson", request).await?;
            print(output, &person, |p| record(p, &columns))
        }
        ContactsCommand::Delete { id } => {
            client.call("ContactsService/DeletePerson", json!({"id": id})).await?;
            print(output, &json!({"deleted": id}), |_| format!("deleted {id}\n"))
        }
    }
}

/// `crm deals`.
pub(crate) async fn deals(args: DealsArgs) -> anyhow::Result<()> {
    let mut client = Client::new(&args.client)?;
    let output = client.output;
    let columns = deal_columns();
    match args.command {
        DealsCommand::List { list: options } => {
            let deals =
                list(&mut client, "DealsService/ListDeals", list_request(&options), "deals", options.limit).await?;
            print(output, &deals, |d| table(rows(d), &columns))
        }
        DealsCommand::Get { id } => {
            let deal = client.call("DealsService/GetDeal", json!({"id": id})).await?;
            print(output, &deal, |d| record(d, &columns))
        }
        DealsCommand::Create { title, fields, pipeline } => {
            let (mut deal, _) = fields.json(Some(&title))?;
            if let Some(pipeline) = pipeline {
                deal.insert("pipelineId".into(), json!(pipeline));
            }
            let deal = client.call("DealsService/CreateDeal", json!({"deal": deal})).await?;
            print(output, &deal, |d| record(d, &columns))
        }
        DealsCommand::Update { id, title, fields } => {
            let (mut deal, mask) = fields.json(title.as_deref())?;
            if mask.is_empty() {
                bail!("nothing to change: give at least one field (crm deals update --help)");
            }
            deal.insert("id".into(), json!(id));
            let deal =
                client.call("DealsService/UpdateDeal", json!({"deal": deal, "updateMask": mask.join(",")})).await?;
            print(output, &deal, |d| record(d, &columns))
        }
        DealsCommand::Move { id, stage, lost_reason } => {
            let mut request = json!({"id": id, "stageId": stage});
            if let Some(reason) = lost_reason {
                request["lostReason"] = json!(reason);
            }
            let deal = client.call("DealsService/MoveDeal", request).await?;
            print(output, &deal, |d| record(d, &columns))
        }
        DealsCommand::Pipelines => {
            let answer = client.call("DealsService/ListPipelines", json!({})).await?;
            print(output, &answer, |a| {
                let mut stages = Vec::new();
                for pipeline in rows(&a["pipelines"]) {
                    for stage in rows(&pipeline["stages"]) {
                        stages.push(json!({"pipeline": pipeline["name"], "stage": stage["name"], "id": stage["id"],
                            "kind": stage["kind"], "probability": stage["probability"]}));
                    }
                }
                table(
                    &stages,
                    &[
                        col!("PIPELINE", "pipeline"),
                        col!("STAGE", "stage"),
                        Column { header: "KIND", value: |v| short_enum(&super::cell_at(v, "kind"), "STAGE_KIND_") },
                        col!("PROBABILITY", "probability"),
                        col!("STAGE ID", "id"),
                    ],
                )
            })
        }
    }
}

/// `crm tasks`.
pub(crate) async fn tasks(args: TasksArgs) -> anyhow::Result<()> {
    let mut client = Client::new(&args.client)?;
    let output = client.output;
    let columns = task_columns();
    match args.command {
        TasksCommand::List { list: options, overdue } => {
            let mut request = list_request(&options);
            if overdue {
                request.insert("overdue".into(), json!(true));
            }
            let tasks = list(&mut client, "TasksService/ListTasks", request, "tasks", options.limit).await?;
            print(output, &tasks, |t| table(rows(t), &columns))
        }
        TasksCommand::Create { title, due, time_zone, assignee, person, deal, description } => {
            let mut task = json!({"title": title});
            for (field, value) in [
                ("dueTime", due),
                ("timeZone", time_zone),
                ("assigneeId", assignee),
                ("dealId", deal),
                ("description", description),
            ] {
                if let Some(value) = value {
                    task[field] = json!(value);
                }
            }
            if let Some(person) = person {
                task["customer"] = json!({"recordType": "RECORD_TYPE_PERSON", "id": person});
            }
            let task = client.call("TasksService/CreateTask", json!({"task": task})).await?;
            print(output, &task, |t| record(t, &columns))
        }
        TasksCommand::Complete { id } => {
            let task = client.call("TasksService/CompleteTask", json!({"id": id})).await?;
            print(output, &task, |t| record(t, &columns))
        }
    }
}

/// `crm notifications`.
pub(crate) async fn notifications(args: NotificationsArgs) -> anyhow::Result<()> {
    let mut client = Client::new(&args.client)?;
    let output = client.output;
    match args.command {
        NotificationsCommand::List { unread, limit } => {
            let mut request = Map::new();
            if unread {
                request.insert("unreadOnly".into(), json!(true));
            }
            let inbox =
                list(&mut client, "NotificationsService/ListNotifications", request, "notifications", limit).await?;
            print(output, &inbox, |n| table(rows(n), &notification_columns()))
        }
        NotificationsCommand::Read { ids, all } => {
            if ids.is_empty() && !all {
                bail!("name the notifications to mark read, or --all");
            }
            let answer = client.call("NotificationsService/MarkRead", json!({"ids": ids, "all": all})).await?;
            print(output, &answer, |a| format!("marked read: {}\n", super::cell_at(a, "marked")))
        }
        NotificationsCommand::Watch { after } => {
            let request = json!({"afterId": after.unwrap_or_default()});
            eprintln!("watching for notifications (Ctrl-C to stop)");
            client
                .stream("NotificationsService/Subscribe", request, |n| {
                    let line = match output {
                        Output::Json => serde_json::to_string(&n)?,
                        Output::Table => format!(
                            "{}  {}  {}",
                            super::cell_at(&n, "createTime"),
                            super::cell_at(&n, "title"),
                            super::cell_at(&n, "id")
                        ),
                    };
                    println!("{line}");
                    Ok(())
                })
                .await
        }
    }
}

/// `crm report`.
pub(crate) async fn report(args: ReportArgs) -> anyhow::Result<()> {
    let mut client = Client::new(&args.client)?;
    let mut request = json!({"kind": args.kind.proto(), "ownerIds": args.owners});
    for (field, value) in [
        ("startDate", &args.from),
        ("endDate", &args.to),
        ("timeZone", &args.time_zone),
        ("departmentId", &args.department),
        ("pipelineId", &args.pipeline),
        ("currencyCode", &args.currency),
    ] {
        if let Some(value) = value {
            request[field] = json!(value);
        }
    }
    if client.output == Output::Json {
        let report = client.call("DealsService/RunReport", request).await?;
        return print(Output::Json, &report, |_| String::new());
    }
    // The downloadable CSV carries the values as people read them (money in its currency's
    // digits, rates as percentages): the table shows the same.
    let body = client.call("DealsService/ExportReport", request).await?;
    let data = body.get("data").and_then(Value::as_str).unwrap_or_default();
    use base64::Engine;
    let csv = base64::engine::general_purpose::STANDARD.decode(data).context("the report's bytes")?;
    if args.csv {
        use std::io::Write;
        std::io::stdout().write_all(&csv)?;
        return Ok(());
    }
    let mut reader = csv::Reader::from_reader(csv.as_slice());
    let headers: Vec<String> = reader.headers()?.iter().map(str::to_string).collect();
    let rows: Vec<Vec<String>> =
        reader.records().map(|r| r.map(|r| r.iter().map(str::to_string).collect())).collect::<Result<_, _>>()?;
    print!("{}", super::grid(&headers, &rows));
    Ok(())
}

#[cfg(test)]
mod tests {
    use prost_reflect::{DescriptorPool, DynamicMessage};

    use super::*;

    /// Every field a command sets is a field of its call's request, in its JSON spelling.
    #[test]
    fn commands_build_requests_of_their_calls() {
        let pool = DescriptorPool::decode(crm_proto::FILE_DESCRIPTOR_SET).unwrap();
        let parse = |method: &str, request: Value| {
            let (service, method) = method.split_once('/').unwrap();
            let service = pool.services().find(|s| s.name() == service).unwrap();
            let method = service.methods().find(|m| m.name() == method).unwrap();
            DynamicMessage::deserialize(method.input(), request).unwrap_or_else(|e| panic!("{}: {e}", method.name()))
        };
        let person = PersonFields {
            emails: vec!["a@example.com".into()],
            phones: vec!["+49 30 1234567".into()],
            company: Some("c".into()),
            owner: Some("u".into()),
            stage: Some("customer".into()),
            tags: vec!["vip".into()],
            notes: Some("n".into()),
        };
        let (json, mask) = person.json(Some("Ada"));
        assert_eq!(json["stage"], "LIFECYCLE_STAGE_CUSTOMER");
        parse("ContactsService/CreatePerson", json!({"person": json}));
        parse("ContactsService/UpdatePerson", json!({"person": json, "updateMask": mask.join(",")}));
        let deal = DealFields {
            amount: Some("19.99".into()),
            currency: Some("eur".into()),
            person: Some("p".into()),
            company: Some("c".into()),
            owner: Some("u".into()),
            close_date: Some("2026-12-31".into()),
            notes: Some("n".into()),
        };
        let (json, mask) = deal.json(Some("Deal")).unwrap();
        assert_eq!(json["amount"], json!({"currencyCode": "EUR", "minorUnits": "1999"}));
        parse("DealsService/CreateDeal", json!({"deal": json}));
        parse("DealsService/UpdateDeal", json!({"deal": json, "updateMask": mask.join(",")}));
        for kind in [ReportKind::Funnel, ReportKind::WonLost, ReportKind::Forecast, ReportKind::WonBySource] {
            parse(
                "DealsService/RunReport",
                json!({"kind": kind.proto(), "ownerIds": ["u"], "startDate": "2026-01-01"}),
            );
        }
        parse(
            "TasksService/CreateTask",
            json!({"task": {"title": "t", "dueTime": "2026-12-14T09:00:00Z",
            "customer": {"recordType": "RECORD_TYPE_PERSON", "id": "p"}}}),
        );
        parse("NotificationsService/MarkRead", json!({"ids": ["n"], "all": false}));
        parse("NotificationsService/Subscribe", json!({"afterId": ""}));
        assert_eq!(enum_name("LIFECYCLE_STAGE_", "Lifecycle_Stage_lead"), "LIFECYCLE_STAGE_LEAD");
    }
}
