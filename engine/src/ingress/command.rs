//! Parsing of SMTP command lines received on the submission sockets.
//!
//! The parser takes one command line without its CRLF and returns either a
//! [`Command`] or the [`Reply`] that rejects it. It never allocates more than
//! the line itself, and the caller bounds the line length.

use std::net::{Ipv4Addr, Ipv6Addr};

use crate::smtp::{EnhancedStatus, Reply};

/// RFC 3461 §4.1: the NOTIFY keywords, as bits of [`RcptCommand::notify`].
pub const NOTIFY_SUCCESS: u8 = 1;
pub const NOTIFY_FAILURE: u8 = 2;
pub const NOTIFY_DELAY: u8 = 4;
pub const NOTIFY_NEVER: u8 = 8;

/// RFC 3461 §4.4: an ENVID value is at most 100 characters.
const MAX_ENVID_CHARS: usize = 100;

/// A parsed command line.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Command {
    Ehlo(String),
    Helo(String),
    Mail(MailCommand),
    Rcpt(RcptCommand),
    Data,
    Rset,
    Noop,
    Quit,
    Vrfy,
    Help,
    /// A command that RFC 5321 or a registered extension defines but this
    /// server does not offer (STARTTLS, AUTH, EXPN, BDAT, ETRN, TURN).
    NotImplemented(&'static str),
}

/// The BODY parameter of MAIL (RFC 6152 §2).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum BodyType {
    SevenBit,
    EightBitMime,
}

/// The RET parameter of MAIL (RFC 3461 §4.3).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ReturnContent {
    Full,
    Headers,
}

/// A mailbox from a reverse-path or forward-path.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Mailbox {
    /// `local-part@domain` exactly as received: case and quoting preserved,
    /// without the angle brackets and without any source route.
    pub address: String,
    /// The domain as a lowercase A-label, or the address literal in
    /// lowercase with its brackets.
    pub domain: String,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct MailCommand {
    /// `None` for the null reverse-path `<>`.
    pub sender: Option<Mailbox>,
    /// The SIZE parameter in bytes (RFC 1870).
    pub declared_size_bytes: Option<u64>,
    pub body: Option<BodyType>,
    pub smtputf8: bool,
    pub ret: Option<ReturnContent>,
    /// The ENVID parameter after xtext decoding.
    pub envid: Option<String>,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RcptCommand {
    pub recipient: Mailbox,
    /// NOTIFY bits (`NOTIFY_*`); 0 when the parameter is absent.
    pub notify: u8,
    /// The ORCPT parameter as `addr-type;address`, the address decoded from
    /// xtext.
    pub orcpt: Option<String>,
}

fn reply(code: u16, class: u8, subject: u16, detail: u16, text: &str) -> Reply {
    Reply::new(code, EnhancedStatus::new(class, subject, detail), text)
}

fn syntax_error(text: &str) -> Reply {
    reply(501, 5, 5, 4, text)
}

/// Parses one command line, CRLF removed. `smtputf8` is whether the current
/// transaction's MAIL carried SMTPUTF8, which decides whether a RCPT address
/// may contain UTF-8 (RFC 6531 §3.4).
pub fn parse_command(line: &[u8], smtputf8: bool) -> Result<Command, Reply> {
    let Ok(line) = std::str::from_utf8(line) else {
        return Err(reply(
            500,
            5,
            5,
            2,
            "Syntax error: command line is not valid UTF-8",
        ));
    };
    let (verb, argument) = match line.find(' ') {
        Some(index) => (&line[..index], &line[index + 1..]),
        None => (line, ""),
    };
    let verb = verb.to_ascii_uppercase();
    match verb.as_str() {
        "EHLO" => parse_client_name(argument).map(Command::Ehlo),
        "HELO" => parse_client_name(argument).map(Command::Helo),
        "MAIL" => parse_mail(line).map(Command::Mail),
        "RCPT" => parse_rcpt(line, smtputf8).map(Command::Rcpt),
        "DATA" => no_argument(argument, Command::Data),
        "RSET" => no_argument(argument, Command::Rset),
        "QUIT" => no_argument(argument, Command::Quit),
        // RFC 5321 §4.1.1.9: NOOP may carry a string, which is ignored.
        "NOOP" => Ok(Command::Noop),
        "VRFY" => Ok(Command::Vrfy),
        "HELP" => Ok(Command::Help),
        "STARTTLS" => Ok(Command::NotImplemented("STARTTLS")),
        "AUTH" => Ok(Command::NotImplemented("AUTH")),
        "EXPN" => Ok(Command::NotImplemented("EXPN")),
        "BDAT" => Ok(Command::NotImplemented("BDAT")),
        "ETRN" => Ok(Command::NotImplemented("ETRN")),
        "TURN" => Ok(Command::NotImplemented("TURN")),
        _ => Err(reply(500, 5, 5, 2, "Syntax error: command not recognized")),
    }
}

fn no_argument(argument: &str, command: Command) -> Result<Command, Reply> {
    if argument.trim_matches(' ').is_empty() {
        Ok(command)
    } else {
        Err(syntax_error(
            "Syntax error: this command takes no parameters",
        ))
    }
}

/// Checks the EHLO/HELO argument. It ends up in the Received header, so only
/// the characters of a domain or an address literal are accepted.
fn parse_client_name(argument: &str) -> Result<String, Reply> {
    let name = argument.trim_matches(' ');
    let valid = !name.is_empty()
        && name.len() <= 255
        && name.bytes().all(|byte| {
            byte.is_ascii_alphanumeric() || matches!(byte, b'-' | b'.' | b'_' | b':' | b'[' | b']')
        });
    if valid {
        Ok(name.to_string())
    } else {
        Err(syntax_error(
            "Syntax error: EHLO and HELO need a domain or address literal",
        ))
    }
}

/// Splits `MAIL FROM:` / `RCPT TO:` from the path. One or more spaces after
/// the colon are tolerated although RFC 5321 §3.3 forbids them, because many
/// submitting clients send `MAIL FROM: <a@b>`.
fn strip_keyword<'a>(line: &'a str, keyword: &str) -> Option<&'a str> {
    let head = line.get(..keyword.len())?;
    if !head.eq_ignore_ascii_case(keyword) {
        return None;
    }
    Some(line[keyword.len()..].trim_start_matches(' '))
}

