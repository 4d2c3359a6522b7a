//! sidenet's own sections in an OpenWrt router's UCI config, changed with OpenWrt's own `uci`
//! command, never by writing a config file.
//!
//! The controller renders one *sidenet batch* per UCI package (`etc/sidenet/uci/<package>`,
//! parsed by [`Batch::parse`]; the format is specified in docs/dataplane.md, "A guest on the
//! household router"). Every section it declares is named `sidenet_*`; a batch cannot name,
//! change or delete anything else. [`Uci::sync`] makes a package's `sidenet_*` sections exactly
//! what its batch declares:
//!
//! 1. `uci changes <package>` must be empty: sidenet never commits changes someone else left
//!    uncommitted (they live in uci's shared `/tmp/.uci`, which every `uci commit` picks up).
//! 2. `uci export <package>`: when its `sidenet_*` sections already are the batch's, nothing
//!    more is done (no commit, no reload).
//! 3. Before the first change ever to a package, the file as the owner had it is kept in
//!    `STATE/pristine/<package>` (or `<package>.absent`), for `--uninstall`.
//! 4. One `uci batch` (with its own change folder, `-t STATE/run/uci`) deletes every
//!    `sidenet_*` section there is and declares the batch's sections.
//! 5. `uci export` with those changes: the owner's sections must be exactly as before and the
//!    `sidenet_*` sections exactly the batch's (`uci batch` exits 0 even when a line fails), or
//!    the changes are dropped and the sync fails.
//! 6. `uci commit <package>` (uci re-reads the file under a lock and writes it through a
//!    temporary file and a rename, so an owner's commit in between is kept).
//!
//! [`Uci::uninstall`] removes the `sidenet_*` sections and, when the owner's sections are still
//! exactly those of the pristine copy, puts the pristine file back byte for byte (comments and
//! layout included, which any `uci commit` drops).
//!
//! `require` lines ([`Require`]) state what sidenet needs from a section it does not own (the
//! router owner's radio): [`Uci::check`] refuses the config, before anything is changed, when
//! one does not hold.

use std::path::{Path, PathBuf};

use crate::backend::Runner;
use crate::files::write_atomic;

/// The UCI packages sidenet adds sections to, in the order they are synced and reloaded.
pub const PACKAGES: [&str; 5] = ["network", "wireless", "firewall", "babeld", "dhcp"];
/// Every section sidenet owns is named with this prefix.
pub const PREFIX: &str = "sidenet_";

/// An option's value.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Value {
    /// `option NAME 'VALUE'` (`set`).
    One(String),
    /// `list NAME 'VALUE'`, one per item (`add_list`).
    List(Vec<String>),
}

/// One section a batch declares.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Section {
    /// `sidenet_*`.
    pub name: String,
    /// Section type (`interface`, `wifi-iface`, `zone`, ...).
    pub kind: String,
    /// Options in the order they are first set.
    pub options: Vec<(String, Value)>,
}

/// `require PKG.SECTION.OPTION='V1' 'V2' ...`: the (owner's) option must hold one of the values;
/// `''` stands for "not set".
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Require {
    /// Section name (any section of the package, usually the owner's).
    pub section: String,
    /// Option name.
    pub option: String,
    /// Accepted values.
    pub allowed: Vec<String>,
    /// The line's `# because: ...` comment, shown when it does not hold.
    pub why: Option<String>,
}

/// A parsed sidenet batch for one package.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Batch {
    /// The UCI package.
    pub package: String,
    /// Sections, in order.
    pub sections: Vec<Section>,
    /// Requirements on sections sidenet does not own.
    pub requires: Vec<Require>,
}

fn is_name(s: &str) -> bool {
    !s.is_empty() && s.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_')
}

