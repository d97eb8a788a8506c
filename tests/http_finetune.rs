//! The files and fine-tuning APIs over real HTTP on the tiny Qwen2 fixture:
//! a job end to end while other clients are served, its checkpoints and
//! adapter served at once, bad input refused with OpenAI's error shape, and
//! kill -9 during jobs, checkpoint writes and uploads.

mod common;

use std::path::Path;
use std::time::{Duration, Instant};

use common::http::{metric, Server};
use common::*;
use serde_json::{json, Value};

const MODEL: &str = "tiny/qwen2/hf-f32";

fn chats(n: usize, offset: usize) -> String {
    (0..n)
        .map(|i| {
            let k = i + offset;
            let answer = (k..k + 6).map(|x| x.to_string()).collect::<Vec<_>>().join(" ");
            json!({"messages": [
                {"role": "user", "content": format!("count {k}")},
                {"role": "assistant", "content": answer},
            ]})
            .to_string()
                + "\n"
        })
        .collect()
}

fn config(data: &Path, extra: &str) -> String {
    format!(
        "[store]\ndata_dir = {:?}\nmax_upload_mib = 1\n[train]\nbusy_share = 0.5\n{extra}",
        data.display().to_string()
    )
}

async fn file_id(s: &Server, text: &str) -> String {
    let (st, v) = s.upload("train.jsonl", text.as_bytes().to_vec(), "fine-tune").await;
    assert_eq!(st, 200, "{v}");
    v["id"].as_str().unwrap().to_string()
}

