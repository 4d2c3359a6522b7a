//! The SSH side: connect, check the host key against the pins, log in, run shell scripts (with
//! an optional stream on their standard input). Blocking, on `ssh2` (libssh2).

use std::io::{Read, Write};
use std::net::{TcpStream, ToSocketAddrs};
use std::path::PathBuf;
use std::time::Duration;

use ssh2::{MethodType, Session};

use crate::install::shell_quote;
use crate::knownhosts::{Check, HostKey, KnownHosts};

/// How to log in.
#[derive(Clone)]
pub enum Credential {
    /// An OpenSSH private key in a file.
    KeyFile(PathBuf),
    /// A password in a file (first line).
    PasswordFile(PathBuf),
    /// A private key held in memory (from a Secret), and where it came from.
    Key {
        /// PEM text.
        pem: String,
        /// `Secret/name key`, for messages.
        from: String,
    },
    /// A password held in memory (from a Secret), and where it came from.
    Password {
        /// The password.
        password: String,
        /// `Secret/name key`, for messages.
        from: String,
    },
}

impl std::fmt::Debug for Credential {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.describe())
    }
}

impl Credential {
    /// What kind of credential and where it comes from, never the secret itself.
    pub fn describe(&self) -> String {
        match self {
            Self::KeyFile(p) => format!("private key {}", p.display()),
            Self::PasswordFile(p) => format!("password from {}", p.display()),
            Self::Key { from, .. } => format!("private key from {from}"),
            Self::Password { from, .. } => format!("password from {from}"),
        }
    }
}

/// The outcome of checking a host key.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum KeyOutcome {
    /// It matched a pin.
    Known,
    /// It was unknown and has been pinned now (trust on first use): `TYPE SHA256:...`.
    Pinned(String),
}

/// A step of a connection that failed, with what the server or the system said.
#[derive(Debug, thiserror::Error)]
pub enum SshError {
    /// No TCP connection.
    #[error("connect to {addr}: {message}")]
    Connect {
        /// host:port.
        addr: String,
        /// Why.
        message: String,
    },
    /// The SSH handshake failed.
    #[error("SSH handshake with {addr} failed: {message}")]
    Handshake {
        /// host:port.
        addr: String,
        /// Why.
        message: String,
    },
    /// The host key differs from the pinned one.
    #[error(
        "HOST KEY CHANGED for {host}: it presented {kind} {got}, but {pinned} is pinned in {file}; aborted before logging in. If the host was really reinstalled, remove its line from {file} and run again with --accept-new-host-keys"
    )]
    HostKeyChanged {
        /// known_hosts pattern.
        host: String,
        /// Presented key type.
        kind: String,
        /// Presented fingerprint.
        got: String,
        /// Pinned keys.
        pinned: String,
        /// known_hosts file.
        file: String,
    },
    /// The host key is not pinned and trust on first use is off.
    #[error(
        "host key of {host} is not known ({kind} {got}); pin it with hostKey in the inventory or in {file}, or allow trust on first use (--accept-new-host-keys)"
    )]
    HostKeyUnknown {
        /// known_hosts pattern.
        host: String,
        /// Presented key type.
        kind: String,
        /// Presented fingerprint.
        got: String,
        /// known_hosts file.
        file: String,
    },
    /// The pinned key could not be written.
    #[error("cannot pin the host key: {0}")]
    Pin(String),
    /// Authentication failed.
    #[error("authentication as {user} with {credential} failed: {message}")]
    Auth {
        /// User.
        user: String,
        /// What was offered.
        credential: String,
        /// Why.
        message: String,
    },
    /// A credential could not be read.
    #[error("cannot read the {credential}: {message}")]
    Credential {
        /// Which.
        credential: String,
        /// Why.
        message: String,
    },
    /// A remote command could not be run.
    #[error("{what}: {message}")]
    Exec {
        /// What was being done.
        what: String,
        /// Why.
        message: String,
    },
}

/// What a remote script returned.
#[derive(Debug, Clone, Default)]
pub struct Output {
    /// Exit status.
    pub status: i32,
    /// Standard output.
    pub stdout: String,
    /// Standard error.
    pub stderr: String,
}

impl Output {
    /// The exit status, or a message with the script's error output.
    pub fn check(self, what: &str) -> Result<Output, SshError> {
        if self.status == 0 {
            return Ok(self);
        }
        let detail = if self.stderr.trim().is_empty() {
            self.stdout.trim()
        } else {
            self.stderr.trim()
        };
        let detail: String = detail.chars().take(600).collect();
        Err(SshError::Exec {
            what: what.to_string(),
            message: format!("exit status {}: {detail}", self.status),
        })
    }
}

