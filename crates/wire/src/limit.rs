//! Traffic counters and the sending bandwidth cap.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// Bytes on the wire of one connection, both directions, readable at any time.
///
/// Counts everything: handshake, length prefixes, authentication tags.
/// Cheap to clone; all clones see the same counters.
#[derive(Clone, Debug, Default)]
pub struct Traffic {
    inner: Arc<TrafficInner>,
}

#[derive(Debug, Default)]
struct TrafficInner {
    sent: AtomicU64,
    received: AtomicU64,
    frames_sent: AtomicU64,
    frames_received: AtomicU64,
}

impl Traffic {
    /// Bytes written to the connection so far.
    pub fn bytes_sent(&self) -> u64 {
        self.inner.sent.load(Ordering::Relaxed)
    }

    /// Bytes read from the connection so far.
    pub fn bytes_received(&self) -> u64 {
        self.inner.received.load(Ordering::Relaxed)
    }

    /// Bytes in both directions so far.
    pub fn bytes_total(&self) -> u64 {
        self.bytes_sent() + self.bytes_received()
    }

    /// Messages sent so far (after the handshake).
    pub fn frames_sent(&self) -> u64 {
        self.inner.frames_sent.load(Ordering::Relaxed)
    }

    /// Messages received so far (after the handshake).
    pub fn frames_received(&self) -> u64 {
        self.inner.frames_received.load(Ordering::Relaxed)
    }

    pub(crate) fn add_sent(&self, n: usize) {
        self.inner.sent.fetch_add(n as u64, Ordering::Relaxed);
    }

    pub(crate) fn add_received(&self, n: usize) {
        self.inner.received.fetch_add(n as u64, Ordering::Relaxed);
    }

    pub(crate) fn add_frame_sent(&self) {
        self.inner.frames_sent.fetch_add(1, Ordering::Relaxed);
    }

    pub(crate) fn add_frame_received(&self) {
        self.inner.frames_received.fetch_add(1, Ordering::Relaxed);
    }
}

/// A cap on the sending rate of one connection (a token bucket), settable at
/// any time from any task. Cheap to clone; all clones control the same cap.
///
/// The cap counts bytes on the wire. The bucket holds at most 20 ms worth
/// of tokens, so bursts stay short; frames larger than that are let
/// through in pieces.
#[derive(Clone, Debug, Default)]
pub struct Bandwidth {
    inner: Arc<BandwidthInner>,
}

#[derive(Debug, Default)]
struct BandwidthInner {
    /// The cap in bits per second; 0 means none.
    bits_per_sec: AtomicU64,
    bucket: Mutex<Bucket>,
}

#[derive(Debug, Default)]
struct Bucket {
    /// Bytes that may be sent now; negative while in debt.
    tokens: f64,
    last: Option<Instant>,
}

/// How long a sender sleeps at most before looking at the cap again.
const MAX_NAP: Duration = Duration::from_millis(50);

/// Burst allowance, as time at the capped rate.
const BURST_SECS: f64 = 0.02;

impl Bandwidth {
    /// A cap of `mbit` megabits (10^6 bits) per second, or none.
    pub fn new(mbit: Option<u64>) -> Bandwidth {
        let b = Bandwidth::default();
        b.set_mbit(mbit);
        b
    }

    /// Sets the cap in megabits (10^6 bits) per second; `None` or 0 lifts it.
    pub fn set_mbit(&self, mbit: Option<u64>) {
        self.set_bits_per_sec(mbit.map(|m| m.saturating_mul(1_000_000)));
    }

    /// Sets the cap in bits per second; `None` or 0 lifts it.
    pub fn set_bits_per_sec(&self, bits: Option<u64>) {
        self.inner
            .bits_per_sec
            .store(bits.unwrap_or(0), Ordering::Relaxed);
    }

    /// The cap in bits per second, if any.
    pub fn bits_per_sec(&self) -> Option<u64> {
        match self.inner.bits_per_sec.load(Ordering::Relaxed) {
            0 => None,
            b => Some(b),
        }
    }

    /// Waits until `n` more bytes may go out under the cap, and takes them.
    pub(crate) async fn acquire(&self, n: usize) {
        let mut charged = false;
        loop {
            let Some(bits) = self.bits_per_sec() else {
                if let Ok(mut b) = self.inner.bucket.lock() {
                    b.tokens = 0.0;
                    b.last = None;
                }
                return;
            };
            let rate = bits as f64 / 8.0;
            let wait = {
                let Ok(mut b) = self.inner.bucket.lock() else {
                    return;
                };
                let now = Instant::now();
                let burst = rate * BURST_SECS;
                if let Some(last) = b.last {
                    let elapsed = now.saturating_duration_since(last).as_secs_f64();
                    b.tokens = (b.tokens + elapsed * rate).min(burst);
                }
                b.last = Some(now);
                if !charged {
                    b.tokens -= n as f64;
                    charged = true;
                }
                if b.tokens >= 0.0 {
                    return;
                }
                Duration::from_secs_f64(-b.tokens / rate).min(MAX_NAP)
            };
            tokio::time::sleep(wait).await;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn bucket_limits_and_lifts() {
        let bw = Bandwidth::new(Some(8)); // 1 MB/s
        let start = Instant::now();
        for _ in 0..10 {
            bw.acquire(20_000).await;
        }
        let took = start.elapsed();
        assert!(took >= Duration::from_millis(180), "{took:?}");
        bw.set_mbit(None);
        let start = Instant::now();
        bw.acquire(100_000_000).await;
        assert!(start.elapsed() < Duration::from_millis(50));
        assert_eq!(bw.bits_per_sec(), None);
    }
}
