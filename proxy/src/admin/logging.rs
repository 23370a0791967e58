//! Process logging with a log filter that `POST /logging?level=…` changes at
//! run time (a `tracing_subscriber` reload layer). [`init`] installs the
//! global subscriber and keeps the reload handle here for the admin API.

use std::sync::{Mutex, OnceLock};

use tracing_subscriber::layer::SubscriberExt;
use tracing_subscriber::util::SubscriberInitExt;
use tracing_subscriber::{EnvFilter, Registry, fmt, reload};

pub(super) const NOT_INITIALISED: &str =
    "the log level cannot be changed: logging was not set up by `nodeway run`\n";

struct Logging {
    handle: reload::Handle<EnvFilter, Registry>,
    /// The filter as last set (EnvFilter's own rendering reorders directives).
    current: Mutex<String>,
}

static LOGGING: OnceLock<Logging> = OnceLock::new();

#[derive(Debug, thiserror::Error)]
pub enum SetError {
    #[error("logging was not initialised")]
    NotInitialised,
    #[error("{0}")]
    Invalid(String),
}

/// Installs the global subscriber: logs to stderr through `level` (`error`,
/// `warn`, `info`, `debug`, `trace`, or a tracing filter such as
/// `nodeway=debug,h2=warn`); an invalid filter falls back to `info`. Fails if
/// a global subscriber is already set.
pub fn init(level: &str) -> Result<(), String> {
    let (level, filter) = match EnvFilter::try_new(level) {
        Ok(f) => (level.to_string(), f),
        Err(_) => ("info".to_string(), EnvFilter::new("info")),
    };
    let (layer, handle) = reload::Layer::new(filter);
    tracing_subscriber::registry()
        .with(layer)
        .with(fmt::layer().with_writer(std::io::stderr))
        .try_init()
        .map_err(|e| e.to_string())?;
    LOGGING
        .set(Logging {
            handle,
            current: Mutex::new(level),
        })
        .map_err(|_| "logging initialised twice".to_string())
}

/// Replaces the log filter.
pub fn set(level: &str) -> Result<(), SetError> {
    let logging = LOGGING.get().ok_or(SetError::NotInitialised)?;
    let filter = EnvFilter::try_new(level).map_err(|e| SetError::Invalid(e.to_string()))?;
    logging
        .handle
        .reload(filter)
        .map_err(|e| SetError::Invalid(e.to_string()))?;
    *logging.current.lock().expect("logging lock") = level.to_string();
    tracing::info!(level, "log level changed");
    Ok(())
}

/// The filter in force, if [`init`] ran.
pub fn current() -> Option<String> {
    LOGGING
        .get()
        .map(|l| l.current.lock().expect("logging lock").clone())
}
