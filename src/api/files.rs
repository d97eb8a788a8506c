//! OpenAI's Files API (`/v1/files`), for training data and job results.
//!
//! An upload is streamed to a partial file in the data directory (never held
//! whole in memory), hashed as it goes, checked as JSONL when its purpose is
//! `fine-tune` (every non-blank line a JSON object), fsynced and renamed into
//! place; only then is it recorded, so a listed file is always complete.

use std::io::Write;

use axum::body::Body;
use axum::extract::multipart::MultipartRejection;
use axum::extract::rejection::QueryRejection;
use axum::extract::{Multipart, Path, Query, State};
use axum::http::header;
use axum::response::{IntoResponse, Response};
use axum::Json;
use serde::{Deserialize, Serialize};
use utoipa::{IntoParams, ToSchema};

use super::error::{ApiError, ErrorResponse};
use super::upload_check::JsonlCheck;
use super::AppState;
use crate::store::{new_id, unix_now, FileRecord, StorageFault, Store, StoreError};

/// Purposes a client may upload with.
const PURPOSES: [&str; 4] = ["fine-tune", "assistants", "batch", "user_data"];

#[derive(Serialize, ToSchema)]
pub struct FileObject {
    pub id: String,
    pub object: &'static str,
    pub bytes: u64,
    pub created_at: u64,
    pub filename: String,
    pub purpose: String,
    pub status: String,
}

impl From<FileRecord> for FileObject {
    fn from(f: FileRecord) -> Self {
        Self {
            id: f.id,
            object: "file",
            bytes: f.bytes,
            created_at: f.created_at,
            filename: f.filename,
            purpose: f.purpose,
            status: f.status,
        }
    }
}

#[derive(Serialize, ToSchema)]
pub struct FileList {
    pub object: &'static str,
    pub data: Vec<FileObject>,
    pub first_id: Option<String>,
    pub last_id: Option<String>,
    pub has_more: bool,
}

#[derive(Serialize, ToSchema)]
pub struct FileDeleted {
    pub id: String,
    pub object: &'static str,
    pub deleted: bool,
}

/// The multipart form of `POST /v1/files` (for the OpenAPI document).
#[derive(ToSchema)]
#[allow(dead_code)]
pub struct FileUpload {
    #[schema(value_type = String, format = Binary)]
    file: Vec<u8>,
    /// `fine-tune` for training and validation data (JSONL).
    purpose: String,
}

#[derive(Deserialize, IntoParams)]
#[into_params(parameter_in = Query)]
pub struct ListFilesQuery {
    pub after: Option<String>,
    /// 1 to 10000 (default 10000).
    pub limit: Option<i64>,
    /// `asc` or `desc` (default) by creation time.
    pub order: Option<String>,
    pub purpose: Option<String>,
}

/// 507 when the data directory is full or read-only, else 500.
pub(super) fn store_error(e: StoreError) -> ApiError {
    match e.fault() {
        Some(fault) => ApiError::storage(fault, &e),
        None => ApiError::internal(format!("the data store failed: {e}")),
    }
}

/// `store_error` for a blob write (`doing` says which).
fn write_error(doing: &str, e: std::io::Error) -> ApiError {
    match StorageFault::of_io(&e) {
        Some(fault) => ApiError::storage(fault, format_args!("{doing}: {e}")),
        None => ApiError::internal(format!("{doing}: {e}")),
    }
}

pub(super) async fn blocking<T: Send + 'static>(f: impl FnOnce() -> T + Send + 'static) -> Result<T, ApiError> {
    tokio::task::spawn_blocking(f).await.map_err(|e| ApiError::internal(format!("a worker thread failed: {e}")))
}

/// A multipart read failure: past the upload limit (413) or malformed (400).
fn multipart_error(e: axum::extract::multipart::MultipartError, limit: usize) -> ApiError {
    if e.status() == axum::http::StatusCode::PAYLOAD_TOO_LARGE {
        ApiError::payload_too_large(limit)
    } else {
        ApiError::invalid(format!("malformed multipart body: {}", e.body_text()))
    }
}

fn not_found(id: &str) -> ApiError {
    ApiError::not_found(format!("No such File object: {id}")).with_param("file_id")
}

