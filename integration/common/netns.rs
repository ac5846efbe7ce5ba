//! A network namespace joined to the host by a veth pair: the only way to
//! be a client that is neither loopback nor a cluster node on one machine
//! (every 127.x address is loopback). Needs root and iproute2.

use std::process::Command;

pub struct Netns {
    pub name: String,
    host_if: String,
    ns_if: String,
    /// The host side's address (what the namespace connects to).
    pub host_ip: String,
    /// The namespace side's address (the client address the host sees).
    pub ns_ip: String,
}

fn ip(args: &[&str]) {
    let out = Command::new("ip").args(args).output().expect("the `ip` command (iproute2)");
    assert!(out.status.success(), "ip {}: {}", args.join(" "), String::from_utf8_lossy(&out.stderr));
}

impl Netns {
    pub fn create() -> Netns {
        assert!(rustix::process::geteuid().is_root(), "this test needs root to create a network namespace");
        let tag: u16 = rand::random::<u16>() % 4000 + 1;
        let name = format!("slbtest{tag}");
        let host_if = format!("slbh{tag}");
        let ns_if = format!("slbn{tag}");
        let (hi, lo) = (tag / 250, tag % 250 + 1);
        let host_ip = format!("10.{}.{}.1", 200 + hi, lo);
        let ns_ip = format!("10.{}.{}.2", 200 + hi, lo);
        ip(&["netns", "add", &name]);
        let ns = Netns {
            name: name.clone(),
            host_if: host_if.clone(),
            ns_if: ns_if.clone(),
            host_ip: host_ip.clone(),
            ns_ip: ns_ip.clone(),
        };
        ip(&["link", "add", &host_if, "type", "veth", "peer", "name", &ns_if]);
        ip(&["link", "set", &ns_if, "netns", &name]);
        ip(&["addr", "add", &format!("{host_ip}/24"), "dev", &host_if]);
        ip(&["link", "set", &host_if, "up"]);
        ip(&["netns", "exec", &name, "ip", "addr", "add", &format!("{ns_ip}/24"), "dev", &ns_if]);
        ip(&["netns", "exec", &name, "ip", "link", "set", &ns_if, "up"]);
        ip(&["netns", "exec", &name, "ip", "link", "set", "lo", "up"]);
        ns
    }

    /// Cut the namespace off (its side of the link down; packets to it are
    /// dropped, as in a partition) or heal it. While it is cut, a blackhole
    /// route keeps the host from sending its address anywhere else (without
    /// it, the host would route it through its default route).
    pub fn set_link(&self, up: bool) {
        let blackhole = format!("{}/32", self.ns_ip);
        if up {
            ip(&["netns", "exec", &self.name, "ip", "link", "set", &self.ns_if, "up"]);
            ip(&["route", "del", "blackhole", &blackhole]);
        } else {
            ip(&["route", "add", "blackhole", &blackhole]);
            ip(&["netns", "exec", &self.name, "ip", "link", "set", &self.ns_if, "down"]);
        }
    }

    /// `curl` inside the namespace: (HTTP status, body).
    pub fn curl(&self, url: &str) -> (u16, String) {
        let out = Command::new("ip")
            .args(["netns", "exec", &self.name, "curl", "-s", "-m", "10", "-w", "\n%{http_code}", url])
            .output()
            .expect("curl");
        let text = String::from_utf8_lossy(&out.stdout).to_string();
        let (body, code) = text.rsplit_once('\n').unwrap_or(("", "0"));
        (code.trim().parse().unwrap_or(0), body.to_string())
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        let _ = Command::new("ip").args(["route", "del", "blackhole", &format!("{}/32", self.ns_ip)]).output();
        let _ = Command::new("ip").args(["link", "del", &self.host_if]).output();
        let _ = Command::new("ip").args(["netns", "del", &self.name]).output();
    }
}
