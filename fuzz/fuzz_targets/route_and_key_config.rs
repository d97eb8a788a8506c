//! Route specs (the body of `PUT /admin/routes/{alias}`, JSON) and API-key
//! config (`[auth]`, TOML) from outside bytes: the first byte picks which.
//! Parsing gives a value or an error, never a panic; a route that validates
//! answers any key with one of its targets, and keys that load check any
//! presented key without panicking.
#![no_main]

use libfuzzer_sys::fuzz_target;
use tandem::auth::{AuthSection, Keys};
use tandem::routing::{Route, RouteSpec};

fuzz_target!(|data: &[u8]| {
    let Some((&which, rest)) = data.split_first() else { return };
    let text = String::from_utf8_lossy(rest);
    if which % 2 == 0 {
        let Ok(spec) = serde_json::from_slice::<RouteSpec>(rest) else { return };
        let Ok(route) = Route::new("alias", spec) else { return };
        for key in [None, Some(""), Some(text.as_ref()), Some("user-1")] {
            let t = route.choose(key, f64::from(which) / 255.0);
            assert!(route.targets.contains(t));
        }
        let _ = route.shadowed(0.5);
    } else {
        let Ok(section) = toml::from_str::<AuthSection>(&text) else { return };
        let env = text.split_once('\n').map(|(a, _)| a);
        if let Ok(keys) = Keys::new(&section, env, None) {
            for k in [None, Some(""), Some(text.as_ref())] {
                if let Ok(id) = keys.check(k) {
                    let _ = id.allows(&text);
                    if let Ok(p) = id.admit() {
                        id.charge(rest.len() as u64);
                        drop(p);
                    }
                }
            }
        }
    }
});
