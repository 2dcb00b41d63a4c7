//! The raw settings layer shared by the server, the executors and the client commands: the
//! config file's text and the environment, answering "what is the value of key K, and where
//! did it come from". One precedence rule lives here and nowhere else: a non-empty
//! environment variable wins over the file, which wins over the caller's default.
//!
//! It knows no setting's meaning. Each reader (the binary's `settings` module, the workers'
//! `WorkersConfig`) validates the raw values it owns into typed settings and reports a bad one
//! with [`ConfigError`], which names the key and, for a key of the file, its line.

use std::path::{Path, PathBuf};

/// The file read when neither `--config` nor `ATELIER_CONFIG` names one, if it exists.
pub const CONFIG_FILE_DEFAULT: &str = "atelier.toml";
/// The environment variable naming the config file.
pub const CONFIG_ENV: &str = "ATELIER_CONFIG";

/// Looks up an environment variable (a closure, so tests need not touch the process's).
pub type EnvLookup<'a> = &'a dyn Fn(&str) -> Option<String>;

/// The process environment, as [`Sources`] reads it.
pub fn process_env(name: &str) -> Option<String> {
    std::env::var(name).ok()
}

/// A setting's value as found, before its reader gives it a type.
#[derive(Clone, Debug, PartialEq)]
pub enum Raw<'a> {
    Toml(&'a toml::Value),
    Env(String),
}

impl Raw<'_> {
    /// A boolean: TOML `true`/`false`, or 1/true/yes/on and 0/false/no/off in the environment.
    pub fn bool(&self, key: &str) -> Result<bool, ConfigError> {
        match self {
            Raw::Toml(toml::Value::Boolean(b)) => Ok(*b),
            Raw::Env(s) => match s.trim().to_ascii_lowercase().as_str() {
                "1" | "true" | "yes" | "on" => Ok(true),
                "0" | "false" | "no" | "off" => Ok(false),
                other => Err(ConfigError::invalid(key, format!("'{other}' is not a boolean"))),
            },
            Raw::Toml(v) => {
                Err(ConfigError::invalid(key, format!("expected a boolean, got {}", v.type_str())))
            }
        }
    }

    /// An integer in `min..=max`.
    pub fn int(&self, key: &str, min: i64, max: i64) -> Result<i64, ConfigError> {
        let v = match self {
            Raw::Toml(toml::Value::Integer(i)) => *i,
            Raw::Env(s) => {
                s.trim().parse::<i64>().map_err(|e| ConfigError::invalid(key, format!("'{s}': {e}")))?
            }
            Raw::Toml(v) => {
                return Err(ConfigError::invalid(key, format!("expected an integer, got {}", v.type_str())))
            }
        };
        if v < min || v > max {
            return Err(ConfigError::invalid(key, format!("{v} is outside {min}..={max}")));
        }
        Ok(v)
    }

    /// Seconds (integer or decimal, at most `max_seconds`) as milliseconds.
    pub fn seconds_ms(&self, key: &str, max_seconds: u64) -> Result<u64, ConfigError> {
        let secs = match self {
            Raw::Toml(toml::Value::Integer(i)) => *i as f64,
            Raw::Toml(toml::Value::Float(f)) => *f,
            Raw::Env(s) => {
                s.trim().parse::<f64>().map_err(|e| ConfigError::invalid(key, format!("'{s}': {e}")))?
            }
            Raw::Toml(v) => {
                return Err(ConfigError::invalid(key, format!("expected seconds, got {}", v.type_str())))
            }
        };
        if !secs.is_finite() || secs < 0.0 || secs > max_seconds as f64 {
            return Err(ConfigError::invalid(key, format!("{secs} is outside 0..={max_seconds} seconds")));
        }
        // In range above, so the cast cannot overflow.
        Ok((secs * 1000.0).round() as u64)
    }

    /// The value as text: an environment variable as set, a TOML string without its quotes,
    /// any other TOML value as written.
    pub fn text(&self) -> String {
        match self {
            Raw::Env(s) => s.clone(),
            Raw::Toml(toml::Value::String(s)) => s.clone(),
            Raw::Toml(other) => other.to_string(),
        }
    }
}

/// Where a setting's value came from.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Origin {
    /// This environment variable.
    Env(String),
    /// This dotted key of the config file.
    File { key: String },
}

impl Origin {
    /// The name an error about this value uses: the variable's, or the file's key.
    pub fn name(&self) -> &str {
        match self {
            Origin::Env(name) => name,
            Origin::File { key } => key,
        }
    }
}

/// One setting as found: its raw value and where it came from.
#[derive(Clone, Debug, PartialEq)]
pub struct Found<'a> {
    pub raw: Raw<'a>,
    pub origin: Origin,
}

