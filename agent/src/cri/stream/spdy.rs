//! SPDY/3.1 framing, the server side of what Kubernetes' streaming protocols (exec, attach,
//! port-forward) run over: kubelet and `critest` speak it to a runtime's streaming server through
//! Go's spdystream. Only what those peers use is built: streams the client opens (SYN_STREAM,
//! answered with SYN_REPLY), data both ways with half-close (FIN), RST_STREAM, PING (echoed) and
//! GOAWAY. SETTINGS, HEADERS and WINDOW_UPDATE are read and ignored: spdystream does no flow
//! control, and a peer that did would only be slowed by its own windows.
//!
//! Frames (SPDY/3 draft, section 2.2): a control frame starts with the control bit, the version
//! (3) and a 16-bit type, then 8 flag bits and a 24-bit length; a data frame with a clear bit and
//! a 31-bit stream id, then flags and length. Header blocks are a count and length-prefixed
//! names and values, compressed with one zlib stream per direction for the whole connection,
//! primed with the protocol's dictionary.

use std::{collections::HashMap, io, sync::OnceLock};

use flate2::{Compress, Compression, Decompress, FlushCompress, FlushDecompress, Status};
use tokio::{
    io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt},
    sync::mpsc,
};

/// The SPDY version spoken.
const VERSION: u16 = 3;
/// Frame types.
const SYN_STREAM: u16 = 1;
const SYN_REPLY: u16 = 2;
const RST_STREAM: u16 = 3;
const PING: u16 = 6;
const GOAWAY: u16 = 7;
/// The FIN flag (control and data frames alike).
const FLAG_FIN: u8 = 0x01;
/// RST_STREAM status: the stream was refused / cancelled.
pub const RST_CANCEL: u32 = 5;
/// Largest frame body read. Kubernetes' clients send data in pieces of 32 KiB (Go's io.Copy);
/// a larger frame ends the connection, so a client cannot make the agent buffer 16 MiB frames.
const MAX_FRAME: usize = 1 << 20;
/// Data frames queued per stream for its reader.
const STREAM_QUEUE: usize = 16;
/// Largest data frame sent.
const MAX_DATA: usize = 32 << 10;
/// Largest header block after decompression.
const MAX_HEADERS: usize = 1 << 20;

/// The zlib dictionary of SPDY/3 header compression (SPDY Protocol draft 3, section
/// 2.6.10.1): each of these words as a 32-bit big-endian length and its bytes, then the tail
/// as it is. A peer's compressor is primed with it, so its header blocks cannot be read without
/// it; the unit test checks its zlib id (Adler-32), which the peer's stream names.
fn dictionary() -> &'static [u8] {
    const WORDS: &[&str] = &[
        "options",
        "head",
        "post",
        "put",
        "delete",
        "trace",
        "accept",
        "accept-charset",
        "accept-encoding",
        "accept-language",
        "accept-ranges",
        "age",
        "allow",
        "authorization",
        "cache-control",
        "connection",
        "content-base",
        "content-encoding",
        "content-language",
        "content-length",
        "content-location",
        "content-md5",
        "content-range",
        "content-type",
        "date",
        "etag",
        "expect",
        "expires",
        "from",
        "host",
        "if-match",
        "if-modified-since",
        "if-none-match",
        "if-range",
        "if-unmodified-since",
        "last-modified",
        "location",
        "max-forwards",
        "pragma",
        "proxy-authenticate",
        "proxy-authorization",
        "range",
        "referer",
        "retry-after",
        "server",
        "te",
        "trailer",
        "transfer-encoding",
        "upgrade",
        "user-agent",
        "vary",
        "via",
        "warning",
        "www-authenticate",
        "method",
        "get",
        "status",
        "200 OK",
        "version",
        "HTTP/1.1",
        "url",
        "public",
        "set-cookie",
        "keep-alive",
        "origin",
    ];
    const TAIL: &[&str] = &[
        "100101201202205206300302303304305306307402405406407408409410411412413414415416417502504505",
        "203 Non-Authoritative Information",
        "204 No Content",
        "301 Moved Permanently",
        "400 Bad Request",
        "401 Unauthorized",
        "403 Forbidden",
        "404 Not Found",
        "500 Internal Server Error",
        "501 Not Implemented",
        "503 Service Unavailable",
        "Jan Feb Mar Apr May Jun Jul Aug Sept Oct Nov Dec",
        " 00:00:00",
        " Mon, Tue, Wed, Thu, Fri, Sat, Sun, GMT",
        "chunked,text/html,image/png,image/jpg,image/gif,application/xml,application/xhtml+xml,",
        "text/plain,text/javascript,publicprivatemax-age=gzip,deflate,sdch",
        "charset=utf-8charset=iso-8859-1,utf-,*,enq=0.",
    ];
    static DICT: OnceLock<Vec<u8>> = OnceLock::new();
    DICT.get_or_init(|| {
        let mut d = Vec::with_capacity(1424);
        for w in WORDS {
            d.extend_from_slice(&u32::try_from(w.len()).unwrap_or(0).to_be_bytes());
            d.extend_from_slice(w.as_bytes());
        }
        for t in TAIL {
            d.extend_from_slice(t.as_bytes());
        }
        d
    })
}

