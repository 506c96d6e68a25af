//! TLS of the connections walstream opens itself: to PostgreSQL (the URL's `sslmode`,
//! `sslrootcert`, `sslcert` and `sslkey`, the same verification for the normal connections and
//! the replication connection), and its NATS publisher's (the `[nats]` TLS settings).

use std::path::{Path, PathBuf};
use std::sync::Arc;

use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::client::WebPkiServerVerifier;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName, UnixTime};
use rustls::{
    CertificateError, ClientConfig, DigitallySignedStruct, RootCertStore, SignatureScheme,
};

/// Chooses rustls' cryptography for the process. Two of walstream's dependencies enable both
/// of rustls' providers, and then a library that asks for the default (async-nats' TLS) panics
/// unless one is installed first.
pub fn install_crypto_provider() {
    // An error only says one is installed already.
    let _ = rustls::crypto::aws_lc_rs::default_provider().install_default();
}

/// How walstream talks to PostgreSQL. There is no opportunistic mode: TLS that anyone on the
/// path can strip, or that accepts any certificate, protects nothing.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    /// Plaintext (`sslmode=disable`, or no `sslmode`).
    Disable,
    /// TLS; the certificate chain is verified, the host name is not (`verify-ca`).
    VerifyCa,
    /// TLS; chain and host name verified (`verify-full`, and `require`).
    VerifyFull,
}

/// A database URL's TLS settings, and the URL without them (which tokio-postgres parses).
#[derive(Debug, Clone)]
pub struct PostgresTls {
    pub mode: Mode,
    /// PEM file of the CA(s) to trust; without it, the Mozilla roots (webpki-roots).
    pub root_cert: Option<PathBuf>,
    /// PEM certificate and key for client-certificate authentication.
    pub client_cert: Option<(PathBuf, PathBuf)>,
}

const TLS_KEYS: [&str; 4] = ["sslmode", "sslrootcert", "sslcert", "sslkey"];

/// Splits `url` (a `postgres://` URL or a `key=value` connection string) into the URL without
/// its TLS settings and those settings, refusing modes that would not protect the link.
pub fn split_url(url: &str) -> Result<(String, PostgresTls), String> {
    let (rest, settings) = if url.starts_with("postgres://") || url.starts_with("postgresql://") {
        split_query(url)
    } else {
        split_key_values(url)
    };
    let setting = |key: &str| {
        settings
            .iter()
            .rev()
            .find(|(k, _)| k == key)
            .map(|(_, v)| v.clone())
    };
    let mode = match setting("sslmode").as_deref() {
        None | Some("disable") => Mode::Disable,
        Some("require" | "verify-full") => Mode::VerifyFull,
        Some("verify-ca") => Mode::VerifyCa,
        Some(weak @ ("prefer" | "allow")) => {
            return Err(format!(
                "sslmode={weak} falls back to plaintext, which anyone on the path can force; \
                 use sslmode=verify-full (with sslrootcert=<CA file>), or sslmode=disable on a \
                 trusted link"
            ))
        }
        Some(other) => {
            return Err(format!(
                "sslmode={other} is not a mode; use disable, require, verify-ca or verify-full"
            ))
        }
    };
    let client_cert = match (setting("sslcert"), setting("sslkey")) {
        (Some(cert), Some(key)) => Some((PathBuf::from(cert), PathBuf::from(key))),
        (None, None) => None,
        _ => return Err("sslcert and sslkey go together: set both, or neither".into()),
    };
    let tls = PostgresTls {
        mode,
        root_cert: setting("sslrootcert").map(PathBuf::from),
        client_cert,
    };
    if tls.mode == Mode::Disable && (tls.root_cert.is_some() || tls.client_cert.is_some()) {
        return Err(
            "sslrootcert/sslcert/sslkey are set but TLS is off; add sslmode=verify-full".into(),
        );
    }
    Ok((rest, tls))
}

