//! Routes: an alias clients put in `model`, mapped to weighted targets (the
//! base model, an adapter, an `ft:` model or checkpoint), for canary and A/B
//! splits inside the server.
//!
//! Assignment is sticky per user by weighted rendezvous hashing: each target
//! scores `weight / -ln(u)` with `u` a hash of (user key, target) in (0, 1),
//! and the highest score wins. A weight change moves only the users who must
//! move (a user never leaves a target whose share grew), and adding or removing
//! a target moves only users to or from it. Without a user key, a weighted
//! random draw per request. The table is swapped whole (`RouteTable` behind an
//! `Arc`): a request sees the old table or the new one, never a mix.
//!
//! No HTTP and no engine here: the API layer validates targets against what
//! the server can serve and persists routes in the store.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, RwLock};

use serde::{Deserialize, Serialize};

/// One weighted target of a route.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct RouteTarget {
    pub model: String,
    #[schema(minimum = 1)]
    pub weight: u32,
}

/// A copy of a fraction of the route's requests sent to another model in the
/// background, its output discarded.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct Shadow {
    pub model: String,
    #[schema(exclusive_minimum = 0.0, maximum = 1.0)]
    pub fraction: f64,
    /// How many leading tokens of the shadow's output are compared with the
    /// primary's (greedy or seeded requests only: sampled ones would differ
    /// by chance); 0 turns the comparison off.
    #[serde(default = "default_compare_tokens")]
    #[schema(default = 16, maximum = 4096)]
    pub compare_tokens: u32,
}

fn default_compare_tokens() -> u32 {
    DEFAULT_COMPARE_TOKENS
}

/// Leading tokens compared between a shadow and its primary by default.
pub const DEFAULT_COMPARE_TOKENS: u32 = 16;
/// The most a route may ask to compare.
pub const MAX_COMPARE_TOKENS: u32 = 4096;

/// How a shadow's first tokens compare with its primary's: whether the first
/// `n` (or all, when an output is shorter) are equal, and how many leading
/// tokens the two share (at most `n`).
pub fn first_tokens_agree(primary: &[u32], shadow: &[u32], n: usize) -> (bool, usize) {
    let (p, s) = (&primary[..primary.len().min(n)], &shadow[..shadow.len().min(n)]);
    let common = p.iter().zip(s).take_while(|(a, b)| a == b).count();
    (p == s, common)
}

/// What keys stickiness: the request's OpenAI `user` field, or a header.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum StickyBy {
    User,
    Header(String),
}

impl StickyBy {
    pub fn parse(s: &str) -> Result<Self, String> {
        match s.split_once(':') {
            None if s == "user" => Ok(Self::User),
            Some(("header", name)) if is_header_name(name) => Ok(Self::Header(name.to_ascii_lowercase())),
            _ => Err(format!("sticky_by {s:?}: expected \"user\" or \"header:NAME\" (an HTTP header name)")),
        }
    }
}

impl std::fmt::Display for StickyBy {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::User => f.write_str("user"),
            Self::Header(h) => write!(f, "header:{h}"),
        }
    }
}

fn is_header_name(s: &str) -> bool {
    !s.is_empty() && s.len() <= 64 && s.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
}

/// A route as the admin API and the config spell it (the alias is the key).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct RouteSpec {
    #[schema(min_items = 1, max_items = 64)]
    pub targets: Vec<RouteTarget>,
    /// `user` (the request's `user` field) or `header:NAME`.
    #[serde(default = "default_sticky")]
    #[schema(default = "user")]
    pub sticky_by: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub shadow: Option<Shadow>,
}

fn default_sticky() -> String {
    "user".into()
}

/// A validated route.
#[derive(Debug, Clone, PartialEq)]
pub struct Route {
    pub alias: String,
    pub targets: Vec<RouteTarget>,
    pub sticky_by: StickyBy,
    pub shadow: Option<Shadow>,
}

/// Most targets a route may split between.
pub const MAX_TARGETS: usize = 64;