/// Header names (lower case, as SPDY/3 sends them) and values (several values of one name
/// are separated by NUL).
pub type Headers = Vec<(String, String)>;

/// The value of header `name` (case-insensitive).
pub fn header<'a>(h: &'a Headers, name: &str) -> Option<&'a str> {
    h.iter()
        .find(|(k, _)| k.eq_ignore_ascii_case(name))
        .map(|(_, v)| v.as_str())
}

/// A frame as read.
#[derive(Debug, PartialEq)]
pub enum Frame {
    /// The peer opens a stream.
    SynStream {
        /// Stream id (odd: the client's).
        id: u32,
        /// The peer will send nothing on it.
        fin: bool,
        /// Its headers.
        headers: Headers,
    },
    /// The peer answers a stream we opened (we open none).
    SynReply {
        /// Stream id.
        id: u32,
    },
    /// The peer ends a stream abruptly.
    RstStream {
        /// Stream id.
        id: u32,
        /// Why.
        status: u32,
    },
    /// A ping to echo.
    Ping(u32),
    /// The peer is closing the connection.
    GoAway,
    /// Data on a stream.
    Data {
        /// Stream id.
        id: u32,
        /// The peer's last data on it.
        fin: bool,
        /// The bytes.
        data: Vec<u8>,
    },
    /// A frame read and ignored (SETTINGS, HEADERS, WINDOW_UPDATE, unknown types).
    Ignored,
}

/// Reads frames: one connection's incoming side, with its header decompression.
pub struct FrameReader {
    inflate: Decompress,
}

/// Writes header blocks: one connection's outgoing side, with its header compression.
pub struct HeaderWriter {
    deflate: Compress,
    primed: bool,
}

impl std::fmt::Debug for FrameReader {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("FrameReader").finish_non_exhaustive()
    }
}

impl std::fmt::Debug for HeaderWriter {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("HeaderWriter").finish_non_exhaustive()
    }
}

impl Default for FrameReader {
    fn default() -> Self {
        Self {
            inflate: Decompress::new(true),
        }
    }
}

impl Default for HeaderWriter {
    fn default() -> Self {
        Self {
            deflate: Compress::new(Compression::default(), true),
            primed: false,
        }
    }
}

fn bad(msg: impl Into<String>) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, msg.into())
}

fn be32(b: &[u8]) -> u32 {
    u32::from_be_bytes([b[0], b[1], b[2], b[3]])
}