/// Splits `'a'` or `'a' 'b'` (uci's quoting: `'\''` is a quote inside a value) into values,
/// and the text of a trailing ` # comment`, if any.
fn parse_values(s: &str) -> Result<(Vec<String>, Option<&str>), String> {
    let mut out = Vec::new();
    let mut rest = s;
    loop {
        let Some(r) = rest.strip_prefix('\'') else {
            return Err(format!("expected a value in single quotes at {rest:?}"));
        };
        let mut value = String::new();
        let mut r = r;
        loop {
            let Some(end) = r.find('\'') else {
                return Err(format!("unterminated quote in {s:?}"));
            };
            value.push_str(&r[..end]);
            r = &r[end + 1..];
            if let Some(after) = r.strip_prefix("\\''") {
                value.push('\'');
                r = after;
            } else {
                break;
            }
        }
        out.push(value);
        if r.is_empty() {
            return Ok((out, None));
        }
        if let Some(comment) = r.strip_prefix(" # ") {
            return Ok((out, Some(comment.trim())));
        }
        rest = r
            .strip_prefix(' ')
            .ok_or_else(|| format!("expected a space between values at {r:?}"))?;
    }
}

/// Quotes a value as uci prints it.
pub fn quote(v: &str) -> String {
    format!("'{}'", v.replace('\'', "'\\''"))
}

impl Batch {
    /// Parses the batch `text` for `package` (see the module docs and docs/dataplane.md).
    /// Errors name the line.
    pub fn parse(package: &str, text: &str) -> Result<Self, String> {
        if !PACKAGES.contains(&package) {
            return Err(format!(
                "package {package:?} is not one sidenet adds sections to ({})",
                PACKAGES.join(", ")
            ));
        }
        let mut b = Batch {
            package: package.to_string(),
            ..Default::default()
        };
        for (i, raw) in text.lines().enumerate() {
            let line = raw.trim_end();
            let ln = i + 1;
            let err = |m: String| format!("line {ln}: {m}: {line:?}");
            if line.trim_start().is_empty() || line.trim_start().starts_with('#') {
                continue;
            }
            let (cmd, rest) = line.split_once(' ').unwrap_or((line, ""));
            if !matches!(cmd, "set" | "add_list" | "require") {
                return Err(err(format!(
                    "expected `set`, `add_list` or `require` (a sidenet batch does nothing else), not {cmd:?}"
                )));
            }
            let (path, value) = match rest.split_once('=') {
                Some((p, v)) => (p, Some(v)),
                None => (rest, None),
            };
            let mut parts = path.split('.');
            let (pkg, section, option) = (parts.next(), parts.next(), parts.next());
            if parts.next().is_some() || section.is_none() {
                return Err(err("expected PACKAGE.SECTION[.OPTION]".into()));
            }
            let (Some(pkg), Some(section)) = (pkg, section) else {
                return Err(err("expected PACKAGE.SECTION[.OPTION]".into()));
            };
            if pkg != package {
                return Err(err(format!(
                    "names package {pkg:?}; this batch may only touch {package:?}"
                )));
            }
            if !is_name(section) || option.is_some_and(|o| !is_name(o)) {
                return Err(err(
                    "section and option names are letters, digits and '_'".into()
                ));
            }
            match (cmd, option, value) {
                ("require", Some(option), Some(v)) => {
                    let (allowed, why) = parse_values(v).map_err(err)?;
                    b.requires.push(Require {
                        section: section.to_string(),
                        option: option.to_string(),
                        allowed,
                        why: why.map(str::to_string),
                    });
                }
                ("set" | "add_list", _, _) if !section.starts_with(PREFIX) => {
                    return Err(err(format!(
                        "section {section:?} is not sidenet's (only {PREFIX}* sections may be changed)"
                    )));
                }
                ("set", None, Some(kind)) => {
                    if kind.is_empty()
                        || !kind
                            .bytes()
                            .all(|c| c.is_ascii_alphanumeric() || c == b'_' || c == b'-')
                    {
                        return Err(err("a section type is letters, digits, '_' and '-'".into()));
                    }
                    if b.sections.iter().any(|s| s.name == section) {
                        return Err(err(format!("section {section:?} is declared twice")));
                    }
                    b.sections.push(Section {
                        name: section.to_string(),
                        kind: kind.to_string(),
                        options: Vec::new(),
                    });
                }
                ("set" | "add_list", Some(option), Some(v)) => {
                    let (mut values, _) = parse_values(v).map_err(err)?;
                    if values.len() != 1 {
                        return Err(err("expected exactly one quoted value".into()));
                    }
                    let value = values.remove(0);
                    let s = b
                        .sections
                        .iter_mut()
                        .find(|s| s.name == section)
                        .ok_or_else(|| {
                            err(format!(
                                "section {section:?} is used before `set {package}.{section}=TYPE`"
                            ))
                        })?;
                    let existing = s.options.iter_mut().find(|(n, _)| n == option);
                    match (cmd, existing) {
                        ("set", None) => s.options.push((option.to_string(), Value::One(value))),
                        ("add_list", None) => s
                            .options
                            .push((option.to_string(), Value::List(vec![value]))),
                        ("add_list", Some((_, Value::List(items)))) => items.push(value),
                        _ => {
                            return Err(err(format!(
                                "option {option:?} is set more than once (or both set and add_list)"
                            )));
                        }
                    }
                }
                _ => {
                    return Err(err(
                        "expected `set PKG.SECTION=TYPE`, `set PKG.SECTION.OPTION='VALUE'`, `add_list PKG.SECTION.OPTION='VALUE'` or `require PKG.SECTION.OPTION='VALUE' ...`".into(),
                    ));
                }
            }
        }
        Ok(b)
    }

