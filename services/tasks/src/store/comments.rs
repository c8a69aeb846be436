//! Comments on tasks and activity records: added under the lock of the record they are about
//! (which the commenter must be able to see), listed oldest first.

use crm_kit::ApiError;
use crm_kit::db::{Sql, Tx, idempotency};
use crm_kit::page::{Order, Page};
use crm_kit::time::{now_micros, to_timestamp};
use crm_proto::tasks::v1::{Comment, CommentAdded, SubjectType};
use sqlx::Row;
use sqlx::any::AnyRow;

use super::{CREATED_COMMENT, Store, Viewer};

/// What a comment is about.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Subject {
    Task,
    Activity,
}

impl Subject {
    pub fn from_proto(value: i32) -> Option<Subject> {
        match SubjectType::try_from(value).ok()? {
            SubjectType::Task => Some(Subject::Task),
            SubjectType::Activity => Some(Subject::Activity),
            SubjectType::Unspecified => None,
        }
    }

    fn proto(self) -> SubjectType {
        match self {
            Subject::Task => SubjectType::Task,
            Subject::Activity => SubjectType::Activity,
        }
    }

    fn table(self) -> &'static str {
        match self {
            Subject::Task => "tasks",
            Subject::Activity => "activities",
        }
    }
}

/// Oldest first.
pub const ORDER: Order = Order { column: "created_at", tie: "id", text: false, desc: false };

fn decode(row: &AnyRow) -> Result<Comment, ApiError> {
    Ok(Comment {
        id: row.try_get("id")?,
        subject_type: row.try_get::<i64, _>("subject_type")? as i32,
        subject_id: row.try_get("subject_id")?,
        author_id: row.try_get("author_id")?,
        body: row.try_get("body")?,
        create_time: to_timestamp(row.try_get("created_at")?),
    })
}

/// Deletes the comments on a record (that is being deleted).
pub(crate) async fn delete_of(tx: &mut Tx, subject: Subject, id: &str) -> Result<(), ApiError> {
    let mut sql = Sql::new("DELETE FROM comments WHERE subject_type = ");
    sql.bind(subject.proto() as i64).push(" AND subject_id = ").bind(id);
    sql.query().execute(&mut **tx).await?;
    Ok(())
}

fn not_found(subject: Subject, id: &str) -> ApiError {
    match subject {
        Subject::Task => super::task_not_found(id),
        Subject::Activity => super::activities::not_found(id),
    }
}

/// A record as a comment on it needs it: who to tell, and what to call it.
struct Commented {
    title: String,
    author_id: String,
    creator_id: String,
}

impl Store {
    /// The record `id` as the viewer may see it, locked for the comment's count.
    async fn commented(&self, tx: &mut Tx, subject: Subject, id: &str, viewer: &Viewer) -> Result<Commented, ApiError> {
        let backend = self.db.backend();
        let mut sql = match subject {
            Subject::Task => Sql::new("SELECT title, assignee_id AS author_id, creator_id, doc FROM tasks WHERE id = "),
            Subject::Activity => Sql::new("SELECT author_id, doc FROM activities WHERE id = "),
        };
        sql.bind(id);
        match subject {
            Subject::Task => viewer.push_tasks(&mut sql, backend),
            Subject::Activity => viewer.push_authors(&mut sql, backend),
        }
        sql.push(self.db.for_update());
        let row = sql.query().fetch_optional(&mut **tx).await?.ok_or_else(|| not_found(subject, id))?;
        let author_id: String = row.try_get("author_id")?;
        Ok(match subject {
            Subject::Task => {
                let creator_id: String = row.try_get("creator_id")?;
                Commented {
                    title: row.try_get("title")?,
                    creator_id: if creator_id == author_id { String::new() } else { creator_id },
                    author_id,
                }
            }
            Subject::Activity => {
                let doc: Vec<u8> = row.try_get("doc")?;
                let activity = <crm_proto::tasks::v1::Activity as prost::Message>::decode(doc.as_slice())
                    .map_err(|e| ApiError::Internal(format!("stored activity record {id} does not decode: {e}")))?;
                Commented { title: activity.summary, author_id, creator_id: String::new() }
            }
        })
    }

