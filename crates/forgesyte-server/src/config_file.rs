//! The config file (`--config FILE`, `FORGESYTE_CONFIG`) and `forgesyte
//! config --print`.
//!
//! Owns: reading a TOML file whose keys are the long option names of one
//! subcommand (`serve`), layering it under the command line and the
//! environment (flag > env > file > default), and printing the effective
//! values with where each came from.
//!
//! It knows no option by name. Every key, its value parser, its environment
//! variable and its default come from the clap [`Command`] (clap's
//! [`ArgMatches::value_source`] says which layer set a value), so an option
//! added to `ServeArgs` is a file key and a `--print` line at once; there is
//! no second list to drift. It must not know about the server
//! (`ServerConfig`) either: the layered [`ArgMatches`] go through the
//! ordinary derive parsing afterwards.

use std::collections::BTreeMap;
use std::ffi::OsString;
use std::fmt::Write as _;
use std::path::{Path, PathBuf};

use clap::builder::ValueParser;
use clap::parser::ValueSource;
use clap::{Arg, ArgAction, ArgMatches, Command};

/// The id of the option naming the config file, in every subcommand that
/// reads one.
pub(crate) const CONFIG_ARG: &str = "config";

/// The file's key of the plugins directory, and the id of the argument that
/// takes it in a subcommand without that option: a positional (`check DIR`,
/// `lock DIR`) or an option of its own name (`new --dir PARENT`).
const PLUGINS_KEY: &str = "plugins";
const DIR_ARG: &str = "dir";

/// Where an effective value came from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Source {
    /// The command line.
    Flag,
    /// The named environment variable.
    Env(String),
    /// The config file.
    File(PathBuf),
    /// The option's default.
    Default,
    /// Nothing: the option is unset (it has no default).
    Unset,
}

impl std::fmt::Display for Source {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Source::Flag => f.write_str("flag"),
            Source::Env(name) => write!(f, "env {name}"),
            Source::File(path) => write!(f, "file {}", path.display()),
            Source::Default => f.write_str("default"),
            Source::Unset => f.write_str("unset"),
        }
    }
}

/// A config file that cannot be used; every variant names the file, and the
/// key where one is at fault.
#[derive(Debug, thiserror::Error)]
pub(crate) enum ConfigError {
    /// The command line (or a variable) itself is wrong, or asks for help.
    #[error(transparent)]
    Usage(#[from] clap::Error),
    #[error("cannot read the config file {}: {source}", path.display())]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("the config file {} is not valid TOML: {message}", path.display())]
    Syntax { path: PathBuf, message: String },
    #[error(
        "the config file {}: unknown key `{key}` (the keys are the long options of \
         `forgesyte {keys_of}`: {known})",
        path.display()
    )]
    UnknownKey {
        path: PathBuf,
        key: String,
        keys_of: String,
        known: String,
    },
    #[error("the config file {}: key `{key}`: {message}", path.display())]
    BadValue {
        path: PathBuf,
        key: String,
        message: String,
    },
    /// An option's variable that is set to the empty string, which its
    /// parser refused: said as the variable, not as a flag nobody typed.
    /// An empty value is not read as unset: `FORGESYTE_REQUIRE_SIGNED=`
    /// must not turn a requirement off.
    #[error("{name} is set but empty (it sets {option}): give it a value, or unset it")]
    EmptyEnv { name: String, option: String },
    /// An option's variable whose value its parser refused: said as the
    /// variable (clap names the flag, which nobody typed).
    #[error("{name} (it sets {option}): {message}")]
    BadEnv {
        name: String,
        option: String,
        message: String,
    },
}