    /// The `uci batch` commands that declare the sections.
    pub fn commands(&self) -> String {
        let p = &self.package;
        let mut out = String::new();
        for s in &self.sections {
            out.push_str(&format!("set {p}.{}={}\n", s.name, s.kind));
            for (o, v) in &s.options {
                match v {
                    Value::One(v) => {
                        out.push_str(&format!("set {p}.{}.{o}={}\n", s.name, quote(v)))
                    }
                    Value::List(items) => {
                        for v in items {
                            out.push_str(&format!("add_list {p}.{}.{o}={}\n", s.name, quote(v)));
                        }
                    }
                }
            }
        }
        out
    }

    /// The sections as `uci export` prints them.
    pub fn exported(&self) -> Vec<ExportedSection> {
        self.sections
            .iter()
            .map(|s| {
                let mut text = format!("config {} {}\n", s.kind, quote(&s.name));
                for (o, v) in &s.options {
                    match v {
                        Value::One(v) => text.push_str(&format!("\toption {o} {}\n", quote(v))),
                        Value::List(items) => {
                            for v in items {
                                text.push_str(&format!("\tlist {o} {}\n", quote(v)));
                            }
                        }
                    }
                }
                ExportedSection {
                    name: Some(s.name.clone()),
                    text,
                }
            })
            .collect()
    }
}

/// One section of `uci export` output.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ExportedSection {
    /// Its name, `None` for an anonymous section.
    pub name: Option<String>,
    /// `config TYPE ['NAME']` and its option and list lines.
    pub text: String,
}

impl ExportedSection {
    /// Whether sidenet owns it.
    pub fn is_sidenet(&self) -> bool {
        self.name.as_deref().is_some_and(|n| n.starts_with(PREFIX))
    }

    /// The value of `option NAME` in this section, if set.
    pub fn option(&self, name: &str) -> Option<String> {
        let prefix = format!("\toption {name} ");
        self.text
            .lines()
            .find_map(|l| l.strip_prefix(&prefix))
            .and_then(|v| parse_values(v).ok())
            .and_then(|(mut v, _)| (v.len() == 1).then(|| v.remove(0)))
    }

    /// The section type.
    pub fn kind(&self) -> &str {
        self.text
            .lines()
            .next()
            .and_then(|l| l.strip_prefix("config "))
            .and_then(|l| l.split(' ').next())
            .unwrap_or_default()
    }
}

/// Splits `uci export` output into its sections.
pub fn parse_export(text: &str) -> Vec<ExportedSection> {
    let mut out: Vec<ExportedSection> = Vec::new();
    for line in text.lines() {
        if let Some(rest) = line.strip_prefix("config ") {
            let name = rest
                .split_once(' ')
                .and_then(|(_, n)| parse_values(n).ok())
                .and_then(|(mut v, _)| (v.len() == 1).then(|| v.remove(0)));
            out.push(ExportedSection {
                name,
                text: format!("{line}\n"),
            });
        } else if line.starts_with('\t')
            && let Some(s) = out.last_mut()
        {
            s.text.push_str(line);
            s.text.push('\n');
        }
    }
    out
}

