//! Every settable key of `config/default.toml`, with its default, its
//! environment variable and the comment above it: read from the defaults file
//! itself, so the list cannot drift from what the server accepts. It drives
//! the environment overlay (`TANDEM_<SECTION>_<KEY>` for every key, which is
//! how a container is configured) and the reference table in
//! docs/operations.md (`tandem config --reference`; a test keeps them equal).

/// One key: `[section] key = default`.
#[derive(Debug, Clone, PartialEq)]
pub struct Key {
    pub section: String,
    pub key: String,
    /// The default as TOML (`"int8"`, `32`, `[]`).
    pub default: toml::Value,
    /// The comment above it in the defaults file (one line), or empty when it
    /// shares the comment of the key before it.
    pub doc: String,
}

/// Older, shorter variables that set the same keys (they win over the long names).
pub const ALIASES: [(&str, &str, &str); 7] = [
    ("TANDEM_MODEL", "model", "path"),
    ("TANDEM_QUANTIZE", "model", "quantize"),
    ("TANDEM_THREADS", "cpu", "threads"),
    ("TANDEM_ACTIVATIONS", "cpu", "activations"),
    ("TANDEM_DEVICE", "device", "name"),
    ("TANDEM_LOG_FORMAT", "server", "log_format"),
    ("TANDEM_DATA_DIR", "store", "data_dir"),
];

impl Key {
    /// `TANDEM_SCHEDULER_MAX_NUM_SEQS` for `[scheduler] max_num_seqs`.
    pub fn env(&self) -> String {
        format!("TANDEM_{}_{}", self.section.replace('.', "_"), self.key).to_uppercase()
    }

    pub fn alias(&self) -> Option<&'static str> {
        ALIASES.iter().find(|(_, s, k)| *s == self.section && *k == self.key).map(|(name, _, _)| *name)
    }

    /// `raw` (an environment variable's value) as this key's type: strings as
    /// they are, lists of strings also comma-separated, the rest as TOML.
    pub fn parse(&self, raw: &str) -> Result<toml::Value, String> {
        use toml::Value;
        match &self.default {
            Value::String(_) => return Ok(Value::String(raw.to_string())),
            Value::Array(a) if !raw.trim_start().starts_with('[') && a.iter().all(Value::is_str) => {
                let items = raw.split(',').map(str::trim).filter(|s| !s.is_empty());
                return Ok(Value::Array(items.map(|s| Value::String(s.to_string())).collect()));
            }
            _ => {}
        }
        let v: toml::Table = toml::from_str(&format!("v = {raw}"))
            .map_err(|_| format!("'{raw}' is not a valid {}", self.default.type_str()))?;
        let v = v["v"].clone();
        match (&self.default, v) {
            (Value::Float(_), Value::Integer(i)) => Ok(Value::Float(i as f64)),
            (d, v) if d.type_str() == v.type_str() => Ok(v),
            (d, v) => Err(format!("'{raw}' is a {} where {} is expected", v.type_str(), d.type_str())),
        }
    }
}

/// Every key of `defaults` (a TOML text with comments) in file order. Tables
/// of user-named entries (`[lora.adapters]`, `[routes]`) and `[auth] keys`
/// are not single values and are left to the file.
pub fn keys(defaults: &str) -> Vec<Key> {
    let parsed: toml::Table = toml::from_str(defaults).expect("config/default.toml is valid");
    let mut out = Vec::new();
    let mut section = String::new();
    let mut comment: Vec<&str> = Vec::new();
    for line in defaults.lines().map(str::trim) {
        if let Some(c) = line.strip_prefix('#') {
            comment.push(c.trim());
            continue;
        }
        if let Some(name) = line.strip_prefix('[').and_then(|l| l.strip_suffix(']')) {
            section = name.trim_matches(|c| c == '[' || c == ']').to_string();
            comment.clear();
            continue;
        }
        let Some((key, _)) = line.split_once('=') else {
            comment.clear();
            continue;
        };
        let key = key.trim().to_string();
        let doc = std::mem::take(&mut comment).join(" ");
        let table = section.split('.').try_fold(&parsed, |t, part| t.get(part)?.as_table());
        let Some(default) = table.and_then(|t| t.get(&key)) else { continue };
        if section == "auth" || default.is_table() {
            continue;
        }
        out.push(Key { section: section.clone(), key, default: default.clone(), doc });
    }
    out
}

/// Sets `merged` (the defaults with the file over them) from the environment:
/// each key's `TANDEM_<SECTION>_<KEY>`, then its alias.
pub fn overlay_env(
    merged: &mut toml::Value,
    keys: &[Key],
    env: &dyn Fn(&str) -> Option<String>,
) -> Result<(), super::ConfigFileError> {
    for k in keys {
        for name in std::iter::once(k.env()).chain(k.alias().map(str::to_string)) {
            let Some(raw) = env(&name) else { continue };
            let value = k.parse(&raw).map_err(|reason| super::ConfigFileError::Env { name: name.clone(), reason })?;
            let mut table = &mut *merged;
            for part in k.section.split('.') {
                table = table.get_mut(part).expect("a section of the defaults");
            }
            table.as_table_mut().expect("a section is a table").insert(k.key.clone(), value);
        }
    }
    Ok(())
}

