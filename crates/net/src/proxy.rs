//! HTTP `CONNECT` proxies for the clients' TCP fallback to the relay.
//!
//! Some corporate networks let nothing out but web traffic through a proxy. There the clients reach
//! the relay over TCP through that proxy: they ask it with `CONNECT relay:port HTTP/1.1` for a raw
//! tunnel, and run TLS to the relay inside it.
//!
//! Decisions:
//!
//! * **`http://` proxies only.** The tunnelled connection is TLS from end to end, so TLS to the
//!   proxy as well would protect nothing more than the proxy login, and it would need a second TLS
//!   stack and the proxy's certificate chain. `https://` and `socks*://` addresses are refused with
//!   a message that says what to use instead.
//! * **Environment variables as curl reads them**, because that is what IT departments configure
//!   and test with: `HTTPS_PROXY`, then `https_proxy`, then `ALL_PROXY` / `all_proxy` (the relay is
//!   reached with TLS, hence the `https` variables); `NO_PROXY` / `no_proxy` exempts hosts by domain
//!   suffix, IP address or CIDR block ([`no_proxy_matches`]); a bare `host:port` is taken as
//!   `http://`, and the port defaults to 80. An empty variable counts as unset.
//! * **The response head is read without over-reading.** TLS starts right after the blank line
//!   that ends the proxy's answer, and a proxy may send it together with the relay's first bytes.
//!   The head is therefore read by peeking at the socket and consuming only the bytes up to and
//!   including the blank line, so that the stream handed back is exactly at the start of the
//!   tunnel. The head is limited to [`MAX_RESPONSE_HEAD`] bytes.
//! * **The proxy password never leaves [`Proxy`]**: neither `Debug` of [`Proxy`] nor any
//!   [`ProxyError`] contains the user name or the password, and errors about a malformed address
//!   show it with its credentials replaced by `***`.

use std::fmt;
use std::net::IpAddr;
use std::time::Duration;

use base64::Engine as _;
use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
use tokio::net::TcpStream;

/// The most bytes of a proxy's answer to `CONNECT` read before the blank line that ends it.
pub const MAX_RESPONSE_HEAD: usize = 16 * 1024;

/// Port of a proxy address without one, as curl does.
const DEFAULT_PORT: u16 = 80;

/// The proxy named in errors of [`check_connect_response`], which does not know it.
const UNKNOWN_PROXY: &str = "(unknown)";

/// Environment variables naming the proxy, in order of precedence.
const PROXY_VARS: [&str; 4] = ["HTTPS_PROXY", "https_proxy", "ALL_PROXY", "all_proxy"];

/// Environment variables listing hosts reached without the proxy, in order of precedence.
const NO_PROXY_VARS: [&str; 2] = ["NO_PROXY", "no_proxy"];

/// An HTTP proxy to tunnel TCP through with CONNECT (http:// only; the tunnelled connection is TLS
/// end to end anyway).
#[derive(Clone, PartialEq, Eq)]
pub struct Proxy {
    /// Host name or IP address; IPv6 addresses without brackets.
    host: String,
    port: u16,
    /// User name and password, percent-decoded.
    auth: Option<(String, String)>,
}

/// Shows the proxy's address and whether a login is set, never the user name or the password.
impl fmt::Debug for Proxy {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Proxy")
            .field("address", &format_args!("{}", self.address()))
            .field(
                "auth",
                &format_args!("{}", if self.auth.is_some() { "set" } else { "none" }),
            )
            .finish()
    }
}

/// `http://host:port`, without the login: fit for logs and messages.
impl fmt::Display for Proxy {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "http://{}", self.address())
    }
}

impl Proxy {
    /// Parses `http://[user[:password]@]host[:port][/]`, also a bare `host:port` (taken as http).
    /// Default port 80 when none (as curl). IPv6 hosts in brackets. Percent-decoding of user and
    /// password (%40 etc.). Rejects https://, socks*, empty host, bad port, paths other than "/" or
    /// "", query strings.
    pub fn parse(url: &str) -> Result<Proxy, ProxyError> {
        let url = url.trim();
        let (scheme, rest) = split_scheme(url);
        // Everything before the last '@' is the login, whatever it contains: a password with a
        // stray '/' or '?' must not end up in the host, the port or an error message.
        let (userinfo, host_and_path) = match rest.rsplit_once('@') {
            Some((userinfo, after)) => (Some(userinfo), after),
            None => (None, rest),
        };
        let bad = |reason: &str| ProxyError::BadUrl {
            url_without_credentials: redacted(scheme, userinfo.is_some(), host_and_path),
            reason: reason.to_owned(),
        };

        match scheme.map(str::to_ascii_lowercase).as_deref() {
            None | Some("http") => {}
            Some("https") => {
                return Err(bad(
                    "HTTPS proxies are not supported; use the proxy's http:// address (the \
                     connection to the relay is TLS through it anyway)",
                ));
            }
            Some(s) if s.starts_with("socks") => {
                return Err(bad(
                    "SOCKS proxies are not supported; use the address of an HTTP proxy \
                     (http://host:port)",
                ));
            }
            Some(_) => {
                return Err(bad(
                    "only http:// proxy addresses are supported (http://[user:password@]host[:port])",
                ));
            }
        }

        if url.is_empty() {
            return Err(bad(
                "the address is empty; expected http://[user:password@]host[:port]",
            ));
        }

        let (authority, path) = match host_and_path.find(['/', '?', '#']) {
            Some(i) => host_and_path.split_at(i),
            None => (host_and_path, ""),
        };
        if path.starts_with('?') {
            return Err(bad(
                "a proxy address has no query string ('?…'); give only http://host:port",
            ));
        }
        if !path.is_empty() && path != "/" {
            return Err(bad(
                "a proxy address has no path; give only http://host:port",
            ));
        }

        let (host, port) = split_host_port(authority).map_err(|reason| bad(&reason))?;
        let auth = match userinfo {
            None => None,
            Some(userinfo) => Some(parse_userinfo(userinfo).map_err(bad)?),
        };
        Ok(Proxy { host, port, auth })
    }

    /// The proxy's host name or IP address (IPv6 addresses without brackets).
    pub fn host(&self) -> &str {
        &self.host
    }

    /// The proxy's port.
    pub fn port(&self) -> u16 {
        self.port
    }

    /// The proxy for reaching `target_host`, from the environment as curl reads it: `HTTPS_PROXY`,
    /// then `https_proxy`, then `ALL_PROXY`/`all_proxy`; none when `NO_PROXY`/`no_proxy` matches
    /// `target_host`. `Ok(None)` when no proxy applies; an empty variable counts as unset.
    pub fn from_env(target_host: &str) -> Result<Option<Proxy>, ProxyError> {
        Self::from_vars(|name| std::env::var(name).ok(), target_host)
    }