impl Route {
    /// Checks the spec's own shape: at least one target, positive weights,
    /// distinct target names, none the alias itself, a valid sticky key and
    /// shadow fraction. Whether targets exist is the caller's to check.
    pub fn new(alias: &str, spec: RouteSpec) -> Result<Self, String> {
        if alias.is_empty() || alias.len() > 256 || alias.chars().any(char::is_control) {
            return Err("an alias is 1 to 256 characters, without control characters".into());
        }
        if spec.targets.is_empty() || spec.targets.len() > MAX_TARGETS {
            return Err(format!("a route has 1 to {MAX_TARGETS} targets, got {}", spec.targets.len()));
        }
        for (i, t) in spec.targets.iter().enumerate() {
            if t.weight == 0 {
                return Err(format!("targets[{i}] ({}): weight must be a positive integer", t.model));
            }
            if t.model == alias {
                return Err(format!("targets[{i}]: a route cannot target its own alias"));
            }
            if spec.targets[..i].iter().any(|o| o.model == t.model) {
                return Err(format!("targets[{i}]: {} is listed twice", t.model));
            }
        }
        if spec.targets.iter().map(|t| u64::from(t.weight)).sum::<u64>() > u64::from(u32::MAX) {
            return Err("the weights' sum must fit in 32 bits".into());
        }
        if let Some(s) = &spec.shadow {
            if !(s.fraction > 0.0 && s.fraction <= 1.0) {
                return Err(format!("shadow.fraction must be in (0, 1], got {}", s.fraction));
            }
            if s.model == alias {
                return Err("shadow.model cannot be the route's own alias".into());
            }
            if s.compare_tokens > MAX_COMPARE_TOKENS {
                return Err(format!(
                    "shadow.compare_tokens must be at most {MAX_COMPARE_TOKENS}, got {}",
                    s.compare_tokens
                ));
            }
        }
        Ok(Self {
            alias: alias.to_string(),
            targets: spec.targets,
            sticky_by: StickyBy::parse(&spec.sticky_by)?,
            shadow: spec.shadow,
        })
    }

    pub fn spec(&self) -> RouteSpec {
        RouteSpec { targets: self.targets.clone(), sticky_by: self.sticky_by.to_string(), shadow: self.shadow.clone() }
    }

    /// The target for a request: sticky for `key`, else weighted by `draw`
    /// (uniform in [0, 1)).
    pub fn choose(&self, key: Option<&str>, draw: f64) -> &RouteTarget {
        match key.filter(|k| !k.is_empty()) {
            Some(key) => self
                .targets
                .iter()
                .max_by(|a, b| score(key, a).total_cmp(&score(key, b)))
                .expect("routes have at least one target"),
            None => {
                let total: u64 = self.targets.iter().map(|t| u64::from(t.weight)).sum();
                let mut point = (draw.clamp(0.0, 1.0) * total as f64) as u64;
                for t in &self.targets {
                    if point < u64::from(t.weight) {
                        return t;
                    }
                    point -= u64::from(t.weight);
                }
                self.targets.last().expect("routes have at least one target")
            }
        }
    }

    /// Whether this request (by `draw`, uniform in [0, 1)) is also shadowed.
    pub fn shadowed(&self, draw: f64) -> Option<&Shadow> {
        self.shadow.as_ref().filter(|s| draw < s.fraction)
    }
}

/// Weighted rendezvous score of `target` for `key`.
fn score(key: &str, target: &RouteTarget) -> f64 {
    let h = stable_hash(key.as_bytes(), target.model.as_bytes());
    // 53 random bits, strictly inside (0, 1).
    let u = ((h >> 11) as f64 + 0.5) / (1u64 << 53) as f64;
    f64::from(target.weight) / -u.ln()
}