/// A logged-in SSH connection.
pub struct Conn {
    sess: Session,
}

/// The address and settings of one host.
#[derive(Debug, Clone)]
pub struct Endpoint<'a> {
    /// Host name or address.
    pub host: &'a str,
    /// Port.
    pub port: u16,
    /// Host key pinned by the inventory, if any.
    pub host_key: Option<&'a HostKey>,
    /// Whether an unknown key may be pinned now.
    pub trust_on_first_use: bool,
    /// TCP connect and per-operation timeout.
    pub timeout: Duration,
}

fn ssh_msg(e: &ssh2::Error) -> String {
    e.message().to_string()
}

fn algorithms_for(kind: &str) -> &str {
    match kind {
        "ssh-rsa" => "rsa-sha2-512,rsa-sha2-256,ssh-rsa",
        other => other,
    }
}

/// Connects, verifies the host key and returns the unauthenticated session.
pub fn connect(ep: &Endpoint<'_>, known: &KnownHosts) -> Result<(Conn, KeyOutcome), SshError> {
    let addr = format!("{}:{}", ep.host, ep.port);
    let conn_err = |message: String| SshError::Connect {
        addr: addr.clone(),
        message,
    };
    let addrs: Vec<_> = (ep.host, ep.port)
        .to_socket_addrs()
        .map_err(|e| conn_err(format!("cannot resolve: {e}")))?
        .collect();
    let mut last = None;
    let mut tcp = None;
    for a in addrs {
        match TcpStream::connect_timeout(&a, ep.timeout) {
            Ok(s) => {
                tcp = Some(s);
                break;
            }
            Err(e) => last = Some(e),
        }
    }
    let tcp = tcp.ok_or_else(|| {
        conn_err(match last {
            Some(e) if e.kind() == std::io::ErrorKind::ConnectionRefused => {
                "connection refused (no SSH server on this port?)".into()
            }
            Some(e) if e.kind() == std::io::ErrorKind::TimedOut => {
                format!("no answer within {:?}", ep.timeout)
            }
            Some(e) => e.to_string(),
            None => "the name resolves to no address".into(),
        })
    })?;
    let hs = |e: ssh2::Error| SshError::Handshake {
        addr: addr.clone(),
        message: ssh_msg(&e),
    };
    let mut sess = Session::new().map_err(hs)?;
    sess.set_tcp_stream(tcp);
    sess.set_timeout(u32::try_from(ep.timeout.as_millis()).unwrap_or(u32::MAX));
    // Ask for the key types already pinned, like OpenSSH does, so a host with several keys
    // does not look changed.
    let mut kinds: Vec<String> = ep
        .host_key
        .map(|k| vec![k.kind.clone()])
        .unwrap_or_default();
    if kinds.is_empty() {
        kinds = known.kinds(ep.host, ep.port);
    }
    if !kinds.is_empty() {
        let pref: Vec<&str> = kinds.iter().map(|k| algorithms_for(k)).collect();
        sess.method_pref(MethodType::HostKey, &pref.join(","))
            .map_err(hs)?;
    }
    sess.handshake().map_err(hs)?;
    let (blob, _) = sess.host_key().ok_or_else(|| SshError::Handshake {
        addr: addr.clone(),
        message: "the server sent no host key".into(),
    })?;
    let key = HostKey::from_blob(blob).map_err(|message| SshError::Handshake {
        addr: addr.clone(),
        message,
    })?;
    let pattern = crate::knownhosts::host_pattern(ep.host, ep.port);
    let file = known.path().display().to_string();
    let changed = |pinned: Vec<HostKey>, file: String| SshError::HostKeyChanged {
        host: pattern.clone(),
        kind: key.kind.clone(),
        got: key.fingerprint(),
        pinned: pinned
            .iter()
            .map(|k| format!("{} {}", k.kind, k.fingerprint()))
            .collect::<Vec<_>>()
            .join(", "),
        file,
    };
    if let Some(pinned) = ep.host_key {
        return if *pinned == key {
            Ok((Conn { sess }, KeyOutcome::Known))
        } else {
            Err(changed(vec![pinned.clone()], "the inventory".into()))
        };
    }
    match known.check(ep.host, ep.port, &key) {
        Check::Match => Ok((Conn { sess }, KeyOutcome::Known)),
        Check::Changed { pinned } => Err(changed(pinned, file)),
        Check::Unknown if ep.trust_on_first_use => {
            known
                .add(ep.host, ep.port, &key)
                .map_err(|e| SshError::Pin(e.to_string()))?;
            let fp = format!("{} {}", key.kind, key.fingerprint());
            Ok((Conn { sess }, KeyOutcome::Pinned(fp)))
        }
        Check::Unknown => Err(SshError::HostKeyUnknown {
            host: pattern,
            kind: key.kind.clone(),
            got: key.fingerprint(),
            file,
        }),
    }
}

