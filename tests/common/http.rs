//! The built `tandem serve` binary on a free port, and small HTTP helpers for it.

use std::io::{BufRead, BufReader};
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use serde_json::Value;

pub struct Server {
    child: Child,
    pub base: String,
    log: Arc<Mutex<String>>,
    /// `/health` answered 503 (model loading) before it answered 200.
    pub saw_loading: bool,
    _dir: tempfile::TempDir,
}

impl Server {
    /// Starts `tandem serve --model <model> --port 0` with `config` (TOML, added to
    /// the defaults) and waits until `/health` is 200.
    pub async fn start(model: &Path, config: &str) -> Server {
        Self::start_wrapped(model, config, &[]).await
    }

    /// `start` with the binary run by `wrapper` (a command and its arguments,
    /// which must end by exec'ing the binary and arguments it is given, so the
    /// child's pid is the server's).
    pub async fn start_wrapped(model: &Path, config: &str, wrapper: &[&str]) -> Server {
        let dir = tempfile::tempdir().unwrap();
        let cfg = dir.path().join("config.toml");
        std::fs::write(&cfg, config).unwrap();
        let bin = env!("CARGO_BIN_EXE_tandem");
        let mut cmd = match wrapper.split_first() {
            None => Command::new(bin),
            Some((first, rest)) => {
                let mut c = Command::new(first);
                c.args(rest).arg(bin);
                c
            }
        };
        let mut child = cmd
            .env("TANDEM_THREADS", "2")
            .args(["--config", cfg.to_str().unwrap(), "serve", "--port", "0", "--model", model.to_str().unwrap()])
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .expect("starting tandem serve");
        let log = Arc::new(Mutex::new(String::new()));
        let (tx, rx) = std::sync::mpsc::channel();
        let stderr = child.stderr.take().unwrap();
        let log2 = log.clone();
        std::thread::spawn(move || {
            for line in BufReader::new(stderr).lines().map_while(Result::ok) {
                // JSON log lines carry the text in "message".
                let text = match serde_json::from_str::<Value>(&line) {
                    Ok(v) => v["message"].as_str().unwrap_or_default().to_string(),
                    Err(_) => line.clone(),
                };
                if let Some(addr) = text.split("listening on ").nth(1) {
                    let _ = tx.send(addr.trim().to_string());
                }
                let mut l = log2.lock().unwrap();
                l.push_str(&line);
                l.push('\n');
            }
        });
        let base = match rx.recv_timeout(Duration::from_secs(30)) {
            Ok(a) => a,
            Err(_) => {
                let _ = child.kill();
                panic!("the server did not report its address; stderr:\n{}", log.lock().unwrap());
            }
        };
        let mut server = Server { child, base, log, saw_loading: false, _dir: dir };
        server.wait_healthy().await;
        server
    }

    pub fn url(&self, path: &str) -> String {
        format!("{}{path}", self.base)
    }

    pub fn stderr(&self) -> String {
        self.log.lock().unwrap().clone()
    }