    /// Adds `body` as `commenter`'s comment on the record, if the viewer may see it, and tells
    /// its author. With a `request_id`, a repeated call returns the comment the first one added.
    #[allow(clippy::too_many_arguments)]
    pub async fn add_comment(
        &self,
        subject: Subject,
        subject_id: &str,
        body: &str,
        commenter: &str,
        commenter_name: &str,
        request_id: &str,
        viewer: &Viewer,
    ) -> Result<Comment, ApiError> {
        let now = now_micros();
        let id = crm_kit::id::new();
        let mut tx = self.db.begin_write().await?;
        let record = self.commented(&mut tx, subject, subject_id, viewer).await?;
        if let idempotency::Claim::Retry { record_id, .. } =
            idempotency::claim(&mut tx, commenter, request_id, CREATED_COMMENT, &id, now).await?
        {
            let mut sql = Sql::new("SELECT id, subject_type, subject_id, author_id, body, created_at FROM comments");
            sql.push(" WHERE id = ").bind(record_id.as_str());
            let row = sql.query().fetch_optional(&mut *tx).await?;
            tx.rollback().await?;
            return match row {
                Some(row) => decode(&row),
                None => Err(ApiError::NotFound(format!("comment {record_id} not found"))),
            };
        }
        let comment = Comment {
            id,
            subject_type: subject.proto() as i32,
            subject_id: subject_id.to_string(),
            author_id: commenter.to_string(),
            body: body.to_string(),
            create_time: to_timestamp(now),
        };
        let mut sql =
            Sql::new("INSERT INTO comments (id, subject_type, subject_id, author_id, body, created_at) VALUES ");
        sql.push_values([&comment], |v, c| {
            v.bind(c.id.as_str())
                .bind(i64::from(c.subject_type))
                .bind(c.subject_id.as_str())
                .bind(c.author_id.as_str())
                .bind(c.body.as_str())
                .bind(now);
        });
        sql.query().execute(&mut *tx).await?;
        let mut sql = Sql::new("UPDATE ");
        sql.push(subject.table()).push(" SET comment_count = comment_count + 1 WHERE id = ").bind(subject_id);
        sql.query().execute(&mut *tx).await?;
        let event = CommentAdded {
            comment_id: comment.id.clone(),
            subject_type: comment.subject_type,
            subject_id: subject_id.to_string(),
            subject_title: record.title,
            commenter_id: commenter.to_string(),
            commenter_name: commenter_name.to_string(),
            author_id: record.author_id,
            creator_id: record.creator_id,
            body: body.to_string(),
        };
        self.outbox.append(&mut tx, &comment.id, commenter, &event).await?;
        tx.commit().await?;
        Ok(comment)
    }

    /// One page of a record's comments, oldest first, if the viewer may see the record.
    pub async fn list_comments(
        &self,
        subject: Subject,
        subject_id: &str,
        page: &Page,
        viewer: &Viewer,
    ) -> Result<(Vec<Comment>, String), ApiError> {
        let backend = self.db.backend();
        let mut probe = Sql::new("SELECT id FROM ");
        probe.push(subject.table()).push(" WHERE id = ").bind(subject_id);
        match subject {
            Subject::Task => viewer.push_tasks(&mut probe, backend),
            Subject::Activity => viewer.push_authors(&mut probe, backend),
        }
        if probe.query().fetch_optional(self.db.pool()).await?.is_none() {
            return Err(not_found(subject, subject_id));
        }
        let mut sql = Sql::new("SELECT id, subject_type, subject_id, author_id, body, created_at FROM comments");
        sql.push(" WHERE subject_type = ").bind(subject.proto() as i64).push(" AND subject_id = ").bind(subject_id);
        page.push_keyset(&mut sql, &ORDER);
        let rows = sql.query().fetch_all(self.db.pool()).await?;
        page.finish(&rows, &ORDER, decode)
    }
}