/// FNV-1a over `key`, a separator and `model`, then a SplitMix64 finaliser:
/// fixed across builds and versions, so assignments survive restarts and upgrades.
fn stable_hash(key: &[u8], model: &[u8]) -> u64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for &b in key.iter().chain(&[0xff]).chain(model) {
        h ^= u64::from(b);
        h = h.wrapping_mul(0x0000_0100_0000_01b3);
    }
    h = (h ^ (h >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    h = (h ^ (h >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    h ^ (h >> 31)
}

/// Every route, by alias.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct RouteTable {
    routes: BTreeMap<String, Arc<Route>>,
}

impl RouteTable {
    pub fn get(&self, alias: &str) -> Option<&Arc<Route>> {
        self.routes.get(alias)
    }
    pub fn iter(&self) -> impl Iterator<Item = &Arc<Route>> {
        self.routes.values()
    }
    pub fn len(&self) -> usize {
        self.routes.len()
    }
    pub fn is_empty(&self) -> bool {
        self.routes.is_empty()
    }
}

/// The live table (readers take a snapshot; writers replace it whole) and
/// the counters of what it routed.
#[derive(Debug, Default)]
pub struct Routes {
    table: RwLock<Arc<RouteTable>>,
    /// Per (alias, target): routed requests.
    requests: Mutex<BTreeMap<(String, String), u64>>,
    /// Per (alias, shadow target): shadow copies started and dropped.
    shadows: Mutex<BTreeMap<(String, String), (u64, u64)>>,
    /// Per (alias, target): latencies and errors of the routed responses.
    outcomes: Mutex<BTreeMap<(String, String), Arc<TargetStats>>>,
    /// Per (alias, shadow target): the same for the shadow copies.
    shadow_outcomes: Mutex<BTreeMap<(String, String), Arc<TargetStats>>>,
    /// Per (alias, shadow target): first-token comparisons with the primary.
    agreement: Mutex<BTreeMap<(String, String), Agreement>>,
    changes: AtomicU64,
}

/// What the routed responses of one target looked like.
#[derive(Debug)]
pub struct TargetStats {
    /// Arrival to the first byte of the response body (for a stream, about the first token).
    first_byte: crate::metrics::Histogram,
    /// Arrival to the end of the response body.
    e2e: crate::metrics::Histogram,
    /// Responses with a non-2xx status (shadows: that failed).
    errors: AtomicU64,
    /// Tokens generated.
    tokens: AtomicU64,
}

/// Comparisons of shadows' first tokens with their primaries'.
#[derive(Debug, Default, Clone, Copy)]
struct Agreement {
    agreed: u64,
    disagreed: u64,
    /// Leading tokens shared, summed over comparisons.
    common_prefix_tokens: u64,
}

impl TargetStats {
    fn record(&self, first_byte_s: Option<f64>, e2e_s: f64, tokens: u64, failed: bool) {
        if let Some(t) = first_byte_s {
            self.first_byte.observe(t);
        }
        self.e2e.observe(e2e_s);
        self.tokens.fetch_add(tokens, Ordering::Relaxed);
        if failed {
            self.errors.fetch_add(1, Ordering::Relaxed);
        }
    }

    fn new() -> Arc<Self> {
        Arc::new(Self {
            first_byte: crate::metrics::Histogram::new(crate::metrics::TTFT_BUCKETS),
            e2e: crate::metrics::Histogram::new(crate::metrics::E2E_BUCKETS),
            errors: AtomicU64::new(0),
            tokens: AtomicU64::new(0),
        })
    }
}

fn stats_for(map: &Mutex<BTreeMap<(String, String), Arc<TargetStats>>>, alias: &str, target: &str) -> Arc<TargetStats> {
    let mut m = map.lock().unwrap_or_else(|e| e.into_inner());
    m.entry((alias.to_string(), target.to_string())).or_insert_with(TargetStats::new).clone()
}

/// Why a route table change was refused: the route does not fit the table
/// (the client's to fix), or persisting it failed (the store's error).
#[derive(Debug, PartialEq)]
pub enum TableError<E> {
    Conflict(String),
    Persist(E),
}

impl<E: std::fmt::Display> std::fmt::Display for TableError<E> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Conflict(m) => f.write_str(m),
            Self::Persist(e) => write!(f, "storing it failed: {e}"),
        }
    }
}

