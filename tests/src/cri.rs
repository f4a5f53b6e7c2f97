//! Harness for the CRI tests: a channel to the agent's CRI socket, and a reader of the
//! Kubernetes container log format the runtime writes to each container's `log_path`.
//!
//! A CRI log file holds one record a line: `<RFC3339Nano timestamp> <stdout|stderr> <F|P>
//! <content>`, `F` for a full line, `P` for part of a longer one (the next record continues it).
//! [`parse_log`] checks every record as strictly as the kubelet's own parser does.

use std::{
    path::{Path, PathBuf},
    time::{Duration, Instant},
};

use caas_proto::cri::v1::{
    image_service_client::ImageServiceClient, runtime_service_client::RuntimeServiceClient,
};
use hyper_util::rt::TokioIo;
use tonic::transport::{Channel, Endpoint};

/// Every CRI call fails after this long rather than hang the test (pulls included).
pub const CALL_TIMEOUT: Duration = Duration::from_secs(120);

/// A channel over the CRI unix socket at `path`, retried for up to 10 s while the socket is not
/// there yet or refuses.
pub async fn connect(path: &Path) -> anyhow::Result<Channel> {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let p = path.to_path_buf();
        // The URI is required but unused: the connector dials the socket.
        let r = Endpoint::try_from("http://[::]")?
            .timeout(CALL_TIMEOUT)
            .connect_with_connector(tower::service_fn(move |_| {
                let p = p.clone();
                async move {
                    Ok::<_, std::io::Error>(TokioIo::new(tokio::net::UnixStream::connect(p).await?))
                }
            }))
            .await;
        match r {
            Ok(ch) => return Ok(ch),
            Err(e) if Instant::now() >= deadline => {
                anyhow::bail!("no CRI server on {} within 10 s: {e:?}", path.display())
            }
            Err(_) => tokio::time::sleep(Duration::from_millis(50)).await,
        }
    }
}

/// The two CRI services over one channel.
#[derive(Clone)]
pub struct CriClient {
    /// `runtime.v1.RuntimeService`.
    pub rt: RuntimeServiceClient<Channel>,
    /// `runtime.v1.ImageService`.
    pub img: ImageServiceClient<Channel>,
    /// The socket.
    pub socket: PathBuf,
}

impl CriClient {
    /// Connects to the CRI socket at `path` (see [`connect`]).
    pub async fn connect(path: &Path) -> anyhow::Result<Self> {
        let ch = connect(path).await?;
        Ok(Self {
            rt: RuntimeServiceClient::new(ch.clone()),
            img: ImageServiceClient::new(ch),
            socket: path.to_path_buf(),
        })
    }
}

/// Which output a log record came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LogStream {
    /// The container's stdout.
    Stdout,
    /// The container's stderr.
    Stderr,
}

/// One record of a CRI log file.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LogRecord {
    /// The timestamp, in nanoseconds since the Unix epoch.
    pub time_ns: i128,
    /// The timestamp as written.
    pub time: String,
    /// stdout or stderr.
    pub stream: LogStream,
    /// `P`: the line goes on in the next record of the same stream; `F`: it ends here.
    pub partial: bool,
    /// The text (without the newline).
    pub content: String,
}

/// Parses a whole CRI log file. Every record must end with a newline (a file still being written
/// may end in the middle of one: that is an error too, so callers poll), have all four fields
/// separated by single spaces (the content may be empty, the space before it may not), a
/// timestamp in RFC 3339 with at most nanosecond precision, a stream of `stdout` or `stderr`,
/// and a tag of `F` or `P` (optionally followed by `:`-separated further tags, which the kubelet
/// ignores).
pub fn parse_log(text: &str) -> Result<Vec<LogRecord>, String> {
    let Some(body) = text.strip_suffix('\n').or((text.is_empty()).then_some("")) else {
        return Err(format!(
            "the last record has no newline: {:?}",
            text.rsplit('\n').next().unwrap_or_default()
        ));
    };
    if body.is_empty() {
        return Ok(Vec::new());
    }
    body.split('\n')
        .enumerate()
        .map(|(i, line)| parse_record(line).map_err(|e| format!("record {}: {e}: {line:?}", i + 1)))
        .collect()
}

