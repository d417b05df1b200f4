//! HTTP/1.1 to the PBX in the request's own task: the request head is written
//! straight to the connection, the response head parsed from its read buffer,
//! and the body read from the socket as the client takes it.
//!
//! hyper's client runs each connection as a task of its own and passes every
//! request, response and body chunk between tasks through channels; on the
//! 2-core bench those hops cost as much CPU per request as nginx spends on the
//! whole request (bench/README). Here one task does it all, as nginx does.

use std::io;
use std::mem::MaybeUninit;
use std::pin::Pin;
use std::task::{ready, Context, Poll};

use bytes::{Buf, Bytes, BytesMut};
use http::header::{HeaderName, HeaderValue, CONNECTION, CONTENT_LENGTH, SET_COOKIE, TRANSFER_ENCODING};
use http::{HeaderMap, Method, Response, StatusCode, Version};
use http_body_util::{LengthLimitError, Limited};
use hyper::body::{Body, Incoming, SizeHint};
use smallvec::SmallVec;
use tokio::io::{AsyncWrite, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio_rustls::client::TlsStream;

use super::headers::{is_gateway_cookie, HOP_BY_HOP};

/// Largest response head accepted from the PBX (hyper's client allows about
/// as much).
const MAX_HEAD: usize = 256 * 1024;
/// Most header lines in one response head.
const MAX_HEADERS: usize = 128;
/// How much to read at a time.
const READ_SIZE: usize = 16 * 1024;
/// Longest chunk-size line (with extensions) or trailer line.
const MAX_LINE: usize = 4096;

/// Where each header's name and value lie in a response head (offset and
/// length of each), on the stack for a typical head.
type SmallSpans = SmallVec<[(usize, usize, usize, usize); 24]>;

/// A connection to the PBX: plain TCP (left) or TLS (right). tokio-util's
/// `Either` passes reads and writes to whichever it is.
pub type Stream = tokio_util::either::Either<TcpStream, Box<TlsStream<TcpStream>>>;

fn tcp(stream: &Stream) -> &TcpStream {
    match stream {
        Stream::Left(tcp) => tcp,
        Stream::Right(tls) => tls.get_ref().0,
    }
}

/// A connection and what has been read from it but not yet used.
pub struct Conn {
    pub io: Stream,
    pub read: BytesMut,
}

impl Conn {
    /// Whether the PBX closed this idle connection or sent on it unasked.
    /// Costs no system call unless the socket became readable while idle.
    pub fn is_stale(&self) -> bool {
        if !self.read.is_empty() {
            return true;
        }
        let tcp = tcp(&self.io);
        let mut cx = Context::from_waker(std::task::Waker::noop());
        match tcp.poll_read_ready(&mut cx) {
            Poll::Pending => false,
            Poll::Ready(Err(_)) => true,
            Poll::Ready(Ok(())) => {
                let mut byte = [0u8; 1];
                !matches!(tcp.try_read(&mut byte), Err(e) if e.kind() == io::ErrorKind::WouldBlock)
            }
        }
    }
}

/// Why an exchange gave no response.
#[derive(Debug)]
pub enum Broken {
    /// The request head could not be written: the PBX never saw the request.
    Unsent(io::Error),
    /// The PBX closed the connection (or reset it) before any byte of an answer.
    Closed(io::Error),
    /// The client's body went over `limits.max_request_body`.
    TooLarge,
    /// The client's body broke off or was badly framed (a bad chunk size):
    /// the client's doing, not the PBX's.
    ClientBody(String),
    /// Anything else: a read or write error mid-way, or not HTTP.
    Failed(String),
}

impl std::fmt::Display for Broken {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Broken::Unsent(e) => write!(f, "request not sent: {e}"),
            Broken::Closed(e) => write!(f, "connection closed before the response: {e}"),
            Broken::TooLarge => f.write_str("request body too large"),
            Broken::ClientBody(e) => write!(f, "reading the client's body: {e}"),
            Broken::Failed(e) => f.write_str(e),
        }
    }
}