    /// Same as [`Proxy::from_env`], reading variables through `var` (for tests).
    pub fn from_vars(
        var: impl Fn(&str) -> Option<String>,
        target_host: &str,
    ) -> Result<Option<Proxy>, ProxyError> {
        let first_set = |names: &[&'static str]| {
            names.iter().find_map(|&name| {
                var(name)
                    .filter(|value| !value.trim().is_empty())
                    .map(|value| (name, value))
            })
        };
        let Some((name, url)) = first_set(&PROXY_VARS) else {
            return Ok(None);
        };
        // NO_PROXY first: an exempt host needs no proxy, even a malformed one.
        if first_set(&NO_PROXY_VARS)
            .is_some_and(|(_, no_proxy)| no_proxy_matches(&no_proxy, target_host))
        {
            return Ok(None);
        }
        match Proxy::parse(&url) {
            Ok(proxy) => Ok(Some(proxy)),
            Err(ProxyError::BadUrl {
                url_without_credentials,
                reason,
            }) => Err(ProxyError::BadUrl {
                url_without_credentials,
                reason: format!("{reason} (set in the environment variable {name})"),
            }),
            Err(e) => Err(e),
        }
    }

    /// Opens a TCP connection to the proxy (within `timeout` overall, including the CONNECT
    /// exchange), sends `CONNECT host:port HTTP/1.1` with `Host:` and, when a login is set,
    /// `Proxy-Authorization: Basic …`, reads the response head (at most [`MAX_RESPONSE_HEAD`]
    /// bytes, without consuming any byte after the blank line, where TLS starts), and returns the
    /// stream on a 2xx status. TCP_NODELAY is set on the stream.
    pub async fn connect(
        &self,
        target_host: &str,
        target_port: u16,
        timeout: Duration,
    ) -> Result<TcpStream, ProxyError> {
        let request = self.connect_request(target_host, target_port)?;
        match tokio::time::timeout(timeout, self.tunnel(&request)).await {
            Ok(result) => result,
            Err(_elapsed) => Err(ProxyError::TimedOut {
                proxy: self.address(),
                secs: timeout
                    .as_millis()
                    .div_ceil(1000)
                    .try_into()
                    .unwrap_or(u64::MAX),
            }),
        }
    }

    /// Connects to the proxy, sends `request` and checks the answer.
    async fn tunnel(&self, request: &str) -> Result<TcpStream, ProxyError> {
        let io_err = |source| ProxyError::Connect {
            proxy: self.address(),
            source,
        };
        let mut stream = TcpStream::connect((self.host.as_str(), self.port))
            .await
            .map_err(io_err)?;
        stream.set_nodelay(true).map_err(io_err)?;
        stream.write_all(request.as_bytes()).await.map_err(io_err)?;

        let malformed = |reason: &str| ProxyError::Malformed {
            proxy: self.address(),
            reason: reason.to_owned(),
        };
        let head = match read_response_head(&mut stream).await.map_err(io_err)? {
            Head::Complete(head) => head,
            Head::Closed { empty: true } => {
                return Err(malformed(
                    "it closed the connection without answering the CONNECT request",
                ));
            }
            Head::Closed { empty: false } => {
                return Err(malformed(
                    "it closed the connection in the middle of its answer",
                ));
            }
            Head::TooLong => {
                return Err(malformed(&format!(
                    "its answer is longer than {} KiB without the blank line that ends an HTTP \
                     header",
                    MAX_RESPONSE_HEAD / 1024
                )));
            }
        };
        match parse_connect_response(&head) {
            Ok(()) => {
                tracing::debug!(proxy = %self, "HTTP proxy opened a tunnel");
                Ok(stream)
            }
            Err(rejection) => Err(rejection.into_error(self.address(), self.auth.is_some())),
        }
    }

    /// The CONNECT request for `target_host:target_port`, with `Host:` and the login if any.
    fn connect_request(&self, target_host: &str, target_port: u16) -> Result<String, ProxyError> {
        let target =
            target_authority(target_host, target_port).ok_or_else(|| ProxyError::Connect {
                proxy: self.address(),
                source: std::io::Error::new(
                    std::io::ErrorKind::InvalidInput,
                    format!("the relay's host name {target_host:?} is not a valid host name"),
                ),
            })?;
        let mut request = format!(
            "CONNECT {target} HTTP/1.1\r\nHost: {target}\r\nUser-Agent: Tandem/{}\r\n",
            env!("CARGO_PKG_VERSION")
        );
        if let Some((user, password)) = &self.auth {
            let credentials =
                base64::engine::general_purpose::STANDARD.encode(format!("{user}:{password}"));
            request.push_str("Proxy-Authorization: Basic ");
            request.push_str(&credentials);
            request.push_str("\r\n");
        }
        request.push_str("\r\n");
        Ok(request)
    }

    /// `host:port`, IPv6 addresses in brackets.
    fn address(&self) -> String {
        authority(&self.host, self.port)
    }
}

/// Whether a NO_PROXY value (comma/space separated, as curl) exempts `host`: `*` matches all;
/// `example.com` and `.example.com` match the host and its subdomains (case-insensitive, a trailing
/// dot ignored); IP addresses match exactly; CIDR blocks (`10.0.0.0/8`, `fd00::/8`) match IP hosts
/// inside them; entries with a port (`host:8080`) compare the host part only.
pub fn no_proxy_matches(no_proxy: &str, host: &str) -> bool {
    let host = host.trim();
    let host = host
        .strip_prefix('[')
        .and_then(|h| h.strip_suffix(']'))
        .unwrap_or(host);
    let host = host.strip_suffix('.').unwrap_or(host).to_ascii_lowercase();
    if host.is_empty() {
        return false;
    }
    let host_ip = host.parse::<IpAddr>().ok();

    no_proxy
        .split(|c: char| c == ',' || c.is_whitespace())
        .filter(|entry| !entry.is_empty())
        .any(|entry| match NoProxyEntry::parse(entry) {
            NoProxyEntry::All => true,
            NoProxyEntry::Ip(ip) => host_ip == Some(ip),
            NoProxyEntry::Cidr(net, prefix) => host_ip.is_some_and(|ip| in_cidr(ip, net, prefix)),
            NoProxyEntry::Domain(domain) => {
                host_ip.is_none()
                    && (host == domain
                        || host
                            .strip_suffix(domain.as_str())
                            .is_some_and(|sub| sub.ends_with('.')))
            }
            NoProxyEntry::Invalid => false,
        })
}

