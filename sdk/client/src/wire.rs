//! Frames over QUIC streams, shared by the client and the server.

use std::future::{Future, poll_fn};
use std::pin::pin;
use std::task::Poll;

use quinn::{ReadError, RecvStream};
use serde::Deserialize;
use transdb_proto::frame::{self, FrameError};

/// `future`'s output, or `None` if it is still pending after `limit`. A future that is
/// ready at once (the common case: the bytes are already there) costs no timer.
pub async fn within<F: Future>(limit: std::time::Duration, future: F) -> Option<F::Output> {
    let mut future = pin!(future);
    if let Poll::Ready(output) = poll_fn(|context| Poll::Ready(future.as_mut().poll(context))).await
    {
        return Some(output);
    }
    tokio::time::timeout(limit, future).await.ok()
}

/// Why a frame could not be read from a stream.
#[derive(Debug)]
pub enum ReadFrameError {
    /// The bytes broke the framing (answer with a stream reset carrying `code()`).
    Frame(FrameError),
    /// The stream or the connection failed.
    Stream(ReadError),
    /// The admission check of [`FrameReader::next_payload_admitted`] refused the frame.
    Refused(transdb_proto::ErrorCode),
    /// No byte arrived for the `idle` time given to [`FrameReader::next_payload_admitted`].
    Idle,
}

/// Reads frames from one receive stream.
///
/// Bytes are buffered as they arrive, never pre-allocated from an announced length, so a
/// peer that announces a large frame and stalls costs only what it actually sent.
#[derive(Default)]
pub struct FrameReader {
    buffer: Vec<u8>,
    /// Bytes of `buffer` already handed out as frames.
    consumed: usize,
    finished: bool,
}

impl FrameReader {
    /// A reader with an empty buffer.
    pub fn new() -> Self {
        Self::default()
    }

    /// The payload of the next frame, `Ok(None)` if the stream ended cleanly between frames.
    ///
    /// The payload borrows the reader's buffer until the next call.
    pub async fn next_payload(
        &mut self,
        recv: &mut RecvStream,
    ) -> Result<Option<&[u8]>, ReadFrameError> {
        self.next_payload_admitted(recv, |_| Ok(()), None).await
    }

    /// Like [`FrameReader::next_payload`], but calls `admit` with the frame's length (its
    /// payload bytes) once its header has arrived and before more of it is buffered (bytes
    /// of it that arrived in the same packet excepted); an `Err(code)` ends the read with
    /// [`ReadFrameError::Refused`]. A server uses it to reserve memory for the frame. With
    /// `idle`, a wait of that long without a byte arriving ends the read with
    /// [`ReadFrameError::Idle`] (a frame that keeps arriving, however slowly, is never cut).
    pub async fn next_payload_admitted(
        &mut self,
        recv: &mut RecvStream,
        mut admit: impl FnMut(usize) -> Result<(), transdb_proto::ErrorCode>,
        idle: Option<std::time::Duration>,
    ) -> Result<Option<&[u8]>, ReadFrameError> {
        let mut admitted = false;
        if self.consumed > 0 {
            self.buffer.drain(..self.consumed);
            self.consumed = 0;
        }
        loop {
            let split = frame::split(&self.buffer).map_err(ReadFrameError::Frame)?;
            if !admitted && self.buffer.len() >= frame::HEADER_BYTES {
                let mut header = [0u8; frame::HEADER_BYTES];
                header.copy_from_slice(&self.buffer[..frame::HEADER_BYTES]);
                admit(u32::from_be_bytes(header) as usize).map_err(ReadFrameError::Refused)?;
                admitted = true;
            }
            if let Some((_, length)) = split {
                self.consumed = length;
                return Ok(Some(&self.buffer[frame::HEADER_BYTES..length]));
            }
            if self.finished {
                return if self.buffer.is_empty() {
                    Ok(None)
                } else {
                    Err(ReadFrameError::Frame(FrameError::Truncated))
                };
            }
            let read = recv.read_chunk(usize::MAX, true);
            let chunk = match idle {
                Some(idle) => within(idle, read).await.ok_or(ReadFrameError::Idle)?,
                None => read.await,
            };
            match chunk.map_err(ReadFrameError::Stream)? {
                Some(chunk) => self.buffer.extend_from_slice(&chunk.bytes),
                None => self.finished = true,
            }
        }
    }

    /// The next frame decoded as a `T`, `Ok(None)` if the stream ended cleanly between frames.
    pub async fn next<'a, T: Deserialize<'a>>(
        &'a mut self,
        recv: &mut RecvStream,
    ) -> Result<Option<T>, ReadFrameError> {
        match self.next_payload(recv).await? {
            Some(payload) => frame::decode(payload)
                .map(Some)
                .map_err(ReadFrameError::Frame),
            None => Ok(None),
        }
    }

    /// Whether the peer has finished the stream with no further bytes, judged from what has
    /// already arrived, without waiting. Lets a responder send its last frame and its FIN
    /// together.
    pub async fn finished_now(&mut self, recv: &mut RecvStream) -> bool {
        if self.finished || self.buffer.len() > self.consumed {
            return self.finished && self.buffer.len() == self.consumed;
        }
        let mut read = pin!(recv.read_chunk(usize::MAX, true));
        // Poll once: a ready result is kept, a pending read is dropped (read_chunk is
        // cancel-safe), an error is left for the next real read to report.
        let polled = poll_fn(|context| Poll::Ready(read.as_mut().poll(context))).await;
        match polled {
            Poll::Ready(Ok(None)) => self.finished = true,
            Poll::Ready(Ok(Some(chunk))) => self.buffer.extend_from_slice(&chunk.bytes),
            Poll::Ready(Err(_)) | Poll::Pending => {}
        }
        self.finished && self.buffer.len() == self.consumed
    }
}
