//! The handshake that starts every host connection to a guest's engine relay.
//!
//! A virtio-serial port carries one byte stream and says only whether a host is connected, and
//! the guest learns that by polling: a host that disconnects and another that connects at once
//! (an agent's channel dialing again) can come and go between two polls, and the guest would go
//! on relaying the new connection's bytes into the old engine connection. So each host connection
//! opens with [`HELLO`] and a fresh nonce; the guest relay starts a new engine connection whenever
//! a read from the port begins with [`HELLO`] (or, between connections, skips to it), answers
//! [`ACK`] with the same nonce, and only then relays. The host discards whatever arrives before
//! that answer: bytes a previous connection left behind.

use std::io;

use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// What a host connection starts with (then [`NONCE_LEN`] random bytes).
pub const HELLO: [u8; 16] = *b"\0caas-relay-HELO";
/// What the guest answers (then the host's nonce).
pub const ACK: [u8; 16] = *b"\0caas-relay-ACKN";
/// Length of the nonce after [`HELLO`] and [`ACK`].
pub const NONCE_LEN: usize = 16;
/// Most stale bytes the host skips before the answer.
const MAX_SKIP: usize = 16 << 20;

/// Host side: sends the hello and waits for the answer, skipping stale bytes. The caller puts a
/// deadline on it.
pub async fn client<S>(stream: &mut S) -> io::Result<()>
where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin,
{
    let nonce: [u8; NONCE_LEN] = rand::random();
    let mut hello = HELLO.to_vec();
    hello.extend_from_slice(&nonce);
    stream.write_all(&hello).await?;
    stream.flush().await?;
    let mut want = ACK.to_vec();
    want.extend_from_slice(&nonce);
    // Byte by byte, so nothing after the answer is read here: the engine's first frames follow.
    let mut window: Vec<u8> = Vec::with_capacity(want.len());
    let mut skipped = 0usize;
    let mut b = [0u8; 1];
    loop {
        if stream.read(&mut b).await? == 0 {
            return Err(io::Error::new(
                io::ErrorKind::UnexpectedEof,
                "the guest relay closed the connection before answering",
            ));
        }
        if window.len() == want.len() {
            window.remove(0);
            skipped += 1;
            if skipped > MAX_SKIP {
                return Err(io::Error::other("the guest relay never answered the hello"));
            }
        }
        window.push(b[0]);
        if window == want {
            return Ok(());
        }
    }
}

/// Guest side: where the last complete hello in `data` ends (its nonce included), and its
/// nonce; None when `data` holds no complete hello. The last: earlier ones are from hosts that
/// gave up waiting for the answer.
pub fn find_hello(data: &[u8]) -> Option<(usize, [u8; NONCE_LEN])> {
    let whole = data.len().checked_sub(NONCE_LEN)?;
    let at = data[..whole]
        .windows(HELLO.len())
        .rposition(|w| w == HELLO)?;
    let end = at + HELLO.len() + NONCE_LEN;
    let nonce: [u8; NONCE_LEN] = data.get(at + HELLO.len()..end)?.try_into().ok()?;
    Some((end, nonce))
}

/// The guest's answer to a hello with `nonce`.
pub fn ack(nonce: &[u8; NONCE_LEN]) -> Vec<u8> {
    let mut v = ACK.to_vec();
    v.extend_from_slice(nonce);
    v
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_hello_is_found_after_stale_bytes_and_not_before_it_is_whole() {
        let mut data = b"stale bytes".to_vec();
        data.extend_from_slice(&HELLO);
        data.extend_from_slice(&[7u8; NONCE_LEN]);
        data.extend_from_slice(b"PRI * HTTP/2.0");
        let (end, nonce) = find_hello(&data).unwrap();
        assert_eq!(nonce, [7u8; NONCE_LEN]);
        assert_eq!(&data[end..], b"PRI * HTTP/2.0");
        assert!(
            find_hello(&data[..data.len() - 20]).is_none(),
            "nonce cut short"
        );
    }

    #[tokio::test]
    async fn the_client_skips_stale_bytes_and_leaves_what_follows_the_answer() {
        let (mut host, mut guest) = tokio::io::duplex(4096);
        let server = tokio::spawn(async move {
            let mut got = vec![0u8; HELLO.len() + NONCE_LEN];
            guest.read_exact(&mut got).await.unwrap();
            let (_, nonce) = find_hello(&got).unwrap();
            let mut out = b"old response tail".to_vec();
            out.extend_from_slice(&ack(&nonce));
            out.extend_from_slice(b"SETTINGS");
            guest.write_all(&out).await.unwrap();
            guest
        });
        client(&mut host).await.unwrap();
        let mut rest = [0u8; 8];
        host.read_exact(&mut rest).await.unwrap();
        assert_eq!(&rest, b"SETTINGS");
        drop(server.await.unwrap());
        // A relay that closes without answering is an error, not a hang.
        let (mut host, guest) = tokio::io::duplex(64);
        drop(guest);
        assert!(client(&mut host).await.is_err());
    }
}