/// Writes an upload's chunks to a partial file off the async threads.
struct Sink {
    path: std::path::PathBuf,
    file: std::fs::File,
    bytes: u64,
    hash: sha2::Sha256,
    /// Set for fine-tune files.
    jsonl: Option<JsonlCheck>,
}

impl Sink {
    fn write(&mut self, chunk: &[u8]) -> std::io::Result<()> {
        use sha2::Digest;
        self.file.write_all(chunk)?;
        self.hash.update(chunk);
        self.bytes += chunk.len() as u64;
        if let Some(check) = &mut self.jsonl {
            check.push(chunk);
        }
        Ok(())
    }

    /// Syncs the file; the JSONL problem, if any.
    fn finish(&mut self) -> std::io::Result<Option<String>> {
        self.file.sync_all()?;
        Ok(self.jsonl.take().and_then(JsonlCheck::finish))
    }
}

#[utoipa::path(
    post,
    path = "/v1/files",
    request_body(content = FileUpload, content_type = "multipart/form-data"),
    responses(
        (status = 200, body = FileObject),
        (status = 400, body = ErrorResponse),
        (status = 404, description = "The files API is off (no data directory)", body = ErrorResponse),
        (status = 413, body = ErrorResponse),
        (status = 503, description = "The data directory could not be opened at start", body = ErrorResponse),
        (status = 507, description = "The data directory is full or read-only", body = ErrorResponse),
    )
)]
pub async fn upload(
    State(st): State<AppState>,
    form: Result<Multipart, MultipartRejection>,
) -> Result<Json<FileObject>, ApiError> {
    let store = st.store()?.clone();
    let mut form =
        form.map_err(|e| ApiError::invalid(format!("expected a multipart/form-data body: {}", e.body_text())))?;
    let limit = st.max_upload_bytes();
    let mut purpose: Option<String> = None;
    let mut upload: Option<(Sink, String)> = None;
    let fail = |upload: &Option<(Sink, String)>, e: ApiError| {
        if let Some((s, _)) = upload {
            let _ = std::fs::remove_file(&s.path);
        }
        e
    };
    loop {
        let field = match form.next_field().await {
            Ok(Some(f)) => f,
            Ok(None) => break,
            Err(e) => return Err(fail(&upload, multipart_error(e, limit))),
        };
        match field.name() {
            Some("purpose") => {
                let text = field.text().await.map_err(|e| {
                    fail(&upload, ApiError::invalid_param("purpose", format!("reading purpose: {}", e.body_text())))
                })?;
                purpose = Some(text.trim().to_string());
            }
            Some("file") => {
                if upload.is_some() {
                    return Err(fail(&upload, ApiError::invalid_param("file", "give exactly one file")));
                }
                let filename = field.file_name().unwrap_or("upload").to_string();
                let path = store.partial_upload_path();
                let file = std::fs::File::create(&path)
                    .map_err(|e| write_error(&format!("creating {}", path.display()), e))?;
                let check_jsonl = purpose.as_deref().is_none_or(|p| p == "fine-tune");
                use sha2::Digest;
                let sink = Sink {
                    path,
                    file,
                    bytes: 0,
                    hash: sha2::Sha256::new(),
                    jsonl: check_jsonl.then(JsonlCheck::default),
                };
                upload = Some((sink, filename));
                let mut field = field;
                loop {
                    let chunk = match field.chunk().await {
                        Ok(Some(c)) => c,
                        Ok(None) => break,
                        Err(e) => return Err(fail(&upload, multipart_error(e, limit))),
                    };
                    let (mut sink, name) = upload.take().expect("set above");
                    let (sink_back, res) = blocking(move || {
                        let r = sink.write(&chunk);
                        (sink, r)
                    })
                    .await?;
                    sink = sink_back;
                    upload = Some((sink, name));
                    if let Err(e) = res {
                        return Err(fail(&upload, write_error("writing the upload", e)));
                    }
                }
            }
            Some(other) => {
                let other = other.to_string();
                return Err(fail(
                    &upload,
                    ApiError::invalid(format!("unexpected form field '{other}' (expected file and purpose)")),
                ));
            }
            None => return Err(fail(&upload, ApiError::invalid("a form field has no name"))),
        }
    }
    let Some(purpose) = purpose else {
        return Err(fail(&upload, ApiError::invalid_param("purpose", "purpose: field required")));
    };
    if !PURPOSES.contains(&purpose.as_str()) {
        return Err(fail(
            &upload,
            ApiError::invalid_param("purpose", format!("purpose '{purpose}' is not one of {}", PURPOSES.join(", "))),
        ));
    }
    let Some((mut sink, filename)) = upload else {
        return Err(ApiError::invalid_param("file", "file: field required"));
    };
    if purpose != "fine-tune" {
        sink.jsonl = None;
    }
    let id = new_id("file-");
    let rec = blocking(move || -> Result<FileRecord, ApiError> {
        use sha2::Digest;
        let problem = sink.finish().map_err(|e| write_error("writing the upload", e));
        let cleanup = |e: ApiError| {
            let _ = std::fs::remove_file(&sink.path);
            e
        };
        if let Some(p) = problem.map_err(cleanup)? {
            return Err(cleanup(ApiError::invalid_param("file", format!("'{filename}' is not valid JSONL: {p}"))));
        }
        let rec = FileRecord {
            id,
            bytes: sink.bytes,
            created_at: unix_now(),
            filename,
            purpose,
            status: "processed".into(),
            sha256: format!("{:x}", sink.hash.clone().finalize()),
        };
        store.commit_file(&sink.path, &rec).map_err(|e| cleanup(store_error(e)))?;
        Ok(rec)
    })
    .await??;
    Ok(Json(rec.into()))
}