fn parse_record(line: &str) -> Result<LogRecord, String> {
    let mut parts = line.splitn(4, ' ');
    let (Some(time), Some(stream), Some(tags), Some(content)) =
        (parts.next(), parts.next(), parts.next(), parts.next())
    else {
        return Err("fewer than four space-separated fields".into());
    };
    let time_ns = parse_rfc3339_nano(time).ok_or("the timestamp is not RFC 3339")?;
    let stream = match stream {
        "stdout" => LogStream::Stdout,
        "stderr" => LogStream::Stderr,
        s => return Err(format!("stream {s:?} is neither stdout nor stderr")),
    };
    let partial = match tags.split(':').next() {
        Some("F") => false,
        Some("P") => true,
        t => return Err(format!("tag {t:?} is neither F nor P")),
    };
    Ok(LogRecord {
        time_ns,
        time: time.to_string(),
        stream,
        partial,
        content: content.to_string(),
    })
}

/// The text one stream wrote, rebuilt from its records: `P` records are joined to what follows,
/// `F` records end a line.
pub fn stream_text(records: &[LogRecord], stream: LogStream) -> String {
    let mut out = String::new();
    for r in records.iter().filter(|r| r.stream == stream) {
        out.push_str(&r.content);
        if !r.partial {
            out.push('\n');
        }
    }
    out
}

/// Nanoseconds since the Unix epoch of an RFC 3339 timestamp as Go's `time.RFC3339Nano` writes
/// it (`2006-01-02T15:04:05.999999999Z07:00`: the fraction has 1 to 9 digits, or is left out;
/// the offset is `Z` or `±hh:mm`). None for anything else.
pub fn parse_rfc3339_nano(s: &str) -> Option<i128> {
    let b = s.as_bytes();
    let num = |from: usize, to: usize| -> Option<i64> {
        let t = s.get(from..to)?;
        if t.is_empty() || !t.bytes().all(|c| c.is_ascii_digit()) {
            return None;
        }
        t.parse().ok()
    };
    let at = |i: usize, c: u8| b.get(i) == Some(&c);
    if !(at(4, b'-') && at(7, b'-') && at(10, b'T') && at(13, b':') && at(16, b':')) {
        return None;
    }
    let (year, month, day) = (num(0, 4)?, num(5, 7)?, num(8, 10)?);
    let (hour, minute, second) = (num(11, 13)?, num(14, 16)?, num(17, 19)?);
    if !(1..=12).contains(&month)
        || day < 1
        || day > days_in_month(year, month)
        || hour > 23
        || minute > 59
        || second > 59
    {
        return None;
    }
    let mut i = 19;
    let mut nanos: i128 = 0;
    if at(i, b'.') {
        let start = i + 1;
        let mut end = start;
        while b.get(end).is_some_and(u8::is_ascii_digit) {
            end += 1;
        }
        let digits = end - start;
        if !(1..=9).contains(&digits) {
            return None;
        }
        nanos = i128::from(num(start, end)?) * 10i128.pow(u32::try_from(9 - digits).ok()?);
        i = end;
    }
    let offset = match b.get(i)? {
        b'Z' => {
            i += 1;
            0
        }
        sign @ (b'+' | b'-') => {
            if !at(i + 3, b':') {
                return None;
            }
            let (h, m) = (num(i + 1, i + 3)?, num(i + 4, i + 6)?);
            if h > 23 || m > 59 {
                return None;
            }
            i += 6;
            let secs = h * 3600 + m * 60;
            if *sign == b'-' { -secs } else { secs }
        }
        _ => return None,
    };
    if i != b.len() {
        return None;
    }
    let secs =
        days_since_epoch(year, month, day) * 86_400 + hour * 3600 + minute * 60 + second - offset;
    Some(i128::from(secs) * 1_000_000_000 + nanos)
}

fn is_leap(y: i64) -> bool {
    (y % 4 == 0 && y % 100 != 0) || y % 400 == 0
}

fn days_in_month(y: i64, m: i64) -> i64 {
    match m {
        2 if is_leap(y) => 29,
        2 => 28,
        4 | 6 | 9 | 11 => 30,
        _ => 31,
    }
}