/// A response head read from the PBX, and how its body is framed.
pub struct Head {
    pub response: Response<()>,
    pub framing: Framing,
    /// Whether the connection may take another request once the body is read.
    pub reusable: bool,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Framing {
    /// No body (HEAD, 204, 304, `Content-Length: 0`) or a protocol switch.
    Empty,
    Length(u64),
    Chunked,
    /// Until the PBX closes the connection.
    Close,
}

/// Writes `request` on `conn` (its body streamed, capped at `max_body`) and
/// reads the response head, skipping interim (1xx) responses other than 101.
/// The PBX may answer before the body is all sent (a refused upload): the
/// answer is taken and the connection not reused.
pub async fn exchange(
    conn: &mut Conn,
    head: &[u8],
    body: &mut Option<Limited<Incoming>>,
    chunked: bool,
    method: &Method,
) -> Result<Head, Broken> {
    conn.io.write_all(head).await.map_err(Broken::Unsent)?;
    conn.io.flush().await.map_err(Broken::Unsent)?;
    let mut upload = body.take().map(|body| Upload::new(body, chunked));
    std::future::poll_fn(|cx| loop {
        if let Poll::Ready(head) = poll_head(conn, cx, method) {
            let mut head = head?;
            if upload.as_ref().is_some_and(|u| !u.sent) {
                // Answered mid-upload: what is left of the body is not sent.
                head.reusable = false;
            }
            return Poll::Ready(Ok(head));
        }
        match upload.as_mut() {
            Some(u) if !u.sent => {
                ready!(u.poll_send(&mut conn.io, cx))?;
            }
            _ => return Poll::Pending,
        }
    })
    .await
}

/// Reads into `conn.read` until a final response head is there, then parses it.
fn poll_head(conn: &mut Conn, cx: &mut Context<'_>, method: &Method) -> Poll<Result<Head, Broken>> {
    let mut received = !conn.read.is_empty();
    loop {
        if !conn.read.is_empty() {
            if let Some(head) = parse_head(&mut conn.read, method)? {
                return Poll::Ready(Ok(head));
            }
            if conn.read.len() >= MAX_HEAD {
                return Poll::Ready(Err(Broken::Failed("response head too large".into())));
            }
        }
        match ready!(poll_read(&mut conn.io, &mut conn.read, cx)) {
            Ok(0) if received => {
                return Poll::Ready(Err(Broken::Failed("connection closed mid-head".into())))
            }
            Ok(0) => return Poll::Ready(Err(Broken::Closed(io::ErrorKind::UnexpectedEof.into()))),
            Ok(_) => received = true,
            Err(e) if !received && is_reset(&e) => return Poll::Ready(Err(Broken::Closed(e))),
            Err(e) => return Poll::Ready(Err(Broken::Failed(format!("reading the response: {e}")))),
        }
    }
}

fn is_reset(e: &io::Error) -> bool {
    matches!(
        e.kind(),
        io::ErrorKind::ConnectionReset | io::ErrorKind::BrokenPipe | io::ErrorKind::ConnectionAborted
    )
}

/// Reads what the connection has into `buf`; `Ok(0)` at its end.
fn poll_read(io: &mut Stream, buf: &mut BytesMut, cx: &mut Context<'_>) -> Poll<io::Result<usize>> {
    if buf.capacity() - buf.len() < READ_SIZE / 4 {
        buf.reserve(READ_SIZE);
    }
    tokio_util::io::poll_read_buf(Pin::new(io), cx, buf)
}

/// Parses one response head off the front of `buf`: `None` while incomplete.
/// An interim response (100 Continue, 103 Early Hints) is dropped and the
/// next one parsed.
fn parse_head(buf: &mut BytesMut, method: &Method) -> Result<Option<Head>, Broken> {
    loop {
        // Left uninitialised: httparse writes the lines it finds (zeroing
        // 128 of them cost more than parsing a typical head).
        let mut lines = [const { MaybeUninit::<httparse::Header>::uninit() }; MAX_HEADERS];
        let mut parsed = httparse::Response::new(&mut []);
        let config = httparse::ParserConfig::default();
        let len = match config.parse_response_with_uninit_headers(&mut parsed, &buf[..], &mut lines) {
            Ok(httparse::Status::Complete(len)) => len,
            Ok(httparse::Status::Partial) => return Ok(None),
            Err(e) => return Err(Broken::Failed(format!("the upstream's response is not HTTP/1.1: {e}"))),
        };
        let status = parsed
            .code
            .and_then(|c| StatusCode::from_u16(c).ok())
            .ok_or_else(|| Broken::Failed("bad response status".into()))?;
        if status.is_informational() && status != StatusCode::SWITCHING_PROTOCOLS {
            buf.advance(len);
            continue;
        }
        let version = if parsed.version == Some(0) { Version::HTTP_10 } else { Version::HTTP_11 };
        // Header values are slices of the head's bytes: no copy each.
        let base = buf.as_ptr() as usize;
        let spans: SmallSpans = parsed
            .headers
            .iter()
            .map(|line| {
                let name = line.name.as_ptr() as usize - base;
                let value = line.value.as_ptr() as usize - base;
                (name, line.name.len(), value, line.value.len())
            })
            .collect();
        let head = buf.split_to(len).freeze();
        let mut headers = HeaderMap::with_capacity(spans.len());
        let mut seen = Seen::default();
        for &(name, name_len, value, value_len) in spans.iter() {
            let name = HeaderName::from_bytes(&head[name..name + name_len])
                .map_err(|_| Broken::Failed("bad header name in the response".into()))?;
            let raw = &head[value..value + value_len];
            // The framing and connection headers are read, and left out
            // with the other hop-by-hop ones: hyper frames the client's copy.
            if name == CONTENT_LENGTH {
                seen.content_length(raw);
            } else if name == TRANSFER_ENCODING {
                seen.transfer_encoding(raw);
                continue;
            } else if name == CONNECTION {
                seen.connection(raw);
                continue;
            } else if HOP_BY_HOP.contains(&name) {
                continue;
            } else if name == SET_COOKIE && is_gateway_cookie(raw) {
                // One the PBX could plant or clear would be a session fixed
                // or ended from behind the gateway.
                seen.planted_cookie = true;
                continue;
            }
            let value = HeaderValue::from_maybe_shared(head.slice(value..value + value_len))
                .map_err(|_| Broken::Failed("bad header value in the response".into()))?;
            headers.append(name, value);
        }
        for name in &seen.listed {
            headers.remove(name);
        }
        if seen.planted_cookie {
            tracing::warn!("the upstream tried to set pbxgate's own cookie: removed from its response");
        }
        if seen.chunked.is_some() {
            // Transfer-Encoding overrides it, and it must not be forwarded (RFC 9112 6.3).
            headers.remove(CONTENT_LENGTH);
        }
        let (framing, reusable) = seen.framing(method, status)?;
        let reusable = reusable && seen.keeps_alive(version);
        let mut response = Response::new(());
        *response.status_mut() = status;
        *response.version_mut() = version;
        *response.headers_mut() = headers;
        return Ok(Some(Head { response, framing, reusable }));
    }
}

/// What a response head's framing and connection headers said.
#[derive(Default)]
struct Seen {
    /// Transfer-Encoding: whether its last coding is chunked.
    chunked: Option<bool>,
    /// Content-Length: every value agreed on this one (`Err` if not, or not a number).
    length: Option<Result<u64, ()>>,
    close: bool,
    keep_alive: bool,
    /// Other names `Connection` listed: hop-by-hop too.
    listed: SmallVec<[HeaderName; 2]>,
    /// A `Set-Cookie` for the gateway's own cookies was left out.
    planted_cookie: bool,
}

impl Seen {
    fn transfer_encoding(&mut self, value: &[u8]) {
        let last = value.rsplit(|&b| b == b',').next().unwrap_or_default();
        self.chunked = Some(last.trim_ascii().eq_ignore_ascii_case(b"chunked"));
    }

