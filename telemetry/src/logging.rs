//! The one logging setup of both binaries: `tracing` events to stderr, as
//! human-readable lines or one JSON object per line.
//!
//! The level comes from `RUST_LOG` when it is set and parses (so a single
//! run can be made verbose without editing the configuration), else from the
//! configured `log_level`. Colours are used only when stderr is a terminal
//! and `NO_COLOR` is unset, so a journal, a pipe or a file never gets ANSI
//! escape sequences.

use std::io::IsTerminal as _;
use std::str::FromStr;

use tracing_subscriber::EnvFilter;
use tracing_subscriber::fmt::MakeWriter;

/// Why logging could not be set up.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum LogError {
    /// The configured `log_level` is not a level or filter directive.
    #[error(
        "log_level {level:?}: {reason} (expected a level such as info or debug, or directives such as oxid_agent=debug,info)"
    )]
    Level {
        /// The value given.
        level: String,
        /// What the filter parser said.
        reason: String,
    },
    /// The configured `log_format` is neither `human` nor `json`.
    #[error("log_format {0:?}: expected human or json")]
    Format(String),
}

/// How each event is written.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum LogFormat {
    /// One readable line per event.
    #[default]
    Human,
    /// One JSON object per line.
    Json,
}

impl FromStr for LogFormat {
    type Err = LogError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "human" => Ok(Self::Human),
            "json" => Ok(Self::Json),
            other => Err(LogError::Format(other.to_owned())),
        }
    }
}

/// Checks a configured `log_level` (for `validate`), without installing
/// anything.
pub fn check_level(level: &str) -> Result<(), LogError> {
    parse_filter(level).map(drop)
}

/// Installs the process's logger: events at `level` (or as `RUST_LOG`
/// says) to stderr in `format`. Refuses a `level` that does not parse. A
/// second call in one process (tests that run a binary's `main` in
/// process) keeps the first logger.
pub fn init(level: &str, format: LogFormat) -> Result<(), LogError> {
    let configured = parse_filter(level)?;
    let (filter, bad_env) = match std::env::var("RUST_LOG") {
        Ok(env) if !env.trim().is_empty() => match EnvFilter::try_new(&env) {
            Ok(f) => (f, None),
            Err(e) => (configured, Some((env, e.to_string()))),
        },
        _ => (configured, None),
    };
    let ansi = use_ansi(
        std::io::stderr().is_terminal(),
        std::env::var_os("NO_COLOR").is_some_and(|v| !v.is_empty()),
    );
    // Already set only when a logger was installed before in this process.
    let _ = install(filter, format, ansi, std::io::stderr);
    if let Some((env, reason)) = bad_env {
        tracing::warn!(
            rust_log = env,
            reason,
            level,
            "RUST_LOG does not parse; using the configured log_level"
        );
    }
    Ok(())
}

/// Colours only for a person at a terminal who has not asked for none
/// (<https://no-color.org>).
fn use_ansi(stderr_is_terminal: bool, no_color: bool) -> bool {
    stderr_is_terminal && !no_color
}

fn parse_filter(level: &str) -> Result<EnvFilter, LogError> {
    let bad = |reason: String| LogError::Level {
        level: level.to_owned(),
        reason,
    };
    if level.trim().is_empty() {
        return Err(bad("empty".into()));
    }
    // A bare word is a target to the filter parser, so a misspelt level
    // ("verbose") would silently log only that target: a directive is a
    // level, or names one after `=`.
    if let Some(word) = level.split(',').map(str::trim).find(|d| {
        !d.contains('=') && d.parse::<tracing::Level>().is_err() && !d.eq_ignore_ascii_case("off")
    }) {
        return Err(bad(format!("{word:?} is not a level")));
    }
    EnvFilter::try_new(level).map_err(|e| bad(e.to_string()))
}

fn install<W>(
    filter: EnvFilter,
    format: LogFormat,
    ansi: bool,
    writer: W,
) -> Result<(), tracing_subscriber::util::TryInitError>
where
    W: for<'w> MakeWriter<'w> + Send + Sync + 'static,
{
    use tracing_subscriber::util::SubscriberInitExt as _;
    build(filter, format, ansi, writer).try_init()
}

/// The subscriber `init` installs, for any writer (tests use a buffer).
fn build<W>(
    filter: EnvFilter,
    format: LogFormat,
    ansi: bool,
    writer: W,
) -> Box<dyn tracing::Subscriber + Send + Sync>
where
    W: for<'w> MakeWriter<'w> + Send + Sync + 'static,
{
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(ansi)
        .with_writer(writer);
    match format {
        LogFormat::Human => Box::new(builder.finish()),
        LogFormat::Json => Box::new(builder.json().finish()),
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]

    use std::sync::{Arc, Mutex};

    use super::*;

    #[derive(Clone, Default)]
    struct Buffer(Arc<Mutex<Vec<u8>>>);

    impl std::io::Write for Buffer {
        fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
            self.0.lock().unwrap().extend_from_slice(buf);
            Ok(buf.len())
        }

        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }

    impl<'w> MakeWriter<'w> for Buffer {
        type Writer = Self;

        fn make_writer(&'w self) -> Self::Writer {
            self.clone()
        }
    }

    fn capture(level: &str, format: LogFormat, ansi: bool) -> String {
        let buffer = Buffer::default();
        let subscriber = build(parse_filter(level).unwrap(), format, ansi, buffer.clone());
        tracing::subscriber::with_default(subscriber, || {
            tracing::info!(agent = "spiffe://td/a", "agent attested");
            tracing::debug!("hidden at info");
        });
        String::from_utf8(buffer.0.lock().unwrap().clone()).unwrap()
    }

    #[test]
    fn human_lines_carry_no_escape_sequences_when_not_a_terminal() {
        let out = capture("info", LogFormat::Human, use_ansi(false, false));
        assert!(out.contains("agent attested"), "{out}");
        assert!(!out.contains('\u{1b}'), "{out:?}");
        assert!(!out.contains("hidden at info"), "{out}");
        // A terminal does get them, unless NO_COLOR says otherwise.
        assert!(capture("info", LogFormat::Human, use_ansi(true, false)).contains('\u{1b}'));
        assert!(!use_ansi(true, true));
    }

    #[test]
    fn json_is_one_object_per_line() {
        let out = capture("debug", LogFormat::Json, false);
        let lines: Vec<serde_json::Value> = out
            .lines()
            .map(|l| serde_json::from_str(l).unwrap())
            .collect();
        assert_eq!(lines.len(), 2, "{out}");
        assert_eq!(lines[0]["level"], "INFO");
        assert_eq!(lines[0]["fields"]["message"], "agent attested");
        assert_eq!(lines[0]["fields"]["agent"], "spiffe://td/a");
        assert!(!out.contains('\u{1b}'));
    }

    #[test]
    fn levels_and_formats_are_parsed_strictly() {
        for good in [
            "info",
            "debug",
            "warn,oxid_agent=trace",
            "oxid_server=debug",
        ] {
            check_level(good).unwrap();
        }
        check_level("off").unwrap();
        for bad in [
            "",
            "  ",
            "loud",
            "verbose",
            "info,oxid_agent",
            "info,x=loud",
        ] {
            let e = check_level(bad).unwrap_err();
            assert!(e.to_string().contains("log_level"), "{e}");
        }
        assert_eq!("human".parse::<LogFormat>().unwrap(), LogFormat::Human);
        assert_eq!("json".parse::<LogFormat>().unwrap(), LogFormat::Json);
        assert!("pretty".parse::<LogFormat>().is_err());
        assert!("JSON".parse::<LogFormat>().is_err());
    }
}