#[utoipa::path(
    get,
    path = "/v1/files",
    params(ListFilesQuery),
    responses((status = 200, body = FileList), (status = 400, body = ErrorResponse), (status = 404, body = ErrorResponse))
)]
pub async fn list(
    State(st): State<AppState>,
    q: Result<Query<ListFilesQuery>, QueryRejection>,
) -> Result<Json<FileList>, ApiError> {
    let store = st.store()?.clone();
    let Query(q) = q.map_err(|e| ApiError::invalid(format!("bad query: {}", e.body_text())))?;
    let limit = match q.limit {
        None => 10000,
        Some(l) if (1..=10000).contains(&l) => l as usize,
        Some(l) => return Err(ApiError::invalid_param("limit", format!("limit must be between 1 and 10000, got {l}"))),
    };
    let descending = match q.order.as_deref() {
        None | Some("desc") => true,
        Some("asc") => false,
        Some(o) => return Err(ApiError::invalid_param("order", format!("order must be 'asc' or 'desc', got '{o}'"))),
    };
    let page = blocking(move || store.files(q.purpose.as_deref(), q.after.as_deref(), limit, descending))
        .await?
        .map_err(store_error)?;
    let data: Vec<FileObject> = page.data.into_iter().map(FileObject::from).collect();
    Ok(Json(FileList {
        object: "list",
        first_id: data.first().map(|f| f.id.clone()),
        last_id: data.last().map(|f| f.id.clone()),
        has_more: page.has_more,
        data,
    }))
}

async fn find(store: std::sync::Arc<Store>, id: String) -> Result<FileRecord, ApiError> {
    let id2 = id.clone();
    blocking(move || store.file(&id2)).await?.map_err(store_error)?.ok_or_else(|| not_found(&id))
}

#[utoipa::path(
    get,
    path = "/v1/files/{file_id}",
    params(("file_id" = String, Path)),
    responses((status = 200, body = FileObject), (status = 404, body = ErrorResponse))
)]
pub async fn retrieve(State(st): State<AppState>, Path(id): Path<String>) -> Result<Json<FileObject>, ApiError> {
    Ok(Json(find(st.store()?.clone(), id).await?.into()))
}

