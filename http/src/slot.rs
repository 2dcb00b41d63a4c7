//! Connection slots: the global cap on open connections and the cap per client address.
//!
//! A slot is taken by the accept loop and given back when its [`Slot`] is dropped, on every
//! path a connection can end by: a normal close, an error, a thread that could not start, and
//! a panic in the connection's thread (unwinding drops it). A slot given back by a call at the
//! end of the thread leaked on a panic, and enough leaked slots left the server answering 503
//! to everyone until it restarted.

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

/// The open connections, in total and per client address, and their caps.
pub(crate) struct Slots {
    total_max: u64,
    per_ip_max: u64,
    /// Open connections, against `total_max`; /metrics reports it.
    open: AtomicU64,
    /// Open connections per client address, against `connections_per_ip_max`; an address
    /// with none has no entry, so the map holds only addresses connected now.
    per_ip: Mutex<HashMap<IpAddr, u64>>,
}

/// Why a connection got no slot.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Full {
    /// `connections_max` connections are open.
    Total(u64),
    /// `connections_per_ip_max` connections are open from this client's address.
    PerIp(u64),
}

impl Slots {
    pub(crate) fn new(total_max: usize, per_ip_max: usize) -> Slots {
        Slots {
            total_max: u64::try_from(total_max).unwrap_or(u64::MAX),
            per_ip_max: u64::try_from(per_ip_max).unwrap_or(u64::MAX),
            open: AtomicU64::new(0),
            per_ip: Mutex::new(HashMap::new()),
        }
    }

    /// Open connections now.
    pub(crate) fn open(&self) -> u64 {
        self.open.load(Ordering::SeqCst)
    }
}

/// One open connection's place in [`Slots`]; gives it back when dropped.
pub(crate) struct Slot {
    slots: Arc<Slots>,
    /// The client address the connection counts against; none for a trusted proxy's
    /// connection until a request names its client (see [`Slot::count_as`]).
    ip: Option<IpAddr>,
}

impl Slot {
    /// Takes a slot for a connection from `ip`, or says which cap is reached.
    pub(crate) fn take(slots: &Arc<Slots>, ip: IpAddr) -> Result<Slot, Full> {
        let mut slot = Slot::take_unassigned(slots)?;
        slot.count_as(ip)?;
        Ok(slot)
    }

    /// Takes a slot that counts against the total only: a trusted proxy's connection, whose
    /// clients are counted per request as `X-Forwarded-For` names them.
    pub(crate) fn take_unassigned(slots: &Arc<Slots>) -> Result<Slot, Full> {
        let total_max = slots.total_max;
        if slots.open.fetch_add(1, Ordering::SeqCst) >= total_max {
            slots.open.fetch_sub(1, Ordering::SeqCst);
            return Err(Full::Total(total_max));
        }
        Ok(Slot { slots: slots.clone(), ip: None })
    }

    /// Counts this connection against `ip` from now on (and no longer against the address it
    /// counted against before), unless `ip` has its cap of connections already; then nothing
    /// changes. A proxy's kept-alive connection serves one client after another.
    pub(crate) fn count_as(&mut self, ip: IpAddr) -> Result<(), Full> {
        if self.ip == Some(ip) {
            return Ok(());
        }
        let per_ip_max = self.slots.per_ip_max;
        let mut per_ip = self.slots.per_ip.lock().unwrap_or_else(|p| p.into_inner());
        let count = per_ip.entry(ip).or_insert(0);
        if *count >= per_ip_max {
            if *count == 0 {
                per_ip.remove(&ip);
            }
            return Err(Full::PerIp(per_ip_max));
        }
        *count += 1;
        if let Some(old) = self.ip.replace(ip) {
            uncount(&mut per_ip, old);
        }
        Ok(())
    }
}

fn uncount(per_ip: &mut HashMap<IpAddr, u64>, ip: IpAddr) {
    if let Some(count) = per_ip.get_mut(&ip) {
        *count = count.saturating_sub(1);
        if *count == 0 {
            per_ip.remove(&ip);
        }
    }
}

impl Drop for Slot {
    fn drop(&mut self) {
        let slots = &self.slots;
        if let Some(ip) = self.ip {
            // A poisoned lock only means another thread panicked while holding it; the map
            // itself is always left consistent, so go on with it.
            let mut per_ip = slots.per_ip.lock().unwrap_or_else(|p| p.into_inner());
            uncount(&mut per_ip, ip);
        }
        slots.open.fetch_sub(1, Ordering::SeqCst);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn slots_are_capped_in_total_and_per_address_and_given_back_on_drop_and_on_panic() {
        let slots = Arc::new(Slots::new(3, 2));
        let (a, b): (IpAddr, IpAddr) = ("10.0.0.1".parse().unwrap(), "10.0.0.2".parse().unwrap());
        let a1 = Slot::take(&slots, a).unwrap();
        let a2 = Slot::take(&slots, a).unwrap();
        assert_eq!(Slot::take(&slots, a).err(), Some(Full::PerIp(2)));
        let b1 = Slot::take(&slots, b).unwrap();
        assert_eq!(Slot::take(&slots, b).err(), Some(Full::Total(3)));
        assert_eq!(slots.open(), 3);
        drop((a1, b1));
        assert_eq!(slots.open(), 1);
        let held = Slot::take(&slots, b).unwrap();
        let panicked = std::thread::spawn(move || {
            let _slot = held;
            panic!("a connection thread that panics");
        })
        .join();
        assert!(panicked.is_err());
        drop(a2);
        assert_eq!(slots.open(), 0);
        assert!(slots.per_ip.lock().unwrap().is_empty(), "no entry is left for addresses gone");
    }

    #[test]
    fn a_proxied_connection_counts_against_each_client_it_serves_in_turn() {
        let slots = Arc::new(Slots::new(10, 1));
        let (a, b): (IpAddr, IpAddr) = ("198.51.100.1".parse().unwrap(), "198.51.100.2".parse().unwrap());
        let mut p1 = Slot::take_unassigned(&slots).unwrap();
        let mut p2 = Slot::take_unassigned(&slots).unwrap();
        p1.count_as(a).unwrap();
        assert_eq!(p2.count_as(a), Err(Full::PerIp(1)), "a is at its cap");
        p2.count_as(b).unwrap();
        // p1's next request comes from b: refused (b is at its cap), p1 still counts as a.
        assert_eq!(p1.count_as(b), Err(Full::PerIp(1)));
        drop(p2);
        p1.count_as(b).unwrap();
        assert_eq!(slots.per_ip.lock().unwrap().get(&a), None, "a no longer counted");
        drop(p1);
        assert_eq!(slots.open(), 0);
        assert!(slots.per_ip.lock().unwrap().is_empty());
    }
}