/// Pure parser of a CONNECT response head (the bytes up to and including the blank line): Ok(())
/// on 2xx, else the matching ProxyError. The errors name the proxy as `(unknown)`, and a 407 is
/// reported as if no login had been sent; [`Proxy::connect`] fills in both.
pub fn check_connect_response(head: &[u8]) -> Result<(), ProxyError> {
    parse_connect_response(head)
        .map_err(|rejection| rejection.into_error(UNKNOWN_PROXY.to_owned(), false))
}

/// Why connecting through an HTTP proxy failed.
#[derive(Debug, thiserror::Error)]
pub enum ProxyError {
    /// The proxy address cannot be used. The address is shown with its login replaced by `***`.
    #[error("the HTTP proxy address {url_without_credentials:?} cannot be used: {reason}")]
    BadUrl {
        url_without_credentials: String,
        reason: String,
    },
    /// No TCP connection to the proxy, or it broke during the CONNECT exchange.
    #[error(
        "cannot reach the HTTP proxy {proxy}: {source}; check the proxy's address and port, and \
         that this computer may connect to it"
    )]
    Connect {
        /// `host:port`.
        proxy: String,
        source: std::io::Error,
    },
    /// The proxy did not answer, or not completely, within the time allowed.
    #[error(
        "the HTTP proxy {proxy} did not open the connection to the relay within {secs} s; check \
         that the proxy's address and port are right and that the proxy is working"
    )]
    TimedOut { proxy: String, secs: u64 },
    /// The proxy answered 407 Proxy Authentication Required.
    #[error("the HTTP proxy {proxy} {}", login_advice(.credentials_sent))]
    AuthRequired {
        proxy: String,
        /// Whether a login from the proxy address was sent (and refused).
        credentials_sent: bool,
    },
    /// The proxy answered with a status other than 2xx or 407, typically 403 from a policy.
    #[error(
        "the HTTP proxy {proxy} refused to connect to the relay: {status} {reason}; ask for the \
         relay's address and port to be allowed"
    )]
    Refused {
        proxy: String,
        status: u16,
        reason: String,
    },
    /// The answer was not HTTP, too long, or cut short.
    #[error(
        "the HTTP proxy {proxy} gave an unexpected answer: {reason}; check that this address and \
         port are those of an HTTP proxy"
    )]
    Malformed { proxy: String, reason: String },
}

/// The end of the message of [`ProxyError::AuthRequired`].
fn login_advice(credentials_sent: &bool) -> &'static str {
    if *credentials_sent {
        "refused the login in the proxy address; check the user name and password \
         (http://user:password@host:port, with characters such as @ or : written as %40 or %3A)"
    } else {
        "asks for a login: put it in the proxy address (http://user:password@host:port)"
    }
}

/// How a proxy turned down a CONNECT request, before the proxy's name is known.
#[derive(Debug)]
enum Rejection {
    Auth,
    Status { status: u16, reason: String },
    Malformed(String),
}

impl Rejection {
    fn into_error(self, proxy: String, credentials_sent: bool) -> ProxyError {
        match self {
            Rejection::Auth => ProxyError::AuthRequired {
                proxy,
                credentials_sent,
            },
            Rejection::Status { status, reason } => ProxyError::Refused {
                proxy,
                status,
                reason,
            },
            Rejection::Malformed(reason) => ProxyError::Malformed { proxy, reason },
        }
    }
}

/// Checks the status line of a CONNECT response head.
fn parse_connect_response(head: &[u8]) -> Result<(), Rejection> {
    let not_http = || {
        Rejection::Malformed(
            "its answer does not start with an HTTP status line (\"HTTP/1.1 200 …\")".to_owned(),
        )
    };
    let line_end = head.iter().position(|&b| b == b'\n').unwrap_or(head.len());
    let line = &head[..line_end];
    let line = line.strip_suffix(b"\r").unwrap_or(line);
    let line = std::str::from_utf8(line).map_err(|_| not_http())?;

    let (version, rest) = line.split_once(' ').ok_or_else(not_http)?;
    if !version.starts_with("HTTP/1.") {
        return Err(not_http());
    }
    let rest = rest.trim_start_matches(' ');
    let (code, reason) = rest.split_once(' ').unwrap_or((rest, ""));
    if code.len() != 3 || !code.bytes().all(|b| b.is_ascii_digit()) {
        return Err(not_http());
    }
    let status: u16 = code.parse().map_err(|_| not_http())?;
    match status {
        200..=299 => Ok(()),
        407 => Err(Rejection::Auth),
        _ => Err(Rejection::Status {
            status,
            reason: printable(reason.trim(), 200),
        }),
    }
}

/// `text` without control characters, cut to at most `max` characters.
fn printable(text: &str, max: usize) -> String {
    text.chars().filter(|c| !c.is_control()).take(max).collect()
}

/// The outcome of reading a response head.
enum Head {
    /// The bytes up to and including the blank line.
    Complete(Vec<u8>),
    /// The connection was closed first; `empty` when nothing at all was received.
    Closed { empty: bool },
    /// [`MAX_RESPONSE_HEAD`] bytes without a blank line.
    TooLong,
}

/// Reads a response head up to and including its blank line, and not one byte more.
///
/// The socket is peeked at; the bytes seen are consumed only up to the end of the head, or all of
/// them when they do not complete it (so that the next peek waits for new data instead of
/// returning the same bytes at once).
async fn read_response_head(stream: &mut TcpStream) -> std::io::Result<Head> {
    let mut head = Vec::with_capacity(512);
    let mut chunk = vec![0u8; 4096];
    loop {
        let room = MAX_RESPONSE_HEAD - head.len();
        if room == 0 {
            return Ok(Head::TooLong);
        }
        let want = room.min(chunk.len());
        let peeked = stream.peek(&mut chunk[..want]).await?;
        if peeked == 0 {
            return Ok(Head::Closed {
                empty: head.is_empty(),
            });
        }
        // A blank line may straddle what was read before and what was peeked now: search from up
        // to two bytes back (the longest end marker, "\n\r\n", is three bytes).
        let old_len = head.len();
        let search_from = old_len.saturating_sub(2);
        head.extend_from_slice(&chunk[..peeked]);
        let end = find_head_end(&head[search_from..]).map(|end| search_from + end);
        let take = end.map_or(peeked, |end| end - old_len);
        head.truncate(old_len + take);
        // These bytes are already in the socket's receive buffer: this does not wait.
        stream.read_exact(&mut chunk[..take]).await?;
        if end.is_some() {
            return Ok(Head::Complete(head));
        }
    }
}

/// The index just after the first blank line in `bytes` (a line end, "\n" or "\r\n", right after a
/// "\n"), if any.
fn find_head_end(bytes: &[u8]) -> Option<usize> {
    bytes.iter().enumerate().find_map(|(i, &b)| {
        if b != b'\n' {
            return None;
        }
        match bytes.get(i + 1..) {
            Some([b'\n', ..]) => Some(i + 2),
            Some([b'\r', b'\n', ..]) => Some(i + 3),
            _ => None,
        }
    })
}