impl FrameReader {
    /// Reads one frame; None at a clean end of the connection.
    pub async fn read<R: AsyncRead + Unpin>(&mut self, r: &mut R) -> io::Result<Option<Frame>> {
        let mut head = [0u8; 8];
        match r.read_exact(&mut head).await {
            Ok(_) => {}
            Err(e) if e.kind() == io::ErrorKind::UnexpectedEof => return Ok(None),
            Err(e) => return Err(e),
        }
        let flags = head[4];
        let len = usize::from(head[5]) << 16 | usize::from(head[6]) << 8 | usize::from(head[7]);
        if len > MAX_FRAME {
            return Err(bad(format!(
                "a SPDY frame of {len} bytes (at most {MAX_FRAME} are taken)"
            )));
        }
        let mut body = vec![0u8; len];
        r.read_exact(&mut body).await?;
        if head[0] & 0x80 == 0 {
            return Ok(Some(Frame::Data {
                id: be32(&head[..4]) & 0x7fff_ffff,
                fin: flags & FLAG_FIN != 0,
                data: body,
            }));
        }
        let version = u16::from_be_bytes([head[0] & 0x7f, head[1]]);
        if version != VERSION {
            return Err(bad(format!("SPDY version {version}; this server speaks 3")));
        }
        let short = |n: usize| {
            if body.len() < n {
                Err(bad("a SPDY control frame shorter than its type needs"))
            } else {
                Ok(())
            }
        };
        Ok(Some(match u16::from_be_bytes([head[2], head[3]]) {
            SYN_STREAM => {
                short(10)?;
                Frame::SynStream {
                    id: be32(&body[..4]) & 0x7fff_ffff,
                    fin: flags & FLAG_FIN != 0,
                    headers: self.inflate_headers(&body[10..])?,
                }
            }
            SYN_REPLY => {
                short(4)?;
                // The block must still pass through the inflater, which is one stream.
                let _ = self.inflate_headers(&body[4..])?;
                Frame::SynReply {
                    id: be32(&body[..4]) & 0x7fff_ffff,
                }
            }
            RST_STREAM => {
                short(8)?;
                Frame::RstStream {
                    id: be32(&body[..4]) & 0x7fff_ffff,
                    status: be32(&body[4..8]),
                }
            }
            PING => {
                short(4)?;
                Frame::Ping(be32(&body[..4]))
            }
            GOAWAY => Frame::GoAway,
            // HEADERS carries a block too: keep the inflater in step.
            8 => {
                short(4)?;
                let _ = self.inflate_headers(&body[4..])?;
                Frame::Ignored
            }
            _ => Frame::Ignored,
        }))
    }

    fn inflate_headers(&mut self, block: &[u8]) -> io::Result<Headers> {
        let mut out = Vec::with_capacity(block.len() * 4 + 256);
        let mut input = block;
        loop {
            if out.len() == out.capacity() {
                if out.len() >= MAX_HEADERS {
                    return Err(bad("a SPDY header block over 1 MiB"));
                }
                out.reserve(out.len().max(1024));
            }
            let before = self.inflate.total_in();
            let r = self
                .inflate
                .decompress_vec(input, &mut out, FlushDecompress::Sync);
            let used = usize::try_from(self.inflate.total_in() - before).unwrap_or(input.len());
            input = &input[used.min(input.len())..];
            match r {
                Ok(Status::Ok | Status::BufError)
                    if input.is_empty() && out.len() < out.capacity() =>
                {
                    break;
                }
                Ok(Status::StreamEnd) => break,
                Ok(_) => {}
                Err(e) if e.needs_dictionary().is_some() => {
                    self.inflate
                        .set_dictionary(dictionary())
                        .map_err(|e| bad(format!("SPDY header dictionary: {e}")))?;
                }
                Err(e) => return Err(bad(format!("SPDY header block: {e}"))),
            }
        }
        parse_block(&out)
    }
}

impl HeaderWriter {
    fn deflate_headers(&mut self, headers: &[(&str, &str)]) -> io::Result<Vec<u8>> {
        if !self.primed {
            self.deflate
                .set_dictionary(dictionary())
                .map_err(|e| bad(format!("SPDY header dictionary: {e}")))?;
            self.primed = true;
        }
        let mut raw = Vec::new();
        raw.extend_from_slice(&u32::try_from(headers.len()).unwrap_or(0).to_be_bytes());
        for (k, v) in headers {
            for s in [k.to_ascii_lowercase().as_str(), v] {
                raw.extend_from_slice(&u32::try_from(s.len()).unwrap_or(0).to_be_bytes());
                raw.extend_from_slice(s.as_bytes());
            }
        }
        let mut out = Vec::with_capacity(raw.len() + 64);
        let mut input = raw.as_slice();
        loop {
            if out.len() == out.capacity() {
                out.reserve(256);
            }
            let before = self.deflate.total_in();
            self.deflate
                .compress_vec(input, &mut out, FlushCompress::Sync)
                .map_err(|e| bad(format!("compressing SPDY headers: {e}")))?;
            let used = usize::try_from(self.deflate.total_in() - before).unwrap_or(input.len());
            input = &input[used.min(input.len())..];
            // A sync flush is complete when it left room in the output.
            if input.is_empty() && out.len() < out.capacity() {
                return Ok(out);
            }
        }
    }