#[utoipa::path(
    get,
    path = "/v1/files/{file_id}/content",
    params(("file_id" = String, Path)),
    responses(
        (status = 200, description = "The file's bytes", content_type = "application/octet-stream", body = String),
        (status = 404, body = ErrorResponse)
    )
)]
pub async fn content(State(st): State<AppState>, Path(id): Path<String>) -> Result<Response, ApiError> {
    let store = st.store()?.clone();
    let rec = find(store.clone(), id).await?;
    let path = store.file_path(&rec.id);
    // Read in chunks on a blocking thread and stream them out.
    let (tx, rx) = tokio::sync::mpsc::channel::<std::io::Result<Vec<u8>>>(4);
    tokio::task::spawn_blocking(move || {
        use std::io::Read;
        let mut f = match std::fs::File::open(&path) {
            Ok(f) => f,
            Err(e) => {
                let _ = tx.blocking_send(Err(e));
                return;
            }
        };
        loop {
            let mut buf = vec![0u8; 64 * 1024];
            match f.read(&mut buf) {
                Ok(0) => return,
                Ok(n) => {
                    buf.truncate(n);
                    if tx.blocking_send(Ok(buf)).is_err() {
                        return;
                    }
                }
                Err(e) => {
                    let _ = tx.blocking_send(Err(e));
                    return;
                }
            }
        }
    });
    let stream = futures::stream::unfold(rx, |mut rx| async move { rx.recv().await.map(|item| (item, rx)) });
    Ok(([(header::CONTENT_TYPE, "application/octet-stream")], Body::from_stream(stream)).into_response())
}

#[utoipa::path(
    delete,
    path = "/v1/files/{file_id}",
    params(("file_id" = String, Path)),
    responses((status = 200, body = FileDeleted), (status = 404, body = ErrorResponse))
)]
pub async fn delete(State(st): State<AppState>, Path(id): Path<String>) -> Result<Json<FileDeleted>, ApiError> {
    let store = st.store()?.clone();
    let id2 = id.clone();
    let deleted = blocking(move || store.delete_file(&id2)).await?.map_err(store_error)?;
    if !deleted {
        return Err(not_found(&id));
    }
    Ok(Json(FileDeleted { id, object: "file", deleted: true }))
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn sink(dir: &std::path::Path) -> Sink {
        use sha2::Digest;
        let path = dir.join("upload");
        Sink {
            file: std::fs::File::create(&path).unwrap(),
            path,
            bytes: 0,
            hash: sha2::Sha256::new(),
            jsonl: Some(JsonlCheck::default()),
        }
    }

    /// The verdict of reading the whole file at once.
    fn reference(bytes: &[u8]) -> Option<usize> {
        let bytes = bytes.strip_prefix(b"\xEF\xBB\xBF").unwrap_or(bytes);
        let mut seen = false;
        for (i, line) in bytes.split(|&b| b == b'\n').enumerate() {
            if line.iter().all(u8::is_ascii_whitespace) {
                continue;
            }
            seen = true;
            match serde_json::from_slice::<serde_json::Value>(line) {
                Ok(v) if v.is_object() => {}
                _ => return Some(i + 1),
            }
        }
        (!seen).then_some(0)
    }

    proptest! {
        /// However an upload is cut into chunks, the streaming JSONL check
        /// finds the same first bad line as reading it whole, and never panics.
        #[test]
        fn chunked_jsonl_check_matches_whole_file(
            lines in proptest::collection::vec(prop_oneof![
                Just("{\"messages\": []}".to_string()),
                Just("".to_string()),
                Just("  ".to_string()),
                Just("[1]".to_string()),
                Just("{\"a\": \"\\u00e9\"}".to_string()),
                "[ -~]{0,12}",
            ], 0..8),
            cuts in proptest::collection::vec(0usize..64, 0..6),
            bom in any::<bool>(),
        ) {
            let mut bytes = if bom { b"\xEF\xBB\xBF".to_vec() } else { vec![] };
            bytes.extend(lines.join("\n").into_bytes());
            let dir = tempfile::tempdir().unwrap();
            let mut s = sink(dir.path());
            let mut rest: &[u8] = &bytes;
            for c in cuts {
                let (a, b) = rest.split_at(c.min(rest.len()));
                s.write(a).unwrap();
                rest = b;
            }
            s.write(rest).unwrap();
            let got = s.finish().unwrap();
            let want = reference(&bytes);
            match want {
                None => prop_assert!(got.is_none(), "{got:?}"),
                Some(0) => prop_assert!(got.as_deref().is_some_and(|m| m.contains("empty")), "{got:?}"),
                Some(n) => prop_assert!(got.as_deref().is_some_and(|m| m.starts_with(&format!("line {n}:"))), "{got:?} want line {n}"),
            }
            prop_assert_eq!(s.bytes as usize, bytes.len());
        }
    }
}
