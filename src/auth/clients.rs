//! Registered clients and their public keys: inline JWKS or fetched from a `jwks_url`, cached.

use std::collections::HashMap;
use std::sync::{Arc, RwLock};
use std::time::{Duration, Instant};

use jsonwebtoken::jwk::{Jwk, JwkSet};
use url::Url;

use crate::auth::scopes::Scope;
use crate::config::ClientConfig;

/// How long a fetched JWKS is used before it is fetched again anyway.
const JWKS_TTL: Duration = Duration::from_secs(3600);

/// A registered client, ready for verification.
#[derive(Debug, Clone)]
pub struct Client {
    /// `client_id`.
    pub id: String,
    /// Scopes it may be granted.
    pub allowed: Vec<Scope>,
    /// Its registered JWKS URL, if keys are fetched.
    pub jwks_url: Option<Url>,
    inline: Option<Arc<JwkSet>>,
}

/// Why a client's keys could not be used.
#[derive(Debug, thiserror::Error)]
pub enum KeyError {
    /// The registered JWKS (inline or fetched) is not a JWKS.
    #[error("the JWKS of client {0} is invalid: {1}")]
    Invalid(String, String),
    /// The JWKS URL could not be fetched.
    #[error("fetching the JWKS of client {0} failed: {1}")]
    Fetch(String, String),
}

/// What a reload changed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Reloaded {
    /// Clients registered now.
    pub clients: usize,
    /// Ids registered before and not any more, sorted.
    pub removed: Vec<String>,
}

/// The client registry; replaced as a whole on reload.
pub struct Registry {
    clients: RwLock<HashMap<String, Client>>,
    http: reqwest::Client,
    fetched: moka::sync::Cache<String, Arc<JwkSet>>,
    last_fetch: moka::sync::Cache<String, Instant>,
    min_refetch: Duration,
}

/// Whether a JWKS URL may be fetched: HTTPS anywhere, plain HTTP only on loopback.
pub fn fetchable(url: &Url) -> bool {
    match url.scheme() {
        "https" => true,
        "http" => match url.host() {
            Some(url::Host::Ipv4(ip)) => ip.is_loopback(),
            Some(url::Host::Ipv6(ip)) => ip.is_loopback(),
            Some(url::Host::Domain(d)) => d == "localhost",
            None => false,
        },
        _ => false,
    }
}

fn build(configs: &[ClientConfig]) -> Result<HashMap<String, Client>, KeyError> {
    configs
        .iter()
        .map(|c| {
            let inline = match &c.jwks {
                Some(v) => Some(Arc::new(
                    serde_json::from_value::<JwkSet>(v.clone())
                        .map_err(|e| KeyError::Invalid(c.client_id.clone(), e.to_string()))?,
                )),
                None => None,
            };
            if let Some(url) = c.jwks_url.as_ref().filter(|u| !fetchable(u)) {
                return Err(KeyError::Invalid(
                    c.client_id.clone(),
                    format!("jwks_url {url} must be https (or http on loopback)"),
                ));
            }
            let client = Client {
                id: c.client_id.clone(),
                allowed: c.scopes.iter().filter_map(|s| Scope::parse(s)).collect(),
                jwks_url: c.jwks_url.clone(),
                inline,
            };
            Ok((c.client_id.clone(), client))
        })
        .collect()
}

impl Registry {
    /// A registry of `configs`; refetches a JWKS URL at most every `min_refetch`.
    pub fn new(configs: &[ClientConfig], min_refetch: Duration) -> Result<Self, KeyError> {
        Ok(Self {
            clients: RwLock::new(build(configs)?),
            http: reqwest::Client::builder()
                .timeout(Duration::from_secs(10))
                .redirect(reqwest::redirect::Policy::none())
                .build()
                .map_err(|e| KeyError::Fetch("-".into(), e.to_string()))?,
            fetched: moka::sync::Cache::builder().time_to_live(JWKS_TTL).build(),
            last_fetch: moka::sync::Cache::builder()
                .time_to_live(min_refetch.max(Duration::from_millis(1)))
                .build(),
            min_refetch,
        })
    }

