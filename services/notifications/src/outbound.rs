//! Requests to addresses users give (webhook URLs), guarded against reaching inside the
//! cluster (SSRF): a URL whose host is, or resolves to, a loopback, private, link-local,
//! shared, multicast or unspecified address is refused unless the operator allows that network
//! (`--webhooks-allow-networks`). The check runs when a URL is saved and again on every
//! request, in the resolver the connection itself uses, so a name that later resolves inward
//! (DNS rebinding) reaches nothing. Redirects are not followed.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::sync::Arc;
use std::time::Duration;

use reqwest::dns::{Addrs, Name, Resolve, Resolving};

/// An IP network, `10.0.0.0/8` or `fd00::/8`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Network {
    addr: IpAddr,
    prefix: u8,
}

impl std::str::FromStr for Network {
    type Err = String;

    fn from_str(text: &str) -> Result<Network, String> {
        let text = text.trim();
        let (addr, prefix) = match text.split_once('/') {
            Some((a, p)) => (a, Some(p)),
            None => (text, None),
        };
        let addr: IpAddr = addr.parse().map_err(|_| format!("{text:?} is not an IP network (10.0.0.0/8, fd00::/8)"))?;
        let max = if addr.is_ipv4() { 32 } else { 128 };
        let prefix = match prefix {
            Some(p) => {
                p.parse::<u8>().ok().filter(|p| *p <= max).ok_or_else(|| format!("{text:?}: bad prefix length"))?
            }
            None => max,
        };
        Ok(Network { addr, prefix })
    }
}

impl Network {
    pub fn contains(&self, ip: IpAddr) -> bool {
        match (self.addr, canonical(ip)) {
            (IpAddr::V4(net), IpAddr::V4(ip)) => {
                let mask = if self.prefix == 0 { 0 } else { u32::MAX << (32 - u32::from(self.prefix)) };
                u32::from(net) & mask == u32::from(ip) & mask
            }
            (IpAddr::V6(net), IpAddr::V6(ip)) => {
                let mask = if self.prefix == 0 { 0 } else { u128::MAX << (128 - u32::from(self.prefix)) };
                u128::from(net) & mask == u128::from(ip) & mask
            }
            _ => false,
        }
    }
}

/// An IPv4 address written as IPv6 (`::ffff:127.0.0.1`) is the IPv4 address.
fn canonical(ip: IpAddr) -> IpAddr {
    match ip {
        IpAddr::V6(v6) => v6.to_ipv4_mapped().map(IpAddr::V4).unwrap_or(ip),
        v4 => v4,
    }
}

/// Whether `ip` is inside: not a public unicast address.
pub fn is_internal(ip: IpAddr) -> bool {
    match canonical(ip) {
        IpAddr::V4(v4) => {
            let shared = Network { addr: IpAddr::V4(Ipv4Addr::new(100, 64, 0, 0)), prefix: 10 };
            let this_network = v4.octets()[0] == 0;
            v4.is_loopback()
                || v4.is_private()
                || v4.is_link_local()
                || v4.is_unspecified()
                || v4.is_broadcast()
                || v4.is_multicast()
                || v4.is_documentation()
                || this_network
                || shared.contains(IpAddr::V4(v4))
        }
        IpAddr::V6(v6) => {
            let unique_local = (v6.segments()[0] & 0xfe00) == 0xfc00;
            let link_local = (v6.segments()[0] & 0xffc0) == 0xfe80;
            v6.is_loopback()
                || v6.is_unspecified()
                || v6.is_multicast()
                || unique_local
                || link_local
                || v6 == Ipv6Addr::UNSPECIFIED
        }
    }
}

/// Which addresses requests may reach.
#[derive(Debug, Clone, Default)]
pub struct Policy {
    /// Internal networks the operator allows.
    pub allowed: Vec<Network>,
}

impl Policy {
    pub fn allows(&self, ip: IpAddr) -> bool {
        !is_internal(ip) || self.allowed.iter().any(|n| n.contains(ip))
    }

    /// Checks a URL someone gave: its scheme, and its host's addresses (resolved now). The error
    /// says what is wrong, for the caller.
    pub async fn check_url(&self, url: &str) -> Result<reqwest::Url, String> {
        let parsed = reqwest::Url::parse(url.trim()).map_err(|e| format!("is not a URL ({e})"))?;
        if !matches!(parsed.scheme(), "https" | "http") {
            return Err("must be an https:// (or http://) URL".into());
        }
        if !parsed.username().is_empty() || parsed.password().is_some() {
            return Err("must not carry a user name or password".into());
        }
        let host = parsed.host_str().ok_or("has no host")?.trim_matches(['[', ']']).to_string();
        let port = parsed.port_or_known_default().unwrap_or(443);
        let addrs: Vec<IpAddr> = match host.parse::<IpAddr>() {
            Ok(ip) => vec![ip],
            Err(_) => tokio::net::lookup_host((host.as_str(), port))
                .await
                .map_err(|e| format!("its host {host} does not resolve ({e})"))?
                .map(|a| a.ip())
                .collect(),
        };
        if let Some(inside) = addrs.iter().find(|ip| !self.allows(**ip)) {
            return Err(format!(
                "resolves to {}, a loopback, private or link-local address; an operator can allow its network \
                 with --webhooks-allow-networks",
                crm_kit::validate::quote(&inside.to_string())
            ));
        }
        if parsed.scheme() == "http" && addrs.iter().all(|ip| !is_internal(*ip)) {
            return Err("must be https:// (plain http:// only for networks the operator allows)".into());
        }
        Ok(parsed)
    }