impl Found<'_> {
    /// An error about this value, naming where it came from.
    pub fn invalid(&self, reason: impl Into<String>) -> ConfigError {
        ConfigError::Invalid { key: self.origin.name().to_string(), reason: reason.into() }
    }
}

/// The config file and the environment.
pub struct Sources<'e> {
    /// The config file's text, for the lines of errors; none without a file.
    text: Option<String>,
    /// The file parsed (empty without a file).
    table: toml::Table,
    env: EnvLookup<'e>,
}

impl<'e> Sources<'e> {
    /// The file named by `config_flag`, else by `ATELIER_CONFIG`, else `./atelier.toml` if it
    /// exists, else none; and `env`.
    pub fn discover(config_flag: Option<&Path>, env: EnvLookup<'e>) -> Result<Sources<'e>, ConfigError> {
        let path = config_flag
            .map(Path::to_path_buf)
            .or_else(|| non_empty(env(CONFIG_ENV)).map(PathBuf::from))
            .or_else(|| Some(PathBuf::from(CONFIG_FILE_DEFAULT)).filter(|p| p.exists()));
        let Some(path) = path else {
            return Sources::from_text(None, env);
        };
        let text = std::fs::read_to_string(&path)
            .map_err(|source| ConfigError::Read { path: path.clone(), source })?;
        Sources::from_text(Some(&text), env).map_err(|e| match e {
            ConfigError::Syntax { source, .. } => ConfigError::Syntax { path: Some(path), source },
            other => other,
        })
    }

    /// The environment alone: for commands that do not read the config file.
    pub fn env_only(env: EnvLookup<'e>) -> Sources<'e> {
        Sources { text: None, table: toml::Table::new(), env }
    }

    /// `text`: the config file's contents, if there is one.
    pub fn from_text(text: Option<&str>, env: EnvLookup<'e>) -> Result<Sources<'e>, ConfigError> {
        let table = match text {
            None => toml::Table::new(),
            Some(text) => text.parse().map_err(|source| ConfigError::Syntax { path: None, source })?,
        };
        Ok(Sources { text: text.map(str::to_string), table, env })
    }

    /// The first of `env_names` set to a non-empty value, else the file's dotted `key`.
    pub fn get(&self, key: &str, env_names: &[&str]) -> Option<Found<'_>> {
        for name in env_names {
            if let Some(v) = non_empty((self.env)(name)) {
                return Some(Found { raw: Raw::Env(v), origin: Origin::Env((*name).to_string()) });
            }
        }
        self.file_value(key)
            .map(|v| Found { raw: Raw::Toml(v), origin: Origin::File { key: key.to_string() } })
    }

    /// An environment variable, with an empty one counted as unset.
    pub fn env(&self, name: &str) -> Option<String> {
        non_empty((self.env)(name))
    }

    /// The file's value at the dotted `key` (`workers.max_concurrent_jobs`).
    pub fn file_value(&self, key: &str) -> Option<&toml::Value> {
        let mut segments = key.split('.');
        let first = segments.next()?;
        let mut value = self.top_level().get(first)?;
        for segment in segments {
            value = value.as_table()?.get(segment)?;
        }
        Some(value)
    }

    /// The file's top-level table (empty without a file).
    pub fn top_level(&self) -> &toml::Table {
        &self.table
    }

    /// Checks that the file's top level has only `known` keys.
    pub fn expect_top_level_keys(&self, known: &[&str]) -> Result<(), ConfigError> {
        match self.top_level().keys().find(|k| !known.contains(&k.as_str())) {
            None => Ok(()),
            Some(unknown) => Err(self.locate(ConfigError::UnknownKey {
                key: unknown.clone(),
                known: known.iter().map(|k| (*k).to_string()).collect(),
            })),
        }
    }

    /// `error` with the line of the file where its key is set, when it is a key of the file.
    pub fn locate(&self, error: ConfigError) -> ConfigError {
        let key = match &error {
            ConfigError::UnknownKey { key, .. } | ConfigError::Invalid { key, .. } => key,
            _ => return error,
        };
        match self.text.as_deref().and_then(|text| line_of(text, key)) {
            Some(line) => ConfigError::AtLine { line, error: Box::new(error) },
            None => error,
        }
    }
}

fn non_empty(v: Option<String>) -> Option<String> {
    v.filter(|v| !v.is_empty())
}

/// The line (1-based) of `text` where the dotted `key` (`pipelines.a.memory_mb`) is set, or
/// for a key of the environment (`MAX_CONCURRENT_JOBS`) or one not in the text, none.
fn line_of(text: &str, key: &str) -> Option<usize> {
    let doc = toml_edit::ImDocument::parse(text).ok()?;
    let mut table: &dyn toml_edit::TableLike = doc.as_table();
    let mut segments = key.split('.').peekable();
    while let Some(segment) = segments.next() {
        let (k, item) = table.get_key_value(segment)?;
        if segments.peek().is_none() {
            let start = k.span().or_else(|| item.span())?.start;
            return Some(text.get(..start)?.matches('\n').count() + 1);
        }
        table = item.as_table_like()?;
    }
    None
}

/// A setting that cannot be used. Every variant names the key (a dotted key of the file, or
/// the environment variable that set it); [`Sources::locate`] adds the file's line.
#[derive(Debug)]
pub enum ConfigError {
    /// The config file cannot be read.
    Read { path: PathBuf, source: std::io::Error },
    /// The config file is not valid TOML.
    Syntax { path: Option<PathBuf>, source: toml::de::Error },
    /// A key no reader knows; `known` lists the keys allowed beside it, when that helps.
    UnknownKey { key: String, known: Vec<String> },
    /// `key` has the wrong type or an unusable value.
    Invalid { key: String, reason: String },
    /// One of the above, for a key set on this line (1-based) of the config file.
    AtLine { line: usize, error: Box<ConfigError> },
}

impl ConfigError {
    pub fn invalid(key: impl Into<String>, reason: impl Into<String>) -> ConfigError {
        ConfigError::Invalid { key: key.into(), reason: reason.into() }
    }

    pub fn unknown(key: impl Into<String>) -> ConfigError {
        ConfigError::UnknownKey { key: key.into(), known: Vec::new() }
    }
}

impl std::fmt::Display for ConfigError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            ConfigError::Read { path, .. } => write!(f, "cannot read {}", path.display()),
            ConfigError::Syntax { path: Some(path), .. } => write!(f, "{} is not valid TOML", path.display()),
            ConfigError::Syntax { path: None, .. } => write!(f, "the config file is not valid TOML"),
            ConfigError::UnknownKey { key, known } if known.is_empty() => {
                write!(f, "unknown setting '{key}'")
            }
            ConfigError::UnknownKey { key, known } => {
                write!(f, "unknown setting '{key}' (known: {})", known.join(", "))
            }
            ConfigError::Invalid { key, reason } => write!(f, "setting '{key}': {reason}"),
            ConfigError::AtLine { line, error } => write!(f, "config file line {line}: {error}"),
        }
    }
}

