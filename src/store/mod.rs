//! What must survive a restart: uploaded files, fine-tuning jobs, their events
//! and checkpoints, in one SQLite database (WAL) under the data directory,
//! with large blobs beside it as files.
//!
//! ```text
//! DATA/tandem.sqlite3        files, jobs, events, checkpoints, routes
//! DATA/files/<file id>       an uploaded file's bytes (written to .partial-*, fsynced, renamed)
//! DATA/jobs/<job id>/        a job's checkpoints and its published adapter (see train/jobs)
//! ```
//!
//! A row is written only after its blob is complete and renamed into place,
//! so nothing listed is ever half-written; a blob without a row (a crash
//! between the rename and the insert) is removed at open. One connection
//! behind a mutex: every call is short (no call holds it across file IO).

use std::path::{Path, PathBuf};
use std::sync::Mutex;

use rusqlite::{params, Connection, OptionalExtension};
use serde::{Deserialize, Serialize};
use serde_json::Value;

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("the database: {0}")]
    Sql(#[from] rusqlite::Error),
    #[error("{path}: {source}")]
    Io { path: PathBuf, source: std::io::Error },
    #[error("stored record {id} is unreadable: {reason}")]
    Corrupt { id: String, reason: String },
}

pub type StoreResult<T> = Result<T, StoreError>;

/// A write that failed because of the data directory itself, not the request
/// or a bug: the operator has to free space or remount it. Serving goes on;
/// only what needs the directory fails, with a message saying which.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StorageFault {
    /// No space left (or the quota is used up).
    Full,
    /// Mounted read-only (or remounted so by the kernel after an error).
    ReadOnly,
}

impl StorageFault {
    pub fn of_io(e: &std::io::Error) -> Option<Self> {
        use std::io::ErrorKind;
        match e.kind() {
            ErrorKind::StorageFull | ErrorKind::QuotaExceeded => Some(Self::Full),
            ErrorKind::ReadOnlyFilesystem => Some(Self::ReadOnly),
            _ => None,
        }
    }

    /// What the operator reads: the fault and what to do about it.
    pub fn describe(self) -> &'static str {
        match self {
            Self::Full => "the data directory is full: free space in it (serving is unaffected)",
            Self::ReadOnly => "the data directory is read-only: remount it read-write (serving is unaffected)",
        }
    }
}

impl StoreError {
    /// Whether the data directory (full, read-only) is to blame.
    pub fn fault(&self) -> Option<StorageFault> {
        use rusqlite::ErrorCode;
        match self {
            Self::Io { source, .. } => StorageFault::of_io(source),
            Self::Sql(e) => match e.sqlite_error_code() {
                // SQLite turns ENOSPC into SQLITE_FULL.
                Some(ErrorCode::DiskFull) => Some(StorageFault::Full),
                Some(ErrorCode::ReadOnly) => Some(StorageFault::ReadOnly),
                _ => None,
            },
            Self::Corrupt { .. } => None,
        }
    }
}

fn io(path: &Path) -> impl FnOnce(std::io::Error) -> StoreError + '_ {
    move |source| StoreError::Io { path: path.to_owned(), source }
}

/// An uploaded file (OpenAI's FileObject without `object`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct FileRecord {
    pub id: String,
    pub bytes: u64,
    pub created_at: u64,
    pub filename: String,
    pub purpose: String,
    pub status: String,
    pub sha256: String,
}

/// One job event (OpenAI's `fine_tuning.job.event`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct EventRecord {
    pub id: String,
    pub created_at: u64,
    pub level: String,
    pub message: String,
    #[serde(rename = "type")]
    pub kind: String,
    pub data: Value,
}

/// A published checkpoint of a job.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct CheckpointRecord {
    pub id: String,
    pub job_id: String,
    pub created_at: u64,
    pub step: u64,
    /// The model name it is served under (`ft:...:ckpt-step-N`).
    pub model: String,
    pub metrics: Value,
    /// The PEFT directory (with the trainer state to resume from).
    pub dir: String,
}

/// A page of records in creation order, for `after` / `limit` listing.
pub struct Page<T> {
    pub data: Vec<T>,
    pub has_more: bool,
}

pub struct Store {
    root: PathBuf,
    db: Mutex<Connection>,
}