/// The owner's sections of an export (everything not named `sidenet_*`), as text.
fn owner_part(sections: &[ExportedSection]) -> Vec<&ExportedSection> {
    sections.iter().filter(|s| !s.is_sidenet()).collect()
}

/// What [`Uci::uninstall`] did to one package.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Restored {
    /// sidenet never changed it.
    Untouched,
    /// The file is back byte for byte as it was before sidenet (or gone, if it did not exist).
    Exactly,
    /// sidenet's sections are gone, but the owner changed their own sections since sidenet was
    /// installed: their version is kept (in uci's canonical layout).
    OwnerChangesKept,
}

/// OpenWrt's `uci` command over one config folder, with sidenet's own change folder and
/// pristine copies.
#[derive(Debug, Clone)]
pub struct Uci {
    /// The `uci` program.
    pub bin: String,
    /// The config folder (`-c`), `ROOT/etc/config`.
    pub confdir: PathBuf,
    /// sidenet's change folder (`-t`), emptied before every use.
    pub savedir: PathBuf,
    /// The owner's files as they were before sidenet first changed them.
    pub pristine: PathBuf,
}

impl Uci {
    /// `uci` at `bin` over `ROOT/etc/config`, with its working folders under `state`.
    pub fn new(bin: &str, root: &Path, state: &Path) -> Self {
        Self {
            bin: bin.to_string(),
            confdir: root.join("etc/config"),
            savedir: state.join("run/uci"),
            pristine: state.join("pristine"),
        }
    }

    fn run(&self, runner: &mut dyn Runner, args: &[&str]) -> Result<String, String> {
        let conf = self.confdir.to_string_lossy();
        let save = self.savedir.to_string_lossy();
        let mut argv = vec![self.bin.as_str(), "-c", &conf, "-t", &save];
        argv.extend_from_slice(args);
        runner.run(&argv)
    }

    fn clear_changes(&self) -> Result<(), String> {
        std::fs::create_dir_all(&self.savedir)
            .map_err(|e| format!("cannot create {}: {e}", self.savedir.display()))?;
        for p in PACKAGES {
            let f = self.savedir.join(p);
            match std::fs::remove_file(&f) {
                Ok(()) => {}
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                Err(e) => return Err(format!("cannot remove {}: {e}", f.display())),
            }
        }
        Ok(())
    }

    /// The package's sections (with sidenet's pending changes), `None` if it has no file.
    pub fn export(
        &self,
        runner: &mut dyn Runner,
        package: &str,
    ) -> Result<Option<Vec<ExportedSection>>, String> {
        if !self.confdir.join(package).exists() {
            return Ok(None);
        }
        self.run(runner, &["export", package])
            .map(|t| Some(parse_export(&t)))
    }

    /// Refuses, before anything changes, when someone left uncommitted changes to a package
    /// sidenet is about to change, or a `require` line does not hold.
    pub fn check(&self, runner: &mut dyn Runner, batches: &[Batch]) -> Result<(), String> {
        self.clear_changes()?;
        for package in PACKAGES {
            if !self.confdir.join(package).exists() {
                continue;
            }
            let pending = self.run(runner, &["changes", package])?;
            if !pending.trim().is_empty() {
                return Err(format!(
                    "the router has uncommitted uci changes to {package} made outside sidenet (`uci changes {package}`: {}); sidenet never commits someone else's changes: commit or revert them, then restart the agent",
                    pending.trim().replace('\n', "; ")
                ));
            }
        }
        for b in batches {
            if b.requires.is_empty() {
                continue;
            }
            let sections = self.export(runner, &b.package)?.unwrap_or_default();
            for r in &b.requires {
                let path = format!("{}.{}.{}", b.package, r.section, r.option);
                let section = sections
                    .iter()
                    .find(|s| s.name.as_deref() == Some(r.section.as_str()));
                let Some(section) = section else {
                    return Err(format!(
                        "{}.{} does not exist on this router, but the config needs {path} to be {}{}",
                        b.package,
                        r.section,
                        list(&r.allowed),
                        because(r)
                    ));
                };
                let have = section.option(&r.option).unwrap_or_default();
                if !r.allowed.contains(&have) {
                    return Err(format!(
                        "{path} is {} on this router (the owner's setting, which sidenet never changes), but the config needs {}{}",
                        if have.is_empty() {
                            "not set".to_string()
                        } else {
                            quote(&have)
                        },
                        list(&r.allowed),
                        because(r)
                    ));
                }
            }
        }
        Ok(())
    }