    /// Replaces every client (configuration reload); keeps nothing of removed clients.
    pub fn reload(&self, configs: &[ClientConfig]) -> Result<Reloaded, KeyError> {
        let clients = build(configs)?;
        let n = clients.len();
        let previous =
            std::mem::replace(&mut *self.clients.write().expect("registry lock"), clients);
        self.fetched.invalidate_all();
        self.last_fetch.invalidate_all();
        let mut removed: Vec<String> = previous
            .into_keys()
            .filter(|id| self.client(id).is_none())
            .collect();
        removed.sort();
        Ok(Reloaded {
            clients: n,
            removed,
        })
    }

    /// The client registered as `id`.
    pub fn client(&self, id: &str) -> Option<Client> {
        self.clients.read().expect("registry lock").get(id).cloned()
    }

    /// The client's key `kid`, fetching its JWKS again (rate-limited) when the kid is unknown.
    pub async fn key(&self, client: &Client, kid: &str) -> Result<Option<Jwk>, KeyError> {
        if let Some(set) = &client.inline {
            return Ok(set.find(kid).cloned());
        }
        let Some(url) = &client.jwks_url else {
            return Ok(None);
        };
        if let Some(set) = self.fetched.get(url.as_str()) {
            if let Some(k) = set.find(kid) {
                return Ok(Some(k.clone()));
            }
            if self.last_fetch.contains_key(url.as_str()) {
                return Ok(None);
            }
        }
        let set = self.fetch(client, url).await?;
        Ok(set.find(kid).cloned())
    }

    async fn fetch(&self, client: &Client, url: &Url) -> Result<Arc<JwkSet>, KeyError> {
        tracing::debug!(client = %client.id, %url, min_refetch_s = self.min_refetch.as_secs(), "fetching client JWKS");
        self.last_fetch.insert(url.to_string(), Instant::now());
        let fail = |e: String| KeyError::Fetch(client.id.clone(), e);
        let response = self
            .http
            .get(url.clone())
            .send()
            .await
            .map_err(|e| fail(e.to_string()))?;
        if !response.status().is_success() {
            return Err(fail(format!("{url} answered {}", response.status())));
        }
        let set: JwkSet = response.json().await.map_err(|e| fail(e.to_string()))?;
        let set = Arc::new(set);
        self.fetched.insert(url.to_string(), set.clone());
        Ok(set)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_https_or_loopback_http_is_fetched() {
        for (url, ok) in [
            ("https://keys.example/jwks.json", true),
            ("http://127.0.0.1:9/jwks.json", true),
            ("http://[::1]:9/jwks.json", true),
            ("http://localhost/jwks.json", true),
            ("http://keys.example/jwks.json", false),
            ("file:///etc/passwd", false),
        ] {
            assert_eq!(fetchable(&Url::parse(url).unwrap()), ok, "{url}");
        }
    }

    #[test]
    fn registry_rejects_bad_jwks_and_reloads() {
        let bad = ClientConfig {
            client_id: "c".into(),
            scopes: vec!["system/*.rs".into()],
            jwks: Some(serde_json::json!({"keys": "nope"})),
            jwks_url: None,
        };
        assert!(Registry::new(&[bad], Duration::from_secs(1)).is_err());
        let good = ClientConfig {
            client_id: "c".into(),
            scopes: vec!["system/*.rs".into()],
            jwks: Some(serde_json::json!({"keys": []})),
            jwks_url: None,
        };
        let r = Registry::new(&[good], Duration::from_secs(1)).unwrap();
        assert!(r.client("c").is_some());
        assert_eq!(
            r.reload(&[]).unwrap(),
            Reloaded {
                clients: 0,
                removed: vec!["c".into()]
            }
        );
        assert!(r.client("c").is_none());
    }
}
