//! Senders: swaks, Postfix's smtp-source, and a raw SMTP client for protocol
//! tests.

use std::io::{self, BufRead, BufReader, Write};
use std::net::{SocketAddr, TcpStream};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::time::Duration;

use crate::net::other_error;

/// Path of swaks from the Debian package.
const SWAKS_COMMAND: &str = "/usr/bin/swaks";

/// Path of Postfix's load generator from the Debian postfix package.
const SMTP_SOURCE_COMMAND: &str = "/usr/sbin/smtp-source";

/// Where swaks connects.
#[derive(Clone, Debug)]
enum Target {
    Socket(PathBuf),
    Server(SocketAddr),
}

/// One swaks run, built up with methods and started with [`Swaks::run`].
///
/// The content goes through `--data @file`. swaks (20201014) turns bare LF
/// into CRLF, dot-stuffs lines that start with a dot, and replaces tokens such
/// as `%DATE%`, so content that must arrive byte for byte should use CRLF and
/// avoid `%` tokens.
#[derive(Clone, Debug)]
pub struct Swaks {
    target: Target,
    from: String,
    to: Vec<String>,
    data: Option<Vec<u8>>,
    starttls: bool,
    ca_file: Option<PathBuf>,
    extra_args: Vec<String>,
}

impl Swaks {
    /// Starts building a session over the Unix socket at `path`, such as a lane
    /// socket.
    pub fn socket(path: &Path) -> Swaks {
        Swaks::new(Target::Socket(path.to_path_buf()))
    }

    /// Starts building a session over TCP to `addr`.
    pub fn server(addr: SocketAddr) -> Swaks {
        Swaks::new(Target::Server(addr))
    }

    fn new(target: Target) -> Swaks {
        Swaks {
            target,
            from: "sender@caduceus.test".to_string(),
            to: Vec::new(),
            data: None,
            starttls: false,
            ca_file: None,
            extra_args: Vec::new(),
        }
    }

    /// Sets the envelope sender.
    pub fn from(mut self, address: &str) -> Swaks {
        self.from = address.to_string();
        self
    }

    /// Adds an envelope recipient.
    pub fn to(mut self, address: &str) -> Swaks {
        self.to.push(address.to_string());
        self
    }

    /// Sets the message content; without it swaks sends its own test message.
    pub fn data(mut self, content: &[u8]) -> Swaks {
        self.data = Some(content.to_vec());
        self
    }

    /// Requires STARTTLS (`--tls`), verifying the server against `ca_file`
    /// when given.
    pub fn starttls(mut self, ca_file: Option<&Path>) -> Swaks {
        self.starttls = true;
        self.ca_file = ca_file.map(Path::to_path_buf);
        self
    }

    /// Appends raw swaks arguments, such as `--quit-after RCPT`.
    pub fn arg(mut self, argument: &str) -> Swaks {
        self.extra_args.push(argument.to_string());
        self
    }

    /// Runs swaks and returns its output; the transcript is on stdout. A
    /// failed SMTP transaction is a non-zero exit status, not an `Err`.
    pub fn run(&self) -> io::Result<Output> {
        let data_file = tempfile::NamedTempFile::new()?;
        let mut command = Command::new(SWAKS_COMMAND);
        match &self.target {
            Target::Socket(path) => command.arg("--socket").arg(path),
            Target::Server(addr) => command.arg("--server").arg(addr.to_string()),
        };
        command.arg("--from").arg(&self.from);
        if !self.to.is_empty() {
            command.arg("--to").arg(self.to.join(","));
        }
        if let Some(content) = &self.data {
            let mut file_content = content.clone();
            // swaks ends the data with CRLF "." CRLF unless the data already
            // ends with a dot line, so content that ends with a line ending
            // would gain an empty line.
            if file_content.ends_with(b"\n") {
                file_content.extend_from_slice(b".\r\n");
            }
            std::fs::write(data_file.path(), file_content)?;
            command
                .arg("--data")
                .arg(format!("@{}", data_file.path().display()));
        }
        if self.starttls {
            command.arg("--tls");
            if let Some(ca_file) = &self.ca_file {
                command
                    .arg("--tls-verify")
                    .arg("--tls-ca-path")
                    .arg(ca_file);
            }
        }
        command.args(&self.extra_args);
        command.output().map_err(|error| {
            other_error(format!(
                "running {SWAKS_COMMAND} failed: {error}; install the swaks package"
            ))
        })
    }
}

/// Settings of one smtp-source run; see smtp-source(1).
#[derive(Clone, Debug)]
pub struct SmtpSourceOptions {
    /// Messages to send in total (`-m`).
    pub messages: u32,
    /// Parallel sessions (`-s`).
    pub sessions: u32,
    /// Content size in bytes (`-l`).
    pub message_size_bytes: u32,
    /// Envelope sender (`-f`).
    pub from: String,
    /// Envelope recipient (`-t`).
    pub to: String,
    /// Recipients per message (`-r`); smtp-source numbers them.
    pub recipients_per_message: u32,
    /// Send `QUIT` after each message and open a new session (`-d`).
    pub disconnect_after_message: bool,
}