/// Splits `<path> params` into the text between the brackets and the
/// parameter text. Angle brackets inside a quoted local part do not end the
/// path.
fn split_path(text: &str) -> Result<(&str, &str), Reply> {
    let Some(inner) = text.strip_prefix('<') else {
        return Err(syntax_error(
            "Syntax error: the address must be enclosed in <>",
        ));
    };
    let bytes = inner.as_bytes();
    let mut in_quotes = false;
    let mut index = 0;
    while index < bytes.len() {
        match bytes[index] {
            b'\\' if in_quotes => index += 1,
            b'"' => in_quotes = !in_quotes,
            b'>' if !in_quotes => {
                let rest = &inner[index + 1..];
                if !rest.is_empty() && !rest.starts_with(' ') {
                    return Err(syntax_error(
                        "Syntax error: expected a space after the address",
                    ));
                }
                return Ok((&inner[..index], rest.trim_matches(' ')));
            }
            _ => {}
        }
        index += 1;
    }
    Err(syntax_error(
        "Syntax error: the address must be enclosed in <>",
    ))
}

/// Splits ESMTP parameters into uppercase keywords and raw values.
fn parse_parameters(text: &str) -> Result<Vec<(String, Option<&str>)>, Reply> {
    let mut parameters: Vec<(String, Option<&str>)> = Vec::new();
    for item in text.split(' ').filter(|item| !item.is_empty()) {
        let (keyword, value) = match item.find('=') {
            Some(index) => (&item[..index], Some(&item[index + 1..])),
            None => (item, None),
        };
        // RFC 5321 §4.1.2: esmtp-keyword = (ALPHA / DIGIT) *(ALPHA / DIGIT / "-").
        let keyword_valid = keyword
            .bytes()
            .next()
            .is_some_and(|first| first.is_ascii_alphanumeric())
            && keyword
                .bytes()
                .all(|byte| byte.is_ascii_alphanumeric() || byte == b'-');
        if !keyword_valid {
            return Err(syntax_error("Syntax error: invalid parameter"));
        }
        let keyword = keyword.to_ascii_uppercase();
        if parameters.iter().any(|(existing, _)| *existing == keyword) {
            return Err(syntax_error("Syntax error: duplicate parameter"));
        }
        parameters.push((keyword, value));
    }
    Ok(parameters)
}