impl Routes {
    pub fn snapshot(&self) -> Arc<RouteTable> {
        self.table.read().unwrap_or_else(|e| e.into_inner()).clone()
    }

    /// Inserts or replaces `route`; `Err` if one of its targets or its shadow
    /// is an alias (routes do not chain), or if `persist` fails (then nothing
    /// changes). `persist` runs under the write lock, so the stored and the
    /// live tables change in the same order. Returns whether it replaced one.
    pub fn put<E>(&self, route: Route, persist: impl FnOnce(&Route) -> Result<(), E>) -> Result<bool, TableError<E>> {
        let mut guard = self.table.write().unwrap_or_else(|e| e.into_inner());
        let names = route.targets.iter().map(|t| &t.model).chain(route.shadow.as_ref().map(|s| &s.model));
        for name in names {
            if guard.routes.contains_key(name) {
                return Err(TableError::Conflict(format!(
                    "{name} is an alias; a route targets models, not other aliases"
                )));
            }
        }
        let targets_alias = |r: &Route| {
            r.targets.iter().map(|t| &t.model).chain(r.shadow.as_ref().map(|s| &s.model)).any(|m| *m == route.alias)
        };
        if let Some(other) = guard.iter().find(|r| targets_alias(r)) {
            return Err(TableError::Conflict(format!(
                "route {} targets {}, so it cannot become an alias",
                other.alias, route.alias
            )));
        }
        persist(&route).map_err(TableError::Persist)?;
        let mut next = (**guard).clone();
        let replaced = next.routes.insert(route.alias.clone(), Arc::new(route)).is_some();
        *guard = Arc::new(next);
        self.changes.fetch_add(1, Ordering::Relaxed);
        Ok(replaced)
    }

    /// Removes `alias` (after `persist` succeeds); whether it existed.
    pub fn delete<E>(&self, alias: &str, persist: impl FnOnce() -> Result<(), E>) -> Result<bool, E> {
        let mut guard = self.table.write().unwrap_or_else(|e| e.into_inner());
        if !guard.routes.contains_key(alias) {
            return Ok(false);
        }
        persist()?;
        let mut next = (**guard).clone();
        next.routes.remove(alias);
        *guard = Arc::new(next);
        self.changes.fetch_add(1, Ordering::Relaxed);
        Ok(true)
    }

    /// Counts a request routed from `alias` to `target`.
    pub fn count(&self, alias: &str, target: &str) {
        let mut m = self.requests.lock().unwrap_or_else(|e| e.into_inner());
        *m.entry((alias.to_string(), target.to_string())).or_default() += 1;
    }

    /// Records one routed response: seconds to its first body byte (if any),
    /// to its end, tokens generated, and whether it failed (a non-2xx status).
    pub fn observe(&self, alias: &str, target: &str, first_byte_s: Option<f64>, e2e_s: f64, tokens: u64, failed: bool) {
        stats_for(&self.outcomes, alias, target).record(first_byte_s, e2e_s, tokens, failed);
    }

    /// Records one finished shadow copy: its duration, tokens, and failure.
    pub fn observe_shadow(&self, alias: &str, target: &str, e2e_s: f64, tokens: u64, failed: bool) {
        stats_for(&self.shadow_outcomes, alias, target).record(None, e2e_s, tokens, failed);
    }

    /// Records how the first `n` tokens of a shadow copy compare with its
    /// primary's ([`first_tokens_agree`]).
    pub fn compare_shadow(&self, alias: &str, target: &str, primary: &[u32], shadow: &[u32], n: usize) {
        let (agreed, common) = first_tokens_agree(primary, shadow, n);
        let mut m = self.agreement.lock().unwrap_or_else(|e| e.into_inner());
        let a = m.entry((alias.to_string(), target.to_string())).or_default();
        if agreed {
            a.agreed += 1;
        } else {
            a.disagreed += 1;
        }
        a.common_prefix_tokens += common as u64;
    }

