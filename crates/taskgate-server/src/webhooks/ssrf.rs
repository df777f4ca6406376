//! Request-forgery guard for callback URLs.
//!
//! By default a callback may only reach public addresses. A literal address (in any notation the
//! URL parser accepts: `2130706433`, `0x7f.1`, `[::ffff:127.0.0.1]`) or a `localhost` name is
//! refused when the task is submitted. Names are resolved at delivery by [`GuardedResolver`],
//! which checks every address and hands only checked addresses to the HTTP client, so the
//! connection goes to an address that was checked (no DNS-rebinding window).

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};

use reqwest::dns::{Addrs, Name, Resolve, Resolving};
use url::{Host, Url};

/// Whether an address is a public unicast address a callback may reach.
///
/// ```
/// use taskgate_server::webhooks::ssrf::is_public;
///
/// assert!(is_public("93.184.216.34".parse().unwrap()));
/// assert!(!is_public("169.254.169.254".parse().unwrap()));
/// assert!(!is_public("::ffff:10.0.0.1".parse().unwrap()));
/// ```
pub fn is_public(ip: IpAddr) -> bool {
    match ip {
        IpAddr::V4(v4) => is_public_v4(v4),
        IpAddr::V6(v6) => {
            // Forms that carry an IPv4 address reach that address (or may): judge that one.
            // IPv4-mapped (::ffff:a.b.c.d), IPv4-translated (::ffff:0:a.b.c.d, SIIT),
            // IPv4-compatible (::a.b.c.d) and well-known NAT64 (64:ff9b::/96).
            let seg = v6.segments();
            let embedded = || Ipv4Addr::from((u32::from(seg[6]) << 16) | u32::from(seg[7]));
            if let Some(v4) = v6.to_ipv4_mapped() {
                return is_public_v4(v4);
            }
            if seg[..4] == [0, 0, 0, 0] && seg[4] == 0xffff && seg[5] == 0 {
                return is_public_v4(embedded());
            }
            if seg[..6] == [0, 0, 0, 0, 0, 0] && !v6.is_loopback() && !v6.is_unspecified() {
                return is_public_v4(embedded());
            }
            if seg[0] == 0x64 && seg[1] == 0xff9b && seg[2..6] == [0, 0, 0, 0] {
                return is_public_v4(embedded());
            }
            // Transition forms whose IPv4 end a relay picks, or that are for local use only,
            // are refused outright: 6to4 (2002::/16), Teredo (2001::/32) and local-use NAT64
            // (64:ff9b:1::/48, RFC 8215), whose translators sit inside operators' networks.
            if seg[0] == 0x2002 || (seg[0] == 0x2001 && seg[1] == 0) {
                return false;
            }
            if seg[0] == 0x64 && seg[1] == 0xff9b && seg[2] == 1 {
                return false;
            }
            is_public_v6(v6)
        }
    }
}

fn is_public_v4(ip: Ipv4Addr) -> bool {
    let o = ip.octets();
    !(ip.is_loopback()          // 127.0.0.0/8
        || ip.is_private()      // 10/8, 172.16/12, 192.168/16
        || ip.is_link_local()   // 169.254/16, including the cloud metadata address
        || ip.is_unspecified()
        || ip.is_multicast()
        || ip.is_broadcast()
        || o[0] == 0                                // "this network"
        || (o[0] == 100 && (o[1] & 0xc0) == 64)     // 100.64/10, carrier-grade NAT
        || (o[0] == 192 && o[1] == 0 && o[2] == 0)  // 192.0.0/24, IETF protocol assignments
        || (o[0] == 198 && (o[1] & 0xfe) == 18)     // 198.18/15, benchmarking
        || o[0] >= 240) // 240/4, reserved
}

