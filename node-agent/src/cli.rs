//! The agent's command line: a table of options read from the arguments and the environment.
//!
//! A general-purpose argument parser cost the agent over 100 KB of flash (its builder, help
//! renderer, colours and suggestions), more than the whole TLS layer's certificate validation.
//! The agent's options are a fixed list of `--long` options, each with an optional environment
//! variable and default, so this table-driven reader does what the agent needs:
//!
//! - `--name VALUE`, `--name=VALUE`; flags take no value (`--name=false` is refused);
//! - an option missing from the arguments is read from its environment variable, then its
//!   default; on the command line the option wins;
//! - list options (`list`) accept several values separated by commas and may be repeated; the
//!   values given replace the default;
//! - a flag's environment variable is true for `true`, `1`, `yes` or `on` and false for
//!   `false`, `0`, `no`, `off` or empty; anything else is an error;
//! - `choices` lists the values an option accepts;
//! - `-h`/`--help` prints the help and `-V`/`--version` the version, both on stdout, exit 0;
//!   a usage error prints one line naming the option and exits 2.

use std::ffi::OsString;

/// One option.
#[derive(Debug, Clone, Copy)]
pub struct Opt {
    /// The name after `--`.
    pub long: &'static str,
    /// Its environment variable.
    pub env: Option<&'static str>,
    /// The value's name in the help (`None`: a flag, which takes no value).
    pub value: Option<&'static str>,
    /// The default, as it would be written on the command line.
    pub default: Option<&'static str>,
    /// The values accepted (empty: any).
    pub choices: &'static [&'static str],
    /// Several values, separated by commas or given by repeating the option.
    pub list: bool,
    /// Options this one cannot be given with.
    pub conflicts: &'static [&'static str],
    /// The help text.
    pub help: &'static str,
}

impl Opt {
    /// An option that takes a value.
    pub const fn value(long: &'static str, value: &'static str, help: &'static str) -> Self {
        Self {
            long,
            env: None,
            value: Some(value),
            default: None,
            choices: &[],
            list: false,
            conflicts: &[],
            help,
        }
    }

    /// A flag.
    pub const fn flag(long: &'static str, help: &'static str) -> Self {
        Self {
            long,
            env: None,
            value: None,
            default: None,
            choices: &[],
            list: false,
            conflicts: &[],
            help,
        }
    }

    /// With an environment variable.
    pub const fn env(mut self, env: &'static str) -> Self {
        self.env = Some(env);
        self
    }

    /// With a default.
    pub const fn default(mut self, default: &'static str) -> Self {
        self.default = Some(default);
        self
    }

    /// Accepting only these values.
    pub const fn choices(mut self, choices: &'static [&'static str]) -> Self {
        self.choices = choices;
        self
    }

    /// Taking several values.
    pub const fn list(mut self) -> Self {
        self.list = true;
        self
    }

    /// Not to be given with these options.
    pub const fn conflicts(mut self, with: &'static [&'static str]) -> Self {
        self.conflicts = with;
        self
    }
}

/// What the command line asks for.
#[derive(Debug)]
pub enum Parsed {
    /// Run with these values.
    Run(Matches),
    /// Print the help ([`help`]) and exit.
    Help,
    /// Print the version and exit.
    Version,
}

/// Where a value came from (error messages name it).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Origin {
    Unset,
    Arg,
    Env,
    Default,
}

/// The values read, by option.
#[derive(Debug)]
pub struct Matches {
    specs: &'static [Opt],
    values: Vec<(Vec<String>, Origin)>,
}

/// A usage error: one line naming the option (exit code 2).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{0}")]
pub struct UsageError(pub String);

impl Matches {
    fn index(&self, long: &str) -> usize {
        // The callers name options of their own table: a missing one is a programming error
        // that the tests of the table catch, and reads as "not given" meanwhile.
        self.specs
            .iter()
            .position(|o| o.long == long)
            .unwrap_or(usize::MAX)
    }

    fn raw(&self, long: &str) -> Option<&(Vec<String>, Origin)> {
        self.values.get(self.index(long))
    }

    /// The value of an option (the last one given), if any.
    pub fn get(&self, long: &str) -> Option<&str> {
        self.raw(long)
            .and_then(|(v, _)| v.last())
            .map(String::as_str)
    }