    /// Keeps the package's file as it is now in `STATE/pristine`, unless a copy is there.
    fn keep_pristine(&self, package: &str) -> Result<(), String> {
        let copy = self.pristine.join(package);
        let absent = self.pristine.join(format!("{package}.absent"));
        if copy.exists() || absent.exists() {
            return Ok(());
        }
        let src = self.confdir.join(package);
        match std::fs::read(&src) {
            Ok(bytes) => {
                use std::os::unix::fs::PermissionsExt;
                let mode = std::fs::metadata(&src)
                    .map(|m| m.permissions().mode() & 0o7777)
                    .unwrap_or(0o644);
                write_atomic(&copy, &bytes, mode)
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => write_atomic(&absent, b"", 0o600),
            Err(e) => return Err(format!("cannot read {}: {e}", src.display())),
        }
        .map_err(|e| format!("cannot keep a copy of {}: {e}", src.display()))
    }

    /// Makes the package's `sidenet_*` sections exactly `batch`'s (none for `None`); whether it
    /// committed a change. Call [`Uci::check`] first.
    pub fn sync(
        &self,
        runner: &mut dyn Runner,
        package: &str,
        batch: Option<&Batch>,
    ) -> Result<bool, String> {
        let want = batch.map(Batch::exported).unwrap_or_default();
        self.clear_changes()?;
        let file = self.confdir.join(package);
        let before = match self.export(runner, package)? {
            Some(s) => s,
            None if want.is_empty() => return Ok(false),
            None => {
                // A package the router does not have yet (babeld before its first start):
                // sidenet creates the file, and removes it again on uninstall.
                self.keep_pristine(package)?;
                let mode = if package == "babeld" { 0o644 } else { 0o600 };
                write_atomic(&file, b"", mode)
                    .map_err(|e| format!("cannot create {}: {e}", file.display()))?;
                Vec::new()
            }
        };
        let ours: Vec<&ExportedSection> = before.iter().filter(|s| s.is_sidenet()).collect();
        if ours.iter().copied().eq(want.iter()) {
            return Ok(false);
        }
        self.keep_pristine(package)?;
        let mut script = String::new();
        for s in &ours {
            if let Some(n) = &s.name {
                script.push_str(&format!("delete {package}.{n}\n"));
            }
        }
        if let Some(b) = batch {
            script.push_str(&b.commands());
        }
        let input = self.savedir.join(format!("{package}.batch"));
        // A scratch file: a crash leaves it to the next sync, which rewrites it.
        std::fs::write(&input, script.as_bytes())
            .map_err(|e| format!("cannot write {}: {e}", input.display()))?;
        let result = self
            .run(runner, &["-f", &input.to_string_lossy(), "batch"])
            .and_then(|_| self.export(runner, package))
            .and_then(|after| {
                let after = after.unwrap_or_default();
                if owner_part(&after) != owner_part(&before) {
                    return Err(format!(
                        "uci batch on {package} would change sections that are not sidenet's; nothing committed"
                    ));
                }
                let got: Vec<&ExportedSection> = after.iter().filter(|s| s.is_sidenet()).collect();
                if !got.iter().copied().eq(want.iter()) {
                    return Err(format!(
                        "uci did not take sidenet's {package} sections as rendered (an option uci refuses?); nothing committed. wanted:\n{}got:\n{}",
                        want.iter().map(|s| s.text.as_str()).collect::<String>(),
                        got.iter().map(|s| s.text.as_str()).collect::<String>()
                    ));
                }
                Ok(())
            })
            .and_then(|()| self.run(runner, &["commit", package]));
        let _ = std::fs::remove_file(&input);
        if let Err(e) = result {
            let _ = self.clear_changes();
            return Err(format!("{package}: {e}"));
        }
        self.clear_changes()?;
        Ok(true)
    }

    /// Removes sidenet's sections from the package and, where the owner's sections are still
    /// those of the pristine copy, restores the file byte for byte (or removes it, if sidenet
    /// created it).
    pub fn uninstall(&self, runner: &mut dyn Runner, package: &str) -> Result<Restored, String> {
        let copy = self.pristine.join(package);
        let absent = self.pristine.join(format!("{package}.absent"));
        let removed = self.sync(runner, package, None)?;
        let file = self.confdir.join(package);
        let restored = if absent.exists() {
            let now = self.export(runner, package)?.unwrap_or_default();
            if now.is_empty() {
                match std::fs::remove_file(&file) {
                    Ok(()) => Restored::Exactly,
                    Err(e) if e.kind() == std::io::ErrorKind::NotFound => Restored::Exactly,
                    Err(e) => return Err(format!("cannot remove {}: {e}", file.display())),
                }
            } else {
                Restored::OwnerChangesKept
            }
        } else if copy.exists() {
            use std::os::unix::fs::PermissionsExt;
            let saved = Uci {
                confdir: self.pristine.clone(),
                ..self.clone()
            };
            let then = saved.export(runner, package)?.unwrap_or_default();
            let now = self.export(runner, package)?.unwrap_or_default();
            if owner_part(&then) == owner_part(&now) && !then.iter().any(|s| s.is_sidenet()) {
                let bytes = std::fs::read(&copy)
                    .map_err(|e| format!("cannot read {}: {e}", copy.display()))?;
                let mode = std::fs::metadata(&copy)
                    .map(|m| m.permissions().mode() & 0o7777)
                    .map_err(|e| format!("cannot read {}: {e}", copy.display()))?;
                write_atomic(&file, &bytes, mode)
                    .map_err(|e| format!("cannot restore {}: {e}", file.display()))?;
                Restored::Exactly
            } else {
                Restored::OwnerChangesKept
            }
        } else if removed {
            Restored::OwnerChangesKept
        } else {
            Restored::Untouched
        };
        for p in [&copy, &absent] {
            match std::fs::remove_file(p) {
                Ok(()) => {}
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                Err(e) => return Err(format!("cannot remove {}: {e}", p.display())),
            }
        }
        Ok(restored)
    }
}

fn list(values: &[String]) -> String {
    let q: Vec<String> = values
        .iter()
        .map(|v| {
            if v.is_empty() {
                "not set".to_string()
            } else {
                quote(v)
            }
        })
        .collect();
    match q.len() {
        1 => q[0].clone(),
        _ => format!("one of {}", q.join(", ")),
    }
}

fn because(r: &Require) -> String {
    r.why
        .as_deref()
        .map(|w| format!(" ({w})"))
        .unwrap_or_default()
}

/// Whether a babeld package (its export) has an interface babeld would run on (an `interface`
/// section with an `ifname` that is not ignored): without one, babeld exits at once.
pub fn babeld_has_interface(sections: &[ExportedSection]) -> bool {
    sections.iter().any(|s| {
        s.kind() == "interface"
            && s.option("ifname").is_some_and(|i| !i.is_empty())
            && !matches!(
                s.option("ignore").as_deref(),
                Some("1" | "true" | "yes" | "on")
            )
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_the_batch_format() -> Result<(), String> {
        let text = "# sidenet batch\n\
            \n\
            require wireless.radio0.channel='36' # the mesh runs on 36\n\
            require wireless.radio0.disabled='' '0'\n\
            set wireless.sidenet_mesh=wifi-iface\n\
            set wireless.sidenet_mesh.device='radio0'\n\
            set wireless.sidenet_mesh.ssid='it'\\''s'\n\
            add_list wireless.sidenet_mesh.x='a b'\n\
            add_list wireless.sidenet_mesh.x='c'\n";
        let b = Batch::parse("wireless", text)?;
        assert_eq!(b.requires.len(), 2);
        assert_eq!(b.requires[0].allowed, ["36"]);
        assert_eq!(b.requires[0].why.as_deref(), Some("the mesh runs on 36"));
        assert_eq!(b.requires[1].allowed, ["", "0"]);
        assert_eq!(b.sections.len(), 1);
        assert_eq!(
            b.sections[0].options,
            [
                ("device".to_string(), Value::One("radio0".into())),
                ("ssid".to_string(), Value::One("it's".into())),
                ("x".to_string(), Value::List(vec!["a b".into(), "c".into()])),
            ]
        );
        assert_eq!(
            b.commands(),
            "set wireless.sidenet_mesh=wifi-iface\nset wireless.sidenet_mesh.device='radio0'\nset wireless.sidenet_mesh.ssid='it'\\''s'\nadd_list wireless.sidenet_mesh.x='a b'\nadd_list wireless.sidenet_mesh.x='c'\n"
        );
        assert_eq!(
            b.exported()[0].text,
            "config wifi-iface 'sidenet_mesh'\n\toption device 'radio0'\n\toption ssid 'it'\\''s'\n\tlist x 'a b'\n\tlist x 'c'\n"
        );
        Ok(())
    }

    #[test]
    fn refuses_anything_but_its_own_sections() {
        let bad = [
            (
                "network",
                "set network.lan.ipaddr='10.0.0.1'",
                "not sidenet's",
            ),
            ("network", "set network.lan=interface", "not sidenet's"),
            ("network", "delete network.lan", "expected `set`"),
            ("network", "set firewall.sidenet_x=zone", "names package"),
            (
                "network",
                "set network.sidenet_x.proto='static'",
                "before `set",
            ),
            (
                "network",
                "set network.sidenet_x=interface\nset network.sidenet_x.a='1'\nset network.sidenet_x.a='2'",
                "more than once",
            ),
            (
                "network",
                "set network.sidenet_x=interface\nset network.sidenet_x=interface",
                "declared twice",
            ),
            (
                "network",
                "set network.sidenet_x=interface\nset network.sidenet_x.a=unquoted",
                "single quotes",
            ),
            (
                "network",
                "set network.sidenet_x=interface\nset network.sidenet_x.a='open",
                "unterminated",
            ),
            (
                "network",
                "set network.sidenet-x=interface",
                "letters, digits",
            ),
            (
                "system",
                "set system.sidenet_x=system",
                "not one sidenet adds",
            ),
            ("network", "commit network", "expected `set"),
        ];
        for (pkg, text, want) in bad {
            let e = Batch::parse(pkg, text).err().unwrap_or_default();
            assert!(e.contains(want), "{text:?}: {e}");
        }
    }

    #[test]
    fn splits_exports_into_sections() {
        let text = "package firewall\n\nconfig defaults\n\toption syn_flood '1'\n\nconfig zone 'sidenet_zone'\n\toption name 'sidenet'\n\tlist network 'a'\n\n";
        let s = parse_export(text);
        assert_eq!(s.len(), 2);
        assert_eq!(s[0].name, None);
        assert_eq!(s[0].kind(), "defaults");
        assert!(!s[0].is_sidenet());
        assert!(s[1].is_sidenet());
        assert_eq!(s[1].option("name").as_deref(), Some("sidenet"));
        assert_eq!(s[1].option("network"), None);
    }

    #[test]
    fn knows_when_babeld_has_an_interface() {
        let stock = parse_export(
            "package babeld\n\nconfig general\n\toption ipv6_subtrees 'true'\n\nconfig interface\n\toption ignore 'true'\n\toption ifname 'wlan'\n\nconfig interface\n",
        );
        assert!(!babeld_has_interface(&stock));
        let ours = parse_export("config interface 'sidenet_x'\n\toption ifname 'sidenet_x'\n");
        assert!(babeld_has_interface(&ours));
    }
}