fn unknown_parameter() -> Reply {
    // RFC 5321 §4.2.3: 555 means MAIL or RCPT parameters not recognized.
    reply(555, 5, 5, 4, "Unsupported parameter")
}

fn required_value(value: Option<&str>) -> Result<&str, Reply> {
    match value {
        Some(value) if !value.is_empty() => Ok(value),
        _ => Err(syntax_error("Syntax error: parameter needs a value")),
    }
}

/// Decodes xtext (RFC 3461 §4): printable ASCII except `+` and `=`, and
/// `+HH` for any octet. A decoded CR, LF or NUL is rejected, because such a
/// value could split a line-oriented record or header later on.
pub fn decode_xtext(text: &str) -> Result<String, Reply> {
    let bytes = text.as_bytes();
    let mut decoded = Vec::with_capacity(bytes.len());
    let mut index = 0;
    while index < bytes.len() {
        let byte = bytes[index];
        if byte == b'+' {
            let hex = bytes
                .get(index + 1..index + 3)
                .filter(|pair| pair.iter().all(|b| matches!(b, b'0'..=b'9' | b'A'..=b'F')));
            let Some(hex) = hex else {
                return Err(syntax_error("Syntax error: invalid xtext encoding"));
            };
            let value = (hex_value(hex[0]) << 4) | hex_value(hex[1]);
            decoded.push(value);
            index += 3;
        } else if (b'!'..=b'~').contains(&byte) && byte != b'=' {
            decoded.push(byte);
            index += 1;
        } else {
            return Err(syntax_error("Syntax error: invalid xtext encoding"));
        }
    }
    if decoded.iter().any(|byte| matches!(byte, b'\r' | b'\n' | 0)) {
        return Err(syntax_error(
            "Syntax error: encoded CR, LF or NUL in parameter",
        ));
    }
    // RFC 3461 §4.2 and §4.4: ORCPT and ENVID carry printable US-ASCII only.
    if decoded.iter().any(|byte| !(b' '..=b'~').contains(byte)) {
        return Err(syntax_error(
            "Syntax error: parameter is not printable US-ASCII",
        ));
    }
    // Every byte is printable ASCII, checked just above.
    Ok(decoded.into_iter().map(char::from).collect())
}

fn hex_value(digit: u8) -> u8 {
    match digit {
        b'0'..=b'9' => digit - b'0',
        _ => digit - b'A' + 10,
    }
}

fn parse_mail(line: &str) -> Result<MailCommand, Reply> {
    let Some(text) = strip_keyword(line, "MAIL FROM:") else {
        return Err(syntax_error("Syntax error: expected MAIL FROM:<address>"));
    };
    let (path, parameter_text) = split_path(text)?;
    let mut command = MailCommand {
        sender: None,
        declared_size_bytes: None,
        body: None,
        smtputf8: false,
        ret: None,
        envid: None,
    };
    let parameters = parse_parameters(parameter_text)?;
    // Xtext values are checked before anything else, so that an encoded CR
    // or LF always gets 501 5.5.4, whatever else the line contains.
    for (keyword, value) in &parameters {
        if matches!(keyword.as_str(), "ENVID" | "AUTH") {
            decode_xtext(required_value(*value)?)?;
        }
    }
    for (keyword, value) in parameters {
        match keyword.as_str() {
            "SIZE" => {
                let value = required_value(value)?;
                // RFC 1870 §3: size-value = 1*20DIGIT.
                if value.len() > 20 || !value.bytes().all(|byte| byte.is_ascii_digit()) {
                    return Err(syntax_error("Syntax error: invalid SIZE value"));
                }
                let size = value.parse::<u64>().unwrap_or(u64::MAX);
                command.declared_size_bytes = Some(size);
            }
            "BODY" => {
                let value = required_value(value)?;
                command.body = Some(if value.eq_ignore_ascii_case("7BIT") {
                    BodyType::SevenBit
                } else if value.eq_ignore_ascii_case("8BITMIME") {
                    BodyType::EightBitMime
                } else {
                    return Err(unknown_parameter());
                });
            }
            "SMTPUTF8" => {
                if value.is_some() {
                    return Err(syntax_error("Syntax error: SMTPUTF8 takes no value"));
                }
                command.smtputf8 = true;
            }
            "RET" => {
                let value = required_value(value)?;
                command.ret = Some(if value.eq_ignore_ascii_case("FULL") {
                    ReturnContent::Full
                } else if value.eq_ignore_ascii_case("HDRS") {
                    ReturnContent::Headers
                } else {
                    return Err(syntax_error("Syntax error: RET must be FULL or HDRS"));
                });
            }
            "ENVID" => {
                let envid = decode_xtext(required_value(value)?)?;
                if envid.len() > MAX_ENVID_CHARS {
                    return Err(syntax_error(
                        "Syntax error: ENVID is longer than 100 characters",
                    ));
                }
                command.envid = Some(envid);
            }
            _ => return Err(unknown_parameter()),
        }
    }
    if !path.is_empty() {
        command.sender = Some(parse_path(path, command.smtputf8, AddressRole::Sender)?);
    }
    Ok(command)
}