/// Splits `scheme://rest`; no scheme when the part before `://` is not a scheme name.
fn split_scheme(url: &str) -> (Option<&str>, &str) {
    if let Some((scheme, rest)) = url.split_once("://") {
        let mut chars = scheme.chars();
        let is_scheme = chars.next().is_some_and(|c| c.is_ascii_alphabetic())
            && chars.all(|c| c.is_ascii_alphanumeric() || matches!(c, '+' | '-' | '.'));
        if is_scheme {
            return (Some(scheme), rest);
        }
    }
    (None, url)
}

/// The address to show in errors: the login, if any, replaced by `***`.
fn redacted(scheme: Option<&str>, had_userinfo: bool, host_and_path: &str) -> String {
    let mut shown = String::new();
    if let Some(scheme) = scheme {
        shown.push_str(scheme);
        shown.push_str("://");
    }
    if had_userinfo {
        shown.push_str("***@");
    }
    shown.push_str(host_and_path);
    shown
}

/// Parses `host[:port]` or `[ipv6][:port]`.
fn split_host_port(authority: &str) -> Result<(String, u16), String> {
    const EXPECTED: &str = "expected http://[user:password@]host[:port]";
    let (host, port) = if let Some(bracketed) = authority.strip_prefix('[') {
        let (inside, after) = bracketed
            .split_once(']')
            .ok_or_else(|| format!("an IPv6 address lacks its closing ']'; {EXPECTED}"))?;
        if inside.parse::<std::net::Ipv6Addr>().is_err() {
            return Err(format!("{inside:?} in brackets is not an IPv6 address"));
        }
        let port =
            match after {
                "" => None,
                _ => Some(after.strip_prefix(':').ok_or_else(|| {
                    format!("unexpected text after the IPv6 address; {EXPECTED}")
                })?),
            };
        (inside.to_owned(), port)
    } else {
        let (host, port) = match authority.split_once(':') {
            Some((host, port)) => (host, Some(port)),
            None => (authority, None),
        };
        if port.is_some_and(|port| port.contains(':')) {
            return Err(format!(
                "IPv6 addresses must be written in brackets, as in http://[2001:db8::1]:8080; \
                 {EXPECTED}"
            ));
        }
        if host.is_empty() {
            return Err(format!("the host name is missing; {EXPECTED}"));
        }
        if !is_host_name(host) {
            return Err(format!(
                "{host:?} is not a valid host name or IP address; {EXPECTED}"
            ));
        }
        (host.to_owned(), port)
    };
    let port = match port {
        None => DEFAULT_PORT,
        Some(port) => parse_port(port).ok_or_else(|| {
            format!(
                "the port {:?} is not a number from 1 to 65535",
                printable(port, 20)
            )
        })?,
    };
    Ok((host, port))
}

/// A port number from 1 to 65535, digits only.
fn parse_port(port: &str) -> Option<u16> {
    if port.is_empty() || !port.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    port.parse::<u16>().ok().filter(|&port| port != 0)
}

/// Whether `host` is made of the characters of a host name or an IPv4 address.
fn is_host_name(host: &str) -> bool {
    !host.is_empty()
        && host
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'.' | b'_'))
}

/// Splits and percent-decodes `user[:password]`. The messages never quote the login.
fn parse_userinfo(userinfo: &str) -> Result<(String, String), &'static str> {
    let (user, password) = userinfo.split_once(':').unwrap_or((userinfo, ""));
    let user = percent_decode(user)?;
    let password = percent_decode(password)?;
    if user.is_empty() {
        return Err("the user name before '@' is empty; give http://user:password@host:port");
    }
    if user.contains(':') {
        // Basic authentication cannot carry it: the first ':' separates user and password.
        return Err("the user name contains ':', which HTTP proxy logins cannot carry");
    }
    Ok((user, password))
}

/// Decodes `%XX` escapes; the result must be UTF-8.
fn percent_decode(text: &str) -> Result<String, &'static str> {
    const BAD_ESCAPE: &str = "the user name or password has a '%' not followed by two hex \
                              digits; write a literal '%' as %25";
    let bytes = text.as_bytes();
    let mut decoded = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'%' {
            let hex = bytes.get(i + 1..i + 3).ok_or(BAD_ESCAPE)?;
            let hex = std::str::from_utf8(hex).map_err(|_| BAD_ESCAPE)?;
            if !hex.bytes().all(|b| b.is_ascii_hexdigit()) {
                return Err(BAD_ESCAPE);
            }
            decoded.push(u8::from_str_radix(hex, 16).map_err(|_| BAD_ESCAPE)?);
            i += 3;
        } else {
            decoded.push(bytes[i]);
            i += 1;
        }
    }
    String::from_utf8(decoded)
        .map_err(|_| "the user name or password is not valid UTF-8 once percent-decoded")
}

/// `host:port`, with an IPv6 address in brackets.
fn authority(host: &str, port: u16) -> String {
    if host.contains(':') {
        format!("[{host}]:{port}")
    } else {
        format!("{host}:{port}")
    }
}

/// `host:port` for the CONNECT line, or `None` when `host` could smuggle anything into it. The
/// host may be given with or without brackets when it is an IPv6 address.
fn target_authority(host: &str, port: u16) -> Option<String> {
    let unbracketed = host
        .strip_prefix('[')
        .and_then(|h| h.strip_suffix(']'))
        .unwrap_or(host);
    if unbracketed.parse::<std::net::Ipv6Addr>().is_ok() {
        return Some(format!("[{unbracketed}]:{port}"));
    }
    is_host_name(host).then(|| format!("{host}:{port}"))
}

/// One entry of a NO_PROXY list.
#[derive(Debug, PartialEq, Eq)]
enum NoProxyEntry {
    /// `*`.
    All,
    Ip(IpAddr),
    /// Network address and prefix length.
    Cidr(IpAddr, u8),
    /// Lowercase, without leading `.`/`*.` or trailing `.`.
    Domain(String),
    /// Ignored, as curl ignores what it cannot use.
    Invalid,
}