    /// Counts a shadow copy of a request: started, or dropped under load.
    pub fn count_shadow(&self, alias: &str, target: &str, dropped: bool) {
        let mut m = self.shadows.lock().unwrap_or_else(|e| e.into_inner());
        let e = m.entry((alias.to_string(), target.to_string())).or_default();
        if dropped {
            e.1 += 1;
        } else {
            e.0 += 1;
        }
    }

    /// The route families. Labels are aliases and targets only (bounded by
    /// the table), never users or request ids.
    pub fn collect_metrics(&self, f: &mut crate::metrics::Families) {
        let requests = self.requests.lock().unwrap_or_else(|e| e.into_inner()).clone();
        f.labelled(
            "tandem_route_requests_total",
            "Requests routed from an alias to a target.",
            true,
            requests
                .iter()
                .map(|((alias, target), n)| (vec![("alias", alias.as_str()), ("target", target.as_str())], *n as f64)),
        );
        let shadows = self.shadows.lock().unwrap_or_else(|e| e.into_inner()).clone();
        f.labelled(
            "tandem_route_shadow_requests_total",
            "Shadow copies of routed requests, by outcome (started, or dropped under load).",
            true,
            shadows.iter().flat_map(|((alias, target), (started, dropped))| {
                [("started", *started), ("dropped", *dropped)].map(|(outcome, n)| {
                    (vec![("alias", alias.as_str()), ("target", target.as_str()), ("outcome", outcome)], n as f64)
                })
            }),
        );
        let outcomes = self.outcomes.lock().unwrap_or_else(|e| e.into_inner()).clone();
        fn labels((alias, target): &(String, String)) -> Vec<(&str, &str)> {
            vec![("alias", alias.as_str()), ("target", target.as_str())]
        }
        f.histograms(
            "tandem_route_first_byte_seconds",
            "Arrival to the first byte of a routed response (for a stream, about its first token), per target.",
            outcomes.iter().map(|(k, s)| (labels(k), &s.first_byte)),
        );
        f.histograms(
            "tandem_route_e2e_seconds",
            "Arrival to the end of a routed response, per target.",
            outcomes.iter().map(|(k, s)| (labels(k), &s.e2e)),
        );
        f.labelled(
            "tandem_route_errors_total",
            "Routed responses with a non-2xx status, per target.",
            true,
            outcomes.iter().map(|(k, s)| (labels(k), s.errors.load(Ordering::Relaxed) as f64)),
        );
        f.labelled(
            "tandem_route_completion_tokens_total",
            "Tokens generated for routed requests, per target.",
            true,
            outcomes.iter().map(|(k, s)| (labels(k), s.tokens.load(Ordering::Relaxed) as f64)),
        );
        let shadow = self.shadow_outcomes.lock().unwrap_or_else(|e| e.into_inner()).clone();
        f.histograms(
            "tandem_route_shadow_e2e_seconds",
            "Duration of a finished shadow copy, per shadow target (compare tandem_route_e2e_seconds).",
            shadow.iter().map(|(k, s)| (labels(k), &s.e2e)),
        );
        f.labelled(
            "tandem_route_shadow_completion_tokens_total",
            "Tokens the shadow copies generated, per shadow target (compare tandem_route_completion_tokens_total).",
            true,
            shadow.iter().map(|(k, s)| (labels(k), s.tokens.load(Ordering::Relaxed) as f64)),
        );
        f.labelled(
            "tandem_route_shadow_errors_total",
            "Shadow copies that failed, per shadow target.",
            true,
            shadow.iter().map(|(k, s)| (labels(k), s.errors.load(Ordering::Relaxed) as f64)),
        );
        let agreement = self.agreement.lock().unwrap_or_else(|e| e.into_inner()).clone();
        f.labelled(
            "tandem_route_shadow_comparisons_total",
            "Shadow copies whose first tokens (shadow.compare_tokens) were compared with the primary's, by outcome \
             (agree: all equal; disagree). Greedy or seeded requests only.",
            true,
            agreement.iter().flat_map(|((alias, target), a)| {
                [("agree", a.agreed), ("disagree", a.disagreed)].map(|(outcome, n)| {
                    (vec![("alias", alias.as_str()), ("target", target.as_str()), ("outcome", outcome)], n as f64)
                })
            }),
        );
        f.labelled(
            "tandem_route_shadow_common_prefix_tokens_total",
            "Leading tokens a shadow copy shared with its primary (at most shadow.compare_tokens), summed over \
             comparisons: divided by tandem_route_shadow_comparisons_total, the mean shared prefix.",
            true,
            agreement.iter().map(|(k, a)| (labels(k), a.common_prefix_tokens as f64)),
        );
        f.gauge("tandem_routes", "Routes (aliases) in the table.", self.snapshot().len() as f64);
        f.counter(
            "tandem_route_changes_total",
            "Routes created, replaced or deleted since start.",
            self.changes.load(Ordering::Relaxed) as f64,
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn route(targets: &[(&str, u32)]) -> Route {
        let targets = targets.iter().map(|(m, w)| RouteTarget { model: m.to_string(), weight: *w }).collect();
        Route::new("chat", RouteSpec { targets, sticky_by: "user".into(), shadow: None }).unwrap()
    }

    fn share(r: &Route, users: usize, target: &str) -> f64 {
        (0..users).filter(|u| r.choose(Some(&format!("user-{u}")), 0.0).model == target).count() as f64 / users as f64
    }

    #[test]
    fn a_split_over_many_users_lands_near_its_weights_and_is_sticky() {
        let r = route(&[("base", 90), ("ft:canary", 10)]);
        let canary = share(&r, 2000, "ft:canary");
        assert!((canary - 0.10).abs() <= 0.02, "canary share {canary}");
        for u in 0..200 {
            let k = format!("user-{u}");
            assert_eq!(r.choose(Some(&k), 0.1), r.choose(Some(&k), 0.9), "sticky whatever the draw");
        }
        let r3 = route(&[("a", 1), ("b", 1), ("c", 2)]);
        for (t, want) in [("a", 0.25), ("b", 0.25), ("c", 0.5)] {
            let s = share(&r3, 4000, t);
            assert!((s - want).abs() <= 0.025, "{t}: {s}");
        }
    }

    #[test]
    fn weight_changes_move_only_users_who_must_move() {
        let before = route(&[("base", 90), ("ft:canary", 10)]);
        let after = route(&[("base", 50), ("ft:canary", 50)]);
        let mut moved_to_canary = 0;
        for u in 0..2000 {
            let k = format!("user-{u}");
            let (b, a) = (&before.choose(Some(&k), 0.0).model, &after.choose(Some(&k), 0.0).model);
            assert!(!(b == "ft:canary" && a == "base"), "user {u} left the target whose share grew");
            moved_to_canary += usize::from(b == "base" && a == "ft:canary");
        }
        // About 40% of users must move, and no more.
        assert!((700..=900).contains(&moved_to_canary), "{moved_to_canary} moved");
        // Adding a target takes users only from the others, onto itself.
        let three = route(&[("base", 90), ("ft:canary", 10), ("ft:b", 10)]);
        for u in 0..2000 {
            let k = format!("user-{u}");
            let (b, a) = (&before.choose(Some(&k), 0.0).model, &three.choose(Some(&k), 0.0).model);
            assert!(a == b || a == "ft:b", "user {u} moved from {b} to {a}");
        }
    }

    #[test]
    fn without_a_key_the_draw_decides_by_weight() {
        let r = route(&[("a", 3), ("b", 1)]);
        assert_eq!(r.choose(None, 0.0).model, "a");
        assert_eq!(r.choose(None, 0.74).model, "a");
        assert_eq!(r.choose(None, 0.76).model, "b");
        assert_eq!(r.choose(Some(""), 0.99).model, "b", "an empty key is no key");
        assert_eq!(r.choose(None, 1.0).model, "b");
    }

    #[test]
    fn bad_specs_are_refused_with_a_reason() {
        let spec = |targets: &[(&str, u32)], sticky: &str, shadow: Option<f64>| RouteSpec {
            targets: targets.iter().map(|(m, w)| RouteTarget { model: m.to_string(), weight: *w }).collect(),
            sticky_by: sticky.into(),
            shadow: shadow.map(|fraction| Shadow { model: "s".into(), fraction, compare_tokens: 16 }),
        };
        for (alias, s, want) in [
            ("chat", spec(&[], "user", None), "1 to 64 targets"),
            ("chat", spec(&[("a", 0)], "user", None), "positive integer"),
            ("chat", spec(&[("chat", 1)], "user", None), "own alias"),
            ("chat", spec(&[("a", 1), ("a", 2)], "user", None), "listed twice"),
            ("chat", spec(&[("a", 1)], "cookie", None), "sticky_by"),
            ("chat", spec(&[("a", 1)], "header:", None), "sticky_by"),
            ("chat", spec(&[("a", 1)], "header:x y", None), "sticky_by"),
            ("chat", spec(&[("a", 1)], "user", Some(0.0)), "fraction"),
            ("chat", spec(&[("a", 1)], "user", Some(1.5)), "fraction"),
            ("chat", spec(&[("a", 1)], "user", Some(f64::NAN)), "fraction"),
            ("", spec(&[("a", 1)], "user", None), "alias"),
            ("a\nb", spec(&[("a", 1)], "user", None), "alias"),
            ("chat", spec(&[("a", u32::MAX), ("b", 2)], "user", None), "32 bits"),
        ] {
            let e = Route::new(alias, s).unwrap_err();
            assert!(e.contains(want), "{alias:?}: {e}");
        }
        assert_eq!(StickyBy::parse("header:X-Tenant").unwrap(), StickyBy::Header("x-tenant".into()));
        let mut s = spec(&[("a", 1)], "user", Some(0.5));
        s.shadow.as_mut().unwrap().compare_tokens = MAX_COMPARE_TOKENS + 1;
        assert!(Route::new("chat", s).unwrap_err().contains("compare_tokens"));
        // Specs stored before compare_tokens existed read with the default.
        let old: RouteSpec =
            serde_json::from_str(r#"{"targets":[{"model":"a","weight":1}],"shadow":{"model":"s","fraction":0.5}}"#)
                .unwrap();
        assert_eq!(old.shadow.unwrap().compare_tokens, DEFAULT_COMPARE_TOKENS);
    }

    #[test]
    fn shadow_first_tokens_are_compared_up_to_n() {
        assert_eq!(first_tokens_agree(&[1, 2, 3, 4], &[1, 2, 3, 9], 3), (true, 3));
        assert_eq!(first_tokens_agree(&[1, 2, 3, 4], &[1, 2, 3, 9], 4), (false, 3));
        assert_eq!(first_tokens_agree(&[5, 2], &[1, 2], 8), (false, 0));
        // A shorter output agrees only when the other stops at the same place.
        assert_eq!(first_tokens_agree(&[1, 2], &[1, 2], 8), (true, 2));
        assert_eq!(first_tokens_agree(&[1, 2], &[1, 2, 3], 8), (false, 2));
        assert_eq!(first_tokens_agree(&[], &[], 8), (true, 0));
        let routes = Routes::default();
        routes.compare_shadow("chat", "ft:new", &[1, 2, 3], &[1, 2, 3], 16);
        routes.compare_shadow("chat", "ft:new", &[1, 2, 3], &[1, 7, 3], 16);
        let mut f = crate::metrics::Families::default();
        routes.collect_metrics(&mut f);
        let text = crate::metrics::expose(f).unwrap();
        for line in [
            "tandem_route_shadow_comparisons_total{alias=\"chat\",target=\"ft:new\",outcome=\"agree\"} 1",
            "tandem_route_shadow_comparisons_total{alias=\"chat\",target=\"ft:new\",outcome=\"disagree\"} 1",
            "tandem_route_shadow_common_prefix_tokens_total{alias=\"chat\",target=\"ft:new\"} 4",
        ] {
            assert!(text.contains(line), "{line} in\n{text}");
        }
    }

    proptest::proptest! {
        /// Any JSON body gives a route or a reason, and a route answers any
        /// key and draw with one of its targets.
        #[test]
        fn any_body_gives_a_route_or_a_reason(
            weights in proptest::collection::vec(0u32..5, 0..5),
            sticky in "[a-z:_-]{0,12}",
            fraction in proptest::num::f64::ANY,
            key in ".{0,16}",
            draw in proptest::num::f64::ANY,
        ) {
            let body = serde_json::json!({
                "targets": weights.iter().enumerate().map(|(i, w)| serde_json::json!({"model": format!("m{}", i % 3), "weight": w})).collect::<Vec<_>>(),
                "sticky_by": sticky,
                "shadow": if fraction.is_finite() { serde_json::json!({"model": "s", "fraction": fraction}) } else { serde_json::Value::Null },
            });
            if let Ok(spec) = serde_json::from_value::<RouteSpec>(body) {
                if let Ok(r) = Route::new("alias", spec) {
                    let t = r.choose(Some(&key), draw);
                    proptest::prop_assert!(r.targets.contains(t));
                    proptest::prop_assert!(r.targets.contains(r.choose(None, draw)));
                    let _ = r.shadowed(draw);
                }
            }
        }
    }

    #[test]
    fn the_table_refuses_chains_and_swaps_whole() {
        let routes = Routes::default();
        let old = routes.snapshot();
        assert!(!routes.put(route(&[("base", 1)]), |_| Ok::<_, String>(())).unwrap());
        assert!(old.is_empty(), "a snapshot taken before is untouched");
        let chained = Route::new(
            "other",
            RouteSpec {
                targets: vec![RouteTarget { model: "chat".into(), weight: 1 }],
                sticky_by: "user".into(),
                shadow: None,
            },
        )
        .unwrap();
        assert!(routes.put(chained, |_| Ok::<_, String>(())).unwrap_err().to_string().contains("is an alias"));
        // A target of an existing route cannot become an alias.
        let base_alias = Route::new(
            "base",
            RouteSpec {
                targets: vec![RouteTarget { model: "x".into(), weight: 1 }],
                sticky_by: "user".into(),
                shadow: None,
            },
        )
        .unwrap();
        assert!(routes
            .put(base_alias, |_| Ok::<_, String>(()))
            .unwrap_err()
            .to_string()
            .contains("cannot become an alias"));
        // A failed persist changes nothing.
        assert_eq!(
            routes.put(route(&[("base", 1), ("ft:x", 1)]), |_| Err("disk full")),
            Err(TableError::Persist("disk full"))
        );
        assert_eq!(routes.snapshot().get("chat").unwrap().targets.len(), 1);
        assert!(routes.put(route(&[("base", 1), ("ft:x", 1)]), |_| Ok::<_, String>(())).unwrap(), "replaced");
        assert_eq!(routes.snapshot().get("chat").unwrap().targets.len(), 2);
        assert!(routes.delete("chat", || Err("read-only")).is_err());
        assert!(
            routes.delete("chat", || Ok::<_, ()>(())).unwrap() && !routes.delete("chat", || Ok::<_, ()>(())).unwrap()
        );
        assert!(routes.snapshot().is_empty());
        routes.count("chat", "base");
        let mut f = crate::metrics::Families::default();
        routes.collect_metrics(&mut f);
        let text = crate::metrics::expose(f).unwrap();
        assert!(text.contains("tandem_route_requests_total{alias=\"chat\",target=\"base\"} 1"), "{text}");
        assert!(text.contains("tandem_route_changes_total 3"), "{text}");
    }
}
