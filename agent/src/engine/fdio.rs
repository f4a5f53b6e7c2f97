//! Async reads and writes on a raw descriptor (a pipe end or a terminal master) through tokio's
//! readiness events; tokio's pipe types refuse a terminal.

use std::{
    io,
    os::fd::{AsRawFd, OwnedFd},
};

use tokio::io::unix::AsyncFd;

/// A non-blocking descriptor driven by tokio.
#[derive(Debug)]
pub struct FdIo(AsyncFd<OwnedFd>);

impl FdIo {
    /// Takes `fd`, making it non-blocking.
    pub fn new(fd: OwnedFd) -> io::Result<Self> {
        let flags = nix::fcntl::fcntl(fd.as_raw_fd(), nix::fcntl::FcntlArg::F_GETFL)?;
        let flags = nix::fcntl::OFlag::from_bits_truncate(flags) | nix::fcntl::OFlag::O_NONBLOCK;
        nix::fcntl::fcntl(fd.as_raw_fd(), nix::fcntl::FcntlArg::F_SETFL(flags))?;
        // SAFETY: an OwnedFd is a valid open descriptor that stays open, and the same one, for
        // as long as it is owned, and the AsyncFd owns it.
        unsafe { AsyncFd::register(fd) }
            .map(Self)
            .map_err(io::Error::from)
    }

    /// Reads what is there (0 at end of file; a terminal whose other side closed reads as end
    /// of file too, not as the EIO the kernel gives).
    pub async fn read(&self, buf: &mut [u8]) -> io::Result<usize> {
        loop {
            let mut guard = self.0.readable().await?;
            match guard.try_io(|fd| {
                nix::unistd::read(fd.get_ref().as_raw_fd(), buf).map_err(io::Error::from)
            }) {
                Ok(Err(e)) if e.raw_os_error() == Some(libc::EIO) => return Ok(0),
                Ok(r) => return r,
                Err(_would_block) => {}
            }
        }
    }

    /// Reads what is there now without waiting (`WouldBlock` when nothing is; a terminal whose
    /// other side closed and that is drained reads as end of file).
    pub fn read_now(&self, buf: &mut [u8]) -> io::Result<usize> {
        match nix::unistd::read(self.0.get_ref().as_raw_fd(), buf) {
            Err(nix::errno::Errno::EIO) => Ok(0),
            r => r.map_err(io::Error::from),
        }
    }

    /// Writes all of `data`.
    pub async fn write_all(&self, mut data: &[u8]) -> io::Result<()> {
        while !data.is_empty() {
            let mut guard = self.0.writable().await?;
            match guard.try_io(|fd| nix::unistd::write(fd.get_ref(), data).map_err(io::Error::from))
            {
                Ok(Ok(n)) => data = &data[n..],
                Ok(Err(e)) => return Err(e),
                Err(_would_block) => {}
            }
        }
        Ok(())
    }

    /// Sets the terminal's size (a terminal master only).
    pub fn resize(&self, cols: u16, rows: u16) -> io::Result<()> {
        let ws = libc::winsize {
            ws_row: rows,
            ws_col: cols,
            ws_xpixel: 0,
            ws_ypixel: 0,
        };
        // SAFETY: TIOCSWINSZ reads a winsize from the pointer, which is valid for the call.
        if unsafe { libc::ioctl(self.0.get_ref().as_raw_fd(), libc::TIOCSWINSZ, &ws) } < 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(())
    }

    /// A second handle on the same open file (the terminal's reader and writer are separate
    /// tasks).
    pub fn try_clone(&self) -> io::Result<Self> {
        Self::new(self.0.get_ref().try_clone()?)
    }
}