/// `command` and its subcommands without their environment variables.
fn without_env(command: Command) -> Command {
    fn strip(command: Command) -> Command {
        command.mut_args(|arg| arg.env(None::<&'static str>))
    }
    strip(command).mut_subcommands(strip)
}

/// When parsing failed on the value of an option of the command run (or a
/// global one) that its environment variable set (the option not given on
/// the command line): that variable's error, empty or refused.
fn env_behind(command: &Command, argv: &[OsString], error: &clap::Error) -> Option<ConfigError> {
    let said = error.to_string();
    let run = argv
        .iter()
        .skip(1)
        .find_map(|a| a.to_str().and_then(|a| command.find_subcommand(a)));
    command
        .get_arguments()
        .chain(run.into_iter().flat_map(Command::get_arguments))
        .find_map(|arg| {
            let name = arg.get_env()?;
            let value = std::env::var_os(name)?;
            let empty = value.is_empty();
            // How clap names it (`'--python <PATH>'`, an on/off option's
            // `'--watch[=<on|off>]'`, a positional's `'[DIR]'`), in its
            // errors of an empty value.
            let (option, shown) = match arg.get_long() {
                Some(long) => {
                    let option = format!("--{long}");
                    if given_on_command_line(argv, &option) {
                        return None; // the command line's value, not the variable's
                    }
                    (
                        option.clone(),
                        vec![
                            format!("'{option} "),
                            format!("'{option}'"),
                            format!("'{option}["),
                        ],
                    )
                }
                None => {
                    let value = arg
                        .get_value_names()
                        .and_then(|names| names.first())
                        .map_or_else(|| arg.get_id().to_string(), ToString::to_string);
                    (
                        value.clone(),
                        vec![format!("'[{value}]'"), format!("'<{value}>'")],
                    )
                }
            };
            let name = name.to_string_lossy().into_owned();
            if empty {
                let named = shown.iter().any(|shown| {
                    said.contains(&format!("a value is required for {shown}"))
                        || said.contains(&format!("invalid value '' for {shown}"))
                });
                return named.then_some(ConfigError::EmptyEnv { name, option });
            }
            // The value refused must be the variable's: a positional typed
            // on the command line (`check ""`) has no flag to look for.
            // For a list (`FORGESYTE_PUBLIC_HOST=a,b:1`) clap quotes the
            // element it refused: any one of the variable's elements.
            let text = value.to_string_lossy();
            let quoted = |part: &str| said.contains(&format!("'{part}'"));
            let elements_quoted = arg
                .get_value_delimiter()
                .is_some_and(|delimiter| text.split(delimiter).any(quoted));
            let refused = matches!(
                error.kind(),
                clap::error::ErrorKind::InvalidValue | clap::error::ErrorKind::ValueValidation
            ) && (quoted(&text) || elements_quoted)
                && shown
                    .iter()
                    .any(|shown| said.contains(&format!("for {shown}")));
            refused.then(|| ConfigError::BadEnv {
                name,
                option,
                message: first_line(error),
            })
        })
}

/// Whether `option` (`--name`) is given in `argv` (program name first),
/// as `--name` or `--name=…`, before an end of options (`--`).
fn given_on_command_line(argv: &[OsString], option: &str) -> bool {
    argv.iter().skip(1).take_while(|a| *a != "--").any(|a| {
        a.to_str()
            .is_some_and(|a| a == option || a.starts_with(&format!("{option}=")))
    })
}

/// `command` with the variable of every global option given on the
/// command line taken away: the flag wins, and clap, which reads a global
/// option's variable again under the subcommand, refused a bad variable
/// behind a good flag (`FORGESYTE_LOG_FORMAT=xml … --log-format json`).
fn flags_beat_global_env(command: Command, argv: &[OsString]) -> Command {
    let given: Vec<String> = command
        .get_arguments()
        .filter(|arg| arg.is_global_set() && arg.get_env().is_some())
        .filter(|arg| {
            arg.get_long()
                .is_some_and(|long| given_on_command_line(argv, &format!("--{long}")))
        })
        .map(|arg| arg.get_id().to_string())
        .collect();
    given.into_iter().fold(command, |command, id| {
        command.mut_arg(id, |arg| arg.env(None::<&'static str>))
    })
}

/// The command line parsed with the config file's values layered in.
#[derive(Debug)]
pub(crate) struct Layered {
    /// The final matches: parse them with `FromArgMatches` as usual.
    pub(crate) matches: ArgMatches,
    /// The built command the matches are of.
    command: Command,
    /// The subcommand the file's keys are the options of (`serve`).
    keys_of: String,
    /// When the matched subcommand reads a config file: the source of each
    /// of its options, by id.
    sources: Option<BTreeMap<String, Source>>,
    /// The config file read, and where its path came from.
    file: Option<(PathBuf, Source)>,
}

/// Parses `argv` (program name first) against `command`. When the matched
/// subcommand has a [`CONFIG_ARG`] option and it is set (flag or env), the
/// file's keys must be long options of subcommand `keys_of`; each fills
/// the option of the same name where neither the command line nor the
/// environment set it.
pub(crate) fn layer(
    command: Command,
    argv: Vec<OsString>,
    keys_of: &str,
) -> Result<Layered, ConfigError> {
    let mut command = flags_beat_global_env(command, &argv);
    command.build();
    let first = match command.clone().try_get_matches_from(&argv) {
        Ok(first) => first,
        Err(e) => return Err(env_behind(&command, &argv, &e).unwrap_or(e.into())),
    };
    let mut layered = Layered {
        matches: first,
        command,
        keys_of: keys_of.to_owned(),
        sources: None,
        file: None,
    };
    let Some((sub, sub_matches)) = layered.matches.subcommand() else {
        return Ok(layered);
    };
    let sub = sub.to_owned();
    let (Some(sub_command), Some(key_command)) = (
        layered.command.find_subcommand(&sub),
        layered.command.find_subcommand(keys_of),
    ) else {
        return Ok(layered);
    };
    if !sub_command
        .get_arguments()
        .any(|a| a.get_id() == CONFIG_ARG)
    {
        return Ok(layered);
    }
    let file = sub_matches
        .get_one::<PathBuf>(CONFIG_ARG)
        .filter(|p| !p.as_os_str().is_empty())
        .map(|path| {
            (
                path.clone(),
                source_of(sub_command, sub_matches, CONFIG_ARG),
            )
        });
    let table = match &file {
        Some((path, _)) => read_table(path)?,
        None => toml::Table::new(),
    };

    let mut extra: Vec<OsString> = Vec::new();
    // The positional `DIR`'s value from the file: last, after `--`, so
    // that a value such as `--json` is a directory, never an option.
    let mut positional: Vec<OsString> = Vec::new();
    let mut from_file = Vec::new();
    // A file key's value is checked alone, through the parser of the
    // options the keys are, whatever the environment holds: the variables
    // of options the command run lacks (`FORGESYTE_BIND` under `check`)
    // must not decide it. Made for the first key (a start without a file
    // makes none).
    let mut key_checker: Option<Command> = None;
    for (key, value) in &table {
        let path = file.as_ref().map(|(p, _)| p.clone()).unwrap_or_default();
        let arg = file_keys(key_command)
            .find(|a| a.get_long() == Some(key.as_str()))
            .ok_or_else(|| ConfigError::UnknownKey {
                path: path.clone(),
                key: key.clone(),
                keys_of: keys_of.to_owned(),
                known: file_keys(key_command)
                    .filter_map(Arg::get_long)
                    .collect::<Vec<_>>()
                    .join(", "),
            })?;
        let bad = |message: String| ConfigError::BadValue {
            path: path.clone(),
            key: key.clone(),
            message,
        };
        let args = cli_args(key, arg, value).map_err(bad)?;
        // The value alone through the real parser (of the subcommand whose
        // options the keys are): its error is this key's.
        let mut alone = vec![argv.first().cloned().unwrap_or_default(), keys_of.into()];
        alone.extend(args.iter().cloned());
        let checker = key_checker.get_or_insert_with(|| {
            let mut checker = without_env(layered.command.clone());
            checker.build();
            checker
        });
        if let Err(e) = checker.clone().try_get_matches_from(alone) {
            return Err(bad(first_line(&e)));
        }
        // The matched subcommand's option of that id (`check` has the
        // loader's options, and the plugins directory as its `dir`); a key
        // it lacks (`bind`) is the server's only: skipped.
        let id = arg.get_id().as_str();
        let (id, args) = if sub_command.get_arguments().any(|a| a.get_id() == id) {
            (id, args)
        } else if key == PLUGINS_KEY
            && let Some(dir) = sub_command.get_arguments().find(|a| a.get_id() == DIR_ARG)
        {
            // `--plugins=DIR` given as the positional `DIR`, or as the
            // option `--dir=DIR`.
            let flag = format!("--{PLUGINS_KEY}=");
            let values = args
                .iter()
                .filter_map(|a| a.to_str()?.strip_prefix(&flag))
                .map(|value| match dir.get_long() {
                    Some(long) if !dir.is_positional() => format!("--{long}={value}"),
                    _ => value.to_owned(),
                })
                .map(OsString::from)
                .collect();
            (DIR_ARG, values)
        } else {
            continue;
        };
        match sub_matches.value_source(id) {
            Some(ValueSource::CommandLine | ValueSource::EnvVariable) => {}
            _ => {
                from_file.push(id.to_owned());
                let is_positional = sub_command
                    .get_arguments()
                    .any(|a| a.get_id() == id && a.is_positional());
                if is_positional {
                    positional.extend(args);
                } else {
                    extra.extend(args);
                }
            }
        }
    }

    let mut sources = BTreeMap::new();
    for arg in sub_command.get_arguments() {
        let id = arg.get_id().as_str();
        let source = match (&file, from_file.iter().any(|f| f == id)) {
            (Some((path, _)), true) => Source::File(path.clone()),
            _ => source_of(sub_command, sub_matches, id),
        };
        sources.insert(id.to_owned(), source);
    }
    if !extra.is_empty() || !positional.is_empty() {
        // The file's options go before the command line's own `--` if it
        // has one (after it they would be read as positional values), its
        // `DIR` after a `--` (its own, when nothing positional followed
        // it: `DIR` was not given), so a value such as `--json` is a
        // directory, never an option.
        let mut argv = argv;
        let end_of_options = argv.iter().position(|a| a == "--");
        let at = end_of_options.unwrap_or(argv.len());
        argv.splice(at..at, extra);
        if !positional.is_empty() {
            if end_of_options.is_none() {
                argv.push("--".into());
            }
            argv.extend(positional);
        }
        layered.matches = layered.command.clone().try_get_matches_from(argv)?;
    }
    layered.sources = Some(sources);
    layered.file = file;
    Ok(layered)
}

/// The options of `command` a file may set: the ones with a long name but
/// the file itself, help and version.
fn file_keys(command: &Command) -> impl Iterator<Item = &Arg> {
    command.get_arguments().filter(|a| {
        a.get_long().is_some()
            && a.get_id() != CONFIG_ARG
            && !matches!(a.get_action(), ArgAction::Help | ArgAction::Version)
    })
}

fn source_of(command: &Command, matches: &ArgMatches, id: &str) -> Source {
    match matches.value_source(id) {
        Some(ValueSource::CommandLine) => Source::Flag,
        Some(ValueSource::EnvVariable) => {
            let env = command
                .get_arguments()
                .find(|a| a.get_id() == id)
                .and_then(Arg::get_env)
                .map(|e| e.to_string_lossy().into_owned())
                .unwrap_or_default();
            Source::Env(env)
        }
        Some(ValueSource::DefaultValue) => Source::Default,
        _ => Source::Unset,
    }
}

/// The most a config file may hold: far above any real one (a few dozen
/// keys), far below what would exhaust memory (`--config /dev/zero`).
const MAX_CONFIG_BYTES: u64 = 1024 * 1024;

fn read_table(path: &Path) -> Result<toml::Table, ConfigError> {
    use forgesyte_deps::FileSystem as _;
    let read = |source| ConfigError::Read {
        path: path.to_path_buf(),
        source,
    };
    // A regular file only: a FIFO waited for a writer before the server
    // started (`serve`, `check` and `config --print` alike).
    let bytes = forgesyte_deps::RealFs
        .read(path, MAX_CONFIG_BYTES)
        .map_err(read)?;
    // The size first: a cut inside a character read as "not UTF-8".
    if bytes.len() as u64 > MAX_CONFIG_BYTES {
        return Err(read(std::io::Error::other(format!(
            "larger than {MAX_CONFIG_BYTES} bytes"
        ))));
    }
    let text = String::from_utf8(bytes).map_err(|e| {
        read(std::io::Error::new(
            std::io::ErrorKind::InvalidData,
            format!("not UTF-8 text: {e}"),
        ))
    })?;
    text.parse::<toml::Table>()
        .map_err(|e| ConfigError::Syntax {
            path: path.to_path_buf(),
            message: e.to_string().trim_end().to_owned(),
        })
}

/// The command-line words that give option `arg` the file's `value`.
fn cli_args(key: &str, arg: &Arg, value: &toml::Value) -> Result<Vec<OsString>, String> {
    if matches!(arg.get_action(), ArgAction::SetTrue) {
        return match value {
            toml::Value::Boolean(true) => Ok(vec![format!("--{key}").into()]),
            toml::Value::Boolean(false) => Ok(Vec::new()),
            other => Err(format!("must be true or false, not a {}", other.type_str())),
        };
    }
    let values = match value {
        toml::Value::Array(items) if matches!(arg.get_action(), ArgAction::Append) => items
            .iter()
            .map(|item| scalar(arg, item))
            .collect::<Result<Vec<_>, _>>()?,
        toml::Value::Array(_) => return Err("takes one value, not an array".into()),
        other => vec![scalar(arg, other)?],
    };
    Ok(values
        .into_iter()
        .map(|v| format!("--{key}={v}").into())
        .collect())
}

/// One value of option `arg` as its command-line text. A boolean is only
/// an on/off option's value and a number never a path's: `python = true`
/// must not become the program `true`.
fn scalar(arg: &Arg, value: &toml::Value) -> Result<String, String> {
    let takes_path = arg.get_value_parser().type_id() == ValueParser::path_buf().type_id();
    let takes_bool = takes_bool(arg);
    match value {
        toml::Value::Boolean(b) if takes_bool => Ok(b.to_string()),
        // `preflight = "yes"` or `watch = 1`: TOML has booleans, and
        // `config --print` writes them.
        other if takes_bool => Err(format!("must be true or false, not {other}")),
        toml::Value::String(s) => Ok(s.clone()),
        toml::Value::Integer(_) | toml::Value::Float(_) if takes_path => {
            Err(format!("must be a string (a path), not the number {value}"))
        }
        toml::Value::Integer(i) => Ok(i.to_string()),
        // As TOML wrote it, a float (`1e3` is `1000.0`, not `1000`): an
        // option of whole numbers refuses it as its flag would.
        toml::Value::Float(f) => Ok(format!("{f:?}")),
        toml::Value::Boolean(_) if takes_path => {
            Err("must be a string (a path), not a boolean".to_owned())
        }
        toml::Value::Boolean(_) => Err("must be a string or a number, not a boolean".to_owned()),
        other => Err(format!(
            "must be a string, a number or a boolean, not a {}",
            other.type_str()
        )),
    }
}

/// Whether option `arg` takes an on/off value (`--confine=off`).
fn takes_bool(arg: &Arg) -> bool {
    arg.get_value_parser().type_id() == ValueParser::bool().type_id()
}

/// A clap error's message, one line, without its `error: ` prefix, and
/// the values it lists when there are some (`--log-format`'s: `text,
/// json`), which clap writes on a line of their own.
pub(crate) fn first_line(e: &clap::Error) -> String {
    let text = e.to_string();
    let line = text.lines().next().unwrap_or_default();
    let line = line.strip_prefix("error: ").unwrap_or(line);
    match text
        .lines()
        .find_map(|l| l.trim().strip_prefix("[possible values: "))
    {
        Some(values) => format!(
            "{line} (one of: {})",
            values.strip_suffix(']').unwrap_or(values)
        ),
        None => line.to_owned(),
    }
}

impl Layered {
    /// Where the matched subcommand's option `id` came from (`None`: the
    /// subcommand reads no config file, or has no such option).
    pub(crate) fn source(&self, id: &str) -> Option<&Source> {
        self.sources.as_ref()?.get(id)
    }

    /// Whether option `id` was given (a flag, a variable, the file), not
    /// left to its default.
    pub(crate) fn given(&self, id: &str) -> bool {
        !matches!(self.source(id), None | Some(Source::Default))
    }

    /// The keys of the matched subcommand's options given a value that is
    /// not UTF-8 (which [`Self::render`] can only comment out).
    pub(crate) fn not_utf8_keys(&self) -> Vec<&str> {
        let (Some((_, matches)), Some(keys)) = (
            self.matches.subcommand(),
            self.command.find_subcommand(&self.keys_of),
        ) else {
            return Vec::new();
        };
        file_keys(keys)
            .filter(|arg| !is_utf8(arg.get_id().as_str(), matches))
            .filter_map(Arg::get_long)
            .collect()
    }

    /// The effective configuration of the matched subcommand as TOML, one
    /// `key = value  # source` line per file key (an unset option is a
    /// comment), under a header naming the config file. `None` when the
    /// matched subcommand reads no config file.
    pub(crate) fn render(&self) -> Option<String> {
        let sources = self.sources.as_ref()?;
        let (_, matches) = self.matches.subcommand()?;
        let keys = self.command.find_subcommand(&self.keys_of)?;
        let mut out = format!(
            "# Effective configuration of `forgesyte {}` (flag > env > file > default).\n",
            self.keys_of
        );
        let _ = match &self.file {
            Some((path, source)) => {
                writeln!(out, "# config file: {} (from {source})", path.display())
            }
            None => writeln!(out, "# config file: none (--config, FORGESYTE_CONFIG)"),
        };
        for arg in file_keys(keys) {
            let (Some(key), id) = (arg.get_long(), arg.get_id().as_str()) else {
                continue;
            };
            let source = sources.get(id).cloned().unwrap_or(Source::Unset);
            let _ = match value_of(arg, matches) {
                // Printed lossy, it read back as another path.
                Some(value) if !is_utf8(id, matches) => {
                    writeln!(
                        out,
                        "# {key} = {value}  # {source}; not valid UTF-8, which TOML cannot hold \
                         (nor a plugin's path)"
                    )
                }
                Some(value) => {
                    let applied = applied_here(key, Some(&value), &|other| {
                        value_of_key(keys, matches, other)
                    });
                    writeln!(out, "{key} = {value}  # {source}{applied}")
                }
                None => {
                    let applied =
                        applied_here(key, None, &|other| value_of_key(keys, matches, other));
                    writeln!(out, "# {key} is not set  # {source}{applied}")
                }
            };
        }
        Some(out)
    }
}

/// What `serve` applies in place of option `key`'s `value` (`None`: not
/// set) on this machine, said after the value's source, or nothing: the
/// connection cap, lowered to half the open-file limit `serve` runs with
/// (`config --print` showed the configured cap alone, where `serve` logged
/// that it lowered it); the memory for bodies and answers, computed from
/// their limit when not set, and raised to it when set lower. `other`
/// gives another key's value.
fn applied_here(key: &str, value: Option<&str>, other: &dyn Fn(&str) -> Option<String>) -> String {
    // A count past TOML's integers (2^63 - 1) is printed as a string.
    let count = |value: &str| value.trim_matches('"').parse::<usize>().ok();
    let memory_of = |limit_key: &str| -> Option<String> {
        let limit = count(&other(limit_key)?)?;
        let asked = match value {
            Some(value) => Some(count(value)?),
            None => None,
        };
        let applied = forgesyte_server::applied_memory(limit, asked);
        (asked != Some(applied)).then(|| match asked {
            None => format!(
                "; serve applies {applied} (8 × {limit_key}, at least 256 MiB, never less than \
                 {limit_key})"
            ),
            Some(_) => format!("; serve applies {applied} here (never less than {limit_key})"),
        })
    };
    match key {
        "body-memory" => return memory_of("body-limit").unwrap_or_default(),
        "answer-memory" => return memory_of("max-response").unwrap_or_default(),
        _ => {}
    }
    let Some(configured) = (key == "max-connections")
        .then(|| value.and_then(count))
        .flatten()
    else {
        return String::new();
    };
    let applied = forgesyte_server::applied_max_connections(configured);
    if applied < configured {
        format!(
            "; serve applies {applied} here (half the hard open-file limit, to which it raises \
             the soft one: raise `ulimit -Hn` for more)"
        )
    } else {
        String::new()
    }
}

/// Option `arg`'s value in `matches` as a TOML value, `None` when unset.
fn value_of(arg: &Arg, matches: &ArgMatches) -> Option<String> {
    let id = arg.get_id().as_str();
    // A flag or an on/off option (`--confine=off`; a flag's parser makes
    // a `bool` too): `true` or `false`, as the file writes it, whatever
    // word set it.
    if takes_bool(arg)
        && let Ok(Some(flag)) = matches.try_get_one::<bool>(id)
    {
        return Some(flag.to_string());
    }
    let raw = matches.try_get_raw(id).ok().flatten()?;
    let text = is_text(arg.get_value_parser());
    if matches!(arg.get_action(), ArgAction::Append) {
        // An empty element of a list (`/a::/b`) is skipped where it is used
        // (or refused by its parser): it is not shown either.
        let values: Vec<String> = raw
            .filter(|v| !v.is_empty())
            .map(|v| toml_value(&v.to_string_lossy(), text))
            .collect();
        return Some(format!("[{}]", values.join(", ")));
    }
    raw.map(|v| toml_value(&v.to_string_lossy(), text)).next()
}

/// The value of file key `key` (a long option of `keys`) in `matches`,
/// as [`Layered::render`] prints it.
fn value_of_key(keys: &Command, matches: &ArgMatches, key: &str) -> Option<String> {
    let arg = file_keys(keys).find(|arg| arg.get_long() == Some(key))?;
    value_of(arg, matches)
}

/// Whether every value option `id` was given is UTF-8.
fn is_utf8(id: &str, matches: &ArgMatches) -> bool {
    matches
        .try_get_raw(id)
        .ok()
        .flatten()
        .is_none_or(|mut raw| raw.all(|v| v.to_str().is_some()))
}

fn is_text(parser: &ValueParser) -> bool {
    let id = parser.type_id();
    [
        ValueParser::string(),
        ValueParser::os_string(),
        ValueParser::path_buf(),
    ]
    .iter()
    .any(|p| p.type_id() == id)
}

/// `raw` as a TOML value: a number when it reads as one (and the option's
/// type is not text), else a string.
fn toml_value(raw: &str, text: bool) -> String {
    let trimmed = raw.trim();
    let whole = !trimmed.is_empty() && trimmed.bytes().all(|b| b.is_ascii_digit());
    let value = match (text, trimmed.parse::<i64>(), trimmed.parse::<f64>()) {
        (false, Ok(i), _) => toml::Value::Integer(i),
        // A whole number past TOML's integers (a u64 byte count) stays
        // exact as text, which the file reader accepts; as a float it read
        // back as no number of bytes.
        (false, _, Ok(f)) if f.is_finite() && !whole => toml::Value::Float(f),
        _ => toml::Value::String(raw.to_owned()),
    };
    value.to_string()
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::{CommandFactory, FromArgMatches};

    use crate::cli::{Cli, Command as Sub};

    struct Case {
        _dir: tempfile::TempDir,
        file: PathBuf,
    }

    fn file(text: &str) -> Case {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("forgesyte.toml");
        std::fs::write(&file, text).unwrap();
        Case { _dir: dir, file }
    }

    fn layered(args: &[&str]) -> Result<Layered, ConfigError> {
        let argv = std::iter::once("forgesyte")
            .chain(args.iter().copied())
            .map(OsString::from)
            .collect();
        layer(Cli::command(), argv, "serve")
    }

    fn serve_config(args: &[&str]) -> forgesyte_server::ServerConfig {
        let layered = layered(args).unwrap();
        let cli = Cli::from_arg_matches(&layered.matches).unwrap();
        let Sub::Serve(args) = cli.command else {
            panic!("expected serve");
        };
        args.config().0
    }

    #[test]
    fn the_file_fills_what_the_command_line_does_not_set() {
        let case = file(
            "bind = \"0.0.0.0:9000\"\nmax-connections = 123\ncall-timeout = 2.5\n\
             lib-path = [\"/a\", \"/b\"]\npreflight = true\nisolation = \"process\"\n",
        );
        let path = case.file.to_str().unwrap();
        let config = serve_config(&["serve", "--config", path]);
        assert_eq!(config.bind, "0.0.0.0:9000");
        assert_eq!(config.max_connections, 123);
        assert_eq!(config.call_timeout, std::time::Duration::from_millis(2500));
        assert_eq!(config.lib_paths, [PathBuf::from("/a"), PathBuf::from("/b")]);
        assert!(config.preflight);
        assert_eq!(
            config.default_isolation,
            forgesyte_loader::Isolation::Process
        );
        // What the file does not name keeps its default.
        assert_eq!(config.body_limit, forgesyte_server::DEFAULT_BODY_LIMIT);

        // A flag beats the file, for a value and for a list.
        let config = serve_config(&[
            "serve",
            "--config",
            path,
            "--bind",
            "127.0.0.1:1",
            "--lib-path",
            "/c",
        ]);
        assert_eq!(config.bind, "127.0.0.1:1");
        assert_eq!(config.lib_paths, [PathBuf::from("/c")]);
        assert_eq!(config.max_connections, 123);
    }

    #[test]
    fn without_a_file_nothing_changes() {
        let plain = serve_config(&["serve", "--max-connections", "7"]);
        assert_eq!(plain.max_connections, 7);
        assert_eq!(plain.bind, forgesyte_server::DEFAULT_BIND);
    }

    #[test]
    fn a_flag_takes_a_bool_as_an_on_off_option_does() {
        let mut command = Cli::command();
        command.build();
        let check = command.find_subcommand("check").unwrap();
        let arg = |id: &str| check.get_arguments().find(|a| a.get_id() == id).unwrap();
        assert!(matches!(arg("json").get_action(), ArgAction::SetTrue));
        assert!(takes_bool(arg("json")) && takes_bool(arg("preflight")));
        assert!(!takes_bool(arg("python")));
    }

    #[test]
    fn unknown_keys_bad_values_and_missing_files_name_key_and_file() {
        let case = file("bind = \"0.0.0.0:9000\"\nmax-conections = 5\n");
        let path = case.file.to_str().unwrap();
        let err = layered(&["serve", "--config", path])
            .unwrap_err()
            .to_string();
        assert!(err.contains("unknown key `max-conections`"), "{err}");
        assert!(err.contains(path), "{err}");
        assert!(err.contains("max-connections"), "lists the keys: {err}");

        for (text, key, why) in [
            (
                "call-timeout = \"soon\"",
                "call-timeout",
                "not a number of seconds",
            ),
            ("max-connections = 0", "max-connections", "at least 1"),
            ("isolation = \"thread\"", "isolation", "in-process, process"),
            ("preflight = \"yes\"", "preflight", "true or false"),
            ("confine = \"off\"", "confine", "true or false"),
            ("watch = 1", "watch", "true or false"),
            ("bind = [\"a\", \"b\"]", "bind", "not an array"),
            ("plugins = { dir = \"x\" }", "plugins", "not a table"),
            // Not taken as text: `python = true` ran the program `true`.
            ("python = true", "python", "a path), not a boolean"),
            ("plugins = 42", "plugins", "not the number 42"),
            ("lib-path = [\"/a\", 1]", "lib-path", "not the number 1"),
            ("max-connections = true", "max-connections", "not a boolean"),
        ] {
            let case = file(text);
            let path = case.file.to_str().unwrap();
            // Even when a flag overrides it, a bad value in the file is an error.
            let err = layered(&["serve", "--config", path, "--bind", "127.0.0.1:0"])
                .unwrap_err()
                .to_string();
            assert!(err.contains(&format!("key `{key}`")), "{text}: {err}");
            assert!(err.contains(why), "{text}: {err}");
            assert!(err.contains(path), "{text}: {err}");
        }

        let case = file("bind = ");
        let err = layered(&["serve", "--config", case.file.to_str().unwrap()])
            .unwrap_err()
            .to_string();
        assert!(err.contains("not valid TOML"), "{err}");

        // Endless (a device) or too large: refused, not read to the end.
        let err = layered(&["serve", "--config", "/dev/zero"]).unwrap_err();
        assert!(matches!(err, ConfigError::Read { .. }), "{err}");
        let huge = case.file.with_file_name("huge.toml");
        std::fs::write(&huge, format!("# {}\n", "x".repeat(2 << 20))).unwrap();
        let err = layered(&["serve", "--config", huge.to_str().unwrap()]).unwrap_err();
        assert!(
            err.to_string().contains("larger than 1048576 bytes"),
            "{err}"
        );
        // Of multi-byte characters: still its size (the cut fell inside a
        // character, and was read as "not UTF-8").
        std::fs::write(&huge, format!("# {}\n", "é".repeat(1 << 20))).unwrap();
        let err = layered(&["serve", "--config", huge.to_str().unwrap()]).unwrap_err();
        assert!(
            err.to_string().contains("larger than 1048576 bytes"),
            "{err}"
        );

        let missing = case.file.with_file_name("missing.toml");
        let err = layered(&["serve", "--config", missing.to_str().unwrap()]).unwrap_err();
        assert!(matches!(err, ConfigError::Read { .. }), "{err}");
        assert!(err.to_string().contains("missing.toml"), "{err}");

        // The file itself and help are not keys.
        let case = file("config = \"other.toml\"");
        let err = layered(&["serve", "--config", case.file.to_str().unwrap()]).unwrap_err();
        assert!(matches!(err, ConfigError::UnknownKey { .. }), "{err}");
    }

    #[test]
    fn print_names_each_source_and_reads_back() {
        let case = file("bind = \"0.0.0.0:9000\"\nmax-connections = 123\nlib-path = [\"/a\"]\n");
        let path = case.file.to_str().unwrap();
        let shown = layered(&[
            "config",
            "--print",
            "--config",
            path,
            "--max-connections",
            "9",
        ])
        .unwrap()
        .render()
        .unwrap();
        let line = |key: &str| {
            shown
                .lines()
                .find(|l| {
                    l.starts_with(&format!("{key} = ")) || l.starts_with(&format!("# {key} "))
                })
                .unwrap_or_else(|| panic!("no {key} line in:\n{shown}"))
                .to_owned()
        };
        assert_eq!(
            line("bind"),
            format!("bind = \"0.0.0.0:9000\"  # file {path}")
        );
        assert_eq!(line("max-connections"), "max-connections = 9  # flag");
        assert_eq!(
            line("lib-path"),
            format!("lib-path = [\"/a\"]  # file {path}")
        );
        assert_eq!(line("call-timeout"), "call-timeout = 60  # default");
        assert_eq!(line("plugins"), "plugins = \"./plugins\"  # default");
        assert_eq!(line("preflight"), "preflight = false  # default");
        assert_eq!(line("isolation"), "isolation = \"in-process\"  # default");
        assert_eq!(line("runner"), "# runner is not set  # unset");
        assert!(
            shown.contains(&format!("# config file: {path} (from flag)")),
            "{shown}"
        );
        assert!(!shown.contains("print ="), "{shown}");

        // The printed configuration is itself a config file giving the same values.
        let again = file(&shown);
        let reread = layered(&[
            "config",
            "--print",
            "--config",
            again.file.to_str().unwrap(),
        ])
        .unwrap()
        .render()
        .unwrap();
        let values = |text: &str| -> Vec<String> {
            text.lines()
                .filter(|l| !l.starts_with('#'))
                .map(|l| l.split("  # ").next().unwrap_or_default().to_owned())
                .collect()
        };
        assert_eq!(values(&reread), values(&shown));
        assert!(reread.contains("max-connections = 9  # file"), "{reread}");
    }

    /// The env layer, on a command of its own whose option reads `PATH`
    /// (set in any shell; tests cannot set variables safely while other
    /// threads run): env beats file, flag beats env, file beats default.
    #[test]
    fn env_beats_the_file_and_the_flag_beats_env() {
        let Some(path_var) = std::env::var_os("PATH") else {
            assert!(std::env::var_os("CI").is_none(), "PATH is not set");
            eprintln!("skipped: PATH is not set");
            return;
        };
        let command = Command::new("t").subcommand(
            Command::new("serve")
                .arg(
                    Arg::new(CONFIG_ARG)
                        .long("config")
                        .value_parser(clap::value_parser!(PathBuf)),
                )
                .arg(Arg::new("search").long("search").env("PATH"))
                .arg(Arg::new("mode").long("mode").default_value("d")),
        );
        let case = file("search = \"from-file\"\nmode = \"from-file\"\n");
        let path = case.file.to_str().unwrap();
        let parse = |extra: &[&str]| {
            let argv = ["t", "serve", "--config", path]
                .iter()
                .chain(extra)
                .map(OsString::from)
                .collect();
            let layered = layer(command.clone(), argv, "serve").unwrap();
            let (_, sub) = layered.matches.subcommand().unwrap();
            let value = |id: &str| sub.get_one::<String>(id).cloned().unwrap();
            let sources = layered.sources.clone().unwrap();
            (
                value("search"),
                sources["search"].clone(),
                value("mode"),
                sources["mode"].clone(),
            )
        };
        let (search, source, mode, mode_source) = parse(&[]);
        assert_eq!(OsString::from(search), path_var);
        assert_eq!(source, Source::Env("PATH".into()));
        assert_eq!(mode, "from-file");
        assert_eq!(mode_source, Source::File(case.file.clone()));
        let (search, source, _, _) = parse(&["--search", "from-flag"]);
        assert_eq!(search, "from-flag");
        assert_eq!(source, Source::Flag);
    }

    /// A file's `plugins` given to `check` (a positional `DIR`) is a
    /// directory whatever it reads like, never an option (`--json` turned
    /// JSON output on, `--require-signed` signatures).
    #[test]
    fn the_files_plugins_directory_is_never_read_as_an_option() {
        for dir in ["--json", "--require-signed", "-x"] {
            let case = file(&format!("plugins = \"{dir}\"\n"));
            let path = case.file.to_str().unwrap();
            for args in [
                vec!["check", "--config", path],
                vec!["check", "--config", path, "--"],
            ] {
                let layered = layered(&args).unwrap_or_else(|e| panic!("{args:?}: {e}"));
                let (_, matches) = layered.matches.subcommand().unwrap();
                let given = matches.get_one::<PathBuf>(DIR_ARG).unwrap();
                assert_eq!(given, &PathBuf::from(dir), "{args:?}");
                for flag in ["json", "require_signed"] {
                    assert_eq!(matches.get_one::<bool>(flag), Some(&false), "{args:?}");
                }
            }
        }
    }

    /// The file's options with a `--` on the command line: they go before
    /// it (after it, `--init-timeout=5` was an unexpected argument), its
    /// `DIR` after it, and a `DIR` given after it wins.
    #[test]
    fn the_files_options_go_before_the_command_lines_end_of_options() {
        let case = file("plugins = \"/srv/plugins\"\ninit-timeout = 5\nbind = \"127.0.0.1:9\"\n");
        let path = case.file.to_str().unwrap();
        for (args, dir) in [
            (vec!["check", "--config", path, "--"], "/srv/plugins"),
            (vec!["check", "--config", path, "--", "-odd"], "-odd"),
        ] {
            let layered = layered(&args).unwrap_or_else(|e| panic!("{args:?}: {e}"));
            let (_, matches) = layered.matches.subcommand().unwrap();
            assert_eq!(
                matches.get_one::<PathBuf>(DIR_ARG),
                Some(&PathBuf::from(dir)),
                "{args:?}"
            );
            assert_eq!(
                matches.get_raw("init_timeout").and_then(|mut v| v.next()),
                Some(std::ffi::OsStr::new("5")),
                "{args:?}"
            );
        }
        let layered = layered(&["config", "--print", "--config", path, "--"])
            .unwrap_or_else(|e| panic!("{e}"));
        let printed = layered.render().unwrap();
        assert!(printed.contains("bind = \"127.0.0.1:9\""), "{printed}");
    }

    #[test]
    fn toml_values_keep_their_type() {
        assert_eq!(toml_value("60", false), "60");
        assert_eq!(toml_value("0.5", false), "0.5");
        assert_eq!(toml_value("in-process", false), "\"in-process\"");
        assert_eq!(toml_value("8000", true), "\"8000\"");
        assert_eq!(toml_value("a \"q\"\\", true), "'a \"q\"\\'");
        assert_eq!(toml_value("inf", false), "\"inf\"");
        // Past i64: kept exact, as text (a float read back as no byte count).
        assert_eq!(
            toml_value("18446744073709551615", false),
            "\"18446744073709551615\""
        );
    }
}