fn split_query(url: &str) -> (String, Vec<(String, String)>) {
    let Some((base, query)) = url.split_once('?') else {
        return (url.to_owned(), Vec::new());
    };
    let mut kept = Vec::new();
    let mut settings = Vec::new();
    for pair in query.split('&').filter(|p| !p.is_empty()) {
        let (key, value) = pair.split_once('=').unwrap_or((pair, ""));
        if TLS_KEYS.contains(&key) {
            settings.push((key.to_owned(), percent_decode(value)));
        } else {
            kept.push(pair);
        }
    }
    let rest = if kept.is_empty() {
        base.to_owned()
    } else {
        format!("{base}?{}", kept.join("&"))
    };
    (rest, settings)
}

fn split_key_values(conninfo: &str) -> (String, Vec<(String, String)>) {
    let mut kept = Vec::new();
    let mut settings = Vec::new();
    for word in conninfo.split_whitespace() {
        match word.split_once('=') {
            Some((key, value)) if TLS_KEYS.contains(&key) => {
                settings.push((key.to_owned(), value.trim_matches('\'').to_owned()));
            }
            _ => kept.push(word),
        }
    }
    (kept.join(" "), settings)
}

/// `%2F` → `/`: file paths in a URL's query are percent-encoded.
fn percent_decode(text: &str) -> String {
    let bytes = text.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        let hex = bytes
            .get(i + 1..i + 3)
            .and_then(|h| std::str::from_utf8(h).ok())
            .and_then(|h| u8::from_str_radix(h, 16).ok());
        match (bytes[i], hex) {
            (b'%', Some(byte)) => {
                out.push(byte);
                i += 3;
            }
            (byte, _) => {
                out.push(byte);
                i += 1;
            }
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

impl PostgresTls {
    pub fn enabled(&self) -> bool {
        self.mode != Mode::Disable
    }

    /// The rustls client configuration of the normal connections and the replication
    /// connection.
    pub fn client_config(&self) -> anyhow::Result<ClientConfig> {
        let provider = Arc::new(rustls::crypto::aws_lc_rs::default_provider());
        let roots = Arc::new(self.roots()?);
        let builder = ClientConfig::builder_with_provider(provider.clone())
            .with_safe_default_protocol_versions()?;
        let builder = match self.mode {
            Mode::VerifyCa => {
                let chain = WebPkiServerVerifier::builder_with_provider(roots, provider).build()?;
                builder
                    .dangerous()
                    .with_custom_certificate_verifier(Arc::new(ChainOnly(chain)))
            }
            Mode::Disable | Mode::VerifyFull => builder.with_root_certificates(roots),
        };
        Ok(match &self.client_cert {
            Some((cert, key)) => {
                builder.with_client_auth_cert(read_certs(cert)?, read_key(key)?)?
            }
            None => builder.with_no_client_auth(),
        })
    }

    /// tokio-postgres' connector; with TLS off it is never used (sslmode=disable).
    pub fn connector(&self) -> anyhow::Result<tokio_postgres_rustls::MakeRustlsConnect> {
        Ok(tokio_postgres_rustls::MakeRustlsConnect::new(
            self.client_config()?,
        ))
    }

    fn roots(&self) -> anyhow::Result<RootCertStore> {
        let mut roots = RootCertStore::empty();
        match &self.root_cert {
            Some(path) => {
                for cert in read_certs(path)? {
                    roots
                        .add(cert)
                        .map_err(|e| anyhow::anyhow!("sslrootcert {}: {e}", path.display()))?;
                }
            }
            None => roots.extend(webpki_roots::TLS_SERVER_ROOTS.iter().cloned()),
        }
        Ok(roots)
    }
}

/// The NATS publisher's TLS: the server's certificate verified against `ca_file`, or else
/// the system's roots (as async-nats does for walstream's other NATS connection), and a client
/// certificate when one is configured.
pub fn nats_client(
    ca_file: Option<&Path>,
    client_cert: Option<&Path>,
    client_key: Option<&Path>,
) -> anyhow::Result<ClientConfig> {
    let mut roots = RootCertStore::empty();
    match ca_file {
        Some(path) => {
            for cert in read_certs(path)? {
                roots
                    .add(cert)
                    .map_err(|e| anyhow::anyhow!("nats.tls_ca_file {}: {e}", path.display()))?;
            }
        }
        None => {
            let native = rustls_native_certs::load_native_certs();
            anyhow::ensure!(
                !native.certs.is_empty(),
                "no system root certificates to verify the NATS server with ({:?}); set \
                 nats.tls_ca_file",
                native.errors
            );
            roots.add_parsable_certificates(native.certs);
        }
    }
    let provider = Arc::new(rustls::crypto::aws_lc_rs::default_provider());
    let builder = ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()?
        .with_root_certificates(roots);
    Ok(match (client_cert, client_key) {
        (Some(cert), Some(key)) => {
            builder.with_client_auth_cert(read_certs(cert)?, read_key(key)?)?
        }
        _ => builder.with_no_client_auth(),
    })
}

fn read_certs(path: &Path) -> anyhow::Result<Vec<CertificateDer<'static>>> {
    let certs = CertificateDer::pem_file_iter(path)
        .and_then(|certs| certs.collect::<Result<Vec<_>, _>>())
        .map_err(|e| anyhow::anyhow!("cannot read certificates from {}: {e}", path.display()))?;
    anyhow::ensure!(
        !certs.is_empty(),
        "{} holds no PEM certificate",
        path.display()
    );
    Ok(certs)
}

fn read_key(path: &Path) -> anyhow::Result<PrivateKeyDer<'static>> {
    PrivateKeyDer::from_pem_file(path)
        .map_err(|e| anyhow::anyhow!("cannot read a private key from {}: {e}", path.display()))
}

