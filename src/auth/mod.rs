//! API keys: who may call the server, with which scope, on which models, and
//! how much.
//!
//! A key has a scope (`inference`: completions, chat, models; `admin`: also
//! adapters, files, fine-tuning, routes), an optional allow-list of the model
//! names, adapters and aliases it may use (anything else is answered as if it
//! did not exist: tenant isolation), and optional limits on concurrent
//! requests and on tokens per minute. Keys come from `[[auth.keys]]` and from
//! `TANDEM_API_KEYS` / `TANDEM_ADMIN_KEYS` (comma-separated, no limits). With no
//! key at all the server is open, and says so at start.
//!
//! Keys are kept only as SHA-256 digests and compared in constant time over
//! every entry; they are never logged or echoed (an entry's `name` stands for
//! it in logs and errors).

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use serde::Deserialize;
use sha2::{Digest, Sha256};

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Scope {
    Inference,
    Admin,
}

/// One key as the config spells it.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct KeySpec {
    pub key: String,
    pub scope: Scope,
    /// What the key stands for in logs and errors (default: `key-N`).
    #[serde(default)]
    pub name: String,
    /// Model names, adapters and aliases this key may use; empty = all.
    #[serde(default)]
    pub models: Vec<String>,
    /// Requests in flight at once; 0 = no limit.
    #[serde(default)]
    pub max_concurrent: usize,
    /// Prompt plus generated tokens per minute; 0 = no limit.
    #[serde(default)]
    pub tokens_per_minute: u64,
}

/// `[auth]`.
#[derive(Debug, Clone, Default, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AuthSection {
    #[serde(default)]
    pub keys: Vec<KeySpec>,
}

/// A known key (without the key itself).
#[derive(Debug)]
pub struct Identity {
    pub name: String,
    pub scope: Scope,
    models: Vec<String>,
    max_concurrent: usize,
    tokens_per_minute: u64,
    digest: [u8; 32],
    in_flight: AtomicUsize,
    /// The current one-minute window: its start and the tokens charged in it.
    window: Mutex<(Instant, u64)>,
}

const WINDOW: Duration = Duration::from_secs(60);

impl Identity {
    pub fn is_admin(&self) -> bool {
        self.scope == Scope::Admin
    }

    /// Whether this key may use `model` (a model name, an adapter or an alias).
    pub fn allows(&self, model: &str) -> bool {
        self.models.is_empty() || self.models.iter().any(|m| m == model)
    }

    /// Admits one request: `Err(seconds to wait)` when the key is at its
    /// concurrency limit or has spent its tokens for this minute. The permit
    /// frees the slot when dropped.
    pub fn admit(self: &Arc<Self>) -> Result<Permit, u64> {
        if self.tokens_per_minute > 0 {
            let mut w = self.window.lock().unwrap_or_else(|e| e.into_inner());
            let now = Instant::now();
            if now.duration_since(w.0) >= WINDOW {
                *w = (now, 0);
            }
            if w.1 >= self.tokens_per_minute {
                let left = WINDOW.saturating_sub(now.duration_since(w.0));
                return Err(left.as_secs().max(1));
            }
        }
        let n = self.in_flight.fetch_add(1, Ordering::AcqRel);
        if self.max_concurrent > 0 && n >= self.max_concurrent {
            self.in_flight.fetch_sub(1, Ordering::AcqRel);
            return Err(1);
        }
        Ok(Permit(self.clone()))
    }

    /// Charges `tokens` (prompt + generated) to the current minute.
    pub fn charge(&self, tokens: u64) {
        if self.tokens_per_minute == 0 {
            return;
        }
        let mut w = self.window.lock().unwrap_or_else(|e| e.into_inner());
        if w.0.elapsed() >= WINDOW {
            *w = (Instant::now(), 0);
        }
        w.1 = w.1.saturating_add(tokens);
    }

    pub fn in_flight(&self) -> usize {
        self.in_flight.load(Ordering::Acquire)
    }
}

/// The key a request came with (a request extension, and what its tokens
/// are charged to). Equal when it is the same key.
#[derive(Debug, Clone)]
pub struct Caller(pub Arc<Identity>);

impl PartialEq for Caller {
    fn eq(&self, other: &Self) -> bool {
        Arc::ptr_eq(&self.0, &other.0)
    }
}

/// A request slot of one key, freed on drop.
#[derive(Debug)]
pub struct Permit(Arc<Identity>);