const SCHEMA: &str = "
CREATE TABLE IF NOT EXISTS files (
    seq INTEGER PRIMARY KEY AUTOINCREMENT, id TEXT UNIQUE NOT NULL, body TEXT NOT NULL, purpose TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS jobs (
    seq INTEGER PRIMARY KEY AUTOINCREMENT, id TEXT UNIQUE NOT NULL, status TEXT NOT NULL, body TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS events (
    seq INTEGER PRIMARY KEY AUTOINCREMENT, id TEXT UNIQUE NOT NULL, job_id TEXT NOT NULL, body TEXT NOT NULL);
CREATE INDEX IF NOT EXISTS events_by_job ON events (job_id, seq);
CREATE TABLE IF NOT EXISTS checkpoints (
    seq INTEGER PRIMARY KEY AUTOINCREMENT, id TEXT UNIQUE NOT NULL, job_id TEXT NOT NULL, body TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS routes (alias TEXT PRIMARY KEY, body TEXT NOT NULL);
";

/// A random id with OpenAI's look: `prefix` + 24 alphanumerics.
pub fn new_id(prefix: &str) -> String {
    use rand::distributions::Alphanumeric;
    use rand::Rng;
    let tail: String = rand::thread_rng().sample_iter(&Alphanumeric).take(24).map(char::from).collect();
    format!("{prefix}{tail}")
}

pub fn unix_now() -> u64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_secs()).unwrap_or(0)
}

/// Syncs a directory so a rename in it survives a power cut.
pub fn sync_dir(dir: &Path) {
    if let Ok(d) = std::fs::File::open(dir) {
        let _ = d.sync_all();
    }
}

impl Store {
    /// Opens (creating) the store under `root`, and removes what a crash left
    /// half-done: partial uploads and blobs no row names.
    pub fn open(root: &Path) -> StoreResult<Self> {
        for d in [root.to_owned(), root.join("files"), root.join("jobs")] {
            std::fs::create_dir_all(&d).map_err(io(&d))?;
        }
        // SQLite falls back to read-only on a read-only directory and then fails
        // obscurely; a probe write names the real cause (full, read-only) first.
        let probe = root.join(".write-probe");
        std::fs::write(&probe, b"ok").map_err(io(&probe))?;
        let _ = std::fs::remove_file(&probe);
        let db_path = root.join("tandem.sqlite3");
        let conn = Connection::open(&db_path)?;
        conn.pragma_update(None, "journal_mode", "WAL")?;
        // FULL: a committed row survives power loss, not only a process crash.
        conn.pragma_update(None, "synchronous", "FULL")?;
        conn.busy_timeout(std::time::Duration::from_secs(5))?;
        conn.execute_batch(SCHEMA)?;
        let store = Self { root: root.to_owned(), db: Mutex::new(conn) };
        store.remove_orphan_blobs()?;
        Ok(store)
    }

    pub fn root(&self) -> &Path {
        &self.root
    }

    fn db(&self) -> std::sync::MutexGuard<'_, Connection> {
        self.db.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn remove_orphan_blobs(&self) -> StoreResult<()> {
        let dir = self.root.join("files");
        let known: std::collections::HashSet<String> = {
            let db = self.db();
            let mut q = db.prepare("SELECT id FROM files")?;
            let ids = q.query_map([], |r| r.get::<_, String>(0))?.collect::<Result<_, _>>()?;
            ids
        };
        for entry in std::fs::read_dir(&dir).map_err(io(&dir))? {
            let entry = entry.map_err(io(&dir))?;
            let name = entry.file_name().to_string_lossy().into_owned();
            if !known.contains(&name) {
                let _ = std::fs::remove_file(entry.path());
            }
        }
        Ok(())
    }

    // ---- routes --------------------------------------------------------------

    /// Inserts or replaces route `alias` (its spec as JSON).
    pub fn put_route(&self, alias: &str, body: &Value) -> StoreResult<()> {
        self.db().execute(
            "INSERT INTO routes (alias, body) VALUES (?1, ?2) ON CONFLICT(alias) DO UPDATE SET body = excluded.body",
            params![alias, body.to_string()],
        )?;
        Ok(())
    }

    /// Whether route `alias` existed.
    pub fn delete_route(&self, alias: &str) -> StoreResult<bool> {
        Ok(self.db().execute("DELETE FROM routes WHERE alias = ?1", [alias])? > 0)
    }

    /// Every stored route, by alias.
    pub fn routes(&self) -> StoreResult<Vec<(String, Value)>> {
        let db = self.db();
        let mut q = db.prepare("SELECT alias, body FROM routes ORDER BY alias")?;
        let rows: Vec<(String, String)> = q.query_map([], |r| Ok((r.get(0)?, r.get(1)?)))?.collect::<Result<_, _>>()?;
        rows.into_iter().map(|(alias, body)| Ok((alias.clone(), parse(&alias, &body)?))).collect()
    }

    // ---- files ---------------------------------------------------------------

    /// Where file `id`'s bytes live.
    pub fn file_path(&self, id: &str) -> PathBuf {
        self.root.join("files").join(id)
    }

    /// A fresh path in the files directory for an upload in progress (removed
    /// at the next open if the process dies before [`Store::commit_file`]).
    pub fn partial_upload_path(&self) -> PathBuf {
        self.root.join("files").join(new_id(".partial-"))
    }

    /// Makes a complete upload at `partial` (already fsynced) file `rec.id`.
    pub fn commit_file(&self, partial: &Path, rec: &FileRecord) -> StoreResult<()> {
        let dest = self.file_path(&rec.id);
        std::fs::rename(partial, &dest).map_err(io(&dest))?;
        sync_dir(&self.root.join("files"));
        let body = serde_json::to_string(rec).expect("a record serialises");
        self.db()
            .execute("INSERT INTO files (id, body, purpose) VALUES (?1, ?2, ?3)", params![rec.id, body, rec.purpose])?;
        Ok(())
    }

    pub fn file(&self, id: &str) -> StoreResult<Option<FileRecord>> {
        let body: Option<String> =
            self.db().query_row("SELECT body FROM files WHERE id = ?1", [id], |r| r.get(0)).optional()?;
        body.map(|b| parse(id, &b)).transpose()
    }

    /// Files in creation order (`descending`: newest first), after `after`.
    pub fn files(
        &self,
        purpose: Option<&str>,
        after: Option<&str>,
        limit: usize,
        descending: bool,
    ) -> StoreResult<Page<FileRecord>> {
        let db = self.db();
        let cursor = after_seq(&db, "files", after)?;
        let (cmp, order) = if descending { ("<", "DESC") } else { (">", "ASC") };
        let sql = format!(
            "SELECT id, body FROM files WHERE (?1 IS NULL OR purpose = ?1) AND (?2 IS NULL OR seq {cmp} ?2) \
             ORDER BY seq {order} LIMIT ?3"
        );
        let rows = query_bodies(&db, &sql, params![purpose, cursor, limit as i64 + 1])?;
        page(rows, limit)
    }

    /// Deletes file `id`: the row first (it is no longer listed), then the bytes.
    pub fn delete_file(&self, id: &str) -> StoreResult<bool> {
        let n = self.db().execute("DELETE FROM files WHERE id = ?1", [id])?;
        if n > 0 {
            let _ = std::fs::remove_file(self.file_path(id));
        }
        Ok(n > 0)
    }

    // ---- jobs ----------------------------------------------------------------

    /// A job's directory (checkpoints, the published adapter).
    pub fn job_dir(&self, id: &str) -> PathBuf {
        self.root.join("jobs").join(id)
    }

    /// Inserts or replaces job `id` (its JSON body and status).
    pub fn put_job(&self, id: &str, status: &str, body: &Value) -> StoreResult<()> {
        let text = body.to_string();
        self.db().execute(
            "INSERT INTO jobs (id, status, body) VALUES (?1, ?2, ?3) \
             ON CONFLICT(id) DO UPDATE SET status = excluded.status, body = excluded.body",
            params![id, status, text],
        )?;
        Ok(())
    }

    pub fn job(&self, id: &str) -> StoreResult<Option<Value>> {
        let body: Option<String> =
            self.db().query_row("SELECT body FROM jobs WHERE id = ?1", [id], |r| r.get(0)).optional()?;
        body.map(|b| parse(id, &b)).transpose()
    }

    /// Jobs newest first, after `after`.
    pub fn jobs(&self, after: Option<&str>, limit: usize) -> StoreResult<Page<Value>> {
        let db = self.db();
        let cursor = after_seq(&db, "jobs", after)?;
        let rows = query_bodies(
            &db,
            "SELECT id, body FROM jobs WHERE (?1 IS NULL OR seq < ?1) ORDER BY seq DESC LIMIT ?2",
            params![cursor, limit as i64 + 1],
        )?;
        page(rows, limit)
    }

    /// How many jobs are in each status.
    pub fn job_counts(&self) -> StoreResult<Vec<(String, u64)>> {
        let db = self.db();
        let mut q = db.prepare("SELECT status, COUNT(*) FROM jobs GROUP BY status")?;
        let rows = q.query_map([], |r| Ok((r.get::<_, String>(0)?, r.get::<_, i64>(1)? as u64)))?;
        Ok(rows.collect::<Result<_, _>>()?)
    }

    /// Every job in one of `statuses`, oldest first.
    pub fn jobs_with_status(&self, statuses: &[&str]) -> StoreResult<Vec<Value>> {
        let db = self.db();
        let mut out = Vec::new();
        let mut q = db.prepare("SELECT id, body, status FROM jobs ORDER BY seq ASC")?;
        let rows = q.query_map([], |r| Ok((r.get::<_, String>(0)?, r.get::<_, String>(1)?, r.get::<_, String>(2)?)))?;
        for row in rows {
            let (id, body, status) = row?;
            if statuses.contains(&status.as_str()) {
                out.push(parse(&id, &body)?);
            }
        }
        Ok(out)
    }

    // ---- events --------------------------------------------------------------

    pub fn add_event(&self, job_id: &str, e: &EventRecord) -> StoreResult<()> {
        let body = serde_json::to_string(e).expect("an event serialises");
        self.db().execute("INSERT INTO events (id, job_id, body) VALUES (?1, ?2, ?3)", params![e.id, job_id, body])?;
        Ok(())
    }

    /// A job's events newest first, after `after` (an event id).
    pub fn events(&self, job_id: &str, after: Option<&str>, limit: usize) -> StoreResult<Page<EventRecord>> {
        let db = self.db();
        let cursor = after_seq(&db, "events", after)?;
        let rows = query_bodies(
            &db,
            "SELECT id, body FROM events WHERE job_id = ?1 AND (?2 IS NULL OR seq < ?2) ORDER BY seq DESC LIMIT ?3",
            params![job_id, cursor, limit as i64 + 1],
        )?;
        page(rows, limit)
    }

    /// A job's events oldest first (for the results file).
    pub fn all_events(&self, job_id: &str) -> StoreResult<Vec<EventRecord>> {
        let db = self.db();
        let rows =
            query_bodies(&db, "SELECT id, body FROM events WHERE job_id = ?1 ORDER BY seq ASC", params![job_id])?;
        rows.iter().map(|(id, b)| parse(id, b)).collect()
    }

    // ---- checkpoints -----------------------------------------------------------

    pub fn add_checkpoint(&self, c: &CheckpointRecord) -> StoreResult<()> {
        let body = serde_json::to_string(c).expect("a checkpoint serialises");
        self.db()
            .execute("INSERT INTO checkpoints (id, job_id, body) VALUES (?1, ?2, ?3)", params![c.id, c.job_id, body])?;
        Ok(())
    }

    /// A job's checkpoints newest first, after `after`.
    pub fn checkpoints(&self, job_id: &str, after: Option<&str>, limit: usize) -> StoreResult<Page<CheckpointRecord>> {
        let db = self.db();
        let cursor = after_seq(&db, "checkpoints", after)?;
        let rows = query_bodies(
            &db,
            "SELECT id, body FROM checkpoints WHERE job_id = ?1 AND (?2 IS NULL OR seq < ?2) ORDER BY seq DESC LIMIT ?3",
            params![job_id, cursor, limit as i64 + 1],
        )?;
        page(rows, limit)
    }

    /// Every checkpoint, oldest first (to serve them again after a restart).
    pub fn all_checkpoints(&self) -> StoreResult<Vec<CheckpointRecord>> {
        let db = self.db();
        let rows = query_bodies(&db, "SELECT id, body FROM checkpoints ORDER BY seq ASC", [])?;
        rows.iter().map(|(id, b)| parse(id, b)).collect()
    }
}

fn parse<T: serde::de::DeserializeOwned>(id: &str, body: &str) -> StoreResult<T> {
    serde_json::from_str(body).map_err(|e| StoreError::Corrupt { id: id.into(), reason: e.to_string() })
}

/// The position of `after` in `table` (an unknown id lists from the start).
fn after_seq(db: &Connection, table: &str, after: Option<&str>) -> StoreResult<Option<i64>> {
    let Some(id) = after else { return Ok(None) };
    let sql = format!("SELECT seq FROM {table} WHERE id = ?1");
    Ok(db.query_row(&sql, [id], |r| r.get(0)).optional()?)
}

fn query_bodies(db: &Connection, sql: &str, args: impl rusqlite::Params) -> StoreResult<Vec<(String, String)>> {
    let mut q = db.prepare(sql)?;
    let rows = q.query_map(args, |r| Ok((r.get::<_, String>(0)?, r.get::<_, String>(1)?)))?;
    Ok(rows.collect::<Result<_, _>>()?)
}

fn page<T: serde::de::DeserializeOwned>(mut rows: Vec<(String, String)>, limit: usize) -> StoreResult<Page<T>> {
    let has_more = rows.len() > limit;
    rows.truncate(limit);
    let data = rows.iter().map(|(id, b)| parse(id, b)).collect::<StoreResult<_>>()?;
    Ok(Page { data, has_more })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn file(id: &str, purpose: &str) -> FileRecord {
        FileRecord {
            id: id.into(),
            bytes: 3,
            created_at: 1,
            filename: "a.jsonl".into(),
            purpose: purpose.into(),
            status: "processed".into(),
            sha256: "x".into(),
        }
    }

    #[test]
    fn storage_faults_are_told_from_other_failures() {
        let os = |n| StoreError::Io { path: "x".into(), source: std::io::Error::from_raw_os_error(n) };
        // ENOSPC, EDQUOT, EROFS; ENOENT and EACCES are not the directory's state.
        assert_eq!(os(28).fault(), Some(StorageFault::Full));
        assert_eq!(os(122).fault(), Some(StorageFault::Full));
        assert_eq!(os(30).fault(), Some(StorageFault::ReadOnly));
        assert_eq!(os(2).fault(), None);
        assert_eq!(os(13).fault(), None);
        let sql = |code| StoreError::Sql(rusqlite::Error::SqliteFailure(rusqlite::ffi::Error::new(code), None));
        assert_eq!(sql(rusqlite::ffi::SQLITE_FULL).fault(), Some(StorageFault::Full));
        assert_eq!(sql(rusqlite::ffi::SQLITE_READONLY).fault(), Some(StorageFault::ReadOnly));
        assert_eq!(sql(rusqlite::ffi::SQLITE_CONSTRAINT).fault(), None);
    }

    #[test]
    fn files_page_in_order_and_survive_reopening() {
        let dir = tempfile::tempdir().unwrap();
        let s = Store::open(dir.path()).unwrap();
        for (i, p) in ["fine-tune", "other", "fine-tune"].iter().enumerate() {
            let part = s.partial_upload_path();
            std::fs::write(&part, b"abc").unwrap();
            s.commit_file(&part, &file(&format!("file-{i}"), p)).unwrap();
        }
        let all = s.files(None, None, 2, false).unwrap();
        assert_eq!(all.data.iter().map(|f| f.id.as_str()).collect::<Vec<_>>(), ["file-0", "file-1"]);
        assert!(all.has_more);
        let rest = s.files(None, Some("file-1"), 2, false).unwrap();
        assert_eq!(rest.data.len(), 1);
        assert!(!rest.has_more);
        let ft = s.files(Some("fine-tune"), None, 10, true).unwrap();
        assert_eq!(ft.data.iter().map(|f| f.id.as_str()).collect::<Vec<_>>(), ["file-2", "file-0"]);
        // A crash mid-upload leaves a partial file: gone at the next open, rows kept.
        std::fs::write(s.partial_upload_path(), b"half").unwrap();
        drop(s);
        let s = Store::open(dir.path()).unwrap();
        let names: Vec<_> =
            std::fs::read_dir(dir.path().join("files")).unwrap().map(|e| e.unwrap().file_name()).collect();
        assert_eq!(names.len(), 3, "{names:?}");
        assert!(s.delete_file("file-1").unwrap());
        assert!(!s.delete_file("file-1").unwrap());
        assert!(!s.file_path("file-1").exists());
        assert_eq!(s.file("file-0").unwrap().unwrap(), file("file-0", "fine-tune"));
    }

    #[test]
    fn jobs_and_events_list_newest_first() {
        let dir = tempfile::tempdir().unwrap();
        let s = Store::open(dir.path()).unwrap();
        for i in 0..3 {
            s.put_job(&format!("job-{i}"), "queued", &serde_json::json!({"id": format!("job-{i}")})).unwrap();
        }
        s.put_job("job-0", "running", &serde_json::json!({"id": "job-0", "status": "running"})).unwrap();
        let p = s.jobs(None, 2).unwrap();
        assert_eq!(p.data.iter().map(|j| j["id"].as_str().unwrap()).collect::<Vec<_>>(), ["job-2", "job-1"]);
        assert_eq!(s.jobs(Some("job-1"), 5).unwrap().data.len(), 1);
        assert_eq!(s.jobs_with_status(&["running"]).unwrap().len(), 1);
        for i in 0..3 {
            let e = EventRecord {
                id: format!("ev-{i}"),
                created_at: i,
                level: "info".into(),
                message: format!("m{i}"),
                kind: "message".into(),
                data: Value::Null,
            };
            s.add_event("job-0", &e).unwrap();
        }
        let ev = s.events("job-0", Some("ev-2"), 10).unwrap();
        assert_eq!(ev.data.iter().map(|e| e.id.as_str()).collect::<Vec<_>>(), ["ev-1", "ev-0"]);
        assert!(s.events("job-1", None, 10).unwrap().data.is_empty());
    }
}