    /// A SYN_REPLY for stream `id`, with no headers.
    pub fn syn_reply(&mut self, id: u32) -> io::Result<Vec<u8>> {
        let block = self.deflate_headers(&[])?;
        let mut body = id.to_be_bytes().to_vec();
        body.extend_from_slice(&block);
        Ok(control(SYN_REPLY, 0, &body))
    }
}

fn parse_block(b: &[u8]) -> io::Result<Headers> {
    let mut at = 0usize;
    let mut take = |n: usize| -> io::Result<&[u8]> {
        let s = b
            .get(at..at + n)
            .ok_or_else(|| bad("a SPDY header block cut short"))?;
        at += n;
        Ok(s)
    };
    let count = be32(take(4)?);
    let mut out = Vec::new();
    for _ in 0..count {
        let n = be32(take(4)?) as usize;
        let name = String::from_utf8_lossy(take(n)?).into_owned();
        let n = be32(take(4)?) as usize;
        let value = String::from_utf8_lossy(take(n)?).into_owned();
        out.push((name, value));
    }
    Ok(out)
}

fn control(kind: u16, flags: u8, body: &[u8]) -> Vec<u8> {
    let mut f = Vec::with_capacity(8 + body.len());
    f.extend_from_slice(&(0x8000 | VERSION).to_be_bytes());
    f.extend_from_slice(&kind.to_be_bytes());
    let len = u32::try_from(body.len()).unwrap_or(0) & 0x00ff_ffff;
    f.extend_from_slice(&(u32::from(flags) << 24 | len).to_be_bytes());
    f.extend_from_slice(body);
    f
}

/// A data frame (at most [`MAX_DATA`] bytes of `data`; the caller splits).
fn data_frame(id: u32, fin: bool, data: &[u8]) -> Vec<u8> {
    let mut f = Vec::with_capacity(8 + data.len());
    f.extend_from_slice(&(id & 0x7fff_ffff).to_be_bytes());
    let len = u32::try_from(data.len()).unwrap_or(0) & 0x00ff_ffff;
    f.extend_from_slice(&(u32::from(if fin { FLAG_FIN } else { 0 }) << 24 | len).to_be_bytes());
    f.extend_from_slice(data);
    f
}

/// A stream the peer opened.
#[derive(Debug)]
pub struct Incoming {
    /// Its id.
    pub id: u32,
    /// Its headers.
    pub headers: Headers,
    /// What the peer sends on it; ends at its FIN, a reset, or the connection's end.
    pub data: mpsc::Receiver<Vec<u8>>,
}

impl Incoming {
    /// The value of header `name`.
    pub fn header(&self, name: &str) -> Option<&str> {
        header(&self.headers, name)
    }
}

enum Out {
    Reply(u32),
    Data(u32, Vec<u8>, bool),
    Reset(u32, u32),
    Ping(u32),
    GoAway,
}

/// Sends on the connection's streams.
#[derive(Clone, Debug)]
pub struct Sender(mpsc::Sender<Out>);

impl std::fmt::Debug for Out {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Out")
    }
}

impl Sender {
    /// Sends `data` on stream `id`; false once the connection is gone.
    pub async fn data(&self, id: u32, data: &[u8]) -> bool {
        for chunk in data.chunks(MAX_DATA) {
            if self
                .0
                .send(Out::Data(id, chunk.to_vec(), false))
                .await
                .is_err()
            {
                return false;
            }
        }
        true
    }

