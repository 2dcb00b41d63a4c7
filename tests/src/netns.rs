//! A host of its own for a test: a network namespace joined to this one by a veth pair, so a
//! server started in it reaches the rest (PostgreSQL, say) only through a link the test can cut.
//! Needs root and `ip` (iproute2, which scripts/test installs); made with `ip netns add` and
//! removed when dropped (removing the namespace removes the pair).

use std::net::Ipv4Addr;
use std::process::Command;

/// The /16 the pairs' /30s come from: private, and not one a test machine's own network uses
/// by default.
const NETNS_PREFIX: Ipv4Addr = Ipv4Addr::new(10, 213, 0, 0);
/// How many /30s the /16 holds.
const NETNS_SLOTS: u32 = 1 << 14;
/// How many /30s a test binary tries before it gives up (another run may hold some).
const NETNS_TRIES: u32 = 16;

pub struct NetNs {
    name: String,
    /// The host's end of the pair (cut and restored), and its address.
    host_link: String,
    pub host_ip: Ipv4Addr,
    /// The namespace's end of the pair, and its address.
    ns_link: String,
    pub ip: Ipv4Addr,
}

fn ip(args: &[&str]) -> Result<(), String> {
    let out = Command::new("ip").args(args).output().map_err(|e| format!("run ip {args:?}: {e}"))?;
    if out.status.success() {
        Ok(())
    } else {
        Err(format!("ip {args:?}: {}", String::from_utf8_lossy(&out.stderr).trim()))
    }
}

impl NetNs {
    /// A namespace with its end of a veth pair up, the host's end up, and one /30 between them.
    /// Panics, saying what is missing, where it cannot be made: a partition test that did not
    /// partition must not pass.
    pub fn create() -> NetNs {
        let pid = std::process::id();
        let mut last = String::new();
        for k in 0..NETNS_TRIES {
            // A /30 of its own per process and try: .1 the host's end, .2 the namespace's.
            let slot = pid.wrapping_mul(7).wrapping_add(k * 13) % NETNS_SLOTS;
            let base = u32::from(NETNS_PREFIX) + slot * 4;
            let ns = NetNs {
                name: format!("atelier-t{pid}-{k}"),
                host_link: format!("at{pid}h{k}"),
                host_ip: Ipv4Addr::from(base + 1),
                ns_link: format!("at{pid}n{k}"),
                ip: Ipv4Addr::from(base + 2),
            };
            match ns.set_up() {
                Ok(()) => return ns,
                Err(e) => last = e,
            }
        }
        panic!("a network namespace for the test (needs root and iproute2's `ip`): {last}");
    }

    fn set_up(&self) -> Result<(), String> {
        ip(&["netns", "add", &self.name])?;
        let made = (|| {
            ip(&["link", "add", &self.host_link, "type", "veth", "peer", "name", &self.ns_link])?;
            ip(&["link", "set", &self.ns_link, "netns", &self.name])?;
            ip(&["addr", "add", &format!("{}/30", self.host_ip), "dev", &self.host_link])?;
            ip(&["link", "set", &self.host_link, "up"])?;
            let in_ns = |args: &[&str]| {
                let mut all = vec!["-n", self.name.as_str()];
                all.extend_from_slice(args);
                ip(&all)
            };
            in_ns(&["addr", "add", &format!("{}/30", self.ip), "dev", &self.ns_link])?;
            in_ns(&["link", "set", &self.ns_link, "up"])?;
            in_ns(&["link", "set", "lo", "up"])
        })();
        if made.is_err() {
            let _ = ip(&["link", "del", &self.host_link]);
            let _ = ip(&["netns", "del", &self.name]);
        }
        made
    }

    /// Makes `cmd` start inside the namespace: it joins the namespace's network (and nothing
    /// else: its mounts, cgroups and users stay the host's) before it runs.
    pub fn enter(&self, cmd: &mut Command) {
        use std::os::fd::AsRawFd;
        use std::os::unix::process::CommandExt;
        let path = format!("/run/netns/{}", self.name);
        let file = std::fs::File::open(&path).unwrap_or_else(|e| panic!("open {path}: {e}"));
        // SAFETY: setns is async-signal-safe, and the closure touches only `file`'s descriptor,
        // which it owns and which stays open until the command has started.
        unsafe {
            cmd.pre_exec(move || {
                if libc::setns(file.as_raw_fd(), libc::CLONE_NEWNET) != 0 {
                    return Err(std::io::Error::last_os_error());
                }
                Ok(())
            });
        }
    }

    /// Cuts the link, as a pulled cable: nothing crosses it either way, and neither end's peer
    /// hears of it (no reset, no ICMP).
    pub fn cut(&self) {
        ip(&["link", "set", &self.host_link, "down"]).expect("cut the link");
    }

    /// Restores the link [`NetNs::cut`] cut.
    pub fn restore(&self) {
        ip(&["link", "set", &self.host_link, "up"]).expect("restore the link");
    }
}

impl Drop for NetNs {
    fn drop(&mut self) {
        let _ = ip(&["netns", "del", &self.name]);
        let _ = ip(&["link", "del", &self.host_link]);
    }
}