/// Polls job `id` until `done(job)` holds.
async fn wait_job(s: &Server, id: &str, secs: u64, done: impl Fn(&Value) -> bool) -> Value {
    let deadline = Instant::now() + Duration::from_secs(secs);
    loop {
        let (st, j) = s.get(&format!("/v1/fine_tuning/jobs/{id}")).await;
        assert_eq!(st, 200, "{j}");
        if done(&j) {
            return j;
        }
        assert!(Instant::now() < deadline, "job did not get there in {secs}s: {j}\n{}", s.stderr());
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

fn finished(j: &Value) -> bool {
    matches!(j["status"].as_str(), Some("succeeded" | "failed" | "cancelled"))
}

async fn greedy(s: &Server, model: &str, prompt: &str) -> (u16, Value) {
    s.post(
        "/v1/chat/completions",
        &json!({"model": model, "messages": [{"role": "user", "content": prompt}], "max_tokens": 8, "temperature": 0}),
    )
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_job_trains_while_serving_and_its_checkpoints_and_adapter_serve_at_once() {
    let data = tempfile::tempdir().unwrap();
    let s = Server::start(&fixture(MODEL), &config(data.path(), "")).await;
    let train = file_id(&s, &chats(8, 0)).await;
    let valid = file_id(&s, &chats(2, 40)).await;
    // Files: list (newest first), retrieve, content as uploaded.
    let (_, list) = s.get("/v1/files?purpose=fine-tune").await;
    assert_eq!(list["data"].as_array().unwrap().len(), 2);
    assert_eq!(list["first_id"], valid.as_str());
    let (_, f) = s.get(&format!("/v1/files/{train}")).await;
    assert_eq!((f["object"].as_str(), f["purpose"].as_str()), (Some("file"), Some("fine-tune")));
    let content = reqwest::get(s.url(&format!("/v1/files/{train}/content"))).await.unwrap().text().await.unwrap();
    assert_eq!(content, chats(8, 0));

    let (base_status, base_answer) = greedy(&s, "", "count 3").await;
    assert_eq!(base_status, 200);
    let (st, job) = s
        .post(
            "/v1/fine_tuning/jobs",
            &json!({"model": "hf-f32", "training_file": train, "validation_file": valid, "suffix": "counter",
                    "seed": 3, "metadata": {"team": "qa"},
                    "method": {"type": "supervised", "supervised": {"hyperparameters": {"n_epochs": 3, "batch_size": 2}}},
                    "tandem": {"rank": 4, "learning_rate": 0.02, "save_every": 2}}),
        )
        .await;
    assert_eq!(st, 200, "{job}");
    let id = job["id"].as_str().unwrap().to_string();
    assert_eq!(job["status"], "validating_files");
    assert_eq!(job["hyperparameters"]["n_epochs"], 3);

    // Serving goes on while the job trains: every request succeeds.
    let mut served = 0;
    while !finished(&s.get(&format!("/v1/fine_tuning/jobs/{id}")).await.1) {
        let (st, v) = greedy(&s, "", "count 3").await;
        assert_eq!(st, 200, "{v}");
        served += 1;
    }
    assert!(served > 0);
    let j = wait_job(&s, &id, 120, finished).await;
    assert_eq!(j["status"], "succeeded", "{j}");
    let ft = j["fine_tuned_model"].as_str().unwrap().to_string();
    assert_eq!(ft, format!("ft:hf-f32:tandem:counter:{id}"));
    assert!(j["trained_tokens"].as_u64().unwrap() > 0);
    assert_eq!(j["hyperparameters"]["batch_size"], 2);

    // Checkpoints every 2 steps (8 examples / 2 = 4 steps an epoch, 12 in all).
    let (_, cks) = s.get(&format!("/v1/fine_tuning/jobs/{id}/checkpoints")).await;
    let steps: Vec<u64> = cks["data"].as_array().unwrap().iter().map(|c| c["step_number"].as_u64().unwrap()).collect();
    assert_eq!(steps, [10, 8, 6, 4, 2], "{cks}");
    let ck = cks["data"][0]["fine_tuned_model_checkpoint"].as_str().unwrap().to_string();
    assert_eq!(ck, format!("{ft}:ckpt-step-10"));
    assert!(cks["data"][0]["metrics"]["train_loss"].is_number());

    // Both serve; the trained model answers differently from the base.
    let (st, ans) = greedy(&s, &ft, "count 3").await;
    assert_eq!(st, 200, "{ans}");
    assert_eq!(ans["model"], ft.as_str());
    assert_ne!(ans["choices"][0]["message"]["content"], base_answer["choices"][0]["message"]["content"]);
    let (st, _) = greedy(&s, &ck, "count 3").await;
    assert_eq!(st, 200);
    let (_, models) = s.get("/v1/models").await;
    let card = |name: &str| models["data"].as_array().unwrap().iter().find(|m| m["id"] == name).cloned();
    assert_eq!(card(&ft).unwrap()["parent"], "hf-f32");
    assert_eq!(card(&ck).unwrap()["parent"], ft.as_str());
    let (st, m) = s.get(&format!("/v1/models/{ft}")).await;
    assert_eq!(st, 200);
    assert_eq!(m["lineage"]["job"], id.as_str());
    assert_eq!(m["lineage"]["data"]["train"]["file"]["path"], train.as_str());
    assert_eq!(m["lineage"]["data"]["train"]["file"]["sha256"].as_str().unwrap().len(), 64);

    // Events: messages and per-step metrics, newest first, paged.
    let (_, ev) = s.get(&format!("/v1/fine_tuning/jobs/{id}/events?limit=100")).await;
    let evs = ev["data"].as_array().unwrap();
    assert_eq!(evs[0]["message"], "The job has successfully completed");
    let metrics: Vec<&Value> =
        evs.iter().filter(|e| e["type"] == "metrics" && e["data"]["train_loss"].is_number()).collect();
    assert_eq!(metrics.len(), 12);
    assert!(evs.iter().any(|e| e["message"].as_str().unwrap().contains("MiB reserved")));
    let (_, page) = s.get(&format!("/v1/fine_tuning/jobs/{id}/events?limit=2")).await;
    assert_eq!(page["has_more"], true);
    let after = page["data"][1]["id"].as_str().unwrap();
    let (_, next) = s.get(&format!("/v1/fine_tuning/jobs/{id}/events?limit=1&after={after}")).await;
    assert_eq!(next["data"][0]["id"], evs[2]["id"]);
    // The results file: a CSV row per step.
    let results = j["result_files"][0].as_str().unwrap();
    let csv = reqwest::get(s.url(&format!("/v1/files/{results}/content"))).await.unwrap().text().await.unwrap();
    assert!(csv.starts_with("step,train_loss"), "{csv}");
    assert_eq!(csv.lines().count(), 13, "{csv}");
    // Listing with a metadata filter.
    let (_, jl) = s.get("/v1/fine_tuning/jobs?metadata[team]=qa").await;
    assert_eq!(jl["data"].as_array().unwrap().len(), 1);
    let (_, jl) = s.get("/v1/fine_tuning/jobs?metadata[team]=other").await;
    assert_eq!(jl["data"].as_array().unwrap().len(), 0);
    let m = s.metrics().await;
    assert_eq!(metric(&m, "tandem_train_steps_total"), Some(12.0));
    assert!(m.contains("tandem_train_jobs{status=\"succeeded\"} 1"), "{m}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn bad_input_gets_openai_errors_and_starts_nothing() {
    let data = tempfile::tempdir().unwrap();
    let s = Server::start(&fixture(MODEL), &config(data.path(), "")).await;
    let good = file_id(&s, &chats(3, 0)).await;
    let (_, other) = s.upload("notes.txt", b"hello".to_vec(), "user_data").await;
    let other = other["id"].as_str().unwrap().to_string();

    // Uploads.
    let cases: Vec<(&str, Vec<u8>, &str, u16, &str)> = vec![
        ("wrong purpose", chats(1, 0).into_bytes(), "homework", 400, "purpose"),
        ("not JSONL", b"just some text\n".to_vec(), "fine-tune", 400, "line 1"),
        (
            "bad JSON on line 3",
            format!("{}{}{{\"messages\": [\n", chats(1, 0), chats(1, 1)).into_bytes(),
            "fine-tune",
            400,
            "line 3",
        ),
        ("a JSON array line", b"[1, 2]\n".to_vec(), "fine-tune", 400, "JSON object"),
        ("empty file", Vec::new(), "fine-tune", 400, "empty"),
        ("oversize upload", vec![b' '; 2 << 20], "fine-tune", 413, "limit"),
    ];
    for (what, bytes, purpose, status, needle) in cases {
        let (st, v) = s.upload("x.jsonl", bytes, purpose).await;
        assert_eq!(st, status, "{what}: {v}");
        let msg = v["error"]["message"].as_str().unwrap_or_else(|| panic!("{what}: {v}"));
        assert!(msg.contains(needle), "{what}: {msg}");
    }
    // Malformed multipart: a body that is not multipart at all, and one cut short.
    let r = reqwest::Client::new().post(s.url("/v1/files")).body("{}").send().await.unwrap();
    assert_eq!(r.status(), 400);
    let r = reqwest::Client::new()
        .post(s.url("/v1/files"))
        .header("content-type", "multipart/form-data; boundary=XX")
        .body("--XX\r\nContent-Disposition: form-data; name=\"file\"; filename=\"a\"\r\n\r\nabc")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 400, "{}", r.text().await.unwrap());
    let r = reqwest::Client::new()
        .post(s.url("/v1/files"))
        .multipart(reqwest::multipart::Form::new().text("purpose", "fine-tune"))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 400, "no file part");
    let (st, _) = s.get("/v1/files/file-nope").await;
    assert_eq!(st, 404);
    let r = reqwest::Client::new().delete(s.url("/v1/files/file-nope")).send().await.unwrap();
    assert_eq!(r.status(), 404);
    let (_, files) = s.get("/v1/files").await;
    assert_eq!(files["data"].as_array().unwrap().len(), 2, "no failed upload is listed: {files}");
    let leftovers: Vec<_> =
        std::fs::read_dir(data.path().join("files")).unwrap().map(|e| e.unwrap().file_name()).collect();
    assert_eq!(leftovers.len(), 2, "no partial upload is left: {leftovers:?}");

    // Job creation.
    let job = |extra: Value| {
        let mut b = json!({"model": "hf-f32", "training_file": good});
        for (k, v) in extra.as_object().unwrap() {
            b[k] = v.clone();
        }
        b
    };
    let hp = |h: Value| json!({"method": {"type": "supervised", "supervised": {"hyperparameters": h}}});
    let cases = vec![
        ("unknown model", json!({"model": "gpt-4o"}), 400, "model"),
        ("unknown file", json!({"training_file": "file-nope"}), 400, "training_file"),
        ("unknown validation file", json!({"validation_file": "file-nope"}), 400, "validation_file"),
        ("wrong purpose", json!({"training_file": other}), 400, "training_file"),
        ("n_epochs 0", hp(json!({"n_epochs": 0})), 400, "n_epochs"),
        ("batch_size too big", hp(json!({"batch_size": 100000})), 400, "batch_size"),
        ("negative lr multiplier", hp(json!({"learning_rate_multiplier": -2})), 400, "learning_rate_multiplier"),
        ("n_epochs a string", hp(json!({"n_epochs": "many"})), 400, "n_epochs"),
        ("dpo", json!({"method": {"type": "dpo"}}), 400, "method.type"),
        ("bad suffix", json!({"suffix": "a b"}), 400, "suffix"),
        ("rank too big", json!({"tandem": {"rank": 1000}}), 400, "tandem.rank"),
        ("unknown target", json!({"tandem": {"targets": ["attn"]}}), 400, "tandem.targets"),
        ("unknown field", json!({"epochs": 3}), 400, "epochs"),
        ("missing training_file", json!({"training_file": null}), 400, "training_file"),
    ];
    for (what, extra, status, param) in cases {
        let (st, v) = s.post("/v1/fine_tuning/jobs", &job(extra)).await;
        assert_eq!(st, status, "{what}: {v}");
        let e = &v["error"];
        assert!(e["message"].is_string(), "{what}: {v}");
        let got_param = e["param"].as_str().unwrap_or("");
        assert!(got_param.contains(param) || e["message"].as_str().unwrap().contains(param), "{what}: {v}");
    }
    let (_, jobs) = s.get("/v1/fine_tuning/jobs").await;
    assert!(jobs["data"].as_array().unwrap().is_empty(), "no job was created: {jobs}");

    // Files that parse as JSON but not as training data fail the job in
    // validating_files, naming the line; nothing trains.
    let bad_lines = [
        (format!("{}{}", chats(1, 0), json!({"messages": [{"role": "wizard", "content": "x"}]})), "line 2"),
        (json!({"messages": [{"role": "user", "content": "only a question"}]}).to_string(), "line 1"),
        (
            json!({"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": ""}]}).to_string(),
            "line 1",
        ),
    ];
    for (text, needle) in bad_lines {
        let f = file_id(&s, &text).await;
        let (st, j) = s.post("/v1/fine_tuning/jobs", &json!({"model": "hf-f32", "training_file": f})).await;
        assert_eq!(st, 200, "{j}");
        let id = j["id"].as_str().unwrap();
        let j = wait_job(&s, id, 30, finished).await;
        assert_eq!(j["status"], "failed", "{j}");
        assert_eq!(j["error"]["code"], "invalid_training_file");
        assert_eq!(j["error"]["param"], "training_file");
        assert!(j["error"]["message"].as_str().unwrap().contains(needle), "{j}");
        assert!(j["fine_tuned_model"].is_null());
        // Actions on a finished job are refused.
        let (st, v) = s.post(&format!("/v1/fine_tuning/jobs/{id}/cancel"), &json!({})).await;
        assert_eq!(st, 400, "{v}");
    }
    let (st, _) = s.get("/v1/fine_tuning/jobs/ftjob-nope").await;
    assert_eq!(st, 404);
    let (st, _) = s.get("/v1/fine_tuning/jobs/ftjob-nope/events").await;
    assert_eq!(st, 404);
    let (st, _) = s.get("/v1/fine_tuning/jobs?limit=0").await;
    assert_eq!(st, 400);
    assert_eq!(metric(&s.metrics().await, "tandem_train_steps_total"), Some(0.0));
}