impl NoProxyEntry {
    fn parse(entry: &str) -> NoProxyEntry {
        if entry == "*" {
            return NoProxyEntry::All;
        }
        // `[v6]`, `[v6]:port`, `[v6]/len`.
        if let Some(bracketed) = entry.strip_prefix('[') {
            let Some((inside, after)) = bracketed.split_once(']') else {
                return NoProxyEntry::Invalid;
            };
            return match after.strip_prefix('/') {
                Some(prefix) => Self::cidr(inside, prefix),
                None if after.is_empty() || after.starts_with(':') => inside
                    .parse()
                    .map_or(NoProxyEntry::Invalid, NoProxyEntry::Ip),
                None => NoProxyEntry::Invalid,
            };
        }
        if let Some((net, prefix)) = entry.split_once('/') {
            return Self::cidr(net, prefix);
        }
        if let Ok(ip) = entry.parse() {
            return NoProxyEntry::Ip(ip);
        }
        // `host:port` (a bare IPv6 address has been handled above).
        let host = entry.split_once(':').map_or(entry, |(host, _port)| host);
        if let Ok(ip) = host.parse() {
            return NoProxyEntry::Ip(ip);
        }
        let domain = host
            .strip_prefix("*.")
            .or_else(|| host.strip_prefix('.'))
            .unwrap_or(host);
        let domain = domain.strip_suffix('.').unwrap_or(domain);
        if domain.is_empty() {
            NoProxyEntry::Invalid
        } else {
            NoProxyEntry::Domain(domain.to_ascii_lowercase())
        }
    }

    fn cidr(net: &str, prefix: &str) -> NoProxyEntry {
        let (Ok(net), Ok(prefix)) = (net.parse::<IpAddr>(), prefix.parse::<u8>()) else {
            return NoProxyEntry::Invalid;
        };
        let max = if net.is_ipv4() { 32 } else { 128 };
        if prefix > max {
            NoProxyEntry::Invalid
        } else {
            NoProxyEntry::Cidr(net, prefix)
        }
    }
}