    /// Every value of a list option.
    pub fn list(&self, long: &str) -> Vec<String> {
        self.raw(long).map(|(v, _)| v.clone()).unwrap_or_default()
    }

    /// Whether a flag is set.
    pub fn flag(&self, long: &str) -> bool {
        self.get(long) == Some("true")
    }

    /// A value parsed as a number, with an error naming the option and where it came from.
    pub fn number<T: std::str::FromStr>(&self, long: &str) -> Result<Option<T>, UsageError>
    where
        T::Err: std::fmt::Display,
    {
        let Some(text) = self.get(long) else {
            return Ok(None);
        };
        text.parse().map(Some).map_err(|e| {
            let from = self.origin(long);
            UsageError(format!("invalid value '{text}' for --{long}{from}: {e}"))
        })
    }

    /// " (from $ENV)" when the value came from the environment.
    fn origin(&self, long: &str) -> String {
        match (self.raw(long), self.specs.get(self.index(long))) {
            (Some((_, Origin::Env)), Some(Opt { env: Some(e), .. })) => format!(" (from ${e})"),
            (Some((_, Origin::Default)), _) => " (its default)".into(),
            _ => String::new(),
        }
    }
}

/// Reads `args` (without the program name) and the environment (`env`) by the table `specs`.
pub fn parse(
    specs: &'static [Opt],
    args: impl IntoIterator<Item = OsString>,
    env: impl Fn(&str) -> Option<OsString>,
) -> Result<Parsed, UsageError> {
    let mut given: Vec<Vec<String>> = vec![Vec::new(); specs.len()];
    let mut args = args.into_iter();
    while let Some(arg) = args.next() {
        let arg = arg
            .into_string()
            .map_err(|a| UsageError(format!("argument {a:?} is not valid UTF-8")))?;
        match arg.as_str() {
            "-h" | "--help" => return Ok(Parsed::Help),
            "-V" | "--version" => return Ok(Parsed::Version),
            _ => {}
        }
        let Some(body) = arg.strip_prefix("--") else {
            return Err(UsageError(format!(
                "unexpected argument '{arg}' (options start with --; see --help)"
            )));
        };
        let (name, inline) = match body.split_once('=') {
            Some((n, v)) => (n, Some(v.to_string())),
            None => (body, None),
        };
        let Some(i) = specs.iter().position(|o| o.long == name) else {
            return Err(UsageError(format!(
                "unexpected argument '--{name}' (see --help)"
            )));
        };
        let spec = &specs[i];
        let value = match (spec.value, inline) {
            (None, None) => "true".to_string(),
            (None, Some(_)) => {
                return Err(UsageError(format!("--{name} is a flag and takes no value")));
            }
            (Some(_), Some(v)) => v,
            (Some(vn), None) => match args.next().map(OsString::into_string) {
                Some(Ok(v)) => v,
                Some(Err(v)) => {
                    return Err(UsageError(format!(
                        "the value {v:?} of --{name} is not valid UTF-8"
                    )));
                }
                None => return Err(UsageError(format!("--{name} needs a value: --{name} {vn}"))),
            },
        };
        given[i].push(value);
    }
    let mut values = Vec::with_capacity(specs.len());
    for (spec, mut got) in specs.iter().zip(given) {
        let mut origin = if got.is_empty() {
            Origin::Unset
        } else {
            Origin::Arg
        };
        if got.is_empty() {
            if let Some(text) = spec.env.and_then(&env) {
                let text = text.into_string().map_err(|_| {
                    UsageError(format!(
                        "${} (for --{}) is not valid UTF-8",
                        spec.env.unwrap_or_default(),
                        spec.long
                    ))
                })?;
                origin = Origin::Env;
                if spec.value.is_none() {
                    got.push(env_flag(spec, &text)?.to_string());
                } else {
                    got.push(text);
                }
            } else if let Some(d) = spec.default {
                origin = Origin::Default;
                got.push(d.to_string());
            }
        } else if spec.value.is_some() && !spec.list && got.len() > 1 {
            return Err(UsageError(format!(
                "--{} was given more than once",
                spec.long
            )));
        }
        if spec.list {
            got = got
                .iter()
                .flat_map(|v| v.split(','))
                .filter(|v| !v.is_empty())
                .map(str::to_string)
                .collect();
        }
        if let Some(bad) = got
            .iter()
            .find(|v| !spec.choices.is_empty() && !spec.choices.contains(&v.as_str()))
        {
            let from = match (origin, spec.env) {
                (Origin::Env, Some(e)) => format!(" (from ${e})"),
                _ => String::new(),
            };
            return Err(UsageError(format!(
                "invalid value '{bad}' for --{}{from}: expected one of {}",
                spec.long,
                spec.choices.join(", ")
            )));
        }
        values.push((got, origin));
    }
    let m = Matches { specs, values };
    for spec in specs {
        if m.raw(spec.long).map(|(_, o)| *o) != Some(Origin::Arg) {
            continue;
        }
        for other in spec.conflicts {
            if m.raw(other).map(|(_, o)| *o) == Some(Origin::Arg) {
                return Err(UsageError(format!(
                    "--{} cannot be used with --{other}",
                    spec.long
                )));
            }
        }
    }
    Ok(Parsed::Run(m))
}