    fn content_length(&mut self, value: &[u8]) {
        for part in value.split(|&b| b == b',').map(<[u8]>::trim_ascii) {
            let n = std::str::from_utf8(part)
                .ok()
                .filter(|p| !p.is_empty() && p.bytes().all(|b| b.is_ascii_digit()))
                .and_then(|p| p.parse::<u64>().ok());
            self.length = match (self.length, n) {
                (None, Some(n)) => Some(Ok(n)),
                (Some(Ok(l)), Some(n)) if l == n => Some(Ok(n)),
                _ => Some(Err(())),
            };
        }
    }

    fn connection(&mut self, value: &[u8]) {
        for token in value.split(|&b| b == b',').map(<[u8]>::trim_ascii).filter(|t| !t.is_empty()) {
            if token.eq_ignore_ascii_case(b"close") {
                self.close = true;
            } else if token.eq_ignore_ascii_case(b"keep-alive") {
                self.keep_alive = true;
            } else if let Ok(name) = HeaderName::from_bytes(token) {
                self.listed.push(name);
            }
        }
    }

    /// How the body ends (RFC 9112 section 6.3), and whether that leaves the
    /// connection fit for another request.
    fn framing(&self, method: &Method, status: StatusCode) -> Result<(Framing, bool), Broken> {
        if status == StatusCode::SWITCHING_PROTOCOLS {
            return Ok((Framing::Empty, false));
        }
        if *method == Method::HEAD || status == StatusCode::NO_CONTENT || status == StatusCode::NOT_MODIFIED {
            return Ok((Framing::Empty, true));
        }
        if let Some(chunked) = self.chunked {
            // With a Content-Length too, the message is suspect: read it by
            // its chunks and do not reuse the connection.
            let alone = self.length.is_none();
            return Ok(if chunked { (Framing::Chunked, alone) } else { (Framing::Close, false) });
        }
        Ok(match self.length {
            Some(Err(())) => return Err(Broken::Failed("bad Content-Length in the response".into())),
            Some(Ok(0)) => (Framing::Empty, true),
            Some(Ok(n)) => (Framing::Length(n), true),
            None => (Framing::Close, false),
        })
    }

