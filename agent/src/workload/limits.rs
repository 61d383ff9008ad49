//! How many Workload API streams each uid holds open. A stream costs the
//! agent a task and a channel for as long as the client keeps it, so one
//! user's processes must not be able to hold an unbounded number; other
//! users are unaffected by one that hits its limit.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use tonic::Status;

/// Open streams by uid, under a per-uid limit.
#[derive(Debug)]
pub struct StreamLimits {
    limit: usize,
    open: Mutex<HashMap<u32, usize>>,
}

impl StreamLimits {
    /// At most `limit` open streams per uid.
    pub fn new(limit: usize) -> Arc<Self> {
        Arc::new(Self {
            limit,
            open: Mutex::new(HashMap::new()),
        })
    }

    /// A permit for one more stream of `uid`, released when dropped, or
    /// `ResourceExhausted` if the uid is at its limit.
    #[allow(clippy::result_large_err)]
    pub fn acquire(self: &Arc<Self>, uid: u32) -> Result<StreamPermit, Status> {
        let mut open = self.open.lock().unwrap_or_else(|e| e.into_inner());
        let count = open.entry(uid).or_default();
        if *count >= self.limit {
            return Err(Status::resource_exhausted(format!(
                "uid {uid} has {} Workload API streams open, the limit \
                 (max_streams_per_uid); close some and retry",
                self.limit
            )));
        }
        *count += 1;
        Ok(StreamPermit {
            limits: self.clone(),
            uid,
        })
    }

    /// Streams `uid` holds open now.
    pub fn open(&self, uid: u32) -> usize {
        let open = self.open.lock().unwrap_or_else(|e| e.into_inner());
        open.get(&uid).copied().unwrap_or(0)
    }
}

/// One open stream; dropping it frees the slot.
#[derive(Debug)]
pub struct StreamPermit {
    limits: Arc<StreamLimits>,
    uid: u32,
}

impl Drop for StreamPermit {
    fn drop(&mut self) {
        let mut open = self.limits.open.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(count) = open.get_mut(&self.uid) {
            *count = count.saturating_sub(1);
            if *count == 0 {
                open.remove(&self.uid);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn permits_are_counted_per_uid_and_released_on_drop() {
        let limits = StreamLimits::new(2);
        let a = limits.acquire(1000).ok();
        let b = limits.acquire(1000).ok();
        assert!(a.is_some() && b.is_some());
        let refused = limits.acquire(1000).err().map(|s| s.code());
        assert_eq!(refused, Some(tonic::Code::ResourceExhausted));
        // Another uid is not affected.
        assert!(limits.acquire(1001).is_ok());
        drop(a);
        assert_eq!(limits.open(1000), 1);
        assert!(limits.acquire(1000).is_ok());
        drop(b);
        assert_eq!(limits.open(1000), 0);
    }
}