/// Whether `ip` lies in `net/prefix` (same address family only).
fn in_cidr(ip: IpAddr, net: IpAddr, prefix: u8) -> bool {
    fn mask_match(a: u128, b: u128, prefix: u8, bits: u8) -> bool {
        if prefix == 0 {
            return true;
        }
        let shift = u32::from(bits - prefix);
        (a >> shift) == (b >> shift)
    }
    match (ip, net) {
        (IpAddr::V4(ip), IpAddr::V4(net)) => {
            mask_match(u32::from(ip).into(), u32::from(net).into(), prefix, 32)
        }
        (IpAddr::V6(ip), IpAddr::V6(net)) => mask_match(ip.into(), net.into(), prefix, 128),
        _ => false,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashMap;
    use std::time::Instant;
    use tokio::io::{AsyncBufReadExt as _, BufReader};
    use tokio::net::TcpListener;

    fn parse_ok(url: &str) -> Proxy {
        Proxy::parse(url).unwrap_or_else(|e| panic!("{url:?} should parse: {e}"))
    }

    fn parse_err(url: &str) -> String {
        match Proxy::parse(url) {
            Ok(proxy) => panic!("{url:?} should be rejected, got {proxy:?}"),
            Err(e) => {
                assert!(matches!(e, ProxyError::BadUrl { .. }), "{e:?}");
                e.to_string()
            }
        }
    }

    #[test]
    fn parses_good_addresses() {
        let p = parse_ok("http://proxy.corp.example:3128");
        assert_eq!(
            (p.host(), p.port(), p.auth.is_none()),
            ("proxy.corp.example", 3128, true)
        );

        let p = parse_ok("http://proxy.corp.example:3128/");
        assert_eq!((p.host(), p.port()), ("proxy.corp.example", 3128));

        let p = parse_ok("HTTP://Proxy:8080");
        assert_eq!((p.host(), p.port()), ("Proxy", 8080));

        // Default port, as curl.
        let p = parse_ok("http://proxy");
        assert_eq!((p.host(), p.port()), ("proxy", 80));

        // Bare host:port, taken as http; surrounding whitespace ignored.
        let p = parse_ok("  10.1.2.3:8080\n");
        assert_eq!((p.host(), p.port()), ("10.1.2.3", 8080));

        // IPv6 in brackets, with and without port.
        let p = parse_ok("http://[2001:db8::1]:3128/");
        assert_eq!((p.host(), p.port()), ("2001:db8::1", 3128));
        assert_eq!(p.to_string(), "http://[2001:db8::1]:3128");
        let p = parse_ok("[::1]");
        assert_eq!((p.host(), p.port()), ("::1", 80));
    }

    #[test]
    fn parses_and_decodes_credentials() {
        let p = parse_ok("http://j.doe%40corp.example:p%40ss%3Aw%25rd@proxy:8080");
        assert_eq!(
            p.auth,
            Some(("j.doe@corp.example".to_owned(), "p@ss:w%rd".to_owned()))
        );
        assert_eq!((p.host(), p.port()), ("proxy", 8080));

        // A raw '@' or '/' in the password: the last '@' ends the login.
        let p = parse_ok("http://user:p@ss/x@proxy:8080");
        assert_eq!(p.auth, Some(("user".to_owned(), "p@ss/x".to_owned())));
        assert_eq!((p.host(), p.port()), ("proxy", 8080));

        // User without password.
        let p = parse_ok("http://user@proxy:8080");
        assert_eq!(p.auth, Some(("user".to_owned(), String::new())));

        // Credentials on a bare host:port.
        let p = parse_ok("user:pw@proxy:8080");
        assert_eq!(p.auth, Some(("user".to_owned(), "pw".to_owned())));
    }

    #[test]
    fn rejects_bad_addresses() {
        let https = parse_err("https://proxy:443");
        assert!(https.contains("HTTPS proxies are not supported"), "{https}");
        assert!(https.contains("http://"), "{https}");
        assert!(parse_err("socks5://proxy:1080").contains("SOCKS"));
        assert!(parse_err("socks5h://proxy:1080").contains("SOCKS"));
        assert!(parse_err("ftp://proxy:21").contains("only http://"));
        assert!(parse_err("").contains("empty"));
        assert!(parse_err("http://").contains("host name is missing"));
        assert!(parse_err("http://:8080").contains("host name is missing"));
        assert!(parse_err("http://user:pw@:8080").contains("host name is missing"));
        assert!(parse_err("http://proxy:0").contains("port"));
        assert!(parse_err("http://proxy:65536").contains("port"));
        assert!(parse_err("http://proxy:http").contains("port"));
        assert!(parse_err("http://proxy:").contains("port"));
        assert!(parse_err("http://proxy:+80").contains("port"));
        assert!(parse_err("http://proxy:8080/path").contains("no path"));
        assert!(parse_err("http://proxy:8080/?a=b").contains("no path"));
        assert!(parse_err("http://proxy:8080?a=b").contains("query"));
        assert!(parse_err("http://2001:db8::1:8080").contains("brackets"));
        assert!(parse_err("http://[2001:db8::1:8080").contains("']'"));
        assert!(parse_err("http://[proxy]:8080").contains("IPv6"));
        assert!(parse_err("http://[::1]8080").contains("after the IPv6"));
        assert!(parse_err("http://pro xy:8080").contains("not a valid host"));
        assert!(parse_err("http://user:pw%4@proxy").contains("%25"));
        assert!(parse_err("http://:pw@proxy").contains("user name"));
    }

    #[test]
    fn never_shows_the_login() {
        const USER: &str = "alice.admin";
        const PASSWORD: &str = "Sup3rS3cret";
        let assert_hidden = |text: &str| {
            assert!(!text.contains(PASSWORD), "password shown in {text:?}");
            assert!(!text.contains(USER), "user name shown in {text:?}");
        };

        let p = parse_ok(&format!("http://{USER}:{PASSWORD}@proxy:3128"));
        let debug = format!("{p:?}");
        assert_hidden(&debug);
        assert!(
            debug.contains("proxy:3128") && debug.contains("set"),
            "{debug}"
        );
        assert_hidden(&p.to_string());
        assert!(format!("{:?}", parse_ok("proxy:3128")).contains("none"));

        // Errors about the address, including ones whose password upsets the parser.
        for url in [
            format!("https://{USER}:{PASSWORD}@proxy:3128"),
            format!("http://{USER}:{PASSWORD}@proxy:bad"),
            format!("http://{USER}:{PASSWORD}@proxy/path"),
            format!("http://{USER}:{PASSWORD}%zz@proxy"),
            format!("http://{USER}:{PASSWORD}@"),
            format!("{USER}:{PASSWORD}@[::1"),
        ] {
            let Err(e) = Proxy::parse(&url) else {
                panic!("{url} should be rejected");
            };
            assert_hidden(&e.to_string());
            assert_hidden(&format!("{e:?}"));
            assert!(e.to_string().contains("***@"), "{e}");
        }

        // Errors from connecting.
        let e = Rejection::Auth.into_error(p.address(), true);
        assert_hidden(&e.to_string());
        assert_hidden(&format!("{e:?}"));
    }

    #[test]
    fn no_proxy_wildcard_and_domains() {
        assert!(no_proxy_matches("*", "relay.example.com"));
        assert!(no_proxy_matches("localhost, *", "10.0.0.1"));
        assert!(!no_proxy_matches("", "relay.example.com"));

        assert!(no_proxy_matches("example.com", "example.com"));
        assert!(no_proxy_matches("example.com", "relay.example.com"));
        assert!(no_proxy_matches(".example.com", "relay.example.com"));
        assert!(no_proxy_matches(".example.com", "example.com"));
        assert!(no_proxy_matches("*.example.com", "relay.example.com"));
        assert!(!no_proxy_matches("example.com", "notexample.com"));
        assert!(!no_proxy_matches(".example.com", "notexample.com"));
        assert!(!no_proxy_matches("relay.example.com", "example.com"));

        // Case and trailing dots.
        assert!(no_proxy_matches("Example.COM", "RELAY.example.com"));
        assert!(no_proxy_matches("example.com.", "relay.example.com"));
        assert!(no_proxy_matches("example.com", "relay.example.com."));

        // Separators: commas, spaces, both, stray ones.
        let list = " localhost,,intranet.corp  example.com\t10.0.0.0/8 ,";
        assert!(no_proxy_matches(list, "localhost"));
        assert!(no_proxy_matches(list, "wiki.intranet.corp"));
        assert!(no_proxy_matches(list, "example.com"));
        assert!(no_proxy_matches(list, "10.20.30.40"));
        assert!(!no_proxy_matches(list, "relay.tandem.example"));

        // Ports are ignored.
        assert!(no_proxy_matches("example.com:8080", "relay.example.com"));
        assert!(no_proxy_matches("10.1.2.3:443", "10.1.2.3"));
        assert!(no_proxy_matches("[2001:db8::1]:443", "2001:db8::1"));
    }

    #[test]
    fn no_proxy_addresses_and_cidr() {
        assert!(no_proxy_matches("10.1.2.3", "10.1.2.3"));
        assert!(!no_proxy_matches("10.1.2.3", "10.1.2.30"));
        assert!(no_proxy_matches("::1", "::1"));
        assert!(no_proxy_matches("::1", "[::1]"));
        assert!(no_proxy_matches("[::1]", "::1"));
        // An address is not a domain suffix.
        assert!(!no_proxy_matches("0.0.1", "10.0.0.1"));
        // No name resolution.
        assert!(!no_proxy_matches("127.0.0.1", "localhost"));

        assert!(no_proxy_matches("10.0.0.0/8", "10.255.0.1"));
        assert!(!no_proxy_matches("10.0.0.0/8", "11.0.0.1"));
        assert!(no_proxy_matches("192.168.1.0/24", "192.168.1.77"));
        assert!(!no_proxy_matches("192.168.1.0/24", "192.168.2.77"));
        assert!(no_proxy_matches("0.0.0.0/0", "8.8.8.8"));
        assert!(no_proxy_matches("10.1.2.3/32", "10.1.2.3"));
        assert!(!no_proxy_matches("10.0.0.0/8", "relay.example.com"));
        assert!(no_proxy_matches("fd00::/8", "fd12:3456::1"));
        assert!(no_proxy_matches("fd00::/8", "[fd12:3456::1]"));
        assert!(!no_proxy_matches("fd00::/8", "fe80::1"));
        assert!(no_proxy_matches("[fd00::]/8", "fd00::5"));
        // Families do not mix; invalid blocks are ignored.
        assert!(!no_proxy_matches("::/0", "10.0.0.1"));
        assert!(!no_proxy_matches("10.0.0.0/33", "10.0.0.1"));
        assert!(!no_proxy_matches("10.0.0.0/x", "10.0.0.1"));
    }

    fn vars(pairs: &[(&str, &str)]) -> impl Fn(&str) -> Option<String> {
        let map: HashMap<String, String> = pairs
            .iter()
            .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
            .collect();
        move |name| map.get(name).cloned()
    }

    fn proxy_from(pairs: &[(&str, &str)], host: &str) -> Option<String> {
        Proxy::from_vars(vars(pairs), host)
            .unwrap_or_else(|e| panic!("{e}"))
            .map(|p| p.address())
    }

    #[test]
    fn from_vars_precedence() {
        let host = "relay.example.com";
        assert_eq!(proxy_from(&[], host), None);
        assert_eq!(proxy_from(&[("HTTP_PROXY", "http://a:1")], host), None);

        let all = [
            ("HTTPS_PROXY", "http://a:1"),
            ("https_proxy", "http://b:2"),
            ("ALL_PROXY", "http://c:3"),
            ("all_proxy", "http://d:4"),
        ];
        for skip in 0..all.len() {
            let expected = format!("{}:{}", ["a", "b", "c", "d"][skip], skip + 1);
            assert_eq!(proxy_from(&all[skip..], host), Some(expected));
        }

        // An empty variable counts as unset.
        assert_eq!(
            proxy_from(&[("HTTPS_PROXY", ""), ("https_proxy", "b:2")], host),
            Some("b:2".to_owned())
        );
        assert_eq!(proxy_from(&[("HTTPS_PROXY", "  ")], host), None);
    }

    #[test]
    fn from_vars_no_proxy() {
        let host = "relay.example.com";
        let proxy = ("HTTPS_PROXY", "http://proxy:3128");
        assert_eq!(
            proxy_from(&[proxy, ("NO_PROXY", "example.com")], host),
            None
        );
        assert_eq!(
            proxy_from(&[proxy, ("no_proxy", ".example.com")], host),
            None
        );
        assert_eq!(
            proxy_from(&[proxy, ("NO_PROXY", "other.com")], host),
            Some("proxy:3128".to_owned())
        );
        // NO_PROXY wins over no_proxy; an empty one counts as unset.
        assert_eq!(
            proxy_from(&[proxy, ("NO_PROXY", "other.com"), ("no_proxy", "*")], host),
            Some("proxy:3128".to_owned())
        );
        assert_eq!(
            proxy_from(&[proxy, ("NO_PROXY", ""), ("no_proxy", "*")], host),
            None
        );
        // An exempt host does not care about a bad proxy address.
        let bad = ("HTTPS_PROXY", "https://proxy");
        assert_eq!(proxy_from(&[bad, ("NO_PROXY", "*")], host), None);
        // Otherwise the error names the variable.
        let Err(e) = Proxy::from_vars(vars(&[("ALL_PROXY", "socks5://p:1080")]), host) else {
            panic!("socks should be rejected");
        };
        assert!(e.to_string().contains("ALL_PROXY"), "{e}");
    }

    #[test]
    fn connect_responses() {
        assert!(check_connect_response(b"HTTP/1.1 200 Connection established\r\n\r\n").is_ok());
        assert!(check_connect_response(b"HTTP/1.0 200\r\n\r\n").is_ok());
        assert!(check_connect_response(b"HTTP/1.1 200 OK\r\nVia: 1.1 squid\r\n\r\n").is_ok());
        assert!(check_connect_response(b"HTTP/1.1 204 No Content\n\n").is_ok());

        let e = check_connect_response(
            b"HTTP/1.1 407 Proxy Authentication Required\r\nProxy-Authenticate: Basic\r\n\r\n",
        );
        let Err(e @ ProxyError::AuthRequired { .. }) = e else {
            panic!("407 should ask for a login: {e:?}");
        };
        assert!(e.to_string().contains("asks for a login"), "{e}");

        let e = check_connect_response(b"HTTP/1.1 403 Forbidden\r\n\r\n");
        let Err(ProxyError::Refused {
            status: 403,
            reason,
            ..
        }) = &e
        else {
            panic!("403 should be a refusal: {e:?}");
        };
        assert_eq!(reason, "Forbidden");
        let text = e
            .as_ref()
            .err()
            .map(ToString::to_string)
            .unwrap_or_default();
        assert!(
            text.contains("403 Forbidden") && text.contains("allowed"),
            "{text}"
        );

        let e = check_connect_response(b"HTTP/1.1 502 Bad\x07 Gateway\r\n\r\n");
        assert!(
            matches!(&e, Err(ProxyError::Refused { status: 502, reason, .. }) if reason == "Bad Gateway"),
            "{e:?}"
        );

        for garbage in [
            &b"SSH-2.0-OpenSSH_9.6\r\n\r\n"[..],
            b"\x16\x03\x01\x00\xa5\x01\x00",
            b"HTTP/1.1 OK\r\n\r\n",
            b"HTTP/1.1 20 OK\r\n\r\n",
            b"HTTP/2 200\r\n\r\n",
            b"",
        ] {
            let e = check_connect_response(garbage);
            assert!(
                matches!(e, Err(ProxyError::Malformed { .. })),
                "{garbage:?}: {e:?}"
            );
        }
    }

    #[test]
    fn finds_the_end_of_the_head() {
        assert_eq!(find_head_end(b"HTTP/1.1 200 OK\r\n\r\nTLS"), Some(19));
        assert_eq!(find_head_end(b"HTTP/1.1 200 OK\n\nTLS"), Some(17));
        assert_eq!(find_head_end(b"HTTP/1.1 200 OK\r\nA: b\r\n"), None);
        assert_eq!(find_head_end(b"\r\n\r"), None);
    }

    #[test]
    fn connect_request_lines() {
        let p = parse_ok("http://u%40x:p%3Aw@proxy:3128");
        let request = p.connect_request("2001:db8::7", 443).unwrap_or_default();
        assert!(
            request.starts_with("CONNECT [2001:db8::7]:443 HTTP/1.1\r\n"),
            "{request}"
        );
        assert!(
            request.contains("\r\nHost: [2001:db8::7]:443\r\n"),
            "{request}"
        );
        // base64("u@x:p:w")
        assert!(
            request.contains("\r\nProxy-Authorization: Basic dUB4OnA6dw==\r\n"),
            "{request}"
        );
        assert!(request.ends_with("\r\n\r\n"));

        let request = parse_ok("proxy")
            .connect_request("[::1]", 443)
            .unwrap_or_default();
        assert!(
            request.starts_with("CONNECT [::1]:443 HTTP/1.1\r\n"),
            "{request}"
        );
        assert!(!request.contains("Proxy-Authorization"));

        // Nothing can be smuggled into the request.
        assert!(matches!(
            p.connect_request("relay\r\nX-Evil: 1", 443),
            Err(ProxyError::Connect { .. })
        ));
    }

    /// A one-shot proxy on 127.0.0.1: reads the request head, gives it back through the join
    /// handle, and answers with each of `answer` in turn, 50 ms apart; then keeps the connection
    /// open for `hold` before closing it.
    async fn fake_proxy_holding(
        answer: Vec<Vec<u8>>,
        hold: Duration,
    ) -> (Proxy, tokio::task::JoinHandle<Vec<String>>) {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        let task = tokio::spawn(async move {
            let (stream, _) = listener.accept().await.unwrap();
            let mut stream = BufReader::new(stream);
            let mut lines = Vec::new();
            loop {
                let mut line = String::new();
                stream.read_line(&mut line).await.unwrap();
                if line == "\r\n" || line.is_empty() {
                    break;
                }
                lines.push(line.trim_end().to_owned());
            }
            for (i, part) in answer.iter().enumerate() {
                if i > 0 {
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
                stream.get_mut().write_all(part).await.unwrap();
            }
            tokio::time::sleep(hold).await;
            lines
        });
        (parse_ok(&format!("http://127.0.0.1:{port}")), task)
    }

    async fn fake_proxy(answer: Vec<Vec<u8>>) -> (Proxy, tokio::task::JoinHandle<Vec<String>>) {
        fake_proxy_holding(answer, Duration::from_millis(500)).await
    }

    #[tokio::test]
    async fn connect_tunnels_without_over_reading() {
        let (proxy, task) = fake_proxy(vec![
            b"HTTP/1.1 200 Connection established\r\n\r\n\x16\x03\x01TLS-FIRST-BYTES".to_vec(),
        ])
        .await;
        let proxy = Proxy {
            auth: Some(("j.doe@corp".to_owned(), "pa:ss".to_owned())),
            ..proxy
        };
        let mut stream = proxy
            .connect("relay.example.com", 443, Duration::from_secs(5))
            .await
            .unwrap();
        assert!(stream.nodelay().unwrap());
        let mut first = [0u8; 18];
        stream.read_exact(&mut first).await.unwrap();
        assert_eq!(&first, b"\x16\x03\x01TLS-FIRST-BYTES");

        let lines = task.await.unwrap();
        assert_eq!(lines[0], "CONNECT relay.example.com:443 HTTP/1.1");
        assert!(
            lines.contains(&"Host: relay.example.com:443".to_owned()),
            "{lines:?}"
        );
        let basic = base64::engine::general_purpose::STANDARD.encode("j.doe@corp:pa:ss");
        assert!(
            lines.contains(&format!("Proxy-Authorization: Basic {basic}")),
            "{lines:?}"
        );
    }

    #[tokio::test]
    async fn connect_handles_a_head_in_pieces() {
        // The blank line straddles two segments, and the tunnel's bytes come with the second.
        let (proxy, task) = fake_proxy(vec![
            b"HTTP/1.1 200 OK\r\nVia: 1.1 squid\r\n\r".to_vec(),
            b"\nDATA".to_vec(),
        ])
        .await;
        let mut stream = proxy
            .connect("10.0.0.1", 8443, Duration::from_secs(5))
            .await
            .unwrap();
        let mut data = [0u8; 4];
        stream.read_exact(&mut data).await.unwrap();
        assert_eq!(&data, b"DATA");
        let lines = task.await.unwrap();
        assert_eq!(lines[0], "CONNECT 10.0.0.1:8443 HTTP/1.1");
        assert!(!lines.iter().any(|l| l.starts_with("Proxy-Authorization")));
    }

    #[tokio::test]
    async fn connect_reports_407() {
        let answer = b"HTTP/1.1 407 Proxy Authentication Required\r\n\
                       Proxy-Authenticate: Basic realm=\"corp\"\r\nContent-Length: 0\r\n\r\n";
        let (proxy, _task) = fake_proxy(vec![answer.to_vec()]).await;
        let e = proxy
            .connect("relay.example.com", 443, Duration::from_secs(5))
            .await
            .unwrap_err();
        let ProxyError::AuthRequired {
            proxy: name,
            credentials_sent: false,
        } = &e
        else {
            panic!("expected AuthRequired, got {e:?}");
        };
        assert_eq!(name, &proxy.address());
        assert!(e.to_string().contains("asks for a login"), "{e}");

        let (proxy, _task) = fake_proxy(vec![answer.to_vec()]).await;
        let proxy = Proxy {
            auth: Some(("user".to_owned(), "wrong-password".to_owned())),
            ..proxy
        };
        let e = proxy
            .connect("relay.example.com", 443, Duration::from_secs(5))
            .await
            .unwrap_err();
        assert!(
            matches!(
                e,
                ProxyError::AuthRequired {
                    credentials_sent: true,
                    ..
                }
            ),
            "{e:?}"
        );
        assert!(e.to_string().contains("refused the login"), "{e}");
        assert!(!e.to_string().contains("wrong-password"));
    }

    #[tokio::test]
    async fn connect_times_out_on_a_silent_proxy() {
        let (proxy, _task) = fake_proxy(vec![]).await;
        let start = Instant::now();
        let e = proxy
            .connect("relay.example.com", 443, Duration::from_millis(300))
            .await
            .unwrap_err();
        let elapsed = start.elapsed();
        assert!(matches!(e, ProxyError::TimedOut { secs: 1, .. }), "{e:?}");
        assert!(elapsed >= Duration::from_millis(300), "{elapsed:?}");
        assert!(elapsed < Duration::from_secs(2), "{elapsed:?}");
    }

    #[tokio::test]
    async fn connect_reports_bad_answers() {
        // Closed before the blank line.
        let (proxy, _task) =
            fake_proxy_holding(vec![b"HTTP/1.1 200 OK\r\n".to_vec()], Duration::ZERO).await;
        let e = proxy
            .connect("relay.example.com", 443, Duration::from_secs(5))
            .await
            .unwrap_err();
        assert!(
            matches!(&e, ProxyError::Malformed { reason, .. } if reason.contains("middle")),
            "{e:?}"
        );

        // Closed without a word.
        let (proxy, _task) = fake_proxy_holding(vec![], Duration::ZERO).await;
        let e = proxy
            .connect("relay.example.com", 443, Duration::from_secs(5))
            .await
            .unwrap_err();
        assert!(
            matches!(&e, ProxyError::Malformed { reason, .. } if reason.contains("without answering")),
            "{e:?}"
        );

        // A head without end.
        let endless = [b"HTTP/1.1 200 OK\r\n".to_vec(), b"X-Padding: ".repeat(2000)].concat();
        let (proxy, _task) = fake_proxy(vec![endless]).await;
        let e = proxy
            .connect("relay.example.com", 443, Duration::from_secs(5))
            .await
            .unwrap_err();
        assert!(
            matches!(&e, ProxyError::Malformed { reason, .. } if reason.contains("16 KiB")),
            "{e:?}"
        );

        // Not a proxy at all.
        let (proxy, _task) = fake_proxy(vec![b"SSH-2.0-OpenSSH_9.6\r\n\r\n".to_vec()]).await;
        let e = proxy
            .connect("relay.example.com", 443, Duration::from_secs(5))
            .await
            .unwrap_err();
        assert!(matches!(e, ProxyError::Malformed { .. }), "{e:?}");
    }

    #[tokio::test]
    async fn connect_reports_an_unreachable_proxy() {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        drop(listener);
        let proxy = parse_ok(&format!("http://127.0.0.1:{port}"));
        let e = proxy
            .connect("relay.example.com", 443, Duration::from_secs(5))
            .await
            .unwrap_err();
        assert!(matches!(e, ProxyError::Connect { .. }), "{e:?}");
        assert!(
            e.to_string()
                .starts_with(&format!("cannot reach the HTTP proxy 127.0.0.1:{port}: "))
        );
    }
}