impl std::error::Error for ConfigError {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        match self {
            ConfigError::Read { source, .. } => Some(source),
            ConfigError::Syntax { source, .. } => Some(source),
            ConfigError::UnknownKey { .. } | ConfigError::Invalid { .. } | ConfigError::AtLine { .. } => None,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn env(vars: &'static [(&'static str, &'static str)]) -> impl Fn(&str) -> Option<String> {
        move |k| vars.iter().find(|(n, _)| *n == k).map(|(_, v)| (*v).to_string())
    }

    #[test]
    fn environment_wins_over_the_file_and_empty_counts_as_unset() {
        let text = "listen = \"file:1\"\n[workers]\nmax_concurrent_jobs = 5\n";
        let lookup = env(&[("ATELIER_LISTEN", "env:1"), ("MAX_CONCURRENT_JOBS", "")]);
        let s = Sources::from_text(Some(text), &lookup).unwrap();
        let listen = s.get("listen", &["ATELIER_LISTEN"]).unwrap();
        assert_eq!(
            (listen.raw.text(), listen.origin),
            ("env:1".into(), Origin::Env("ATELIER_LISTEN".into()))
        );
        let jobs = s.get("workers.max_concurrent_jobs", &["MAX_CONCURRENT_JOBS"]).unwrap();
        assert_eq!(jobs.raw.text(), "5");
        assert_eq!(jobs.origin, Origin::File { key: "workers.max_concurrent_jobs".into() });
        assert!(s.get("heartbeat_ms", &["ATELIER_HEARTBEAT_MS"]).is_none(), "the caller's default");
    }

    #[test]
    fn errors_name_the_key_and_the_line() {
        let lookup = env(&[]);
        let s = Sources::from_text(Some("listen = \"x\"\n\nmax_conections = 5\n"), &lookup).unwrap();
        let err = s.expect_top_level_keys(&["listen", "max_connections"]).unwrap_err();
        assert_eq!(
            err.to_string(),
            "config file line 3: unknown setting 'max_conections' (known: listen, max_connections)"
        );
        let err = Sources::from_text(Some("listen = "), &lookup).err().expect("not TOML");
        assert!(std::error::Error::source(&err).is_some(), "keeps the parser's error");
    }
}