impl Default for SmtpSourceOptions {
    fn default() -> SmtpSourceOptions {
        SmtpSourceOptions {
            messages: 1,
            sessions: 1,
            message_size_bytes: 1024,
            from: "sender@caduceus.test".to_string(),
            to: "recipient@example.test".to_string(),
            recipients_per_message: 1,
            disconnect_after_message: false,
        }
    }
}

/// Runs Postfix's smtp-source against `target`, which is `host:port` or
/// `unix:/path/to/socket`.
pub fn smtp_source(target: &str, options: &SmtpSourceOptions) -> io::Result<Output> {
    let mut command = Command::new(SMTP_SOURCE_COMMAND);
    command
        .arg("-m")
        .arg(options.messages.to_string())
        .arg("-s")
        .arg(options.sessions.to_string())
        .arg("-l")
        .arg(options.message_size_bytes.to_string())
        .arg("-f")
        .arg(&options.from)
        .arg("-t")
        .arg(&options.to)
        .arg("-r")
        .arg(options.recipients_per_message.to_string());
    if options.disconnect_after_message {
        command.arg("-d");
    }
    command.arg(target);
    command.output().map_err(|error| {
        other_error(format!(
            "running {SMTP_SOURCE_COMMAND} failed: {error}; install the postfix package"
        ))
    })
}

/// An SMTP reply: the code and the text of each line.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Reply {
    pub code: u16,
    pub lines: Vec<String>,
}

impl Reply {
    /// Returns the text of all lines joined with `\n`.
    pub fn text(&self) -> String {
        self.lines.join("\n")
    }
}

/// A minimal SMTP client for protocol tests: it sends exactly the bytes given
/// and parses replies, and does nothing else (no dot-stuffing, no pipelining
/// rules).
pub struct SmtpClient {
    reader: BufReader<Box<dyn ReadWrite>>,
}

trait ReadWrite: io::Read + io::Write + Send {}
impl<T: io::Read + io::Write + Send> ReadWrite for T {}

/// How long `read_reply` waits before failing.
const CLIENT_READ_TIMEOUT: Duration = Duration::from_secs(30);

impl SmtpClient {
    /// Connects to a Unix socket, such as a lane socket.
    pub fn connect_unix(path: &Path) -> io::Result<SmtpClient> {
        let stream = UnixStream::connect(path)
            .map_err(|error| other_error(format!("connect to {}: {error}", path.display())))?;
        stream.set_read_timeout(Some(CLIENT_READ_TIMEOUT))?;
        Ok(SmtpClient {
            reader: BufReader::new(Box::new(stream)),
        })
    }

    /// Connects over TCP.
    pub fn connect_tcp(addr: SocketAddr) -> io::Result<SmtpClient> {
        let stream = TcpStream::connect(addr)
            .map_err(|error| other_error(format!("connect to {addr}: {error}")))?;
        stream.set_read_timeout(Some(CLIENT_READ_TIMEOUT))?;
        Ok(SmtpClient {
            reader: BufReader::new(Box::new(stream)),
        })
    }

    /// Sends `line` followed by CRLF.
    pub fn send_line(&mut self, line: &str) -> io::Result<()> {
        let stream = self.reader.get_mut();
        stream.write_all(line.as_bytes())?;
        stream.write_all(b"\r\n")?;
        stream.flush()
    }

    /// Sends `bytes` exactly as given, in one write.
    pub fn send_raw(&mut self, bytes: &[u8]) -> io::Result<()> {
        let stream = self.reader.get_mut();
        stream.write_all(bytes)?;
        stream.flush()
    }

    /// Reads one reply, multi-line replies included (RFC 5321 §4.2.1).
    pub fn read_reply(&mut self) -> io::Result<Reply> {
        let mut lines = Vec::new();
        loop {
            let mut line = String::new();
            if self.reader.read_line(&mut line)? == 0 {
                return Err(io::Error::new(
                    io::ErrorKind::UnexpectedEof,
                    format!("connection closed after reply lines {lines:?}"),
                ));
            }
            let line = line.trim_end_matches(['\r', '\n']);
            let code: u16 = line
                .get(..3)
                .and_then(|digits| digits.parse().ok())
                .ok_or_else(|| other_error(format!("malformed reply line {line:?}")))?;
            let separator = line.as_bytes().get(3).copied();
            lines.push(line.get(4..).unwrap_or("").to_string());
            match separator {
                Some(b'-') => continue,
                None | Some(b' ') => return Ok(Reply { code, lines }),
                Some(_) => return Err(other_error(format!("malformed reply line {line:?}"))),
            }
        }
    }

    /// Sends `line` and reads the reply.
    pub fn command(&mut self, line: &str) -> io::Result<Reply> {
        self.send_line(line)?;
        self.read_reply()
    }
}