/// A flag's environment variable, as a boolean.
fn env_flag(spec: &Opt, text: &str) -> Result<bool, UsageError> {
    match text.to_ascii_lowercase().as_str() {
        "true" | "1" | "yes" | "on" => Ok(true),
        "false" | "0" | "no" | "off" | "" => Ok(false),
        _ => Err(UsageError(format!(
            "invalid value '{text}' for ${} (the flag --{}): expected true or false",
            spec.env.unwrap_or_default(),
            spec.long
        ))),
    }
}

/// The help text: `about`, the usage line and every option with its value, default,
/// environment variable and choices.
pub fn help(name: &str, about: &str, specs: &[Opt]) -> String {
    let mut out = format!("{about}\n\nUsage: {name} [OPTIONS]\n\nOptions:\n");
    for o in specs {
        let head = match o.value {
            Some(v) if o.list => format!("--{} <{v}>...", o.long),
            Some(v) => format!("--{} <{v}>", o.long),
            None => format!("--{}", o.long),
        };
        out.push_str("      ");
        out.push_str(&head);
        out.push('\n');
        // The bracketed notes are kept whole on one line.
        let mut words: Vec<String> = o.help.split_whitespace().map(str::to_string).collect();
        if !o.choices.is_empty() {
            words.push(format!("[possible values: {}]", o.choices.join(", ")));
        }
        if let Some(d) = o.default {
            words.push(format!("[default: {d}]"));
        }
        if let Some(e) = o.env {
            words.push(format!("[env: {e}=]"));
        }
        wrap(&mut out, &words, 10, 100);
    }
    out.push_str("  -h, --help\n          Print help\n  -V, --version\n          Print version\n");
    out
}