    fn keeps_alive(&self, version: Version) -> bool {
        if version == Version::HTTP_10 {
            self.keep_alive
        } else {
            !self.close
        }
    }
}

/// The client's request body on its way to the PBX, framed as the head said.
struct Upload {
    body: Limited<Incoming>,
    chunked: bool,
    /// Bytes of the current frame (and its chunk framing) still to write.
    pending: [Bytes; 3],
    /// The client's body has ended.
    done: bool,
    /// And all of it is written.
    sent: bool,
}

impl Upload {
    fn new(body: Limited<Incoming>, chunked: bool) -> Self {
        Self { body, chunked, pending: Default::default(), done: false, sent: false }
    }

    /// Writes the body until it is all sent, or the connection cannot take more.
    fn poll_send(&mut self, io: &mut Stream, cx: &mut Context<'_>) -> Poll<Result<(), Broken>> {
        loop {
            if let Some(piece) = self.pending.iter_mut().find(|p| !p.is_empty()) {
                let n = ready!(Pin::new(&mut *io).poll_write(cx, piece))
                    .map_err(|e| Broken::Failed(format!("sending the request body: {e}")))?;
                if n == 0 {
                    return Poll::Ready(Err(Broken::Failed(
                        "sending the request body: connection closed".into(),
                    )));
                }
                piece.advance(n);
                continue;
            }
            if self.done {
                // A TLS stream may still hold the last record.
                ready!(Pin::new(io).poll_flush(cx))
                    .map_err(|e| Broken::Failed(format!("sending the request body: {e}")))?;
                self.sent = true;
                return Poll::Ready(Ok(()));
            }
            match ready!(Pin::new(&mut self.body).poll_frame(cx)) {
                Some(Ok(frame)) => {
                    // Trailers are not forwarded.
                    let Ok(data) = frame.into_data() else { continue };
                    if data.is_empty() {
                        continue;
                    }
                    self.pending = if self.chunked {
                        [chunk_size_line(data.len()), data, Bytes::from_static(b"\r\n")]
                    } else {
                        [data, Bytes::new(), Bytes::new()]
                    };
                }
                Some(Err(e)) if e.is::<LengthLimitError>() => return Poll::Ready(Err(Broken::TooLarge)),
                Some(Err(e)) => return Poll::Ready(Err(Broken::ClientBody(e.to_string()))),
                None => {
                    self.done = true;
                    if self.chunked {
                        self.pending = [Bytes::from_static(b"0\r\n\r\n"), Bytes::new(), Bytes::new()];
                    }
                }
            }
        }
    }
}

/// The line that starts a chunk of `len` bytes.
fn chunk_size_line(len: usize) -> Bytes {
    Bytes::from(format!("{len:x}\r\n"))
}

/// Reads a response body off its connection as its framing says.
pub struct Reader {
    state: State,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum State {
    /// Body bytes still to come.
    Length(u64),
    /// Reading a chunk-size line.
    ChunkSize,
    /// Inside a chunk: bytes still to come.
    ChunkData(u64),
    /// The CRLF after a chunk's data.
    ChunkEnd,
    /// Trailer lines after the last chunk, until an empty one.
    Trailers,
    Close,
    Done,
}

impl Reader {
    pub fn new(framing: Framing) -> Self {
        let state = match framing {
            Framing::Empty | Framing::Length(0) => State::Done,
            Framing::Length(n) => State::Length(n),
            Framing::Chunked => State::ChunkSize,
            Framing::Close => State::Close,
        };
        Self { state }
    }

    pub fn is_done(&self) -> bool {
        self.state == State::Done
    }

    pub fn size_hint(&self) -> SizeHint {
        match self.state {
            State::Length(n) => SizeHint::with_exact(n),
            State::Done => SizeHint::with_exact(0),
            _ => SizeHint::default(),
        }
    }

