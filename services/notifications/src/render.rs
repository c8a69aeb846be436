//! Templates: the shipped ones (English, Russian, Chinese for every event type and channel),
//! administrators' own on top, and rendering with minijinja — strict about unknown variables,
//! with a fuel limit so that no template can loop for long, and size limits on what it makes.
//!
//! A template's context: `event` (the event's fields by proto name), `event_type`, `event_id`,
//! `source`, `subject_id`, `actor_id`, `occurred_at` (RFC 3339), and `recipient` — `id`
//! everywhere, plus `display_name` in e-mail and SMS templates and `email` in e-mail ones. An
//! SMS template's subject is empty: a text message has only its body.

use crm_proto::notifications::v1::Channel;
use minijinja::{Environment, UndefinedBehavior};
use serde_json::{Value, json};

/// Most characters of a template's subject and body as written.
pub const MAX_SUBJECT_SOURCE: usize = 1_000;
pub const MAX_BODY_SOURCE: usize = 20_000;
/// Most characters of what a template makes.
pub const MAX_SUBJECT: usize = 500;
pub const MAX_BODY: usize = 50_000;
/// Instructions a template may run (minijinja's fuel): plenty for text, not for a long loop.
const FUEL: u64 = 50_000;

/// A template's text, as written.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Source {
    pub subject: String,
    pub body: String,
}

/// What a template made.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Rendered {
    pub subject: String,
    pub body: String,
}

/// Renders `source` with `context`; the error says which part failed and why (an unknown
/// variable, a syntax error with its line).
pub fn render(source: &Source, context: &Value) -> Result<Rendered, String> {
    let mut env = Environment::new();
    env.set_undefined_behavior(UndefinedBehavior::Strict);
    env.set_fuel(Some(FUEL));
    env.set_auto_escape_callback(|_| minijinja::AutoEscape::None);
    let part = |name: &str, text: &str, max: usize| -> Result<String, String> {
        let out = env.render_str(text, context).map_err(|e| describe(name, &e))?;
        if out.chars().count() > max {
            return Err(format!("{name} renders to more than {max} characters"));
        }
        Ok(out)
    };
    let subject = part("subject", &source.subject, MAX_SUBJECT)?;
    let subject = subject.split_whitespace().collect::<Vec<_>>().join(" ");
    Ok(Rendered { subject, body: part("body", &source.body, MAX_BODY)? })
}

fn describe(part: &str, err: &minijinja::Error) -> String {
    let mut text = format!("{part}: {}", err.kind());
    if let Some(detail) = err.detail() {
        text.push_str(&format!(": {detail}"));
    }
    if let Some(line) = err.line() {
        text.push_str(&format!(" (line {line})"));
    }
    text
}

/// The context of one notification.
pub struct Context<'a> {
    pub event: &'a Value,
    pub event_type: &'a str,
    pub event_id: &'a str,
    pub source: &'a str,
    pub subject_id: &'a str,
    pub actor_id: &'a str,
    pub occurred_at: &'a str,
    pub recipient: Value,
}

impl Context<'_> {
    pub fn to_value(&self) -> Value {
        json!({
            "event": self.event,
            "event_type": self.event_type,
            "event_id": self.event_id,
            "source": self.source,
            "subject_id": self.subject_id,
            "actor_id": self.actor_id,
            "occurred_at": self.occurred_at,
            "recipient": self.recipient,
        })
    }
}

/// The recipient as templates of `channel` see them.
pub fn recipient(channel: Channel, id: &str, display_name: &str, email: &str) -> Value {
    match channel {
        Channel::Email => json!({"id": id, "display_name": display_name, "email": email}),
        Channel::Sms => json!({"id": id, "display_name": display_name}),
        _ => json!({"id": id}),
    }
}

/// Whether templates of `channel` have a subject (an SMS has only its text).
pub fn has_subject(channel: Channel) -> bool {
    channel != Channel::Sms
}

/// The variables a template of `event_type` on `channel` may use.
pub fn variables(event_type: &str, channel: Channel) -> Vec<String> {
    let mut names: Vec<String> =
        crate::catalog::field_names(event_type).into_iter().map(|f| format!("event.{f}")).collect();
    names.extend(
        ["event_type", "event_id", "source", "subject_id", "actor_id", "occurred_at", "recipient.id"].map(String::from),
    );
    match channel {
        Channel::Email => names.extend(["recipient.display_name", "recipient.email"].map(String::from)),
        Channel::Sms => names.push("recipient.display_name".into()),
        _ => {}
    }
    names
}

/// The locales to look a template up in, best first: the user's, its language, the suite's
/// default, English.
pub fn fallbacks(locale: &str, default_locale: &str) -> Vec<String> {
    let mut out: Vec<String> = Vec::new();
    for candidate in [locale, language(locale), default_locale, language(default_locale), "en"] {
        let candidate = candidate.trim().to_ascii_lowercase();
        if !candidate.is_empty() && !out.contains(&candidate) {
            out.push(candidate);
        }
    }
    out
}