impl Drop for Permit {
    fn drop(&mut self) {
        self.0.in_flight.fetch_sub(1, Ordering::AcqRel);
    }
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum AuthError {
    #[error("no API key: send it as `Authorization: Bearer <key>`")]
    Missing,
    #[error("the API key is not valid")]
    Wrong,
}

/// Every key the server accepts.
#[derive(Debug, Default)]
pub struct Keys {
    entries: Vec<Arc<Identity>>,
}

fn digest(key: &str) -> [u8; 32] {
    Sha256::digest(key.as_bytes()).into()
}

/// Equal digests, in time independent of where they differ.
fn same(a: &[u8; 32], b: &[u8; 32]) -> bool {
    a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

impl Keys {
    /// The configured keys plus those of the two environment lists.
    pub fn new(section: &AuthSection, env_inference: Option<&str>, env_admin: Option<&str>) -> Result<Self, String> {
        let mut specs = section.keys.clone();
        for (list, scope) in [(env_inference, Scope::Inference), (env_admin, Scope::Admin)] {
            for key in list.unwrap_or("").split(',').map(str::trim).filter(|k| !k.is_empty()) {
                specs.push(KeySpec {
                    key: key.to_string(),
                    scope,
                    name: String::new(),
                    models: Vec::new(),
                    max_concurrent: 0,
                    tokens_per_minute: 0,
                });
            }
        }
        let mut entries: Vec<Arc<Identity>> = Vec::new();
        for (i, s) in specs.into_iter().enumerate() {
            let name = if s.name.is_empty() { format!("key-{}", i + 1) } else { s.name };
            if s.key.len() < 8 {
                return Err(format!("API key {name}: keys must be at least 8 characters"));
            }
            let d = digest(&s.key);
            if entries.iter().any(|e| same(&e.digest, &d)) {
                return Err(format!("API key {name} is listed twice"));
            }
            entries.push(Arc::new(Identity {
                name,
                scope: s.scope,
                models: s.models,
                max_concurrent: s.max_concurrent,
                tokens_per_minute: s.tokens_per_minute,
                digest: d,
                in_flight: AtomicUsize::new(0),
                window: Mutex::new((Instant::now(), 0)),
            }));
        }
        Ok(Self { entries })
    }

    /// No keys: every request is let in with full rights.
    pub fn is_open(&self) -> bool {
        self.entries.is_empty()
    }

    /// The identity of a presented key. Every entry is compared (no early
    /// exit), each in constant time.
    pub fn check(&self, presented: Option<&str>) -> Result<Arc<Identity>, AuthError> {
        let presented = presented.filter(|k| !k.is_empty()).ok_or(AuthError::Missing)?;
        let d = digest(presented);
        let mut found = None;
        for e in &self.entries {
            if same(&e.digest, &d) {
                found = Some(e.clone());
            }
        }
        found.ok_or(AuthError::Wrong)
    }

    pub fn len(&self) -> usize {
        self.entries.len()
    }

    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn keys() -> Keys {
        let section: AuthSection = toml::from_str(
            r#"
            [[keys]]
            key = "tenant-a-secret"
            scope = "inference"
            name = "tenant-a"
            models = ["base", "sql"]
            max_concurrent = 2
            tokens_per_minute = 100
            "#,
        )
        .unwrap();
        Keys::new(&section, Some(" infer-key-1 ,"), Some("admin-key-1")).unwrap()
    }

    #[test]
    fn keys_scopes_and_allow_lists() {
        let k = keys();
        assert_eq!(k.len(), 3);
        assert_eq!(k.check(None).unwrap_err(), AuthError::Missing);
        assert_eq!(k.check(Some("")).unwrap_err(), AuthError::Missing);
        assert_eq!(k.check(Some("tenant-a-secreT")).unwrap_err(), AuthError::Wrong);
        let a = k.check(Some("tenant-a-secret")).unwrap();
        assert_eq!((a.name.as_str(), a.is_admin()), ("tenant-a", false));
        assert!(a.allows("sql") && !a.allows("other-tenant"));
        let admin = k.check(Some("admin-key-1")).unwrap();
        assert!(admin.is_admin() && admin.allows("anything"));
        assert_eq!(k.check(Some("infer-key-1")).unwrap().name, "key-2");
        assert!(Keys::new(&AuthSection::default(), None, None).unwrap().is_open());
        assert!(Keys::new(&AuthSection::default(), Some("short"), None).unwrap_err().contains("8 characters"));
        assert!(Keys::new(&AuthSection::default(), Some("same-key-x,same-key-x"), None).unwrap_err().contains("twice"));
        assert!(toml::from_str::<AuthSection>("[[keys]]\nkey = \"abcdefgh\"\nscope = \"root\"").is_err());
    }

    #[test]
    fn limits_answer_with_a_wait() {
        let k = keys();
        let a = k.check(Some("tenant-a-secret")).unwrap();
        let p1 = a.admit().unwrap();
        let _p2 = a.admit().unwrap();
        assert_eq!(a.admit().unwrap_err(), 1, "two in flight is the limit");
        drop(p1);
        assert_eq!(a.in_flight(), 1);
        let _p3 = a.admit().unwrap();
        a.charge(60);
        a.charge(50);
        drop(_p3);
        let wait = a.admit().unwrap_err();
        assert!((1..=60).contains(&wait), "{wait}");
    }
}