impl Conn {
    /// Logs in: first with the SSH `none` method, which a factory-fresh OpenWrt router (dropbear
    /// with a blank root password) accepts, then with `cred`. Returns the method that worked:
    /// `none`, `publickey` or `password`.
    pub fn login(&self, user: &str, cred: Option<&Credential>) -> Result<&'static str, SshError> {
        // Asking for the methods is the `none` request; a server that lets the user in without
        // credentials answers it with success.
        let offered = self.sess.auth_methods(user).map(str::to_string);
        if self.sess.authenticated() {
            return Ok("none");
        }
        let offered = offered.unwrap_or_default();
        let Some(cred) = cred else {
            return Err(SshError::Auth {
                user: user.to_string(),
                credential: "no credentials".into(),
                message: format!(
                    "the server does not let {user} in without them (it accepts: {}); give privateKeyFile or passwordFile (CLI) or a Secret reference",
                    if offered.is_empty() {
                        "nothing"
                    } else {
                        offered.as_str()
                    }
                ),
            });
        };
        let credential = cred.describe();
        let read = |p: &PathBuf| {
            std::fs::read_to_string(p).map_err(|e| SshError::Credential {
                credential: credential.clone(),
                message: e.to_string(),
            })
        };
        let auth = |e: ssh2::Error| {
            let offered = if offered.is_empty() {
                String::new()
            } else {
                format!(" (the server accepts: {offered})")
            };
            SshError::Auth {
                user: user.to_string(),
                credential: credential.clone(),
                message: format!("{}{offered}", ssh_msg(&e)),
            }
        };
        let method = match cred {
            Credential::KeyFile(p) => {
                let pem = read(p)?;
                self.sess
                    .userauth_pubkey_memory(user, None, &pem, None)
                    .map_err(auth)?;
                "publickey"
            }
            Credential::Key { pem, .. } => {
                self.sess
                    .userauth_pubkey_memory(user, None, pem, None)
                    .map_err(auth)?;
                "publickey"
            }
            Credential::PasswordFile(p) => {
                let text = read(p)?;
                let pw = text.lines().next().unwrap_or_default();
                self.sess.userauth_password(user, pw).map_err(auth)?;
                "password"
            }
            Credential::Password { password, .. } => {
                self.sess.userauth_password(user, password).map_err(auth)?;
                "password"
            }
        };
        if self.sess.authenticated() {
            Ok(method)
        } else {
            Err(SshError::Auth {
                user: user.to_string(),
                credential,
                message: "the server did not accept it".into(),
            })
        }
    }

    /// Runs a POSIX sh script (whatever the login shell is) and collects its output.
    pub fn run(&self, what: &str, script: &str) -> Result<Output, SshError> {
        self.run_with_input(what, script, None)
    }

    /// Runs a script with `input` streamed to its standard input.
    pub fn run_with_input(
        &self,
        what: &str,
        script: &str,
        input: Option<&mut dyn Read>,
    ) -> Result<Output, SshError> {
        let err = |e: String| SshError::Exec {
            what: what.to_string(),
            message: e,
        };
        let mut ch = self.sess.channel_session().map_err(|e| err(ssh_msg(&e)))?;
        ch.exec(&format!("sh -c {}", shell_quote(script)))
            .map_err(|e| err(ssh_msg(&e)))?;
        // When the script stops reading early (it failed), its exit status and error output
        // say why better than the broken write does.
        let mut send_err = None;
        if let Some(input) = input {
            let mut buf = vec![0u8; 64 * 1024];
            loop {
                let n = input.read(&mut buf).map_err(|e| err(e.to_string()))?;
                if n == 0 {
                    break;
                }
                if let Err(e) = ch.write_all(&buf[..n]) {
                    send_err = Some(e);
                    break;
                }
            }
        }
        if let Err(e) = ch.send_eof()
            && send_err.is_none()
        {
            return Err(err(ssh_msg(&e)));
        }
        let mut stdout = String::new();
        ch.read_to_string(&mut stdout)
            .map_err(|e| err(format!("reading output: {e}")))?;
        let mut stderr = String::new();
        ch.stderr()
            .read_to_string(&mut stderr)
            .map_err(|e| err(format!("reading error output: {e}")))?;
        ch.wait_close().map_err(|e| err(ssh_msg(&e)))?;
        let status = ch.exit_status().map_err(|e| err(ssh_msg(&e)))?;
        if let Some(e) = send_err
            && status == 0
        {
            return Err(err(format!("sending data: {e}")));
        }
        Ok(Output {
            status,
            stdout,
            stderr,
        })
    }
}
