//! The cluster under test as the driver sees it: the node list written by
//! `bench/scale.sh`, each node's `/health` and `/metrics`, and users who
//! carry Workbench's signed `user-id` cookie and keep the cookies they are
//! given, as a browser does.

use std::collections::BTreeMap;
use std::path::Path;
use std::time::{Duration, SystemTime};

use anyhow::Context;
use hmac::Hmac;
use sha2::Sha256;

use sessionlb::config::key::SecureKey;
use sessionlb::proxy::identity;

/// One `sessionlb serve` process.
#[derive(Debug, Clone)]
pub struct Node {
    /// Also its PostgreSQL `application_name` and its backend's name.
    pub name: String,
    pub ip: String,
    pub port: u16,
    pub pid: u32,
}

impl Node {
    pub fn base(&self) -> String {
        format!("http://{}:{}", self.ip, self.port)
    }

    pub fn address(&self) -> String {
        format!("{}:{}", self.ip, self.port)
    }
}

/// Read the node list: one node per line, `name ip port pid`; `#` comments.
pub fn read_nodes(path: &Path) -> anyhow::Result<Vec<Node>> {
    let text = std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
    let mut nodes = Vec::new();
    for (i, line) in text.lines().enumerate() {
        let line = line.trim();
        if line.is_empty() || line.starts_with('#') {
            continue;
        }
        let f: Vec<&str> = line.split_whitespace().collect();
        let [name, ip, port, pid] = f[..] else {
            anyhow::bail!("{}:{}: expected `name ip port pid`, got {line:?}", path.display(), i + 1);
        };
        nodes.push(Node {
            name: name.into(),
            ip: ip.into(),
            port: port.parse().with_context(|| format!("{}:{}: port", path.display(), i + 1))?,
            pid: pid.parse().with_context(|| format!("{}:{}: pid", path.display(), i + 1))?,
        });
    }
    anyhow::ensure!(!nodes.is_empty(), "{} lists no node", path.display());
    Ok(nodes)
}

/// An HTTP client for many hosts and many concurrent requests.
pub fn client() -> reqwest::Client {
    reqwest::Client::builder()
        .no_proxy()
        .pool_max_idle_per_host(512)
        .timeout(Duration::from_secs(30))
        .redirect(reqwest::redirect::Policy::none())
        .build()
        .expect("HTTP client")
}

/// The number of sessions in a node's view (`/health`, no database involved).
pub async fn view_sessions(http: &reqwest::Client, node: &Node) -> anyhow::Result<u64> {
    let body: serde_json::Value = http.get(format!("{}/health", node.base())).send().await?.json().await?;
    body.get("sessions").and_then(|v| v.as_u64()).context("/health has no `sessions` count")
}

/// A node's Prometheus text, summed by metric name and labels.
pub async fn metrics(http: &reqwest::Client, node: &Node) -> anyhow::Result<BTreeMap<String, f64>> {
    let text = http.get(format!("{}/metrics", node.base())).send().await?.text().await?;
    Ok(parse_metrics(&text))
}

pub fn parse_metrics(text: &str) -> BTreeMap<String, f64> {
    let mut m = BTreeMap::new();
    for line in text.lines().filter(|l| !l.starts_with('#')) {
        if let Some((name, value)) = line.rsplit_once(' ')
            && let Ok(v) = value.parse::<f64>()
        {
            *m.entry(name.to_string()).or_default() += v;
        }
    }
    m
}

/// Sum of every series of metric `name` (all label values).
pub fn metric_sum(m: &BTreeMap<String, f64>, name: &str) -> f64 {
    m.iter().filter(|(k, _)| *k == name || k.starts_with(&format!("{name}{{"))).map(|(_, v)| v).sum()
}

