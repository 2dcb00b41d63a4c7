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

use crate::state::Shared;

/// The open connections, in total and per client address.
#[derive(Default)]
pub(crate) struct Slots {
    /// Open connections, against `connections_max`; /metrics reports it.
    pub(crate) open: AtomicU64,
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

/// One open connection's place in [`Slots`]; gives it back when dropped.
pub(crate) struct Slot {
    shared: Arc<Shared>,
    ip: IpAddr,
}

impl Slot {
    /// Takes a slot for a connection from `ip`, or says which cap is reached.
    pub(crate) fn take(shared: &Arc<Shared>, ip: IpAddr) -> Result<Slot, Full> {
        let slots = &shared.slots;
        let total_max = shared.config.connections_max as u64;
        if slots.open.fetch_add(1, Ordering::SeqCst) >= total_max {
            slots.open.fetch_sub(1, Ordering::SeqCst);
            return Err(Full::Total(total_max));
        }
        let per_ip_max = shared.config.connections_per_ip_max as u64;
        let mut per_ip = slots.per_ip.lock().unwrap_or_else(|p| p.into_inner());
        let count = per_ip.entry(ip).or_insert(0);
        if *count >= per_ip_max {
            if *count == 0 {
                per_ip.remove(&ip);
            }
            drop(per_ip);
            slots.open.fetch_sub(1, Ordering::SeqCst);
            return Err(Full::PerIp(per_ip_max));
        }
        *count += 1;
        Ok(Slot { shared: shared.clone(), ip })
    }

    pub(crate) fn shared(&self) -> &Arc<Shared> {
        &self.shared
    }
}

impl Drop for Slot {
    fn drop(&mut self) {
        let slots = &self.shared.slots;
        {
            // A poisoned lock only means another thread panicked while holding it; the map
            // itself is always left consistent, so go on with it.
            let mut per_ip = slots.per_ip.lock().unwrap_or_else(|p| p.into_inner());
            if let Some(count) = per_ip.get_mut(&self.ip) {
                *count = count.saturating_sub(1);
                if *count == 0 {
                    per_ip.remove(&self.ip);
                }
            }
        }
        slots.open.fetch_sub(1, Ordering::SeqCst);
    }
}