    async fn wait_healthy(&mut self) {
        let deadline = Instant::now() + Duration::from_secs(300);
        loop {
            if let Ok(r) = reqwest::get(self.url("/health")).await {
                if r.status() == 200 {
                    return;
                }
                assert_eq!(r.status(), 503, "health while loading");
                if !self.saw_loading {
                    self.saw_loading = true;
                    // Generation endpoints refuse politely while loading, too (or,
                    // if loading just finished, reject this invalid prompt).
                    let r = reqwest::Client::new()
                        .post(self.url("/v1/completions"))
                        .body(r#"{"prompt": 5}"#)
                        .send()
                        .await
                        .unwrap();
                    match r.status().as_u16() {
                        503 => assert!(r.headers().contains_key("retry-after")),
                        // 401: a server with API keys checks the key first.
                        400 | 401 => {}
                        other => panic!("while loading: {other}"),
                    }
                }
            }
            assert!(Instant::now() < deadline, "server never became healthy; stderr:\n{}", self.stderr());
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    pub async fn post(&self, path: &str, body: &Value) -> (u16, Value) {
        json_answer(path, reqwest::Client::new().post(self.url(path)).json(body).send().await.unwrap()).await
    }

    pub async fn put(&self, path: &str, body: &Value) -> (u16, Value) {
        json_answer(path, reqwest::Client::new().put(self.url(path)).json(body).send().await.unwrap()).await
    }

    /// `POST /v1/files`: `bytes` as file `name` with `purpose`.
    pub async fn upload(&self, name: &str, bytes: Vec<u8>, purpose: &str) -> (u16, Value) {
        let form = reqwest::multipart::Form::new()
            .text("purpose", purpose.to_string())
            .part("file", reqwest::multipart::Part::bytes(bytes).file_name(name.to_string()));
        json_answer(
            "/v1/files",
            reqwest::Client::new().post(self.url("/v1/files")).multipart(form).send().await.unwrap(),
        )
        .await
    }

    /// A POST whose answer may be plain text (vLLM's adapter endpoints).
    pub async fn post_text(&self, path: &str, body: &Value) -> (u16, String) {
        let r = reqwest::Client::new().post(self.url(path)).json(body).send().await.unwrap();
        (r.status().as_u16(), r.text().await.unwrap())
    }

    /// A streamed request's events: each `data:` payload as JSON, and whether
    /// `[DONE]` ended the stream (it must be last).
    pub async fn post_stream(&self, path: &str, body: &Value) -> (Vec<Value>, bool) {
        let r = reqwest::Client::new().post(self.url(path)).json(body).send().await.unwrap();
        assert_eq!(r.status(), 200, "{}", r.text().await.unwrap_or_default());
        let ct = r.headers()["content-type"].to_str().unwrap().to_string();
        assert!(ct.starts_with("text/event-stream"), "{ct}");
        parse_sse(&r.text().await.unwrap())
    }

    pub async fn metrics(&self) -> String {
        reqwest::get(self.url("/metrics")).await.unwrap().text().await.unwrap()
    }

    /// kill -9: no shutdown, no flush.
    pub fn kill9(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    pub async fn get(&self, path: &str) -> (u16, Value) {
        json_answer(path, reqwest::get(self.url(path)).await.unwrap()).await
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Sends SIGTERM and waits for the exit status.
    pub fn terminate(&mut self) -> std::process::ExitStatus {
        let _ = Command::new("kill").args(["-TERM", &self.child.id().to_string()]).status();
        self.wait_exit()
    }

    pub fn wait_exit(&mut self) -> std::process::ExitStatus {
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            if let Some(s) = self.child.try_wait().unwrap() {
                return s;
            }
            assert!(Instant::now() < deadline, "no exit after SIGTERM; stderr:\n{}", self.stderr());
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        if std::thread::panicking() {
            eprintln!("--- tandem serve stderr ---\n{}", self.stderr());
        }
    }
}

/// A response's status and its body as JSON (which it must be).
async fn json_answer(path: &str, r: reqwest::Response) -> (u16, Value) {
    let status = r.status().as_u16();
    let text = r.text().await.unwrap();
    let v = serde_json::from_str(&text).unwrap_or_else(|e| panic!("{path}: not JSON ({e}): {text}"));
    (status, v)
}

pub fn parse_sse(text: &str) -> (Vec<Value>, bool) {
    let mut events = Vec::new();
    let mut done = false;
    for block in text.split("\n\n").filter(|b| !b.trim().is_empty()) {
        let data = block.strip_prefix("data: ").unwrap_or_else(|| panic!("not an SSE data line: {block:?}"));
        assert!(!done, "events after [DONE]: {text}");
        if data == "[DONE]" {
            done = true;
        } else {
            events.push(serde_json::from_str(data).unwrap_or_else(|e| panic!("{e}: {data}")));
        }
    }
    (events, done)
}

/// The value of an unlabelled metric in Prometheus text.
pub fn metric(text: &str, name: &str) -> Option<f64> {
    text.lines().find_map(|l| l.strip_prefix(name)?.strip_prefix(' ')?.trim().parse().ok())
}