/// Appends `words` wrapped at `width` columns, each line indented by `indent` spaces.
fn wrap(out: &mut String, words: &[String], indent: usize, width: usize) {
    let mut col = 0;
    for word in words {
        if col > 0 && col + 1 + word.len() > width {
            out.push('\n');
            col = 0;
        }
        if col == 0 {
            out.extend(std::iter::repeat_n(' ', indent));
            col = indent;
        } else {
            out.push(' ');
            col += 1;
        }
        out.push_str(word);
        col += word.len();
    }
    out.push('\n');
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::panic)]
    use super::*;

    static SPECS: &[Opt] = &[
        Opt::value("mesh", "NAME", "The mesh.").env("T_MESH"),
        Opt::flag("show-id", "Show.").conflicts(&["uninstall"]),
        Opt::flag("uninstall", "Remove.").env("T_UNINSTALL"),
        Opt::value("backend", "KIND", "How.")
            .choices(&["files", "linux"])
            .default("files")
            .env("T_BACKEND"),
        Opt::value("underlay", "IFACE", "Links.")
            .list()
            .default("mesh0")
            .env("T_UNDERLAY"),
        Opt::value("interval", "SECONDS", "Every.").default("60"),
    ];

    fn run(args: &[&str], env: &[(&str, &str)]) -> Result<Matches, UsageError> {
        let env: Vec<(String, String)> = env
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        match parse(SPECS, args.iter().map(OsString::from), |k| {
            env.iter()
                .find(|(n, _)| n == k)
                .map(|(_, v)| OsString::from(v))
        })? {
            Parsed::Run(m) => Ok(m),
            other => panic!("not a run: {other:?}"),
        }
    }

    #[test]
    fn values_from_arguments_environment_and_defaults() {
        let m = run(&["--mesh", "riverside"], &[("T_BACKEND", "linux")]).unwrap();
        assert_eq!(m.get("mesh"), Some("riverside"));
        assert_eq!(m.get("backend"), Some("linux"));
        assert_eq!(m.list("underlay"), vec!["mesh0"]);
        assert_eq!(m.number::<u64>("interval").unwrap(), Some(60));
        assert!(!m.flag("uninstall"));
        let m = run(
            &["--mesh=a=b", "--backend=files"],
            &[("T_MESH", "x"), ("T_BACKEND", "linux")],
        )
        .unwrap();
        assert_eq!(
            m.get("mesh"),
            Some("a=b"),
            "the argument wins over the environment"
        );
        assert_eq!(m.get("backend"), Some("files"));
    }

    #[test]
    fn lists_split_on_commas_and_repeat() {
        let m = run(&["--underlay", "a,b", "--underlay=c"], &[]).unwrap();
        assert_eq!(m.list("underlay"), vec!["a", "b", "c"]);
        let m = run(&[], &[("T_UNDERLAY", "wan,lan")]).unwrap();
        assert_eq!(m.list("underlay"), vec!["wan", "lan"]);
    }

    #[test]
    fn flags_from_the_environment() {
        for (text, want) in [
            ("1", true),
            ("true", true),
            ("ON", true),
            ("0", false),
            ("", false),
        ] {
            let m = run(&[], &[("T_UNINSTALL", text)]).unwrap();
            assert_eq!(m.flag("uninstall"), want, "{text:?}");
        }
        assert_eq!(
            run(&[], &[("T_UNINSTALL", "maybe")]).unwrap_err().0,
            "invalid value 'maybe' for $T_UNINSTALL (the flag --uninstall): expected true or false"
        );
    }

    #[test]
    fn usage_errors_name_the_option() {
        type Case<'a> = (&'a [&'a str], &'a [(&'a str, &'a str)], &'a str);
        let cases: &[Case] = &[
            (
                &["--nope"],
                &[],
                "unexpected argument '--nope' (see --help)",
            ),
            (
                &["mesh"],
                &[],
                "unexpected argument 'mesh' (options start with --; see --help)",
            ),
            (&["--mesh"], &[], "--mesh needs a value: --mesh NAME"),
            (
                &["--uninstall=yes"],
                &[],
                "--uninstall is a flag and takes no value",
            ),
            (
                &["--mesh", "a", "--mesh", "b"],
                &[],
                "--mesh was given more than once",
            ),
            (
                &["--backend", "uci"],
                &[],
                "invalid value 'uci' for --backend: expected one of files, linux",
            ),
            (
                &[],
                &[("T_BACKEND", "uci")],
                "invalid value 'uci' for --backend (from $T_BACKEND): expected one of files, linux",
            ),
            (
                &["--show-id", "--uninstall"],
                &[],
                "--show-id cannot be used with --uninstall",
            ),
        ];
        for (args, env, want) in cases {
            assert_eq!(run(args, env).unwrap_err().0, *want, "{args:?} {env:?}");
        }
        // A conflict only counts on the command line.
        assert!(run(&["--show-id"], &[("T_UNINSTALL", "1")]).is_ok());
        let m = run(&["--interval", "soon"], &[]).unwrap();
        assert_eq!(
            m.number::<u64>("interval").unwrap_err().0,
            "invalid value 'soon' for --interval: invalid digit found in string"
        );
    }

    #[test]
    fn help_and_version() {
        let p = parse(
            SPECS,
            [OsString::from("--mesh"), "x".into(), "-h".into()],
            |_| None,
        );
        assert!(matches!(p, Ok(Parsed::Help)));
        let p = parse(SPECS, [OsString::from("--version")], |_| None);
        assert!(matches!(p, Ok(Parsed::Version)));
        let h = help("agent", "About.", SPECS);
        assert!(h.contains("      --backend <KIND>\n          How. [possible values: files, linux] [default: files] [env: T_BACKEND=]\n"), "{h}");
        assert!(h.contains("      --underlay <IFACE>...\n"), "{h}");
        assert!(h.contains("      --uninstall\n"), "{h}");
    }
}