    /// Ends our side of stream `id` (FIN).
    pub async fn close(&self, id: u32) {
        let _ = self.0.send(Out::Data(id, Vec::new(), true)).await;
    }

    /// Resets stream `id`.
    pub async fn reset(&self, id: u32) {
        let _ = self.0.send(Out::Reset(id, RST_CANCEL)).await;
    }

    /// Says GOAWAY and closes the connection once what was queued before is written.
    pub async fn go_away(&self) {
        let _ = self.0.send(Out::GoAway).await;
    }
}

/// A served connection.
#[derive(Debug)]
pub struct Conn {
    /// The streams the peer opens, as it opens them.
    pub incoming: mpsc::Receiver<Incoming>,
    /// Sends on them.
    pub sender: Sender,
    /// Cancelled once the connection has ended (either side closed it, GOAWAY, an error).
    pub closed: tokio_util::sync::CancellationToken,
}

/// Serves SPDY on `io`: the streams the peer opens (each answered with a SYN_REPLY), a sender,
/// and the connection's end. The connection ends when the peer closes it or says GOAWAY, or
/// after [`Sender::go_away`]; then the streams' data ends and no more streams come.
///
/// A stream's data waits in a queue of 16 frames for its reader; a reader that
/// stops reading stalls the connection's other streams (there is no flow control: Go's
/// spdystream sends no window updates, and its own frame workers block the same way). A stream
/// whose reader is gone has its data dropped.
pub fn serve<IO>(io: IO) -> Conn
where
    IO: AsyncRead + AsyncWrite + Send + 'static,
{
    let (mut rd, mut wr) = tokio::io::split(io);
    let (out_tx, mut out_rx) = mpsc::channel::<Out>(64);
    let (new_tx, new_rx) = mpsc::channel::<Incoming>(16);
    let done = tokio_util::sync::CancellationToken::new();
    {
        let done = done.clone();
        tokio::spawn(async move {
            let mut headers = HeaderWriter::default();
            while let Some(o) = tokio::select! {
                o = out_rx.recv() => o,
                () = done.cancelled() => None,
            } {
                let bytes = match o {
                    Out::Reply(id) => match headers.syn_reply(id) {
                        Ok(b) => b,
                        Err(_) => break,
                    },
                    Out::Data(id, d, fin) => data_frame(id, fin, &d),
                    Out::Reset(id, status) => {
                        let mut body = id.to_be_bytes().to_vec();
                        body.extend_from_slice(&status.to_be_bytes());
                        control(RST_STREAM, 0, &body)
                    }
                    Out::Ping(id) => control(PING, 0, &id.to_be_bytes()),
                    Out::GoAway => {
                        let mut body = 0u32.to_be_bytes().to_vec();
                        body.extend_from_slice(&0u32.to_be_bytes());
                        let _ = wr.write_all(&control(GOAWAY, 0, &body)).await;
                        break;
                    }
                };
                if wr.write_all(&bytes).await.is_err() || wr.flush().await.is_err() {
                    break;
                }
            }
            let _ = wr.shutdown().await;
            done.cancel();
        });
    }
    let sender = Sender(out_tx.clone());
    // Ended when the reader or the writer ends (the other follows).
    let closed = tokio_util::sync::CancellationToken::new();
    let reader_done = closed.clone();
    {
        let (closed, done) = (closed.clone(), done.clone());
        tokio::spawn(async move {
            done.cancelled().await;
            closed.cancel();
        });
    }
    tokio::spawn(async move {
        let mut streams: HashMap<u32, mpsc::Sender<Vec<u8>>> = HashMap::new();
        let mut reader = FrameReader::default();
        loop {
            let frame = tokio::select! {
                f = reader.read(&mut rd) => f,
                () = done.cancelled() => break,
            };
            match frame {
                Ok(Some(Frame::SynStream { id, fin, headers })) => {
                    let (tx, rx) = mpsc::channel(STREAM_QUEUE);
                    if !fin {
                        streams.insert(id, tx);
                    }
                    if out_tx.send(Out::Reply(id)).await.is_err() {
                        break;
                    }
                    let _ = new_tx
                        .send(Incoming {
                            id,
                            headers,
                            data: rx,
                        })
                        .await;
                }
                Ok(Some(Frame::Data { id, fin, data })) => {
                    if let Some(tx) = streams.get(&id)
                        && !data.is_empty()
                    {
                        let sent = tokio::select! {
                            r = tx.send(data) => r.is_ok(),
                            () = done.cancelled() => break,
                        };
                        if !sent {
                            streams.remove(&id);
                        }
                    }
                    if fin {
                        streams.remove(&id);
                    }
                }
                Ok(Some(Frame::RstStream { id, .. })) => {
                    streams.remove(&id);
                }
                Ok(Some(Frame::Ping(id))) => {
                    let _ = out_tx.send(Out::Ping(id)).await;
                }
                Ok(Some(Frame::GoAway) | None) => break,
                Ok(Some(Frame::SynReply { .. } | Frame::Ignored)) => {}
                Err(e) => {
                    tracing::warn!(error = %e, "CRI streaming: the SPDY connection failed");
                    break;
                }
            }
        }
        // Streams see their end; the writer finishes what is queued, then closes.
        drop(streams);
        drop(new_tx);
        reader_done.cancel();
    });
    Conn {
        incoming: new_rx,
        sender,
        closed,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_dictionary_is_the_one_spdy3_peers_prime_zlib_with() {
        let d = dictionary();
        assert_eq!(d.len(), 1423);
        // The zlib dictionary id (Adler-32) a SPDY/3 peer's header stream names.
        let (mut a, mut b) = (1u32, 0u32);
        for &x in d {
            a = (a + u32::from(x)) % 65521;
            b = (b + a) % 65521;
        }
        assert_eq!(b << 16 | a, 0xe3c6_a7c2);
    }

    #[tokio::test]
    async fn frames_and_header_blocks_round_trip() {
        // A client's SYN_STREAM, made with this codec's deflater as a client's would be.
        let mut client = HeaderWriter::default();
        let block = client
            .deflate_headers(&[("streamType", "stdout"), ("requestid", "0")])
            .unwrap();
        let mut body = 1u32.to_be_bytes().to_vec();
        body.extend_from_slice(&0u32.to_be_bytes());
        body.extend_from_slice(&[0, 0]);
        body.extend_from_slice(&block);
        let mut wire = control(SYN_STREAM, 0, &body);
        // A second block on the same stream of compression.
        let block = client.deflate_headers(&[("streamtype", "error")]).unwrap();
        let mut body = 3u32.to_be_bytes().to_vec();
        body.extend_from_slice(&[0; 6]);
        body.extend_from_slice(&block);
        wire.extend(control(SYN_STREAM, FLAG_FIN, &body));
        wire.extend(data_frame(1, true, b"hello"));
        wire.extend(control(PING, 0, &7u32.to_be_bytes()));
        let mut server = FrameReader::default();
        let mut r = wire.as_slice();
        assert_eq!(
            server.read(&mut r).await.unwrap(),
            Some(Frame::SynStream {
                id: 1,
                fin: false,
                headers: vec![
                    ("streamtype".into(), "stdout".into()),
                    ("requestid".into(), "0".into())
                ],
            })
        );
        assert_eq!(
            server.read(&mut r).await.unwrap(),
            Some(Frame::SynStream {
                id: 3,
                fin: true,
                headers: vec![("streamtype".into(), "error".into())],
            })
        );
        assert_eq!(
            server.read(&mut r).await.unwrap(),
            Some(Frame::Data {
                id: 1,
                fin: true,
                data: b"hello".to_vec()
            })
        );
        assert_eq!(server.read(&mut r).await.unwrap(), Some(Frame::Ping(7)));
        assert_eq!(server.read(&mut r).await.unwrap(), None);
        // A reply the client can read back.
        let reply = HeaderWriter::default().syn_reply(1).unwrap();
        let mut r = reply.as_slice();
        let mut back = FrameReader::default();
        assert_eq!(
            back.read(&mut r).await.unwrap(),
            Some(Frame::SynReply { id: 1 })
        );
    }
}