/// `sessionlb_placement_seconds` bucket counts (upper bound in s → count).
pub fn placement_buckets(m: &BTreeMap<String, f64>) -> Vec<(f64, f64)> {
    let mut b: Vec<(f64, f64)> = m
        .iter()
        .filter_map(|(k, v)| {
            let le = k.strip_prefix("sessionlb_placement_seconds_bucket{le=\"")?.strip_suffix("\"}")?;
            Some((if le == "+Inf" { f64::INFINITY } else { le.parse().ok()? }, *v))
        })
        .collect();
    b.sort_by(|a, c| a.0.total_cmp(&c.0));
    b
}

/// The bucket bound (ms) under which the `q`-quantile of a histogram falls.
pub fn bucket_quantile(buckets: &[(f64, f64)], q: f64) -> f64 {
    let total = buckets.last().map_or(0.0, |b| b.1);
    if total == 0.0 {
        return f64::NAN;
    }
    buckets.iter().find(|b| b.1 >= q * total).map_or(f64::NAN, |b| b.0 * 1000.0)
}

/// Signs `user-id` cookies with the cluster's secure cookie key, as Workbench does.
pub struct UserCookies {
    mac: Hmac<Sha256>,
    expires: String,
    pub name: String,
}

impl UserCookies {
    pub fn new(key_file: &Path, cookie_name: &str) -> anyhow::Result<UserCookies> {
        let key = SecureKey::load(key_file).with_context(|| format!("loading the key {}", key_file.display()))?;
        let expires = httpdate::fmt_http_date(SystemTime::now() + Duration::from_secs(24 * 3600));
        Ok(UserCookies { mac: identity::workbench_mac(&key), expires, name: cookie_name.to_string() })
    }

    /// `user-id=<signed value>` for `user`.
    pub fn cookie(&self, user: &str) -> String {
        format!("{}={}", self.name, identity::sign_workbench_cookie(&self.mac, user, &self.expires))
    }
}

/// A browser's cookies: the signed user cookie plus whatever the nodes set.
#[derive(Debug, Clone, Default)]
pub struct Jar {
    cookies: BTreeMap<String, String>,
}

impl Jar {
    pub fn with(name_value: &str) -> Jar {
        let mut j = Jar::default();
        j.set(name_value);
        j
    }

    /// Keep a `Set-Cookie` (or `name=value`): its first `name=value` pair.
    pub fn set(&mut self, set_cookie: &str) {
        let pair = set_cookie.split(';').next().unwrap_or("").trim();
        if let Some((n, v)) = pair.split_once('=') {
            self.cookies.insert(n.to_string(), v.to_string());
        }
    }

    pub fn keep_from(&mut self, resp: &reqwest::Response) {
        for v in resp.headers().get_all(reqwest::header::SET_COOKIE) {
            if let Ok(s) = v.to_str() {
                self.set(s);
            }
        }
    }

    pub fn header(&self) -> String {
        self.cookies.iter().map(|(n, v)| format!("{n}={v}")).collect::<Vec<_>>().join("; ")
    }
}

/// The backend that answered (`x-backend`).
pub fn backend_of(resp: &reqwest::Response) -> Option<String> {
    resp.headers().get("x-backend").and_then(|v| v.to_str().ok()).map(str::to_string)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn metrics_are_summed_by_name() {
        let text = "# HELP x\nsessionlb_placements_total{balancer=\"sessions\"} 3\n\
                    sessionlb_placement_seconds_bucket{le=\"0.005\"} 2\nsessionlb_placement_seconds_bucket{le=\"+Inf\"} 4\n";
        let m = parse_metrics(text);
        assert_eq!(metric_sum(&m, "sessionlb_placements_total"), 3.0);
        let b = placement_buckets(&m);
        assert_eq!(bucket_quantile(&b, 0.5), 5.0);
        assert!(bucket_quantile(&b, 0.99).is_infinite());
    }

    #[test]
    fn jar_keeps_the_last_value_of_each_cookie() {
        let mut j = Jar::with("user-id=abc");
        j.set("sessionlb-affinity=v1.x; Path=/; HttpOnly");
        j.set("sessionlb-affinity=v1.y; Path=/");
        assert_eq!(j.header(), "sessionlb-affinity=v1.y; user-id=abc");
    }
}