/// Days from 1970-01-01 to `y-m-d` (proleptic Gregorian), by counting whole years and months.
fn days_since_epoch(y: i64, m: i64, d: i64) -> i64 {
    let year_days = |y: i64| if is_leap(y) { 366 } else { 365 };
    let mut days = 0;
    if y >= 1970 {
        days += (1970..y).map(year_days).sum::<i64>();
    } else {
        days -= (y..1970).map(year_days).sum::<i64>();
    }
    days += (1..m).map(|mm| days_in_month(y, mm)).sum::<i64>();
    days + d - 1
}

/// Now, in nanoseconds since the Unix epoch (the unit of every CRI timestamp).
pub fn now_ns() -> i64 {
    let d = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap_or_default();
    i64::try_from(d.as_nanos()).unwrap_or(i64::MAX)
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;

    #[test]
    fn rfc3339_nano_timestamps_parse_to_the_epoch_nanosecond() {
        for (s, want) in [
            ("1970-01-01T00:00:00Z", 0),
            ("2016-10-06T00:17:09.669794202Z", 1_475_713_029_669_794_202),
            ("2016-10-06T00:17:09Z", 1_475_713_029_000_000_000),
            ("2016-10-06T00:17:09.5Z", 1_475_713_029_500_000_000),
            (
                "2016-10-06T02:17:09.669794202+02:00",
                1_475_713_029_669_794_202,
            ),
            ("2016-10-05T23:47:09.1-00:30", 1_475_713_029_100_000_000),
            ("2000-02-29T00:00:00Z", 951_782_400_000_000_000),
            ("1969-12-31T23:59:59.999999999Z", -1),
        ] {
            assert_eq!(parse_rfc3339_nano(s), Some(want), "{s}");
        }
        for bad in [
            "",
            "2016-10-06 00:17:09Z",
            "2016-10-06T00:17:09",
            "2016-10-06T00:17:09.Z",
            "2016-10-06T00:17:09.1234567890Z",
            "2016-13-06T00:17:09Z",
            "2001-02-29T00:00:00Z",
            "2016-10-06T24:00:00Z",
            "2016-10-06T00:17:09+0200",
            "2016-10-06T00:17:09Zx",
            "2016-1-06T00:17:09Z",
            "+016-10-06T00:17:09Z",
        ] {
            assert_eq!(parse_rfc3339_nano(bad), None, "{bad:?}");
        }
    }

    #[test]
    fn timestamps_formatted_by_the_time_crate_read_back() {
        use time::format_description::well_known::Rfc3339;
        for ns in [
            0i128,
            1,
            999_999_999,
            1_700_000_000_123_456_789,
            4_102_444_800_000_000_000,
            -86_400_000_000_001,
        ] {
            let s = time::OffsetDateTime::from_unix_timestamp_nanos(ns)
                .unwrap()
                .format(&Rfc3339)
                .unwrap();
            assert_eq!(parse_rfc3339_nano(&s), Some(ns), "{s}");
        }
    }

    #[test]
    fn log_records_parse_strictly() {
        let text = "2016-10-06T00:17:09.669794202Z stdout F hello world\n\
                    2016-10-06T00:17:09.669794203Z stderr P par\n\
                    2016-10-06T00:17:09.669794204Z stdout F \n\
                    2016-10-06T00:17:09.669794205Z stderr F:x tial\n";
        let r = parse_log(text).unwrap();
        assert_eq!(r.len(), 4);
        assert_eq!(r[0].content, "hello world");
        assert_eq!(r[0].time_ns, 1_475_713_029_669_794_202);
        assert!(r[1].partial && !r[3].partial);
        assert_eq!(stream_text(&r, LogStream::Stdout), "hello world\n\n");
        assert_eq!(stream_text(&r, LogStream::Stderr), "partial\n");
        assert_eq!(parse_log("").unwrap(), []);
        for bad in [
            "2016-10-06T00:17:09Z stdout F no newline",
            "2016-10-06T00:17:09Z stdout F\n",
            "2016-10-06T00:17:09Z stdin F x\n",
            "2016-10-06T00:17:09Z stdout X x\n",
            "yesterday stdout F x\n",
            "hello\n",
        ] {
            assert!(parse_log(bad).is_err(), "{bad:?}");
        }
    }
}