    /// The next piece of the body, `None` at its end.
    pub fn poll_data(
        &mut self,
        conn: &mut Conn,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Bytes, String>>> {
        loop {
            let buf = &mut conn.read;
            match self.state {
                State::Done => return Poll::Ready(None),
                State::Length(left) | State::ChunkData(left) if !buf.is_empty() => {
                    let take = usize::try_from(left).map_or(buf.len(), |l| l.min(buf.len()));
                    let data = buf.split_to(take).freeze();
                    let left = left - take as u64;
                    self.state = match self.state {
                        State::Length(_) if left == 0 => State::Done,
                        State::Length(_) => State::Length(left),
                        _ if left == 0 => State::ChunkEnd,
                        _ => State::ChunkData(left),
                    };
                    return Poll::Ready(Some(Ok(data)));
                }
                State::Close if !buf.is_empty() => return Poll::Ready(Some(Ok(buf.split().freeze()))),
                State::ChunkSize | State::ChunkEnd | State::Trailers => {
                    if let Some(end) = buf.iter().position(|&b| b == b'\n') {
                        let line = buf.split_to(end + 1);
                        match next_chunk_state(self.state, &line) {
                            Ok(state) => self.state = state,
                            Err(e) => return Poll::Ready(Some(Err(e))),
                        }
                        continue;
                    }
                    if buf.len() > MAX_LINE {
                        return Poll::Ready(Some(Err("chunk line too long".into())));
                    }
                }
                _ => {}
            }
            match ready!(poll_read(&mut conn.io, &mut conn.read, cx)) {
                Ok(0) if self.state == State::Close => {
                    self.state = State::Done;
                    return Poll::Ready(None);
                }
                Ok(0) => return Poll::Ready(Some(Err("the upstream closed the connection mid-body".into()))),
                Ok(_) => {}
                Err(e) => return Poll::Ready(Some(Err(format!("reading the response body: {e}")))),
            }
        }
    }
}

/// The state after one line of chunked framing (with its LF).
fn next_chunk_state(state: State, whole: &[u8]) -> Result<State, String> {
    let Some(line) = whole.strip_suffix(b"\r\n") else {
        return Err("chunk line not ended by CRLF".into());
    };
    Ok(match state {
        State::ChunkEnd if line.is_empty() => State::ChunkSize,
        State::ChunkEnd => return Err("chunk longer than its size".into()),
        State::Trailers if line.is_empty() => State::Done,
        State::Trailers => State::Trailers,
        _ => match chunk_size(whole) {
            Some(0) => State::Trailers,
            Some(n) => State::ChunkData(n),
            None => return Err("bad chunk size".into()),
        },
    })
}

/// A chunk-size line's size (the line with its CRLF), read as httparse, and
/// so hyper, reads it: hex digits only (no sign, no `0x`), at most 16, then
/// optional blanks and extensions. Stricter in one point: the size is not
/// empty. A size another parser reads differently would be a desync.
fn chunk_size(whole: &[u8]) -> Option<u64> {
    match httparse::parse_chunk_size(whole) {
        Ok(httparse::Status::Complete((used, size)))
            if used == whole.len() && whole.first().is_some_and(u8::is_ascii_hexdigit) =>
        {
            Some(size)
        }
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn head(bytes: &[u8], method: &Method) -> Result<Option<Head>, Broken> {
        parse_head(&mut BytesMut::from(bytes), method)
    }

    fn framed(bytes: &[u8]) -> (Framing, bool) {
        let head = head(bytes, &Method::GET).expect("parses").expect("complete");
        (head.framing, head.reusable)
    }

    #[test]
    fn response_heads_are_framed_as_rfc_9112_says() {
        assert_eq!(framed(b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\n"), (Framing::Length(5), true));
        assert_eq!(framed(b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n"), (Framing::Empty, true));
        assert_eq!(framed(b"HTTP/1.1 200 OK\r\nContent-Length: 7, 7\r\n\r\n"), (Framing::Length(7), true));
        assert_eq!(
            framed(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n"),
            (Framing::Chunked, true)
        );
        // Both: read by its chunks, never reused.
        assert_eq!(
            framed(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\nContent-Length: 3\r\n\r\n"),
            (Framing::Chunked, false)
        );
        assert_eq!(framed(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: gzip\r\n\r\n"), (Framing::Close, false));
        assert_eq!(framed(b"HTTP/1.1 200 OK\r\n\r\n"), (Framing::Close, false));
        assert_eq!(framed(b"HTTP/1.1 204 No Content\r\n\r\n"), (Framing::Empty, true));
        assert_eq!(framed(b"HTTP/1.1 304 Not Modified\r\nContent-Length: 9\r\n\r\n"), (Framing::Empty, true));
        assert_eq!(
            framed(b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\nConnection: close\r\n\r\n"),
            (Framing::Length(5), false)
        );
        assert_eq!(framed(b"HTTP/1.0 200 OK\r\nContent-Length: 5\r\n\r\n"), (Framing::Length(5), false));
        assert_eq!(
            framed(b"HTTP/1.0 200 OK\r\nContent-Length: 5\r\nConnection: keep-alive\r\n\r\n"),
            (Framing::Length(5), true)
        );
        let answer = head(b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\n", &Method::HEAD)
            .expect("ok")
            .expect("complete");
        assert_eq!(answer.framing, Framing::Empty);
        for bad in [&b"5, 6"[..], b"-1", b"", b"0x10", b"99999999999999999999999"] {
            let mut bytes = b"HTTP/1.1 200 OK\r\nContent-Length: ".to_vec();
            bytes.extend_from_slice(bad);
            bytes.extend_from_slice(b"\r\n\r\n");
            assert!(head(&bytes, &Method::GET).is_err(), "{}", String::from_utf8_lossy(bad));
        }
        assert!(head(b"NOT HTTP\r\n\r\n", &Method::GET).is_err());
    }

    #[test]
    fn hop_by_hop_headers_are_left_out_of_the_response() {
        let answer = head(
            b"HTTP/1.1 200 OK\r\nConnection: keep-alive, X-Secret\r\nKeep-Alive: timeout=5\r\n\
              X-Secret: 1\r\nUpgrade: h2c\r\nProxy-Authenticate: Basic\r\nX-Kept: 2\r\n\
              Content-Length: 5\r\n\r\n",
            &Method::GET,
        )
        .expect("ok")
        .expect("complete");
        let mut names: Vec<&str> = answer.response.headers().keys().map(|n| n.as_str()).collect();
        names.sort_unstable();
        assert_eq!(names, ["content-length", "x-kept"]);
        assert_eq!((answer.framing, answer.reusable), (Framing::Length(5), true));
        // Transfer-Encoding wins over a Content-Length, which is not passed on.
        let answer =
            head(b"HTTP/1.1 200 OK\r\nContent-Length: 3\r\nTransfer-Encoding: chunked\r\n\r\n", &Method::GET)
                .expect("ok")
                .expect("complete");
        assert!(answer.response.headers().is_empty(), "{:?}", answer.response.headers());
        assert_eq!((answer.framing, answer.reusable), (Framing::Chunked, false));
    }

    #[test]
    fn the_pbx_cannot_set_the_gateways_cookies() {
        let answer = head(
            b"HTTP/1.1 302 Found\r\nSet-Cookie: pbxlang=de; Path=/\r\nSet-Cookie: __Host-pbxgate=planted\r\n\
              set-cookie:  __HOST-PBXGATE-remember=x\r\nContent-Length: 0\r\n\r\n",
            &Method::GET,
        )
        .expect("ok")
        .expect("complete");
        let set: Vec<_> = answer.response.headers().get_all(http::header::SET_COOKIE).iter().collect();
        assert_eq!(set, ["pbxlang=de; Path=/"]);
    }

    #[test]
    fn interim_responses_are_skipped_and_the_rest_kept() {
        let mut buf = BytesMut::from(
            &b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 201 Created\r\nX-A: 1\r\nContent-Length: 2\r\n\r\nok"[..],
        );
        let answer = parse_head(&mut buf, &Method::POST).expect("ok").expect("complete");
        assert_eq!(answer.response.status(), StatusCode::CREATED);
        assert_eq!(answer.response.headers()["x-a"], "1");
        assert_eq!(&buf[..], b"ok");
        let mut partial = BytesMut::from(&b"HTTP/1.1 200 OK\r\nContent-Le"[..]);
        assert!(parse_head(&mut partial, &Method::GET).expect("ok").is_none());
        let switched = head(b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\n\r\n", &Method::GET);
        assert_eq!(
            switched.expect("ok").expect("complete").response.status(),
            StatusCode::SWITCHING_PROTOCOLS
        );
    }

    /// A body read off a real loopback connection, sent in `pieces`; the
    /// sender closes its end after them if `close`.
    async fn read_body(framing: Framing, pieces: &[&[u8]], close: bool) -> Result<(Vec<u8>, Conn), String> {
        use tokio::io::AsyncWriteExt;
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let addr = listener.local_addr().expect("addr");
        let pieces: Vec<Vec<u8>> = pieces.iter().map(|p| p.to_vec()).collect();
        // Its output, the socket, stays open until the handle is dropped.
        let _writer = tokio::spawn(async move {
            let (mut socket, _) = listener.accept().await.expect("accept");
            for piece in pieces {
                socket.write_all(&piece).await.expect("write");
                tokio::time::sleep(std::time::Duration::from_millis(5)).await;
            }
            (!close).then_some(socket)
        });
        let tcp = TcpStream::connect(addr).await.expect("connect");
        let mut conn = Conn { io: Stream::Left(tcp), read: BytesMut::new() };
        let mut reader = Reader::new(framing);
        let mut body = Vec::new();
        while let Some(data) = std::future::poll_fn(|cx| reader.poll_data(&mut conn, cx)).await {
            body.extend_from_slice(&data?);
        }
        Ok((body, conn))
    }

    #[tokio::test]
    async fn chunked_bodies_are_decoded_across_reads() {
        let (body, conn) = read_body(
            Framing::Chunked,
            &[b"5\r\nhel", b"lo\r\n6;ext=1\r\n world\r", b"\n0\r\nTrailer: x\r\n", b"\r\nEXTRA"],
            false,
        )
        .await
        .expect("decoded");
        assert_eq!(body, b"hello world");
        assert_eq!(&conn.read[..], b"EXTRA", "bytes past the end are left, so the connection is not reused");
        for bad in [
            &b"zz\r\nhello\r\n0\r\n\r\n"[..],
            b"5\r\nhelloX\r\n0\r\n\r\n",
            b"5\nhello\r\n0\r\n\r\n",
            b"+5\r\nhello\r\n0\r\n\r\n",
            b"0x5\r\nhello\r\n0\r\n\r\n",
            b" 5\r\nhello\r\n0\r\n\r\n",
            b"5\x0c\r\nhello\r\n0\r\n\r\n",
        ] {
            assert!(
                read_body(Framing::Chunked, &[bad], false).await.is_err(),
                "{}",
                String::from_utf8_lossy(bad)
            );
        }
    }

    #[tokio::test]
    async fn length_bodies_stop_at_their_length() {
        let (body, conn) = read_body(Framing::Length(10), &[b"01234", b"56789"], false).await.expect("read");
        assert_eq!(body, b"0123456789");
        assert!(conn.read.is_empty());
        let (body, _) = read_body(Framing::Close, &[b"until ", b"the end"], true).await.expect("read");
        assert_eq!(body, b"until the end");
        assert!(read_body(Framing::Length(10), &[b"short"], true).await.is_err(), "closed mid-body");
    }

    /// Differential tests: what this module reads, httparse (and so hyper,
    /// and most servers' parsers) reads the same way, on the same bytes.
    mod differential {
        use proptest::prelude::*;

        use super::*;

        /// Bytes a chunk-size line is made of, tricky ones often.
        fn size_line() -> impl Strategy<Value = Vec<u8>> {
            let byte = prop_oneof![
                4 => proptest::sample::select(b"0123456789abcdefABCDEF".to_vec()),
                1 => proptest::sample::select(b"+- \t;=x\r\n\x0b\x0c\"".to_vec()),
                1 => any::<u8>(),
            ];
            proptest::collection::vec(byte, 0..24).prop_map(|mut line| {
                // As the reader hands it over: up to its first LF, CRLF-ended.
                line.retain(|&b| b != b'\n');
                line.extend_from_slice(b"\r\n");
                line
            })
        }

        /// A response head of header lines picked from framing ones that
        /// parsers are known to disagree on, and plain ones.
        fn response_head() -> impl Strategy<Value = Vec<u8>> {
            let line = proptest::sample::select(vec![
                "Content-Length: 5",
                "Content-Length: 0",
                "Content-Length: 7",
                "Content-Length: 5, 5",
                "Content-Length: 5,7",
                "Content-Length: +5",
                "Content-Length: -1",
                "Content-Length:  5 ",
                "Content-Length: 0x5",
                "Content-Length: 5 5",
                "Content-Length: 99999999999999999999",
                "Content-Length:",
                "Transfer-Encoding: chunked",
                "Transfer-Encoding: CHUNKED",
                "Transfer-Encoding: gzip, chunked",
                "Transfer-Encoding: chunked, gzip",
                "Transfer-Encoding: xchunked",
                "Transfer-Encoding: identity",
                "Transfer-Encoding:",
                "Connection: close",
                "Connection: keep-alive",
                "X-Plain: value",
            ]);
            let status =
                proptest::sample::select(vec!["200 OK", "204 No Content", "304 Not Modified", "404 X"]);
            let version = proptest::sample::select(vec!["HTTP/1.1", "HTTP/1.0"]);
            (version, status, proptest::collection::vec(line, 0..5)).prop_map(|(version, status, lines)| {
                let mut head = format!("{version} {status}\r\n");
                for line in lines {
                    head.push_str(line);
                    head.push_str("\r\n");
                }
                head.push_str("\r\n");
                head.into_bytes()
            })
        }

        /// RFC 9112 section 6.3, read off httparse's headers: how a response
        /// to a GET is framed, `None` where it must be refused.
        fn rfc_framing(head: &[u8]) -> Option<Framing> {
            let mut lines = [httparse::EMPTY_HEADER; 32];
            let mut parsed = httparse::Response::new(&mut lines);
            let httparse::Status::Complete(_) = parsed.parse(head).ok()? else { return None };
            let status = parsed.code?;
            if status == 204 || status == 304 {
                return Some(Framing::Empty);
            }
            let mut chunked = None;
            let mut length: Option<Option<u64>> = None;
            for header in parsed.headers.iter() {
                if header.name.eq_ignore_ascii_case("transfer-encoding") {
                    let last = header.value.rsplit(|&b| b == b',').next().unwrap_or_default();
                    chunked = Some(last.trim_ascii().eq_ignore_ascii_case(b"chunked"));
                } else if header.name.eq_ignore_ascii_case("content-length") {
                    for part in header.value.split(|&b| b == b',') {
                        let part = part.trim_ascii();
                        let n = (!part.is_empty() && part.iter().all(u8::is_ascii_digit))
                            .then(|| std::str::from_utf8(part).ok()?.parse::<u64>().ok())
                            .flatten();
                        length = Some(match (length, n) {
                            (None, Some(n)) => Some(n),
                            (Some(Some(l)), Some(n)) if l == n => Some(n),
                            _ => None,
                        });
                    }
                }
            }
            match (chunked, length) {
                (Some(true), _) => Some(Framing::Chunked),
                (Some(false), _) => Some(Framing::Close),
                (None, Some(None)) => None,
                (None, Some(Some(0))) => Some(Framing::Empty),
                (None, Some(Some(n))) => Some(Framing::Length(n)),
                (None, None) => Some(Framing::Close),
            }
        }

        proptest! {
            #![proptest_config(ProptestConfig::with_cases(2000))]

            #[test]
            fn chunk_sizes_read_as_httparse_reads_them(line in size_line()) {
                let ours = chunk_size(&line);
                let theirs = match httparse::parse_chunk_size(&line) {
                    Ok(httparse::Status::Complete((used, size))) if used == line.len() => Some(size),
                    _ => None,
                };
                if let Some(size) = ours {
                    prop_assert_eq!(Some(size), theirs, "{:?}", String::from_utf8_lossy(&line));
                }
                // Only an empty size is refused where httparse reads one (0).
                if ours.is_none() && theirs.is_some() {
                    prop_assert!(!line[0].is_ascii_hexdigit(), "{:?}", String::from_utf8_lossy(&line));
                }
            }

            #[test]
            fn chunk_size_lines_written_upstream_read_back_as_their_length(len in any::<usize>()) {
                let line = chunk_size_line(len);
                prop_assert_eq!(chunk_size(&line), Some(len as u64));
                prop_assert_eq!(
                    httparse::parse_chunk_size(&line),
                    Ok(httparse::Status::Complete((line.len(), len as u64)))
                );
            }

            #[test]
            fn response_heads_are_framed_as_rfc_9112_reads_httparses_headers(bytes in response_head()) {
                let ours = parse_head(&mut BytesMut::from(&bytes[..]), &Method::GET);
                let expected = rfc_framing(&bytes);
                let text = String::from_utf8_lossy(&bytes).into_owned();
                match ours {
                    Ok(Some(head)) => {
                        prop_assert_eq!(Some(head.framing), expected, "{}", text);
                        // Both framings, or none: never reused.
                        let te = text.to_ascii_lowercase().contains("transfer-encoding");
                        if te && text.to_ascii_lowercase().contains("content-length") {
                            prop_assert!(!head.reusable || head.framing == Framing::Empty, "{}", text);
                        }
                        if head.framing == Framing::Close {
                            prop_assert!(!head.reusable, "{}", text);
                        }
                    }
                    Ok(None) => prop_assert!(false, "a complete head read as partial: {}", text),
                    Err(_) => prop_assert_eq!(expected, None, "{}", text),
                }
            }
        }
    }
}