fn parse_rcpt(line: &str, smtputf8: bool) -> Result<RcptCommand, Reply> {
    let Some(text) = strip_keyword(line, "RCPT TO:") else {
        return Err(syntax_error("Syntax error: expected RCPT TO:<address>"));
    };
    let (path, parameter_text) = split_path(text)?;
    let parameters = parse_parameters(parameter_text)?;
    let mut notify = 0;
    let mut orcpt = None;
    for (keyword, value) in &parameters {
        if keyword == "ORCPT" {
            orcpt = Some(parse_orcpt(required_value(*value)?)?);
        }
    }
    for (keyword, value) in parameters {
        match keyword.as_str() {
            "NOTIFY" => notify = parse_notify(required_value(value)?)?,
            "ORCPT" => {}
            _ => return Err(unknown_parameter()),
        }
    }
    // RFC 5321 §4.1.1.3: the postmaster forward-path without a domain.
    if path.eq_ignore_ascii_case("postmaster") {
        return Err(reply(
            550,
            5,
            1,
            1,
            "This service relays only; send to postmaster@<domain>",
        ));
    }
    if path.is_empty() {
        return Err(reply(553, 5, 1, 3, "Invalid recipient address: empty path"));
    }
    let recipient = parse_path(path, smtputf8, AddressRole::Recipient)?;
    Ok(RcptCommand {
        recipient,
        notify,
        orcpt,
    })
}

/// RFC 3461 §4.1: NEVER alone, or a comma list of SUCCESS, FAILURE, DELAY.
fn parse_notify(value: &str) -> Result<u8, Reply> {
    let mut bits = 0;
    for keyword in value.split(',') {
        bits |= if keyword.eq_ignore_ascii_case("NEVER") {
            NOTIFY_NEVER
        } else if keyword.eq_ignore_ascii_case("SUCCESS") {
            NOTIFY_SUCCESS
        } else if keyword.eq_ignore_ascii_case("FAILURE") {
            NOTIFY_FAILURE
        } else if keyword.eq_ignore_ascii_case("DELAY") {
            NOTIFY_DELAY
        } else {
            return Err(syntax_error("Syntax error: invalid NOTIFY keyword"));
        };
    }
    if bits & NOTIFY_NEVER != 0 && bits != NOTIFY_NEVER {
        return Err(syntax_error(
            "Syntax error: NOTIFY=NEVER cannot be combined",
        ));
    }
    Ok(bits)
}