fn language(locale: &str) -> &str {
    locale.split(['-', '_']).next().unwrap_or("")
}

/// A BCP 47 tag as templates and preferences keep it: "en", "pt-br", "zh-hans"; `None` when it
/// is not one.
pub fn normalize_locale(locale: &str) -> Option<String> {
    let tag = locale.trim().replace('_', "-").to_ascii_lowercase();
    let mut parts = tag.split('-');
    let first = parts.next()?;
    let ok = (2..=3).contains(&first.len())
        && first.chars().all(|c| c.is_ascii_lowercase())
        && parts.all(|p| (1..=8).contains(&p.len()) && p.chars().all(|c| c.is_ascii_alphanumeric()));
    (ok && tag.len() <= 35).then_some(tag)
}

/// The shipped template of an event type, channel and locale.
pub fn shipped(event_type: &str, channel: Channel, locale: &str) -> Option<Source> {
    SHIPPED
        .iter()
        .find(|t| t.0 == event_type && t.1 == channel && t.2 == locale)
        .map(|t| Source { subject: t.3.to_string(), body: t.4.to_string() })
}

/// Every shipped template: (event type, channel, locale, subject, body).
pub const SHIPPED: &[(&str, Channel, &str, &str, &str)] = &[
    // A record assigned or transferred.
    (
        "crm.contacts.v1.ContactOwnerChanged",
        Channel::InApp,
        "en",
        "{% if event.from_owner_id %}Transferred to you{% else %}Assigned to you{% endif %}: {{ event.display_name }}",
        "{% if event.record_type == 'RECORD_TYPE_COMPANY' %}The company{% else %}The person{% endif %} {{ event.display_name }} is now yours.",
    ),
    (
        "crm.contacts.v1.ContactOwnerChanged",
        Channel::InApp,
        "ru",
        "{% if event.from_owner_id %}Передан вам{% else %}Назначен вам{% endif %}: {{ event.display_name }}",
        "{% if event.record_type == 'RECORD_TYPE_COMPANY' %}Компания{% else %}Контакт{% endif %} {{ event.display_name }} теперь ваш.",
    ),
    (
        "crm.contacts.v1.ContactOwnerChanged",
        Channel::InApp,
        "zh",
        "{% if event.from_owner_id %}已转交给您{% else %}已分配给您{% endif %}：{{ event.display_name }}",
        "{% if event.record_type == 'RECORD_TYPE_COMPANY' %}公司{% else %}联系人{% endif %}「{{ event.display_name }}」现在由您负责。",
    ),
    (
        "crm.contacts.v1.ContactOwnerChanged",
        Channel::Email,
        "en",
        "{% if event.from_owner_id %}Transferred to you{% else %}Assigned to you{% endif %}: {{ event.display_name }}",
        "Hello {{ recipient.display_name }},\n\n{% if event.record_type == 'RECORD_TYPE_COMPANY' %}the company{% else %}the person{% endif %} {{ event.display_name }} is now yours in the CRM.\n\nRecord id: {{ event.id }}\n",
    ),
    (
        "crm.contacts.v1.ContactOwnerChanged",
        Channel::Email,
        "ru",
        "{% if event.from_owner_id %}Передан вам{% else %}Назначен вам{% endif %}: {{ event.display_name }}",
        "Здравствуйте, {{ recipient.display_name }}!\n\n{% if event.record_type == 'RECORD_TYPE_COMPANY' %}Компания{% else %}Контакт{% endif %} {{ event.display_name }} теперь закреплён за вами в CRM.\n\nИдентификатор записи: {{ event.id }}\n",
    ),
    (
        "crm.contacts.v1.ContactOwnerChanged",
        Channel::Email,
        "zh",
        "{% if event.from_owner_id %}已转交给您{% else %}已分配给您{% endif %}：{{ event.display_name }}",
        "{{ recipient.display_name }}，您好：\n\n{% if event.record_type == 'RECORD_TYPE_COMPANY' %}公司{% else %}联系人{% endif %}「{{ event.display_name }}」现在由您在 CRM 中负责。\n\n记录编号：{{ event.id }}\n",
    ),
    // Locked out after wrong passwords.
    (
        "crm.auth.v1.UserLockedOut",
        Channel::InApp,
        "en",
        "Your account was locked",
        "{{ event.failed_attempts }} wrong passwords in a row (last from {{ event.client_address }}). Sign-in is possible again after {{ event.locked_until }}.",
    ),
    (
        "crm.auth.v1.UserLockedOut",
        Channel::InApp,
        "ru",
        "Ваша учётная запись заблокирована",
        "{{ event.failed_attempts }} неверных паролей подряд (последний с адреса {{ event.client_address }}). Войти снова можно после {{ event.locked_until }}.",
    ),
    (
        "crm.auth.v1.UserLockedOut",
        Channel::InApp,
        "zh",
        "您的账户已被锁定",
        "连续 {{ event.failed_attempts }} 次密码错误（最后一次来自 {{ event.client_address }}）。{{ event.locked_until }} 之后可再次登录。",
    ),
    (
        "crm.auth.v1.UserLockedOut",
        Channel::Email,
        "en",
        "Your CRM account was locked",
        "Hello {{ recipient.display_name }},\n\nafter {{ event.failed_attempts }} wrong passwords in a row (the last from {{ event.client_address }}) your account is locked until {{ event.locked_until }}.\n\nIf this was not you, tell your administrator.\n",
    ),
    (
        "crm.auth.v1.UserLockedOut",
        Channel::Email,
        "ru",
        "Ваша учётная запись в CRM заблокирована",
        "Здравствуйте, {{ recipient.display_name }}!\n\nПосле {{ event.failed_attempts }} неверных паролей подряд (последний с адреса {{ event.client_address }}) вход заблокирован до {{ event.locked_until }}.\n\nЕсли это были не вы, сообщите администратору.\n",
    ),
    (
        "crm.auth.v1.UserLockedOut",
        Channel::Email,
        "zh",
        "您的 CRM 账户已被锁定",
        "{{ recipient.display_name }}，您好：\n\n由于连续 {{ event.failed_attempts }} 次密码错误（最后一次来自 {{ event.client_address }}），您的账户已被锁定至 {{ event.locked_until }}。\n\n如果这不是您本人的操作，请告知管理员。\n",
    ),
    // Password set.
    (
        "crm.auth.v1.PasswordChanged",
        Channel::InApp,
        "en",
        "Your password was changed",
        "{% if event.by_self %}You changed your password{% else %}An administrator set a new password for you{% endif %}; {{ event.revoked_sessions }} other sign-in(s) were ended.",
    ),
    (
        "crm.auth.v1.PasswordChanged",
        Channel::InApp,
        "ru",
        "Ваш пароль изменён",
        "{% if event.by_self %}Вы сменили пароль{% else %}Администратор задал вам новый пароль{% endif %}; завершено других входов: {{ event.revoked_sessions }}.",
    ),
    (
        "crm.auth.v1.PasswordChanged",
        Channel::InApp,
        "zh",
        "您的密码已更改",
        "{% if event.by_self %}您已更改密码{% else %}管理员为您设置了新密码{% endif %}；已结束 {{ event.revoked_sessions }} 个其他登录。",
    ),
    (
        "crm.auth.v1.PasswordChanged",
        Channel::Email,
        "en",
        "Your CRM password was changed",
        "Hello {{ recipient.display_name }},\n\n{% if event.by_self %}you changed your password{% else %}an administrator set a new password for you{% endif %}, and {{ event.revoked_sessions }} sign-in(s) were ended.\n\nIf this was not you, tell your administrator at once.\n",
    ),
    (
        "crm.auth.v1.PasswordChanged",
        Channel::Email,
        "ru",
        "Ваш пароль в CRM изменён",
        "Здравствуйте, {{ recipient.display_name }}!\n\n{% if event.by_self %}Вы сменили пароль{% else %}Администратор задал вам новый пароль{% endif %}; завершено входов: {{ event.revoked_sessions }}.\n\nЕсли это были не вы, немедленно сообщите администратору.\n",
    ),
    (
        "crm.auth.v1.PasswordChanged",
        Channel::Email,
        "zh",
        "您的 CRM 密码已更改",
        "{{ recipient.display_name }}，您好：\n\n{% if event.by_self %}您已更改密码{% else %}管理员为您设置了新密码{% endif %}，已结束 {{ event.revoked_sessions }} 个登录。\n\n如果这不是您本人的操作，请立即告知管理员。\n",
    ),
    // Text messages: a body only.
    ("crm.contacts.v1.ContactOwnerChanged", Channel::Sms, "en", "", "CRM: {{ event.display_name }} is now yours."),
    ("crm.contacts.v1.ContactOwnerChanged", Channel::Sms, "ru", "", "CRM: {{ event.display_name }} теперь ваш клиент."),
    ("crm.contacts.v1.ContactOwnerChanged", Channel::Sms, "zh", "", "CRM：「{{ event.display_name }}」现在由您负责。"),
    (
        "crm.auth.v1.UserLockedOut",
        Channel::Sms,
        "en",
        "",
        "CRM: your account is locked until {{ event.locked_until }} after {{ event.failed_attempts }} wrong passwords.",
    ),
    (
        "crm.auth.v1.UserLockedOut",
        Channel::Sms,
        "ru",
        "",
        "CRM: вход заблокирован до {{ event.locked_until }} после {{ event.failed_attempts }} неверных паролей.",
    ),
    (
        "crm.auth.v1.UserLockedOut",
        Channel::Sms,
        "zh",
        "",
        "CRM：连续 {{ event.failed_attempts }} 次密码错误，账户已锁定至 {{ event.locked_until }}。",
    ),
    (
        "crm.auth.v1.PasswordChanged",
        Channel::Sms,
        "en",
        "",
        "CRM: your password was changed. Not you? Tell your administrator.",
    ),
    (
        "crm.auth.v1.PasswordChanged",
        Channel::Sms,
        "ru",
        "",
        "CRM: ваш пароль изменён. Если это не вы, сообщите администратору.",
    ),
    ("crm.auth.v1.PasswordChanged", Channel::Sms, "zh", "", "CRM：您的密码已更改。如非本人操作，请告知管理员。"),
    // A task given to someone.
    (
        "crm.tasks.v1.TaskAssigned",
        Channel::InApp,
        "en",
        "New task: {{ event.title }}",
        "A task was given to you{% if event.previous_assignee_id %} (handed over){% endif %}: {{ event.title }}{% if event.customer_name %} ({{ event.customer_name }}){% endif %}{% if event.due_local %}, due {{ event.due_local }}{% endif %}.",
    ),
    (
        "crm.tasks.v1.TaskAssigned",
        Channel::InApp,
        "ru",
        "Новая задача: {{ event.title }}",
        "Вам назначена задача{% if event.previous_assignee_id %} (передана){% endif %}: {{ event.title }}{% if event.customer_name %} ({{ event.customer_name }}){% endif %}{% if event.due_local %}, срок {{ event.due_local }}{% endif %}.",
    ),
    (
        "crm.tasks.v1.TaskAssigned",
        Channel::InApp,
        "zh",
        "新任务：{{ event.title }}",
        "您有一项新任务{% if event.previous_assignee_id %}（转交）{% endif %}：{{ event.title }}{% if event.customer_name %}（{{ event.customer_name }}）{% endif %}{% if event.due_local %}，截止 {{ event.due_local }}{% endif %}。",
    ),
    (
        "crm.tasks.v1.TaskAssigned",
        Channel::Email,
        "en",
        "New task: {{ event.title }}",
        "Hello {{ recipient.display_name }},\n\na task was given to you in the CRM: {{ event.title }}{% if event.customer_name %} ({{ event.customer_name }}){% endif %}.\n{% if event.due_local %}Due: {{ event.due_local }}\n{% endif %}Priority: {{ event.priority }}\n\nTask id: {{ event.task_id }}\n",
    ),
    (
        "crm.tasks.v1.TaskAssigned",
        Channel::Email,
        "ru",
        "Новая задача: {{ event.title }}",
        "Здравствуйте, {{ recipient.display_name }}!\n\nВам назначена задача в CRM: {{ event.title }}{% if event.customer_name %} ({{ event.customer_name }}){% endif %}.\n{% if event.due_local %}Срок: {{ event.due_local }}\n{% endif %}Приоритет: {{ event.priority }}\n\nИдентификатор задачи: {{ event.task_id }}\n",
    ),
    (
        "crm.tasks.v1.TaskAssigned",
        Channel::Email,
        "zh",
        "新任务：{{ event.title }}",
        "{{ recipient.display_name }}，您好：\n\n您在 CRM 中有一项新任务：{{ event.title }}{% if event.customer_name %}（{{ event.customer_name }}）{% endif %}。\n{% if event.due_local %}截止时间：{{ event.due_local }}\n{% endif %}优先级：{{ event.priority }}\n\n任务编号：{{ event.task_id }}\n",
    ),
    (
        "crm.tasks.v1.TaskAssigned",
        Channel::Sms,
        "en",
        "",
        "CRM: new task {{ event.title }}{% if event.due_local %}, due {{ event.due_local }}{% endif %}.",
    ),
    (
        "crm.tasks.v1.TaskAssigned",
        Channel::Sms,
        "ru",
        "",
        "CRM: новая задача {{ event.title }}{% if event.due_local %}, срок {{ event.due_local }}{% endif %}.",
    ),
    (
        "crm.tasks.v1.TaskAssigned",
        Channel::Sms,
        "zh",
        "",
        "CRM：新任务「{{ event.title }}」{% if event.due_local %}，截止 {{ event.due_local }}{% endif %}。",
    ),
    // A reminder of a task.
    (
        "crm.tasks.v1.TaskReminderDue",
        Channel::InApp,
        "en",
        "Reminder: {{ event.title }}",
        "{{ event.title }}{% if event.customer_name %} ({{ event.customer_name }}){% endif %} is due {{ event.due_local }}.",
    ),
    (
        "crm.tasks.v1.TaskReminderDue",
        Channel::InApp,
        "ru",
        "Напоминание: {{ event.title }}",
        "{{ event.title }}{% if event.customer_name %} ({{ event.customer_name }}){% endif %}: срок {{ event.due_local }}.",
    ),
    (
        "crm.tasks.v1.TaskReminderDue",
        Channel::InApp,
        "zh",
        "提醒：{{ event.title }}",
        "「{{ event.title }}」{% if event.customer_name %}（{{ event.customer_name }}）{% endif %}将于 {{ event.due_local }} 到期。",
    ),
    (
        "crm.tasks.v1.TaskReminderDue",
        Channel::Email,
        "en",
        "Reminder: {{ event.title }}",
        "Hello {{ recipient.display_name }},\n\nyour task {{ event.title }}{% if event.customer_name %} ({{ event.customer_name }}){% endif %} is due {{ event.due_local }}.\n\nTask id: {{ event.task_id }}\n",
    ),
    (
        "crm.tasks.v1.TaskReminderDue",
        Channel::Email,
        "ru",
        "Напоминание: {{ event.title }}",
        "Здравствуйте, {{ recipient.display_name }}!\n\nСрок вашей задачи {{ event.title }}{% if event.customer_name %} ({{ event.customer_name }}){% endif %}: {{ event.due_local }}.\n\nИдентификатор задачи: {{ event.task_id }}\n",
    ),
    (
        "crm.tasks.v1.TaskReminderDue",
        Channel::Email,
        "zh",
        "提醒：{{ event.title }}",
        "{{ recipient.display_name }}，您好：\n\n您的任务「{{ event.title }}」{% if event.customer_name %}（{{ event.customer_name }}）{% endif %}将于 {{ event.due_local }} 到期。\n\n任务编号：{{ event.task_id }}\n",
    ),
    (
        "crm.tasks.v1.TaskReminderDue",
        Channel::Sms,
        "en",
        "",
        "CRM reminder: {{ event.title }}, due {{ event.due_local }}.",
    ),
    (
        "crm.tasks.v1.TaskReminderDue",
        Channel::Sms,
        "ru",
        "",
        "CRM напоминание: {{ event.title }}, срок {{ event.due_local }}.",
    ),
    (
        "crm.tasks.v1.TaskReminderDue",
        Channel::Sms,
        "zh",
        "",
        "CRM 提醒：「{{ event.title }}」将于 {{ event.due_local }} 到期。",
    ),
    // A task overdue past the grace period, to the assignee's supervisor.
    (
        "crm.tasks.v1.TaskOverdue",
        Channel::InApp,
        "en",
        "Overdue: {{ event.title }}",
        "{% if event.assignee_name %}{{ event.assignee_name }}{% else %}A member of your team{% endif %}'s {% if event.kind == 'TASK_KIND_FOLLOW_UP' %}follow-up{% else %}task{% endif %} {{ event.title }}{% if event.customer_name %} ({{ event.customer_name }}){% endif %} was due {{ event.due_local }} and is still open.",
    ),
    (
        "crm.tasks.v1.TaskOverdue",
        Channel::InApp,
        "ru",
        "Просрочено: {{ event.title }}",
        "{% if event.kind == 'TASK_KIND_FOLLOW_UP' %}Контакт с клиентом{% else %}Задача{% endif %} «{{ event.title }}»{% if event.customer_name %} ({{ event.customer_name }}){% endif %}{% if event.assignee_name %} сотрудника {{ event.assignee_name }}{% endif %} не выполнена: срок был {{ event.due_local }}.",
    ),
    (
        "crm.tasks.v1.TaskOverdue",
        Channel::InApp,
        "zh",
        "已逾期：{{ event.title }}",
        "{% if event.assignee_name %}{{ event.assignee_name }} 的{% endif %}{% if event.kind == 'TASK_KIND_FOLLOW_UP' %}跟进{% else %}任务{% endif %}「{{ event.title }}」{% if event.customer_name %}（{{ event.customer_name }}）{% endif %}已于 {{ event.due_local }} 到期，仍未完成。",
    ),
    (
        "crm.tasks.v1.TaskOverdue",
        Channel::Email,
        "en",
        "Overdue: {{ event.title }}",
        "Hello {{ recipient.display_name }},\n\n{% if event.assignee_name %}{{ event.assignee_name }}{% else %}A member of your team{% endif %}'s {% if event.kind == 'TASK_KIND_FOLLOW_UP' %}follow-up{% else %}task{% endif %} {{ event.title }}{% if event.customer_name %} ({{ event.customer_name }}){% endif %} was due {{ event.due_local }} and is still open.\n\nTask id: {{ event.task_id }}\n",
    ),
    (
        "crm.tasks.v1.TaskOverdue",
        Channel::Email,
        "ru",
        "Просрочено: {{ event.title }}",
        "Здравствуйте, {{ recipient.display_name }}!\n\n{% if event.kind == 'TASK_KIND_FOLLOW_UP' %}Контакт с клиентом{% else %}Задача{% endif %} «{{ event.title }}»{% if event.customer_name %} ({{ event.customer_name }}){% endif %}{% if event.assignee_name %} сотрудника {{ event.assignee_name }}{% endif %} не выполнена: срок был {{ event.due_local }}.\n\nИдентификатор задачи: {{ event.task_id }}\n",
    ),
    (
        "crm.tasks.v1.TaskOverdue",
        Channel::Email,
        "zh",
        "已逾期：{{ event.title }}",
        "{{ recipient.display_name }}，您好：\n\n{% if event.assignee_name %}{{ event.assignee_name }} 的{% endif %}{% if event.kind == 'TASK_KIND_FOLLOW_UP' %}跟进{% else %}任务{% endif %}「{{ event.title }}」{% if event.customer_name %}（{{ event.customer_name }}）{% endif %}已于 {{ event.due_local }} 到期，仍未完成。\n\n任务编号：{{ event.task_id }}\n",
    ),
    (
        "crm.tasks.v1.TaskOverdue",
        Channel::Sms,
        "en",
        "",
        "CRM: overdue since {{ event.due_local }}: {{ event.title }}{% if event.assignee_name %} ({{ event.assignee_name }}){% endif %}.",
    ),
    (
        "crm.tasks.v1.TaskOverdue",
        Channel::Sms,
        "ru",
        "",
        "CRM: просрочено с {{ event.due_local }}: {{ event.title }}{% if event.assignee_name %} ({{ event.assignee_name }}){% endif %}.",
    ),
    (
        "crm.tasks.v1.TaskOverdue",
        Channel::Sms,
        "zh",
        "",
        "CRM：自 {{ event.due_local }} 起逾期：「{{ event.title }}」{% if event.assignee_name %}（{{ event.assignee_name }}）{% endif %}。",
    ),
    // A comment on a task or an activity record.
    (
        "crm.tasks.v1.CommentAdded",
        Channel::InApp,
        "en",
        "{{ event.commenter_name }} commented",
        "{{ event.commenter_name }} on {% if event.subject_type == 'SUBJECT_TYPE_TASK' %}the task{% else %}the activity record{% endif %} {{ event.subject_title }}: {{ event.body }}",
    ),
    (
        "crm.tasks.v1.CommentAdded",
        Channel::InApp,
        "ru",
        "Комментарий: {{ event.commenter_name }}",
        "{{ event.commenter_name }} {% if event.subject_type == 'SUBJECT_TYPE_TASK' %}к задаче{% else %}к записи{% endif %} «{{ event.subject_title }}»: {{ event.body }}",
    ),
    (
        "crm.tasks.v1.CommentAdded",
        Channel::InApp,
        "zh",
        "{{ event.commenter_name }} 的批示",
        "{{ event.commenter_name }} 对{% if event.subject_type == 'SUBJECT_TYPE_TASK' %}任务{% else %}跟进记录{% endif %}「{{ event.subject_title }}」批示：{{ event.body }}",
    ),
    (
        "crm.tasks.v1.CommentAdded",
        Channel::Email,
        "en",
        "{{ event.commenter_name }} commented on {{ event.subject_title }}",
        "Hello {{ recipient.display_name }},\n\n{{ event.commenter_name }} commented on {% if event.subject_type == 'SUBJECT_TYPE_TASK' %}the task{% else %}the activity record{% endif %} {{ event.subject_title }}:\n\n{{ event.body }}\n",
    ),
    (
        "crm.tasks.v1.CommentAdded",
        Channel::Email,
        "ru",
        "Комментарий {{ event.commenter_name }}: {{ event.subject_title }}",
        "Здравствуйте, {{ recipient.display_name }}!\n\n{{ event.commenter_name }} оставил(а) комментарий {% if event.subject_type == 'SUBJECT_TYPE_TASK' %}к задаче{% else %}к записи{% endif %} «{{ event.subject_title }}»:\n\n{{ event.body }}\n",
    ),
    (
        "crm.tasks.v1.CommentAdded",
        Channel::Email,
        "zh",
        "{{ event.commenter_name }} 批示了「{{ event.subject_title }}」",
        "{{ recipient.display_name }}，您好：\n\n{{ event.commenter_name }} 对{% if event.subject_type == 'SUBJECT_TYPE_TASK' %}任务{% else %}跟进记录{% endif %}「{{ event.subject_title }}」作出批示：\n\n{{ event.body }}\n",
    ),
    (
        "crm.tasks.v1.CommentAdded",
        Channel::Sms,
        "en",
        "",
        "CRM: {{ event.commenter_name }} commented on {{ event.subject_title }}.",
    ),
    (
        "crm.tasks.v1.CommentAdded",
        Channel::Sms,
        "ru",
        "",
        "CRM: {{ event.commenter_name }} прокомментировал(а) «{{ event.subject_title }}».",
    ),
    (
        "crm.tasks.v1.CommentAdded",
        Channel::Sms,
        "zh",
        "",
        "CRM：{{ event.commenter_name }} 批示了「{{ event.subject_title }}」。",
    ),
    // A deal's stage automation telling someone.
    (
        "crm.deals.v1.DealAutomationNotice",
        Channel::InApp,
        "en",
        "{{ event.title }}: {{ event.stage_name }}",
        "{{ event.message }}",
    ),
    (
        "crm.deals.v1.DealAutomationNotice",
        Channel::InApp,
        "ru",
        "{{ event.title }}: {{ event.stage_name }}",
        "{{ event.message }}",
    ),
    (
        "crm.deals.v1.DealAutomationNotice",
        Channel::InApp,
        "zh",
        "{{ event.title }}：{{ event.stage_name }}",
        "{{ event.message }}",
    ),
    (
        "crm.deals.v1.DealAutomationNotice",
        Channel::Email,
        "en",
        "{{ event.title }} is now at {{ event.stage_name }}",
        "Hello {{ recipient.display_name }},\n\nthe deal {{ event.title }} entered the stage {{ event.stage_name }}.\n\n{{ event.message }}\n\nDeal id: {{ event.deal_id }}\n",
    ),
    (
        "crm.deals.v1.DealAutomationNotice",
        Channel::Email,
        "ru",
        "{{ event.title }}: этап «{{ event.stage_name }}»",
        "Здравствуйте, {{ recipient.display_name }}!\n\nСделка {{ event.title }} перешла на этап «{{ event.stage_name }}».\n\n{{ event.message }}\n\nИдентификатор сделки: {{ event.deal_id }}\n",
    ),
    (
        "crm.deals.v1.DealAutomationNotice",
        Channel::Email,
        "zh",
        "{{ event.title }} 进入「{{ event.stage_name }}」阶段",
        "{{ recipient.display_name }}，您好：\n\n交易「{{ event.title }}」已进入「{{ event.stage_name }}」阶段。\n\n{{ event.message }}\n\n交易编号：{{ event.deal_id }}\n",
    ),
    (
        "crm.deals.v1.DealAutomationNotice",
        Channel::Sms,
        "en",
        "",
        "CRM: {{ event.title }} is at {{ event.stage_name }}. {{ event.message }}",
    ),
    (
        "crm.deals.v1.DealAutomationNotice",
        Channel::Sms,
        "ru",
        "",
        "CRM: {{ event.title }} — этап «{{ event.stage_name }}». {{ event.message }}",
    ),
    (
        "crm.deals.v1.DealAutomationNotice",
        Channel::Sms,
        "zh",
        "",
        "CRM：「{{ event.title }}」进入「{{ event.stage_name }}」。{{ event.message }}",
    ),
    // An instalment of a contract coming due.
    (
        "crm.deals.v1.InstalmentDue",
        Channel::InApp,
        "en",
        "Instalment due {{ event.due_date }}: contract {{ event.number }}",
        "{{ event.amount_due_text }} is still to be paid on contract {{ event.number }} by {{ event.due_date }}.",
    ),
    (
        "crm.deals.v1.InstalmentDue",
        Channel::InApp,
        "ru",
        "Платёж до {{ event.due_date }}: договор {{ event.number }}",
        "По договору {{ event.number }} к {{ event.due_date }} ещё не оплачено {{ event.amount_due_text }}.",
    ),
    (
        "crm.deals.v1.InstalmentDue",
        Channel::InApp,
        "zh",
        "合同 {{ event.number }} 的款项将于 {{ event.due_date }} 到期",
        "合同 {{ event.number }} 在 {{ event.due_date }} 前仍有 {{ event.amount_due_text }}未回款。",
    ),
    (
        "crm.deals.v1.InstalmentDue",
        Channel::Email,
        "en",
        "Contract {{ event.number }}: an instalment is due on {{ event.due_date }}",
        "Hello {{ recipient.display_name }},\n\nan instalment of contract {{ event.number }} is due on {{ event.due_date }} and {{ event.amount_due_text }} of it is not paid yet.\n\nContract id: {{ event.contract_id }}\n",
    ),
    (
        "crm.deals.v1.InstalmentDue",
        Channel::Email,
        "ru",
        "Договор {{ event.number }}: платёж до {{ event.due_date }}",
        "Здравствуйте, {{ recipient.display_name }}!\n\nПо договору {{ event.number }} платёж со сроком {{ event.due_date }} оплачен не полностью: осталось {{ event.amount_due_text }}.\n\nИдентификатор договора: {{ event.contract_id }}\n",
    ),
    (
        "crm.deals.v1.InstalmentDue",
        Channel::Email,
        "zh",
        "合同 {{ event.number }}：{{ event.due_date }} 到期的款项",
        "{{ recipient.display_name }}，您好：\n\n合同 {{ event.number }} 有一笔款项将于 {{ event.due_date }} 到期，尚有 {{ event.amount_due_text }}未回款。\n\n合同编号：{{ event.contract_id }}\n",
    ),
    (
        "crm.deals.v1.InstalmentDue",
        Channel::Sms,
        "en",
        "",
        "CRM: contract {{ event.number }}, {{ event.amount_due_text }} due {{ event.due_date }}.",
    ),
    (
        "crm.deals.v1.InstalmentDue",
        Channel::Sms,
        "ru",
        "",
        "CRM: договор {{ event.number }}, к оплате {{ event.amount_due_text }} до {{ event.due_date }}.",
    ),
    (
        "crm.deals.v1.InstalmentDue",
        Channel::Sms,
        "zh",
        "",
        "CRM：合同 {{ event.number }} 于 {{ event.due_date }} 到期，待回款 {{ event.amount_due_text }}。",
    ),
];