fn is_public_v6(ip: Ipv6Addr) -> bool {
    let first = ip.segments()[0];
    !(ip.is_loopback()
        || ip.is_unspecified()
        || ip.is_multicast()
        || (first & 0xfe00) == 0xfc00 // fc00::/7, unique local
        || (first & 0xffc0) == 0xfe80 // fe80::/10, link-local
        || (first & 0xffc0) == 0xfec0 // fec0::/10, deprecated site-local
        || (first == 0x2001 && ip.segments()[1] == 0x0db8) // 2001:db8::/32, documentation
        || ip.segments()[..4] == [0x100, 0, 0, 0]) // 100::/64, discard-only
}

/// Why a callback URL is refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum UrlRefused {
    #[error("must use http or https")]
    Scheme,
    #[error("has no host")]
    NoHost,
    #[error("points at {0}, which is not a public address (loopback, private, link-local and similar addresses are refused; the operator can allow them with --allow-private-callbacks)")]
    PrivateAddress(IpAddr),
    #[error("points at localhost (the operator can allow local callbacks with --allow-private-callbacks)")]
    Localhost,
}

/// The HTTP client settings for URLs someone else chose (callbacks, upstream output URLs):
/// no redirect followed, no proxy, and unless `allow_private`, every address checked by
/// [`GuardedResolver`] as it is connected to.
pub fn client_builder(allow_private: bool) -> reqwest::ClientBuilder {
    let builder = reqwest::Client::builder()
        .user_agent(concat!("taskgate/", env!("CARGO_PKG_VERSION")))
        .redirect(reqwest::redirect::Policy::none())
        .no_proxy();
    if allow_private {
        builder
    } else {
        builder.dns_resolver(std::sync::Arc::new(GuardedResolver))
    }
}

/// The redirect policy of the client that calls the operator's upstreams: a redirect within the
/// origin asked for is followed (up to ten), one to any other origin is not, and the 3xx is
/// answered as it came. The upstream is trusted because the operator configured it; where its
/// redirect points is the upstream's choice, and may come from a tenant's input (an output URL
/// that redirects to the cloud metadata address).
pub fn same_origin_redirects() -> reqwest::redirect::Policy {
    reqwest::redirect::Policy::custom(|attempt| {
        let same_origin = attempt
            .previous()
            .first()
            .is_some_and(|first| first.origin() == attempt.url().origin());
        if attempt.previous().len() > 10 {
            attempt.error("more than ten redirects")
        } else if same_origin {
            attempt.follow()
        } else {
            attempt.stop()
        }
    })
}

/// Checks what can be checked without DNS: scheme, host, literal addresses, localhost names.
pub fn check_url(url: &Url, allow_private: bool) -> Result<(), UrlRefused> {
    if !matches!(url.scheme(), "http" | "https") {
        return Err(UrlRefused::Scheme);
    }
    let host = url.host().ok_or(UrlRefused::NoHost)?;
    if allow_private {
        return Ok(());
    }
    match host {
        Host::Ipv4(ip) if !is_public(IpAddr::V4(ip)) => {
            Err(UrlRefused::PrivateAddress(IpAddr::V4(ip)))
        }
        Host::Ipv6(ip) if !is_public(IpAddr::V6(ip)) => {
            Err(UrlRefused::PrivateAddress(IpAddr::V6(ip)))
        }
        Host::Domain(d) => {
            let d = d.trim_end_matches('.').to_ascii_lowercase();
            if d == "localhost" || d.ends_with(".localhost") {
                Err(UrlRefused::Localhost)
            } else {
                Ok(())
            }
        }
        _ => Ok(()),
    }
}

#[derive(Debug, thiserror::Error)]
#[error("callback host {host} resolves to {ip}, which is not a public address")]
pub struct ResolvedPrivate {
    host: String,
    ip: IpAddr,
}

#[derive(Debug, thiserror::Error)]
#[error("callback host {0} has no address")]
struct NoAddress(String);