/// RFC 3461 §4.2: `ORCPT=addr-type ";" xtext`.
fn parse_orcpt(value: &str) -> Result<String, Reply> {
    let Some((address_type, encoded)) = value.split_once(';') else {
        return Err(syntax_error("Syntax error: ORCPT needs addr-type;address"));
    };
    let type_valid = !address_type.is_empty()
        && address_type
            .bytes()
            .all(|byte| byte.is_ascii_alphanumeric() || b"!#$%&'*+-/=?^_`{|}~".contains(&byte));
    if !type_valid || encoded.is_empty() {
        return Err(syntax_error("Syntax error: ORCPT needs addr-type;address"));
    }
    let address = decode_xtext(encoded)?;
    Ok(format!("{address_type};{address}"))
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum AddressRole {
    Sender,
    Recipient,
}

impl AddressRole {
    /// RFC 3463 §3.2: X.1.7 is the bad sender address, X.1.3 the bad
    /// destination address.
    fn invalid(self, text: &str) -> Reply {
        match self {
            AddressRole::Sender => reply(553, 5, 1, 7, text),
            AddressRole::Recipient => reply(553, 5, 1, 3, text),
        }
    }
}

/// Parses the text between the angle brackets: an optional source route,
/// which RFC 5321 §4.1.1.3 requires servers to accept and ignore, then a mailbox.
fn parse_path(path: &str, smtputf8: bool, role: AddressRole) -> Result<Mailbox, Reply> {
    let mailbox = if path.starts_with('@') {
        // A-d-l ":" Mailbox. The route has no quotes, so the first colon ends it.
        match path.split_once(':') {
            Some((_, mailbox)) => mailbox,
            None => return Err(role.invalid("Invalid address: malformed source route")),
        }
    } else {
        path
    };
    if let Some(character) = mailbox.chars().find(|c| is_invisible_or_control(*c)) {
        let text = format!(
            "Invalid address: contains the control or invisible character U+{:04X}",
            u32::from(character)
        );
        return Err(role.invalid(&text));
    }
    if !smtputf8 && !mailbox.is_ascii() {
        // RFC 6531 §3.4: UTF-8 addresses need SMTPUTF8 on MAIL.
        return Err(reply(
            553,
            5,
            6,
            7,
            "Non-ASCII address requires the SMTPUTF8 parameter on MAIL",
        ));
    }
    let at =
        local_part_end(mailbox).ok_or_else(|| role.invalid("Invalid address: bad local part"))?;
    let local = &mailbox[..at];
    let Some(domain) = mailbox[at..].strip_prefix('@') else {
        return Err(role.invalid("Invalid address: missing @domain"));
    };
    if local.is_empty() {
        return Err(role.invalid("Invalid address: empty local part"));
    }
    let domain =
        normalize_domain(domain).ok_or_else(|| role.invalid("Invalid address: bad domain"))?;
    Ok(Mailbox {
        address: mailbox.to_string(),
        domain,
    })
}

/// Returns the byte index where a valid local part ends (at the `@`), or
/// `None` when the local part is neither a Dot-string nor a Quoted-string
/// (RFC 5321 §4.1.2). Non-ASCII characters count as atext and qtext, as
/// RFC 6531 §3.3 extends them; the caller has already checked SMTPUTF8.
fn local_part_end(mailbox: &str) -> Option<usize> {
    if let Some(quoted) = mailbox.strip_prefix('"') {
        let mut characters = quoted.char_indices();
        while let Some((index, character)) = characters.next() {
            match character {
                '"' => return Some(index + 2),
                // quoted-pairSMTP = %d92 %d32-126.
                '\\' => match characters.next() {
                    Some((_, escaped)) if (' '..='~').contains(&escaped) => {}
                    _ => return None,
                },
                // qtextSMTP = %d32-33 / %d35-91 / %d93-126, plus UTF-8.
                ' '..='~' => {}
                _ if !character.is_ascii() => {}
                _ => return None,
            }
        }
        return None;
    }
    let end = mailbox.find('@')?;
    let local = &mailbox[..end];
    let atoms_valid = local
        .split('.')
        .all(|atom| !atom.is_empty() && atom.chars().all(|c| !c.is_ascii() || is_atext(c)));
    atoms_valid.then_some(end)
}

/// RFC 5322 §3.2.3 atext.
fn is_atext(character: char) -> bool {
    character.is_ascii_alphanumeric() || "!#$%&'*+-/=?^_`{|}~".contains(character)
}

/// Validates a domain or address literal and returns its lowercase A-label
/// form (or the literal in lowercase).
fn normalize_domain(domain: &str) -> Option<String> {
    if let Some(literal) = domain.strip_prefix('[') {
        let literal = literal.strip_suffix(']')?;
        let valid = if let Some(ipv6) = literal
            .get(..5)
            .filter(|tag| tag.eq_ignore_ascii_case("IPv6:"))
            .map(|_| &literal[5..])
        {
            ipv6.parse::<Ipv6Addr>().is_ok()
        } else {
            literal.parse::<Ipv4Addr>().is_ok()
        };
        // General-address-literal forms have no registered tags to check
        // against, so only IPv4 and IPv6 literals are accepted.
        return valid.then(|| domain.to_ascii_lowercase());
    }
    // RFC 5321 §4.1.2: sub-domain = Let-dig [Ldh-str], and RFC 6531 §3.3
    // adds U-labels; label syntax and lengths are left to UTS #46 below.
    if domain.is_empty() || domain.starts_with('.') || domain.ends_with('.') {
        return None;
    }
    let ascii_syntax_valid = domain
        .chars()
        .all(|c| !c.is_ascii() || c.is_ascii_alphanumeric() || c == '-' || c == '.');
    if !ascii_syntax_valid {
        return None;
    }
    let ascii = idna::domain_to_ascii_strict(domain).ok()?;
    Some(ascii.to_ascii_lowercase())
}

/// Control characters and invisible formatting characters. An address that
/// contains one looks like another address to a human, and UTS #46 would
/// silently drop some of them from a domain, so such addresses are rejected.
pub fn is_invisible_or_control(character: char) -> bool {
    let code = u32::from(character);
    character.is_control()
        || matches!(
            code,
            0x00AD
                | 0x034F
                | 0x0600..=0x0605
                | 0x061C
                | 0x06DD
                | 0x070F
                | 0x08E2
                | 0x115F
                | 0x1160
                | 0x17B4
                | 0x17B5
                | 0x180B..=0x180F
                | 0x200B..=0x200F
                | 0x2028..=0x202E
                | 0x2060..=0x206F
                | 0x3164
                | 0xFE00..=0xFE0F
                | 0xFEFF
                | 0xFFA0
                | 0xFFF0..=0xFFFB
                | 0x110BD
                | 0x110CD
                | 0x13430..=0x1343F
                | 0x1BCA0..=0x1BCA3
                | 0x1D173..=0x1D17A
                | 0xE0000..=0xE0FFF
        )
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(line: &str) -> Result<Command, Reply> {
        parse_command(line.as_bytes(), false)
    }

    fn parse_utf8(line: &str) -> Result<Command, Reply> {
        parse_command(line.as_bytes(), true)
    }

    fn code_and_status(result: Result<Command, Reply>) -> (u16, String) {
        let reply = result.expect_err("the line should be rejected");
        let status = reply
            .status
            .map(|status| status.to_string())
            .unwrap_or_default();
        (reply.code, status)
    }

    fn rcpt(line: &str) -> RcptCommand {
        match parse(line) {
            Ok(Command::Rcpt(command)) => command,
            other => panic!("expected RCPT, got {other:?}"),
        }
    }

    fn mail(line: &str) -> MailCommand {
        match parse(line) {
            Ok(Command::Mail(command)) => command,
            other => panic!("expected MAIL, got {other:?}"),
        }
    }

    #[test]
    fn mail_with_all_parameters() {
        let command =
            mail("mail from:<App@Example.COM> size=1000 body=8bitmime RET=HDRS ENVID=QQ314159");
        let sender = command.sender.expect("sender");
        assert_eq!(sender.address, "App@Example.COM");
        assert_eq!(sender.domain, "example.com");
        assert_eq!(command.declared_size_bytes, Some(1000));
        assert_eq!(command.body, Some(BodyType::EightBitMime));
        assert_eq!(command.ret, Some(ReturnContent::Headers));
        assert_eq!(command.envid.as_deref(), Some("QQ314159"));
        assert!(!command.smtputf8);
    }

    #[test]
    fn mail_body_seven_bit_any_case() {
        assert_eq!(
            mail("MAIL FROM:<a@b.example> BODY=7bit").body,
            Some(BodyType::SevenBit)
        );
        assert_eq!(
            mail("MAIL FROM:<a@b.example> BODY=7BiT").body,
            Some(BodyType::SevenBit)
        );
    }

    #[test]
    fn mail_null_sender() {
        assert_eq!(mail("MAIL FROM:<>").sender, None);
    }

    #[test]
    fn mail_space_after_colon_tolerated() {
        let command = mail("MAIL FROM: <app@example.com>");
        assert_eq!(command.sender.expect("sender").address, "app@example.com");
    }

    #[test]
    fn mail_without_brackets_rejected() {
        assert_eq!(
            code_and_status(parse("MAIL FROM:app@example.com")),
            (501, "5.5.4".into())
        );
    }

    #[test]
    fn mail_unknown_and_duplicate_parameters() {
        assert_eq!(
            code_and_status(parse("MAIL FROM:<a@b.example> XFOO=1")),
            (555, "5.5.4".into())
        );
        assert_eq!(
            code_and_status(parse("MAIL FROM:<a@b.example> BODY=BINARYMIME")),
            (555, "5.5.4".into())
        );
        assert_eq!(
            code_and_status(parse("MAIL FROM:<a@b.example> SIZE=1 SIZE=2")),
            (501, "5.5.4".into())
        );
        assert_eq!(
            code_and_status(parse("MAIL FROM:<a@b.example> SIZE=12x")),
            (501, "5.5.4".into())
        );
    }

    #[test]
    fn xtext_carrying_line_breaks_rejected() {
        // CVE-2020-28021 class: an encoded newline in an xtext parameter.
        let lines = [
            "MAIL FROM:<app@example.com> AUTH=app+40example.com+0Ainjected-spool-line ENVID=abc+0D+0AX-Injected:+20yes",
            "MAIL FROM:<app@example.com> ENVID=abc+0D+0AX-Injected:+20yes",
            "MAIL FROM:<app@example.com> ENVID=abc+00",
            "RCPT TO:<user@example.net> ORCPT=rfc822;user+0A+0Aevil@example.net",
            "RCPT TO:<user@example.net> ORCPT=rfc822;user+0D@example.net",
        ];
        for line in lines {
            assert_eq!(
                code_and_status(parse(line)),
                (501, "5.5.4".into()),
                "{line}"
            );
        }
    }

    #[test]
    fn xtext_decodes_plus_escapes() {
        assert_eq!(decode_xtext("a+2Bb+3Dc").expect("valid xtext"), "a+b=c");
        assert!(decode_xtext("a+2b").is_err());
        assert!(decode_xtext("a=b").is_err());
        assert!(decode_xtext("a+4").is_err());
    }

    #[test]
    fn rcpt_dsn_parameters() {
        let command = rcpt(
            "RCPT TO:<nobody@example.net> NOTIFY=FAILURE,delay ORCPT=rfc822;nobody+40example.net",
        );
        assert_eq!(command.notify, NOTIFY_FAILURE | NOTIFY_DELAY);
        assert_eq!(command.orcpt.as_deref(), Some("rfc822;nobody@example.net"));
        assert_eq!(
            rcpt("RCPT TO:<q@example.net> NOTIFY=NEVER").notify,
            NOTIFY_NEVER
        );
        assert_eq!(
            code_and_status(parse("RCPT TO:<q@example.net> NOTIFY=NEVER,SUCCESS")),
            (501, "5.5.4".into())
        );
        assert_eq!(
            code_and_status(parse("RCPT TO:<q@example.net> NOTIFY=SOMETIMES")),
            (501, "5.5.4".into())
        );
    }

    #[test]
    fn quoted_local_parts_preserved() {
        let cases = [
            r#"RCPT TO:<"odd user"@example.net>"#,
            r#"RCPT TO:<"info@"@example.net>"#,
            r#"RCPT TO:<"a\"b"@example.net>"#,
            r#"RCPT TO:<"plain"@example.net>"#,
            r#"RCPT TO:<"a>b"@example.net>"#,
        ];
        for line in cases {
            let expected = &line["RCPT TO:<".len()..line.len() - 1];
            let command = rcpt(line);
            assert_eq!(command.recipient.address, expected, "{line}");
            assert_eq!(command.recipient.domain, "example.net");
        }
    }

    #[test]
    fn local_part_case_preserved_domain_lowered() {
        let command = rcpt("RCPT TO:<John.Smith@Example.NET>");
        assert_eq!(command.recipient.address, "John.Smith@Example.NET");
        assert_eq!(command.recipient.domain, "example.net");
    }

    #[test]
    fn invalid_addresses_rejected_permanently() {
        let cases = [
            "RCPT TO:<a..b@example.net>",
            "RCPT TO:<.a@example.net>",
            "RCPT TO:<a b@example.net>",
            "RCPT TO:<user@>",
            "RCPT TO:<user>",
            "RCPT TO:<user@exa_mple.net>",
            "RCPT TO:<user@-example.net>",
            "RCPT TO:<user@example.net.>",
            "RCPT TO:<user@[300.1.1.1]>",
        ];
        for line in cases {
            assert_eq!(
                code_and_status(parse(line)),
                (553, "5.1.3".into()),
                "{line}"
            );
        }
    }

    #[test]
    fn unterminated_quote_is_syntax_error() {
        assert_eq!(
            code_and_status(parse(r#"RCPT TO:<"unterminated@example.net>"#)),
            (501, "5.5.4".into())
        );
    }

    #[test]
    fn address_literals_accepted() {
        assert_eq!(
            rcpt("RCPT TO:<u@[127.0.0.1]>").recipient.domain,
            "[127.0.0.1]"
        );
        assert_eq!(
            rcpt("RCPT TO:<u@[IPv6:::1]>").recipient.domain,
            "[ipv6:::1]"
        );
    }

    #[test]
    fn source_route_ignored() {
        let command = rcpt("RCPT TO:<@relay.example.org:user@example.net>");
        assert_eq!(command.recipient.address, "user@example.net");
    }

    #[test]
    fn utf8_address_needs_smtputf8() {
        let line = "RCPT TO:<gr\u{e5}@example.net>";
        assert_eq!(code_and_status(parse(line)), (553, "5.6.7".into()));
        match parse_utf8(line) {
            Ok(Command::Rcpt(command)) => {
                assert_eq!(command.recipient.address, "gr\u{e5}@example.net");
                assert_eq!(command.recipient.domain, "example.net");
            }
            other => panic!("expected RCPT, got {other:?}"),
        }
        assert_eq!(
            code_and_status(parse("MAIL FROM:<gr\u{e5}@example.com>")),
            (553, "5.6.7".into())
        );
        assert!(matches!(
            parse("MAIL FROM:<gr\u{e5}@example.com> SMTPUTF8"),
            Ok(Command::Mail(MailCommand { smtputf8: true, .. }))
        ));
    }

    #[test]
    fn utf8_domain_becomes_a_label() {
        match parse_utf8("RCPT TO:<user@gr\u{e5}.example>") {
            Ok(Command::Rcpt(command)) => {
                assert_eq!(command.recipient.domain, "xn--gr-zia.example")
            }
            other => panic!("expected RCPT, got {other:?}"),
        }
    }

    #[test]
    fn invisible_characters_rejected() {
        for line in [
            "RCPT TO:<user\u{2060}@example.net>",
            "RCPT TO:<user@exam\u{200b}ple.net>",
            "RCPT TO:<us\u{feff}er@example.net>",
            "RCPT TO:<\"us\u{7f}er\"@example.net>",
        ] {
            assert_eq!(
                code_and_status(parse_utf8(line)),
                (553, "5.1.3".into()),
                "{line:?}"
            );
            assert_eq!(
                code_and_status(parse(line)),
                (553, "5.1.3".into()),
                "{line:?}"
            );
        }
        assert_eq!(
            code_and_status(parse_utf8("MAIL FROM:<app\u{2060}@example.com> SMTPUTF8")),
            (553, "5.1.7".into())
        );
    }

    #[test]
    fn simple_commands() {
        assert_eq!(parse("data"), Ok(Command::Data));
        assert_eq!(parse("NOOP anything"), Ok(Command::Noop));
        assert_eq!(parse("QUIT"), Ok(Command::Quit));
        assert_eq!(parse("STARTTLS"), Ok(Command::NotImplemented("STARTTLS")));
        assert_eq!(code_and_status(parse("DATA now")), (501, "5.5.4".into()));
        assert_eq!(code_and_status(parse("FROB")), (500, "5.5.2".into()));
        assert_eq!(
            parse("EHLO client.example.com"),
            Ok(Command::Ehlo("client.example.com".into()))
        );
        assert_eq!(code_and_status(parse("EHLO")), (501, "5.5.4".into()));
        assert_eq!(code_and_status(parse("EHLO a(b)")), (501, "5.5.4".into()));
    }
}