/// The sample context of an event type on a channel: for previews, and to check a template
/// before it is saved.
pub fn sample_context(event_type: &str, channel: Channel, event: &Value) -> Value {
    Context {
        event,
        event_type,
        event_id: "0190f5e2-aaaa-7bbb-8ccc-000000000001",
        source: event_type.split('.').nth(1).unwrap_or(""),
        subject_id: "0190f5e2-0000-7000-8000-000000000002",
        actor_id: "0190f5e2-0000-7000-8000-000000000001",
        occurred_at: "2026-12-01T10:00:00Z",
        recipient: recipient(channel, "0190f5e2-0000-7000-8000-000000000002", "Anna Petrova", "anna@example.com"),
    }
    .to_value()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::catalog;

    #[test]
    fn every_event_type_ships_every_channel_and_locale_and_they_render() {
        for spec in catalog::EVENTS {
            let event = catalog::variables_from_json(spec.name, spec.sample).unwrap();
            for &channel in catalog::CHANNELS {
                for locale in catalog::LOCALES {
                    let source = shipped(spec.name, channel, locale)
                        .unwrap_or_else(|| panic!("no {locale} {channel:?} template for {}", spec.name));
                    let out = render(&source, &sample_context(spec.name, channel, &event))
                        .unwrap_or_else(|e| panic!("{} {channel:?} {locale}: {e}", spec.name));
                    assert_eq!(out.subject.is_empty(), !has_subject(channel));
                    assert!(!out.body.is_empty());
                }
            }
        }
    }

    #[test]
    fn unknown_variables_and_bad_syntax_are_refused_with_their_place() {
        let ctx = json!({"event": {"display_name": "Anna"}});
        let ok = render(&Source { subject: "Hi {{ event.display_name }}".into(), body: "x".into() }, &ctx).unwrap();
        assert_eq!(ok.subject, "Hi Anna");
        let err = render(&Source { subject: "{{ event.nope }}".into(), body: "x".into() }, &ctx).unwrap_err();
        assert!(err.starts_with("subject: ") && err.contains("undefined"), "{err}");
        let err = render(&Source { subject: "x".into(), body: "a\n{% if %}".into() }, &ctx).unwrap_err();
        assert!(err.starts_with("body: ") && err.contains("line 2"), "{err}");
    }

    #[test]
    fn a_runaway_template_runs_out_of_fuel() {
        let source = Source { subject: "x".into(), body: "{% for i in range(100000) %}{{ i }}{% endfor %}".into() };
        assert!(render(&source, &json!({})).is_err());
    }

    #[test]
    fn subjects_are_one_line_and_nothing_is_escaped() {
        let out = render(&Source { subject: "a\n  b".into(), body: "{{ v }}".into() }, &json!({"v": "<b>&"})).unwrap();
        assert_eq!(out.subject, "a b");
        assert_eq!(out.body, "<b>&");
    }

    #[test]
    fn locales_fall_back_and_normalise() {
        assert_eq!(fallbacks("ru-RU", "en"), ["ru-ru", "ru", "en"]);
        assert_eq!(fallbacks("", "zh"), ["zh", "en"]);
        assert_eq!(normalize_locale("pt_BR").as_deref(), Some("pt-br"));
        assert_eq!(normalize_locale("english please"), None);
        assert_eq!(normalize_locale("x"), None);
    }
}