/// The reference table of docs/operations.md.
pub fn markdown(keys: &[Key]) -> String {
    let mut s = String::from("| key | default | environment | what it is |\n| --- | --- | --- | --- |\n");
    for k in keys {
        let env = match k.alias() {
            Some(a) => format!("`{}` (or `{a}`)", k.env()),
            None => format!("`{}`", k.env()),
        };
        let doc = if k.doc.is_empty() { "(see the key above)".to_string() } else { k.doc.replace('|', "\\|") };
        s.push_str(&format!("| `{}.{}` | `{}` | {env} | {doc} |\n", k.section, k.key, k.default));
    }
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    const TEXT: &str =
        "# top\n[a]\n# the x\n# on two lines\nx = 1\ny = \"s\"\n\n[a.b]\n# z\nz = [\"p\"]\nf = 0.5\n[t]\n";

    #[test]
    fn keys_come_from_the_file_with_their_comments() {
        let k = keys(TEXT);
        let names: Vec<String> = k.iter().map(|k| format!("{}.{}", k.section, k.key)).collect();
        assert_eq!(names, ["a.x", "a.y", "a.b.z", "a.b.f"]);
        assert_eq!(k[0].doc, "the x on two lines");
        assert_eq!(k[1].doc, "");
        assert_eq!(k[2].env(), "TANDEM_A_B_Z");
    }

    #[test]
    fn environment_values_take_the_key_type_or_are_refused() {
        let k = keys(TEXT);
        assert_eq!(k[0].parse("7"), Ok(toml::Value::Integer(7)));
        assert!(k[0].parse("seven").unwrap_err().contains("not a valid integer"));
        assert!(k[0].parse("\"7\"").unwrap_err().contains("string where integer is expected"));
        assert_eq!(k[1].parse("7"), Ok(toml::Value::String("7".into())));
        let list = |v: &[&str]| toml::Value::Array(v.iter().map(|s| toml::Value::String(s.to_string())).collect());
        assert_eq!(k[2].parse("/a, /b"), Ok(list(&["/a", "/b"])));
        assert_eq!(k[2].parse("[\"/a\"]"), Ok(list(&["/a"])));
        assert_eq!(k[3].parse("1"), Ok(toml::Value::Float(1.0)));
    }

    #[test]
    fn the_operations_guide_lists_every_key_as_the_code_has_it() {
        let path = concat!(env!("CARGO_MANIFEST_DIR"), "/docs/operations.md");
        let doc = std::fs::read_to_string(path).unwrap();
        let start = doc.find("<!-- config-reference:start").expect("the start marker");
        let body = &doc[start..];
        let body =
            &body[body.find('\n').unwrap() + 1..body.find("<!-- config-reference:end -->").expect("the end marker")];
        let want = markdown(&keys(super::super::DEFAULTS));
        assert!(
            body == want,
            "docs/operations.md's key table is stale: replace it with `tandem config --reference`:\n{want}"
        );
    }

    proptest::proptest! {
        /// Any variable value, for any key: a value of the key's type or a
        /// message, never a panic; and the whole load then either succeeds or
        /// names the variable.
        #[test]
        fn any_environment_value_is_typed_or_refused(key in 0usize..64, raw in ".{0,40}") {
            let all = keys(super::super::DEFAULTS);
            let k = &all[key % all.len()];
            match k.parse(&raw) {
                Ok(v) => proptest::prop_assert_eq!(v.type_str(), k.default.type_str()),
                Err(m) => proptest::prop_assert!(m.contains(&raw)),
            }
            let name = k.env();
            let env = |n: &str| (n == name).then(|| raw.clone());
            if let Err(e) = super::super::Config::load_with_env(None, &env) {
                let e = e.to_string();
                proptest::prop_assert!(e.contains(&name) || e.contains(&k.key), "{e}");
            }
        }
    }

    #[test]
    fn every_default_key_has_a_unique_variable_and_every_alias_a_key() {
        let k = keys(super::super::DEFAULTS);
        let mut names: Vec<String> = k.iter().map(Key::env).collect();
        let n = names.len();
        names.sort();
        names.dedup();
        assert_eq!(names.len(), n, "two keys share a variable name");
        for (alias, section, key) in ALIASES {
            assert!(k.iter().any(|k| k.section == section && k.key == key), "{alias} names no key");
        }
        assert!(n >= 30, "{n} keys: the parser missed some");
    }
}