    /// An HTTP client whose every connection goes only where this policy allows.
    pub fn client(&self, timeout: Duration) -> Result<reqwest::Client, String> {
        reqwest::Client::builder()
            .dns_resolver(Arc::new(GuardedResolver(self.clone())))
            .redirect(reqwest::redirect::Policy::none())
            .connect_timeout(timeout)
            .timeout(timeout)
            .user_agent(concat!("crm-notifications/", env!("CARGO_PKG_VERSION")))
            .build()
            .map_err(|e| format!("HTTP client: {e}"))
    }
}

/// Resolves names, keeping only the addresses the policy allows.
struct GuardedResolver(Policy);

impl Resolve for GuardedResolver {
    fn resolve(&self, name: Name) -> Resolving {
        let policy = self.0.clone();
        Box::pin(async move {
            let host = name.as_str().to_string();
            let all: Vec<SocketAddr> = tokio::net::lookup_host((host.as_str(), 0)).await?.collect();
            let allowed: Vec<SocketAddr> = all.iter().copied().filter(|a| policy.allows(a.ip())).collect();
            if allowed.is_empty() {
                return Err(format!("{host} resolves only to addresses requests may not reach").into());
            }
            Ok(Box::new(allowed.into_iter()) as Addrs)
        })
    }
}

/// How an outgoing request ended.
#[derive(Debug, Clone, Default)]
pub struct Outcome {
    pub status: u16,
    pub error: String,
    pub sent: bool,
    /// The receiver may have it: the connection broke or timed out after the request went.
    pub unknown: bool,
    /// No retry can help (the URL is refused by policy).
    pub permanent: bool,
}

/// POSTs `body` to `url` with `headers`, refusing addresses outside `policy` (IP literals are
/// checked here, names by the client's resolver).
pub async fn post(
    client: &reqwest::Client,
    policy: &Policy,
    url: &str,
    headers: &[(&str, String)],
    body: Vec<u8>,
) -> Outcome {
    let parsed = match reqwest::Url::parse(url) {
        Ok(u) => u,
        Err(e) => return Outcome { error: format!("bad URL: {e}"), permanent: true, ..Outcome::default() },
    };
    if let Some(ip) = parsed.host_str().and_then(|h| h.trim_matches(['[', ']']).parse::<IpAddr>().ok())
        && !policy.allows(ip)
    {
        return Outcome { error: format!("{ip} may not be reached"), permanent: true, ..Outcome::default() };
    }
    let mut request = client.post(parsed).header("content-type", "application/json").body(body);
    for (name, value) in headers {
        request = request.header(*name, value.as_str());
    }
    match request.send().await {
        Ok(response) => {
            let status = response.status();
            let sent = status.is_success();
            let error = if sent {
                String::new()
            } else {
                let text = response.text().await.unwrap_or_default();
                format!("HTTP {status}: {}", text.chars().take(200).collect::<String>())
            };
            Outcome { status: status.as_u16(), error, sent, ..Outcome::default() }
        }
        Err(err) => {
            // Not connected: nothing went, safe to send again. Anything later: maybe received.
            let unknown = !err.is_connect() && !err.is_builder();
            let mut text = err.to_string();
            let mut source = std::error::Error::source(&err);
            while let Some(inner) = source {
                text.push_str(&format!(": {inner}"));
                source = inner.source();
            }
            Outcome { error: text, unknown, permanent: err.is_builder(), ..Outcome::default() }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn internal_addresses_are_recognised_in_every_spelling() {
        for inside in [
            "127.0.0.1",
            "10.1.2.3",
            "172.16.0.1",
            "192.168.1.1",
            "169.254.169.254",
            "100.64.0.1",
            "0.0.0.0",
            "::1",
            "fe80::1",
            "fd00::1",
            "::ffff:127.0.0.1",
            "::ffff:10.0.0.1",
            "224.0.0.1",
            "::",
        ] {
            assert!(is_internal(inside.parse().unwrap()), "{inside}");
        }
        for outside in ["8.8.8.8", "1.1.1.1", "2001:4860:4860::8888", "::ffff:8.8.8.8"] {
            assert!(!is_internal(outside.parse().unwrap()), "{outside}");
        }
    }

    #[test]
    fn operators_allow_networks() {
        let policy = Policy { allowed: vec!["127.0.0.0/8".parse().unwrap(), "fd00::/8".parse().unwrap()] };
        assert!(policy.allows("127.0.0.2".parse().unwrap()));
        assert!(policy.allows("::ffff:127.0.0.1".parse().unwrap()));
        assert!(policy.allows("fd12::1".parse().unwrap()));
        assert!(!policy.allows("10.0.0.1".parse().unwrap()));
        assert!(Policy::default().allows("8.8.8.8".parse().unwrap()));
        assert!("10.0.0.0/33".parse::<Network>().is_err());
        assert!("nonsense".parse::<Network>().is_err());
        assert_eq!("10.0.0.1".parse::<Network>().unwrap().prefix, 32);
    }

    #[tokio::test]
    async fn urls_are_checked_before_they_are_saved() {
        let policy = Policy::default();
        for (url, why) in [
            ("ftp://example.com/x", "https://"),
            ("https://user:pw@example.com/", "user name"),
            ("https://127.0.0.1/hook", "loopback"),
            ("https://[::1]:8443/hook", "loopback"),
            ("https://169.254.169.254/latest/meta-data", "link-local"),
            ("https://localhost/hook", "loopback"),
            ("not a url", "not a URL"),
        ] {
            let err = policy.check_url(url).await.unwrap_err();
            assert!(err.contains(why), "{url}: {err}");
        }
        let allowed = Policy { allowed: vec!["127.0.0.0/8".parse().unwrap()] };
        assert!(allowed.check_url("http://127.0.0.1:9000/hook").await.is_ok());
        assert!(allowed.check_url("http://10.0.0.1/hook").await.is_err());
    }
}
