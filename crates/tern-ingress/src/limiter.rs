//! Connection limits: a global cap (memory and file descriptors are finite) and a per-address
//! cap (one host must not take every slot). Slots are RAII guards so a session that ends in
//! any way, panics included, gives its slot back.

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

#[derive(Debug)]
pub struct ConnectionLimiter {
    max_total: usize,
    max_per_ip: usize,
    total: AtomicUsize,
    per_ip: Mutex<HashMap<IpAddr, usize>>,
}

impl ConnectionLimiter {
    pub fn new(max_total: usize, max_per_ip: usize) -> Arc<Self> {
        Arc::new(Self {
            max_total,
            max_per_ip,
            total: AtomicUsize::new(0),
            per_ip: Mutex::new(HashMap::new()),
        })
    }

    pub fn active(&self) -> usize {
        self.total.load(Ordering::Relaxed)
    }

    /// Takes a global slot, or `None` when the server is full.
    pub fn acquire(self: &Arc<Self>) -> Option<ConnectionSlot> {
        let previous = self.total.fetch_add(1, Ordering::AcqRel);
        let slot = ConnectionSlot {
            limiter: Arc::clone(self),
            ip: None,
        };
        // Constructed before the check so the Drop undoes the increment either way.
        (previous < self.max_total).then_some(slot)
    }

    /// Charges `slot` to `ip`; false when that address already has its share. Called once the
    /// real client address is known (after a PROXY header, if any).
    pub fn bind_ip(&self, slot: &mut ConnectionSlot, ip: IpAddr) -> bool {
        debug_assert!(slot.ip.is_none());
        let mut map = self.per_ip.lock().unwrap_or_else(|e| e.into_inner());
        let count = map.entry(ip).or_insert(0);
        if *count >= self.max_per_ip {
            if *count == 0 {
                map.remove(&ip);
            }
            return false;
        }
        *count += 1;
        slot.ip = Some(ip);
        true
    }
}

#[derive(Debug)]
pub struct ConnectionSlot {
    limiter: Arc<ConnectionLimiter>,
    ip: Option<IpAddr>,
}

impl Drop for ConnectionSlot {
    fn drop(&mut self) {
        self.limiter.total.fetch_sub(1, Ordering::AcqRel);
        if let Some(ip) = self.ip {
            let mut map = self
                .limiter
                .per_ip
                .lock()
                .unwrap_or_else(|e| e.into_inner());
            if let Some(count) = map.get_mut(&ip) {
                *count -= 1;
                if *count == 0 {
                    map.remove(&ip);
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn global_limit_is_enforced_and_released() {
        let limiter = ConnectionLimiter::new(2, 10);
        let a = limiter.acquire().unwrap();
        let _b = limiter.acquire().unwrap();
        assert!(limiter.acquire().is_none());
        assert_eq!(limiter.active(), 2);
        drop(a);
        assert!(limiter.acquire().is_some());
    }

    #[test]
    fn per_ip_limit_is_enforced_and_released() {
        let limiter = ConnectionLimiter::new(10, 1);
        let ip: IpAddr = "192.0.2.1".parse().unwrap();
        let other: IpAddr = "192.0.2.2".parse().unwrap();
        let mut a = limiter.acquire().unwrap();
        assert!(limiter.bind_ip(&mut a, ip));
        let mut b = limiter.acquire().unwrap();
        assert!(!limiter.bind_ip(&mut b, ip));
        assert!(limiter.bind_ip(&mut b, other));
        drop(a);
        let mut c = limiter.acquire().unwrap();
        assert!(limiter.bind_ip(&mut c, ip));
    }
}