/// `verify-ca`: the chain must lead to a trusted root; the name in it may be anything.
#[derive(Debug)]
struct ChainOnly(Arc<WebPkiServerVerifier>);

impl ServerCertVerifier for ChainOnly {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        server_name: &ServerName<'_>,
        ocsp_response: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        match self
            .0
            .verify_server_cert(end_entity, intermediates, server_name, ocsp_response, now)
        {
            Err(rustls::Error::InvalidCertificate(
                CertificateError::NotValidForName | CertificateError::NotValidForNameContext { .. },
            )) => Ok(ServerCertVerified::assertion()),
            other => other,
        }
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.0.verify_tls12_signature(message, cert, dss)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.0.verify_tls13_signature(message, cert, dss)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.0.supported_verify_schemes()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tls_settings_leave_the_url_and_weak_modes_are_refused() {
        let (url, tls) = split_url(
            "postgres://u:p@db.example.com:5432/app?application_name=x&sslmode=verify-full&sslrootcert=%2Fetc%2Fca.pem",
        )
        .unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(
            url,
            "postgres://u:p@db.example.com:5432/app?application_name=x"
        );
        assert_eq!(tls.mode, Mode::VerifyFull);
        assert_eq!(tls.root_cert, Some(PathBuf::from("/etc/ca.pem")));

        let (url, tls) =
            split_url("host=db user=u sslmode=require").unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(
            (url.as_str(), tls.mode),
            ("host=db user=u", Mode::VerifyFull)
        );
        let (_, tls) = split_url("postgres://u@h/d").unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(tls.mode, Mode::Disable);
        let (_, tls) =
            split_url("postgres://u@h/d?sslmode=verify-ca").unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(tls.mode, Mode::VerifyCa);

        for (url, complaint) in [
            ("postgres://u@h/d?sslmode=prefer", "falls back to plaintext"),
            ("postgres://u@h/d?sslmode=allow", "falls back to plaintext"),
            ("postgres://u@h/d?sslmode=on", "not a mode"),
            (
                "postgres://u@h/d?sslmode=verify-full&sslcert=/c.pem",
                "go together",
            ),
            ("postgres://u@h/d?sslrootcert=/ca.pem", "TLS is off"),
        ] {
            let error = split_url(url).err().unwrap_or_default();
            assert!(error.contains(complaint), "{url}: {error}");
        }
    }

    #[test]
    fn a_missing_ca_file_is_named() {
        let tls = PostgresTls {
            mode: Mode::VerifyFull,
            root_cert: Some(PathBuf::from("/nonexistent/ca.pem")),
            client_cert: None,
        };
        let error = tls
            .client_config()
            .err()
            .map(|e| e.to_string())
            .unwrap_or_default();
        assert!(error.contains("/nonexistent/ca.pem"), "{error}");
    }
}