/// Checkpoint directories of a data dir, and whether any is half-written.
fn checkpoint_dirs(data: &Path) -> Vec<std::path::PathBuf> {
    let mut out = vec![];
    for job in std::fs::read_dir(data.join("jobs")).unwrap() {
        let ck = job.unwrap().path().join("checkpoints");
        if let Ok(rd) = std::fs::read_dir(ck) {
            out.extend(rd.map(|e| e.unwrap().path()));
        }
    }
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn kill_9_mid_job_and_mid_upload_loses_nothing_and_the_job_resumes_to_the_same_adapter() {
    let data = tempfile::tempdir().unwrap();
    let cfg = config(data.path(), "");
    let mut s = Server::start(&fixture(MODEL), &cfg).await;
    let train = file_id(&s, &chats(12, 0)).await;
    let body = json!({"model": "hf-f32", "training_file": train, "seed": 5,
        "method": {"type": "supervised", "supervised": {"hyperparameters": {"n_epochs": 50, "batch_size": 1}}},
        "tandem": {"rank": 4, "learning_rate": 0.02, "save_every": 1}});
    // The same job run without interruption: what the resumed one must end with.
    let (_, straight) = s.post("/v1/fine_tuning/jobs", &body).await;
    let straight_id = straight["id"].as_str().unwrap().to_string();
    let done = wait_job(&s, &straight_id, 300, finished).await;
    assert_eq!(done["status"], "succeeded", "{done}");

    let (_, job) = s.post("/v1/fine_tuning/jobs", &body).await;
    let id = job["id"].as_str().unwrap().to_string();
    let mut last_step = 0;
    for round in 0..3 {
        // Let it run a few steps into its checkpoints (one per step), then kill -9.
        let want_step = last_step + 3;
        let j = wait_job(&s, &id, 300, |j| j["tandem"]["step"].as_u64().unwrap_or(0) >= want_step || finished(j)).await;
        assert!(!finished(&j), "the job ended before kill {round}: {j}");
        tokio::time::sleep(Duration::from_millis(37 * round)).await;
        // An upload in flight at the same moment: a slow streamed body.
        let url = s.url("/v1/files");
        let slow = tokio::spawn(async move {
            let chunks = futures_chunks();
            let form = reqwest::multipart::Form::new().text("purpose", "fine-tune").part(
                "file",
                reqwest::multipart::Part::stream(reqwest::Body::wrap_stream(chunks)).file_name("slow.jsonl"),
            );
            let _ = reqwest::Client::new().post(url).multipart(form).send().await;
        });
        tokio::time::sleep(Duration::from_millis(150)).await;
        s.kill9();
        let _ = slow.await;
        // Every checkpoint directory on disk is complete (it loads as an adapter).
        for d in checkpoint_dirs(data.path()) {
            let name = d.file_name().unwrap().to_string_lossy().into_owned();
            if name.ends_with(".partial") {
                continue; // never listed; removed when its step is written again
            }
            assert!(d.join("adapter_model.safetensors").exists() && d.join("trainer_state.json").exists(), "{d:?}");
        }
        s = Server::start(&fixture(MODEL), &cfg).await;
        // Nothing half-written is listed or served.
        let (_, files) = s.get("/v1/files").await;
        for f in files["data"].as_array().unwrap() {
            assert_ne!(f["filename"], "slow.jsonl", "a half-uploaded file is listed: {files}");
        }
        let partials = std::fs::read_dir(data.path().join("files"))
            .unwrap()
            .filter(|e| e.as_ref().unwrap().file_name().to_string_lossy().starts_with(".partial"))
            .count();
        assert_eq!(partials, 0);
        // The newest checkpoints (the ones a kill could have caught mid-write) serve.
        let (_, cks) = s.get(&format!("/v1/fine_tuning/jobs/{id}/checkpoints?limit=3")).await;
        for c in cks["data"].as_array().unwrap() {
            let name = c["fine_tuned_model_checkpoint"].as_str().unwrap();
            let (st, v) = greedy(&s, name, "count 1").await;
            assert_eq!(st, 200, "{name}: {v}");
        }
        let (_, straight_again) = s.get(&format!("/v1/fine_tuning/jobs/{straight_id}")).await;
        assert_eq!(straight_again["status"], "succeeded");
        let (st, _) = greedy(&s, straight_again["fine_tuned_model"].as_str().unwrap(), "count 1").await;
        assert_eq!(st, 200, "a finished adapter serves after the restart");
        last_step = s.get(&format!("/v1/fine_tuning/jobs/{id}")).await.1["tandem"]["step"].as_u64().unwrap();
    }
    let j = wait_job(&s, &id, 300, finished).await;
    assert_eq!(j["status"], "succeeded", "{j}");
    // Every event, page by page: the restarts are recorded.
    let (mut resumed, mut after) = (0, String::new());
    loop {
        let (_, page) = s.get(&format!("/v1/fine_tuning/jobs/{id}/events?limit=100{after}")).await;
        let data = page["data"].as_array().unwrap();
        resumed += data.iter().filter(|e| e["message"].as_str().unwrap().contains("resuming from the step-")).count();
        if page["has_more"] != true {
            break;
        }
        after = format!("&after={}", data.last().unwrap()["id"].as_str().unwrap());
    }
    assert_eq!(resumed, 3, "one resume per kill");
    // Resumed from checkpoints (optimiser state included), the job ends with
    // exactly the adapter of the uninterrupted run.
    let weights = |job: &str| {
        std::fs::read(data.path().join("jobs").join(job).join("adapter/adapter_model.safetensors")).unwrap()
    };
    assert!(weights(&id) == weights(&straight_id), "the resumed job's adapter differs from the straight run's");
}

/// A slow upload body: 40 chunks, 20 ms apart.
fn futures_chunks() -> impl futures::Stream<Item = Result<Vec<u8>, std::io::Error>> + Send + 'static {
    futures::stream::unfold(0, |i| async move {
        if i == 40 {
            return None;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
        Some((Ok(chats(1, i).into_bytes()), i + 1))
    })
}

/// Training memory is planned before the first step: a job that cannot fit
/// the configured budget fails at start with the figure, and serving goes on.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_job_over_the_memory_budget_fails_at_start_with_the_figure() {
    let Some(model) = default_model() else { return };
    let data = tempfile::tempdir().unwrap();
    let s = Server::start(&model, &config(data.path(), "memory_budget_mib = 16\n")).await;
    let train = file_id(&s, &std::fs::read_to_string(fixture("train-data/facts.train.jsonl")).unwrap()).await;
    let (_, models) = s.get("/v1/models").await;
    let base = models["data"][0]["id"].as_str().unwrap().to_string();
    let (st, j) = s.post("/v1/fine_tuning/jobs", &json!({"model": base, "training_file": train})).await;
    assert_eq!(st, 200, "{j}");
    let j = wait_job(&s, j["id"].as_str().unwrap(), 120, finished).await;
    assert_eq!(j["status"], "failed", "{j}");
    let msg = j["error"]["message"].as_str().unwrap();
    assert!(msg.contains("needs at least") && msg.contains("MiB") && msg.contains("budget is 16 MiB"), "{msg}");
    assert_eq!(metric(&s.metrics().await, "tandem_train_steps_total"), Some(0.0));
    let (st, _) = greedy(&s, &base, "hello").await;
    assert_eq!(st, 200, "serving goes on");
}