/// Whether a request failed because its host resolved to a refused address (retrying is useless).
pub fn is_refused_address(e: &(dyn std::error::Error + 'static)) -> bool {
    let mut cur = Some(e);
    while let Some(err) = cur {
        if err.downcast_ref::<ResolvedPrivate>().is_some() {
            return true;
        }
        cur = err.source();
    }
    false
}

/// A DNS resolver for the webhook client that refuses names with any non-public address.
pub struct GuardedResolver;

impl Resolve for GuardedResolver {
    fn resolve(&self, name: Name) -> Resolving {
        let host = name.as_str().to_owned();
        Box::pin(async move {
            let addrs: Vec<SocketAddr> =
                tokio::net::lookup_host((host.as_str(), 0)).await?.collect();
            if addrs.is_empty() {
                return Err(Box::new(NoAddress(host)) as Box<dyn std::error::Error + Send + Sync>);
            }
            // Every address, not just the first: the client may fall back to any of them.
            if let Some(bad) = addrs.iter().find(|a| !is_public(a.ip())) {
                return Err(Box::new(ResolvedPrivate { host, ip: bad.ip() }) as _);
            }
            Ok(Box::new(addrs.into_iter()) as Addrs)
        })
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    fn refused(u: &str) -> bool {
        check_url(&Url::parse(u).unwrap(), false).is_err()
    }

    #[test]
    fn every_notation_of_a_private_address_is_refused() {
        for u in [
            "http://127.0.0.1/h",
            "http://2130706433/h",
            "http://0x7f.1/h",
            "http://0177.0.0.1/h",
            "http://127.1/h",
            "http://[::1]/h",
            "http://[::ffff:127.0.0.1]/h",
            "http://[::ffff:7f00:1]/h",
            "http://[::127.0.0.1]/h",
            "http://[64:ff9b::a00:1]/h",
            "http://localhost/h",
            "http://LOCALHOST./h",
            "http://api.localhost/h",
            "http://10.1.2.3/h",
            "http://172.16.0.1/h",
            "http://192.168.1.1/h",
            "http://169.254.169.254/latest/meta-data",
            "http://0.0.0.0/h",
            "http://[::]/h",
            "http://224.0.0.1/h",
            "http://255.255.255.255/h",
            "http://[fc00::1]/h",
            "http://[fd12:3456::1]/h",
            "http://[fe80::1]/h",
            "http://[ff02::1]/h",
            "http://100.64.0.1/h",
            // IPv6 transition forms: SIIT, local-use NAT64, 6to4 (of loopback and of a public
            // address alike), Teredo, documentation and discard prefixes.
            "http://[::ffff:0:7f00:1]/h",
            "http://[::ffff:0:a00:1]/h",
            "http://[64:ff9b:1::a00:1]/h",
            "http://[64:ff9b:1::5db8:d822]/h",
            "http://[2002:7f00:1::1]/h",
            "http://[2002:5db8:d822::1]/h",
            "http://[2001:0:4136:e378:8000:63bf:3fff:fdd2]/h",
            "http://[2001:db8::1]/h",
            "http://[100::1]/h",
        ] {
            assert!(refused(u), "{u} should be refused");
        }
    }

    #[test]
    fn public_addresses_and_names_pass_the_submit_check() {
        for u in [
            "https://example.com/hook",
            "http://93.184.216.34/h",
            "http://[2606:2800:220:1::1]/h",
            "http://172.32.0.1/h",
            "http://[::ffff:5db8:d822]/h",
            "http://[64:ff9b::5db8:d822]/h",
            "http://[2001:4860::8888]/h",
        ] {
            assert!(!refused(u), "{u} should pass");
        }
    }

    #[test]
    fn non_http_schemes_are_refused_even_when_private_is_allowed() {
        let u = Url::parse("file:///etc/passwd").unwrap();
        assert_eq!(check_url(&u, true), Err(UrlRefused::Scheme));
        assert!(check_url(&Url::parse("http://127.0.0.1/").unwrap(), true).is_ok());
    }
}
