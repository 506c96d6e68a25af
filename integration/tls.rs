//! TLS and credentials against servers that require them: a PostgreSQL that accepts only TLS
//! connections (and one that also demands a client certificate), a nats-server that speaks
//! only TLS and admits only an nkey user, one in operator mode, and one that verifies clients'
//! certificates.

mod harness;

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use harness::*;
use walstream::config::Config;

/// A CA, a server certificate it signed for `names` and a client certificate it signed for
/// the user `postgres`, as PEM files in `dir`.
struct Pki {
    ca: PathBuf,
    cert: PathBuf,
    key: PathBuf,
    client_cert: PathBuf,
    client_key: PathBuf,
}

fn pki(dir: &Path, names: &[&str]) -> anyhow::Result<Pki> {
    use rcgen::{BasicConstraints, CertificateParams, DnType, IsCa, KeyPair};
    std::fs::create_dir_all(dir)?;
    let ca_key = KeyPair::generate()?;
    let mut ca_params = CertificateParams::new(Vec::<String>::new())?;
    ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    ca_params
        .distinguished_name
        .push(DnType::CommonName, "walstream test CA");
    let ca_cert = ca_params.self_signed(&ca_key)?;
    let key = KeyPair::generate()?;
    let names: Vec<String> = names.iter().map(|n| n.to_string()).collect();
    let cert = CertificateParams::new(names)?.signed_by(&key, &ca_cert, &ca_key)?;
    // PostgreSQL's `cert` authentication takes the user name from the common name.
    let client_key = KeyPair::generate()?;
    let mut client_params = CertificateParams::new(Vec::<String>::new())?;
    client_params
        .distinguished_name
        .push(DnType::CommonName, "postgres");
    let client_cert = client_params.signed_by(&client_key, &ca_cert, &ca_key)?;
    let pki = Pki {
        ca: dir.join("ca.pem"),
        cert: dir.join("server.crt"),
        key: dir.join("server.key"),
        client_cert: dir.join("client.crt"),
        client_key: dir.join("client.key"),
    };
    std::fs::write(&pki.ca, ca_cert.pem())?;
    std::fs::write(&pki.cert, cert.pem())?;
    std::fs::write(&pki.key, key.serialize_pem())?;
    std::fs::write(&pki.client_cert, client_cert.pem())?;
    std::fs::write(&pki.client_key, client_key.serialize_pem())?;
    Ok(pki)
}

/// How PostgreSQL admits a TLS connection.
#[derive(Clone, Copy, PartialEq)]
enum ClientAuth {
    Trust,
    /// A client certificate signed by the test CA, for the user its common name names.
    Certificate,
    /// SCRAM-SHA-256, which over TLS the server also offers with channel binding.
    Scram,
}

/// Turns TLS on and every plaintext connection away, then restarts PostgreSQL.
fn require_tls(cluster: &Cluster, pki: &Pki, auth: ClientAuth) -> anyhow::Result<()> {
    use std::os::unix::fs::PermissionsExt;
    let data = &cluster.postgres.data_dir;
    for (from, to) in [
        (&pki.cert, "server.crt"),
        (&pki.key, "server.key"),
        (&pki.ca, "root.crt"),
    ] {
        std::fs::copy(from, data.join(to))?;
        std::fs::set_permissions(data.join(to), std::fs::Permissions::from_mode(0o600))?;
        if unsafe { libc::geteuid() } == 0 {
            let status = Command::new("chown")
                .arg("postgres:postgres")
                .arg(data.join(to))
                .status()?;
            anyhow::ensure!(status.success(), "chown {to}");
        }
    }
    let mut conf = std::fs::read_to_string(data.join("postgresql.conf"))?;
    conf.push_str(
        "\nssl = on\nssl_cert_file = 'server.crt'\nssl_key_file = 'server.key'\n\
         ssl_ca_file = 'root.crt'\n",
    );
    std::fs::write(data.join("postgresql.conf"), conf)?;
    let method = match auth {
        ClientAuth::Trust => "trust",
        ClientAuth::Certificate => "cert",
        ClientAuth::Scram => "scram-sha-256",
    };
    std::fs::write(
        data.join("pg_hba.conf"),
        format!(
            "local all all trust\n\
             hostssl all all 127.0.0.1/32 {method}\n\
             hostssl replication all 127.0.0.1/32 {method}\n\
             hostnossl all all 0.0.0.0/0 reject\n\
             hostnossl replication all 0.0.0.0/0 reject\n"
        ),
    )?;
    cluster.postgres.stop("fast")?;
    cluster.postgres.start()
}

/// Replaces the server's pg_hba.conf by `lines` (after a line trusting the local socket), has
/// it read again through `client`, and waits until `url` logs in: the reload is asynchronous.
async fn set_hba(
    cluster: &Cluster,
    client: &tokio_postgres::Client,
    lines: &str,
    url: &str,
) -> anyhow::Result<()> {
    let hba = format!("local all all trust\n{lines}");
    std::fs::write(cluster.postgres.data_dir.join("pg_hba.conf"), hba)?;
    client.execute("SELECT pg_reload_conf()", &[]).await?;
    eventually(Duration::from_secs(10), "the new pg_hba.conf", || async {
        walstream::postgres::connect(url).await.is_ok()
    })
    .await
}

/// Waits until walstream streams its slot, seen through `client`.
async fn slot_active(client: &tokio_postgres::Client) -> anyhow::Result<()> {
    eventually(Duration::from_secs(30), "walstream streaming", || async {
        client
            .query_one(
                "SELECT count(*) FROM pg_replication_slots WHERE slot_name = 'walstream' AND active",
                &[],
            )
            .await
            .is_ok_and(|row| row.get::<_, i64>(0) == 1)
    })
    .await
}

/// Once walstream's slot is active, a row with `id` and `note` reaches the stream, as its
/// `count`th message.
async fn row_reaches_the_stream(
    client: &tokio_postgres::Client,
    js: &async_nats::jetstream::Context,
    id: i32,
    note: &str,
    count: u64,
) -> anyhow::Result<()> {
    slot_active(client).await?;
    client
        .execute("INSERT INTO t_tls VALUES ($1, $2)", &[&id, &note])
        .await?;
    wait_for_messages(js, count, Duration::from_secs(30)).await?;
    let messages = read_stream(js).await?;
    assert_eq!(messages.len() as u64, count);
    assert_eq!(messages[count as usize - 1].body["data"]["note"], note);
    Ok(())
}

/// For a test against a TLS nats-server: the crypto provider installed, and a temporary
/// directory holding a PKI for `localhost`.
fn tls_files() -> anyhow::Result<(tempfile::TempDir, Pki)> {
    walstream::tls::install_crypto_provider();
    let files = tempfile::Builder::new()
        .prefix("walstream-tls-")
        .tempdir()?;
    let pki = pki(&files.path().join("pki"), &["localhost"])?;
    Ok((files, pki))
}

/// Once walstream's slot is active (seen through `client`), three rows inserted into `t_tls`
/// with `note` reach the stream.
async fn three_rows_reach_the_stream(
    client: &tokio_postgres::Client,
    js: &async_nats::jetstream::Context,
    note: &str,
) -> anyhow::Result<()> {
    slot_active(client).await?;
    client
        .execute(
            "INSERT INTO t_tls SELECT g, $1 FROM generate_series(1, 3) g",
            &[&note],
        )
        .await?;
    wait_for_messages(js, 3, Duration::from_secs(30)).await?;
    let messages = read_stream(js).await?;
    assert_eq!(messages.len(), 3);
    assert_eq!(messages[2].body["data"]["note"], note);
    Ok(())
}

/// `walstream check` with `config`: (success, stdout + stderr).
fn check(config: &Path) -> anyhow::Result<(bool, String)> {
    let output = walstream(&["check"], config)?;
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
    Ok((output.status.success(), text))
}

/// `setup` and a passing `check` with `config`, then walstream streaming with it.
fn start_checked(cluster: &Cluster, config: &Path) -> anyhow::Result<Walstream> {
    setup(config)?;
    let (ok, report) = check(config)?;
    assert!(ok, "{report}");
    Walstream::start(config, &cluster.log_path())
}

/// A copy of `config`, named `name`, with `from` replaced by `to`.
fn rewritten(
    cluster: &Cluster,
    config: &Path,
    from: &str,
    to: &str,
    name: &str,
) -> anyhow::Result<PathBuf> {
    let text = std::fs::read_to_string(config)?.replace(from, to);
    let path = cluster.dir.path().join(name);
    std::fs::write(&path, text)?;
    Ok(path)
}

/// A copy of `config` with another database URL.
fn with_url(cluster: &Cluster, config: &Path, url: &str, name: &str) -> anyhow::Result<PathBuf> {
    rewritten(cluster, config, &cluster.db_url(), url, name)
}

/// A copy of `config` whose `[nats]` url line is replaced by `settings`.
fn with_nats(
    cluster: &Cluster,
    config: &Path,
    settings: &str,
    name: &str,
) -> anyhow::Result<PathBuf> {
    let url_line = format!("url = \"{}\"\n", cluster.nats.url());
    rewritten(cluster, config, &url_line, settings, name)
}

#[tokio::test(flavor = "multi_thread")]
async fn postgres_over_verified_tls_streams_and_plaintext_or_a_wrong_name_or_ca_is_refused(
) -> anyhow::Result<()> {
    let cluster = Cluster::start().await?;
    cluster
        .sql("CREATE TABLE t_tls (id INT PRIMARY KEY, note TEXT)")
        .await?;
    let pki = pki(&cluster.dir.path().join("pki"), &["localhost"])?;
    require_tls(&cluster, &pki, ClientAuth::Trust)?;
    let port = cluster.postgres.port;
    let tls_url = |host: &str, mode: &str, ca: &Path| {
        format!(
            "postgres://postgres@{host}:{port}/{DATABASE}?sslmode={mode}&sslrootcert={}",
            ca.display()
        )
    };
    let plain = cluster.config(&["public.t_tls"], "")?;

    // Verified TLS, by the name in the certificate: set up, stream, and both connections
    // (control and replication) are encrypted.
    let url = tls_url("localhost", "verify-full", &pki.ca);
    let config = with_url(&cluster, &plain, &url, "tls.toml")?;
    let mut streamer = start_checked(&cluster, &config)?;
    let client = walstream::postgres::connect(&url).await?;
    three_rows_reach_the_stream(&client, &cluster.jetstream().await?, "over tls").await?;
    // This client, walstream's control connection and its walsender: all encrypted.
    let row = client
        .query_one(
            "SELECT count(*) FILTER (WHERE ssl), count(*) FROM pg_stat_ssl \
             JOIN pg_stat_activity USING (pid) \
             WHERE backend_type IN ('client backend', 'walsender')",
            &[],
        )
        .await?;
    let (encrypted, connections): (i64, i64) = (row.get(0), row.get(1));
    assert!(
        encrypted == connections && connections >= 3,
        "{encrypted} of {connections} connections encrypted"
    );

    // Plaintext is turned away by the server; TLS that does not verify is refused by walstream.
    let refusals = [
        (
            format!("postgres://postgres@localhost:{port}/{DATABASE}"),
            "no encryption",
        ),
        (
            tls_url("127.0.0.1", "verify-full", &pki.ca),
            "not valid for name",
        ),
        (
            tls_url("localhost", "verify-full", &pki_other(cluster.dir.path())?),
            "invalid peer certificate",
        ),
        (
            format!("postgres://postgres@localhost:{port}/{DATABASE}?sslmode=prefer"),
            "falls back to plaintext",
        ),
    ];
    for (n, (url, reason)) in refusals.iter().enumerate() {
        let config = with_url(&cluster, &plain, url, &format!("refused-{n}.toml"))?;
        let (ok, report) = check(&config)?;
        assert!(!ok && report.contains(reason), "{url}: {report}");
    }
    // verify-ca checks the chain and not the name: the address works.
    streamer.terminate(Duration::from_secs(30))?;
    let config = with_url(
        &cluster,
        &plain,
        &tls_url("127.0.0.1", "verify-ca", &pki.ca),
        "verify-ca.toml",
    )?;
    let (ok, report) = check(&config)?;
    assert!(ok, "{report}");
    Ok(())
}

/// walstream logs its replication connection in by each way PostgreSQL asks for a password
/// (SCRAM, md5, a plain password, SCRAM over TLS where the server offers channel binding), and
/// a wrong password is refused with the server's reason in the log.
#[tokio::test(flavor = "multi_thread")]
async fn password_logins_stream_by_scram_md5_and_password_and_a_wrong_one_is_named(
) -> anyhow::Result<()> {
    const PASSWORD: &str = "Pa55-w0rd";
    let cluster = Cluster::start().await?;
    cluster
        .sql("CREATE TABLE t_tls (id INT PRIMARY KEY, note TEXT)")
        .await?;
    let port = cluster.postgres.port;
    let url = format!("postgres://postgres:{PASSWORD}@127.0.0.1:{port}/{DATABASE}");
    let plain = cluster.config(&["public.t_tls"], "")?;
    let config = with_url(&cluster, &plain, &url, "password.toml")?;
    let js = cluster.jetstream().await?;
    let mut count = 0;
    // Each step connects by the method the step before set up.
    for (method, stored) in [
        ("scram-sha-256", "scram-sha-256"),
        ("md5", "md5"),
        ("password", "scram-sha-256"),
    ] {
        let client = walstream::postgres::connect(&url).await?;
        client
            .batch_execute(&format!(
                "SET password_encryption = '{stored}'; \
                 ALTER USER postgres PASSWORD '{PASSWORD}'"
            ))
            .await?;
        set_hba(
            &cluster,
            &client,
            // A logical replication connection names its database: `all` covers it, the
            // `replication` keyword (physical replication) does not.
            &format!("host all all 127.0.0.1/32 {method}\n"),
            &url,
        )
        .await?;
        let mut streamer = start_checked(&cluster, &config)?;
        count += 1;
        row_reaches_the_stream(&client, &js, count as i32, method, count).await?;
        streamer.terminate(Duration::from_secs(30))?;
    }

    // A wrong password: the replication login says what the server said.
    let wrong = with_url(
        &cluster,
        &plain,
        &url.replace(PASSWORD, "not-it"),
        "wrong.toml",
    )?;
    let target =
        walstream::pipeline::source::ReplicationTarget::from_config(&Config::load(&wrong)?)?;
    let refusal = match target.find_primary().await {
        Ok(_) => anyhow::bail!("a wrong password logged in"),
        Err(error) => format!("{error:#}"),
    };
    assert!(
        refusal.contains("password authentication failed for user \"postgres\"")
            && refusal.contains("28P01"),
        "{refusal}"
    );
    let client = walstream::postgres::connect(&url).await?;

    // Over TLS the server offers SCRAM with channel binding too; walstream verifies the server
    // by its certificate and logs in without it.
    let pki = pki(&cluster.dir.path().join("pki"), &["localhost"])?;
    client
        .batch_execute(
            "SET password_encryption = 'scram-sha-256'; ALTER USER postgres PASSWORD 'Pa55-w0rd'",
        )
        .await?;
    drop(client);
    require_tls(&cluster, &pki, ClientAuth::Scram)?;
    let tls_url = format!(
        "postgres://postgres:{PASSWORD}@localhost:{port}/{DATABASE}?sslmode=verify-full&sslrootcert={}",
        pki.ca.display()
    );
    let config = with_url(&cluster, &plain, &tls_url, "scram-tls.toml")?;
    let mut streamer = start_checked(&cluster, &config)?;
    let client = walstream::postgres::connect(&tls_url).await?;
    row_reaches_the_stream(&client, &js, 4, "scram over tls", 4).await?;
    streamer.terminate(Duration::from_secs(30))?;
    Ok(())
}

#[tokio::test(flavor = "multi_thread")]
async fn nats_over_verified_tls_with_an_nkey_user_streams_and_anything_less_is_refused(
) -> anyhow::Result<()> {
    let (files, pki) = tls_files()?;
    let user = nkeys::KeyPair::new_user();
    let seed = user.seed()?;
    let nats_conf = files.path().join("nats.conf");
    std::fs::write(
        &nats_conf,
        format!(
            "tls {{\n  cert_file: \"{}\"\n  key_file: \"{}\"\n  timeout: 2\n}}\n\
             authorization {{\n  users: [ {{ nkey: \"{}\" }} ]\n}}\n",
            pki.cert.display(),
            pki.key.display(),
            user.public_key()
        ),
    )?;
    let cluster = Cluster::start_with_nats_args(&["-c", &nats_conf.display().to_string()]).await?;
    cluster
        .sql("CREATE TABLE t_tls (id INT PRIMARY KEY, note TEXT)")
        .await?;
    let nats_url = format!("nats://localhost:{}", cluster.nats.port);
    let plain = cluster.config(&["public.t_tls"], "")?;
    let config_for = |name: &str, ca: &Path, nkey: Option<&str>| {
        let mut nats = format!("url = \"{nats_url}\"\ntls_ca_file = \"{}\"\n", ca.display());
        if let Some(seed) = nkey {
            nats.push_str(&format!("nkey_seed = \"{seed}\"\n"));
        }
        with_nats(&cluster, &plain, &nats, name)
    };

    let config = config_for("nats-tls.toml", &pki.ca, Some(&seed))?;
    let _walstream = start_checked(&cluster, &config)?;
    wait_for_slot(&cluster).await?;
    cluster
        .sql("INSERT INTO t_tls SELECT g, 'to a nats that wants tls' FROM generate_series(1, 3) g")
        .await?;
    let nats = async_nats::ConnectOptions::with_nkey(seed.clone())
        .add_root_certificates(pki.ca.clone())
        .require_tls(true)
        .connect(&nats_url)
        .await?;
    let js = async_nats::jetstream::new(nats);
    wait_for_messages(&js, 3, Duration::from_secs(30)).await?;
    let messages = read_stream(&js).await?;
    assert_eq!(messages.len(), 3);
    let (_, health) = http_get(cluster.http_port, "/health").await?;
    assert!(!health.contains(&seed), "the nkey seed leaked into /health");
    let log = std::fs::read_to_string(cluster.log_path())?;
    assert!(!log.contains(&seed), "the nkey seed leaked into the log");

    let other_ca = pki_other(files.path())?;
    for (name, ca, nkey, reason) in [
        ("no-nkey.toml", pki.ca.clone(), None, "uthorization"),
        (
            "wrong-ca.toml",
            other_ca,
            Some(seed.as_str()),
            "certificate",
        ),
    ] {
        let config = config_for(name, &ca, nkey)?;
        let (ok, report) = check(&config)?;
        assert!(!ok && report.contains(reason), "{name}: {report}");
        assert!(
            !report.contains(&seed),
            "the nkey seed leaked into check's output"
        );
    }
    Ok(())
}

/// A CA that signed nothing the servers present.
fn pki_other(dir: &Path) -> anyhow::Result<PathBuf> {
    Ok(pki(&dir.join("other"), &["localhost"])?.ca)
}

/// A NATS JWT (`ed25519-nkey`) with `claims` about `subject`, signed by `issuer`.
fn nats_jwt(
    issuer: &nkeys::KeyPair,
    subject: &str,
    name: &str,
    nats: serde_json::Value,
) -> anyhow::Result<String> {
    use base64::engine::general_purpose::URL_SAFE_NO_PAD;
    use base64::Engine;
    let header = URL_SAFE_NO_PAD.encode(r#"{"typ":"JWT","alg":"ed25519-nkey"}"#);
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)?
        .as_secs();
    let claims = serde_json::json!({
        "jti": format!("{subject}{now}"),
        "iat": now,
        "iss": issuer.public_key(),
        "name": name,
        "sub": subject,
        "nats": nats,
    });
    let claims = URL_SAFE_NO_PAD.encode(serde_json::to_vec(&claims)?);
    let signed = format!("{header}.{claims}");
    let signature = issuer
        .sign(signed.as_bytes())
        .map_err(|e| anyhow::anyhow!("{e}"))?;
    Ok(format!("{signed}.{}", URL_SAFE_NO_PAD.encode(signature)))
}

/// A nats-server in operator (JWT) mode: its config, and a user's credentials file.
fn operator_mode(dir: &Path) -> anyhow::Result<(PathBuf, PathBuf, String)> {
    let operator = nkeys::KeyPair::new_operator();
    let system = nkeys::KeyPair::new_account();
    let account = nkeys::KeyPair::new_account();
    let user = nkeys::KeyPair::new_user();
    let unlimited = serde_json::json!({
        "subs": -1, "data": -1, "payload": -1, "imports": -1, "exports": -1,
        "wildcards": true, "conn": -1, "leaf": -1,
        "mem_storage": -1, "disk_storage": -1, "streams": -1, "consumer": -1,
    });
    let operator_jwt = nats_jwt(
        &operator,
        &operator.public_key(),
        "walstream-test",
        serde_json::json!({"type": "operator", "version": 2, "system_account": system.public_key()}),
    )?;
    let account_jwt = |key: &nkeys::KeyPair, name: &str, limits: serde_json::Value| {
        nats_jwt(
            &operator,
            &key.public_key(),
            name,
            serde_json::json!({"type": "account", "version": 2, "limits": limits}),
        )
    };
    let system_jwt = account_jwt(
        &system,
        "SYS",
        serde_json::json!({"subs": -1, "data": -1, "payload": -1, "imports": -1, "exports": -1, "wildcards": true, "conn": -1, "leaf": -1}),
    )?;
    let app_jwt = account_jwt(&account, "APP", unlimited)?;
    let user_jwt = nats_jwt(
        &account,
        &user.public_key(),
        "walstream",
        serde_json::json!({"type": "user", "version": 2, "pub": {}, "sub": {}, "subs": -1, "data": -1, "payload": -1}),
    )?;
    let config = dir.join("operator.conf");
    std::fs::write(
        &config,
        format!(
            "operator: \"{operator_jwt}\"\nsystem_account: \"{}\"\nresolver: MEMORY\n\
             resolver_preload: {{\n  {}: \"{system_jwt}\"\n  {}: \"{app_jwt}\"\n}}\n",
            system.public_key(),
            system.public_key(),
            account.public_key()
        ),
    )?;
    let seed = user.seed().map_err(|e| anyhow::anyhow!("{e}"))?;
    let creds = dir.join("walstream.creds");
    std::fs::write(
        &creds,
        format!(
            "-----BEGIN NATS USER JWT-----\n{user_jwt}\n------END NATS USER JWT------\n\n\
             ************************* IMPORTANT *************************\n\
             NKEY Seed printed below can be used to sign and prove identity.\n\
             NKEYs are sensitive and should be treated as secrets.\n\n\
             -----BEGIN USER NKEY SEED-----\n{seed}\n------END USER NKEY SEED------\n\n\
             *************************************************************\n"
        ),
    )?;
    Ok((config, creds, seed))
}

#[tokio::test(flavor = "multi_thread")]
async fn a_nats_in_operator_mode_admits_walstream_by_its_credentials_file_only(
) -> anyhow::Result<()> {
    let files = tempfile::Builder::new()
        .prefix("walstream-creds-")
        .tempdir()?;
    let (nats_conf, creds, seed) = operator_mode(files.path())?;
    let cluster = Cluster::start_with_nats_args(&["-c", &nats_conf.display().to_string()]).await?;
    cluster
        .sql("CREATE TABLE t_creds (id INT PRIMARY KEY)")
        .await?;
    let plain = cluster.config(&["public.t_creds"], "")?;
    let with_creds = |name: &str, creds: &Path| {
        let settings = format!(
            "url = \"{}\"\ncredentials_file = \"{}\"\n",
            cluster.nats.url(),
            creds.display()
        );
        with_nats(&cluster, &plain, &settings, name)
    };

    let (ok, report) = check(&plain)?;
    assert!(
        !ok && report.contains("uthoriz"),
        "without credentials: {report}"
    );
    let config = with_creds("creds.toml", &creds)?;
    let _walstream = start_checked(&cluster, &config)?;
    wait_for_slot(&cluster).await?;
    cluster
        .sql("INSERT INTO t_creds SELECT generate_series(1, 3)")
        .await?;
    let nats = async_nats::ConnectOptions::with_credentials_file(&creds)
        .await?
        .connect(cluster.nats.url())
        .await?;
    let js = async_nats::jetstream::new(nats);
    wait_for_messages(&js, 3, Duration::from_secs(30)).await?;
    assert_eq!(read_stream(&js).await?.len(), 3);
    let log = std::fs::read_to_string(cluster.log_path())?;
    assert!(
        !log.contains(&seed),
        "the credentials' seed leaked into the log"
    );
    let (_, health) = http_get(cluster.http_port, "/health").await?;
    assert!(!health.contains(&seed));

    // A credentials file from another operator is refused.
    let foreign_dir = files.path().join("foreign");
    std::fs::create_dir_all(&foreign_dir)?;
    let (_, foreign, _) = operator_mode(&foreign_dir)?;
    let (ok, report) = check(&with_creds("foreign.toml", &foreign)?)?;
    assert!(
        !ok && report.contains("uthoriz"),
        "foreign credentials: {report}"
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread")]
async fn client_certificates_admit_walstream_where_postgres_and_nats_demand_them(
) -> anyhow::Result<()> {
    let (files, pki) = tls_files()?;
    let nats_conf = files.path().join("nats.conf");
    std::fs::write(
        &nats_conf,
        format!(
            "tls {{\n  cert_file: \"{}\"\n  key_file: \"{}\"\n  ca_file: \"{}\"\n  \
             verify: true\n  timeout: 2\n}}\n",
            pki.cert.display(),
            pki.key.display(),
            pki.ca.display()
        ),
    )?;
    let cluster = Cluster::start_with_nats_args(&["-c", &nats_conf.display().to_string()]).await?;
    cluster
        .sql("CREATE TABLE t_tls (id INT PRIMARY KEY, note TEXT)")
        .await?;
    require_tls(&cluster, &pki, ClientAuth::Certificate)?;
    let port = cluster.postgres.port;
    let url_with = |client_files: &str| {
        format!(
            "postgres://postgres@localhost:{port}/{DATABASE}?sslmode=verify-full&sslrootcert={}{client_files}",
            pki.ca.display()
        )
    };
    let url = url_with(&format!(
        "&sslcert={}&sslkey={}",
        pki.client_cert.display(),
        pki.client_key.display()
    ));
    let nats_url = format!("nats://localhost:{}", cluster.nats.port);
    let nats_with = |client_files: &str| {
        format!(
            "url = \"{nats_url}\"\ntls_ca_file = \"{}\"\n{client_files}",
            pki.ca.display()
        )
    };
    let nats_client_files = format!(
        "tls_client_cert = \"{}\"\ntls_client_key = \"{}\"\n",
        pki.client_cert.display(),
        pki.client_key.display()
    );
    let plain = cluster.config(&["public.t_tls"], "")?;
    let with_both = |name: &str, url: &str, nats: &str| -> anyhow::Result<PathBuf> {
        let config = with_url(&cluster, &plain, url, &format!("url-{name}"))?;
        with_nats(&cluster, &config, nats, name)
    };

    // Both servers demand a certificate: walstream presents its own to each and streams.
    let config = with_both("mutual.toml", &url, &nats_with(&nats_client_files))?;
    let mut streamer = start_checked(&cluster, &config)?;
    let client = walstream::postgres::connect(&url).await?;
    let nats = async_nats::ConnectOptions::new()
        .add_root_certificates(pki.ca.clone())
        .add_client_certificate(pki.client_cert.clone(), pki.client_key.clone())
        .require_tls(true)
        .connect(&nats_url)
        .await?;
    three_rows_reach_the_stream(&client, &async_nats::jetstream::new(nats), "mutual tls").await?;
    // The control connection and the walsender were admitted by certificate.
    let row = client
        .query_one(
            "SELECT count(*) FROM pg_stat_ssl JOIN pg_stat_activity USING (pid) \
             WHERE backend_type IN ('client backend', 'walsender') \
               AND client_dn = '/CN=postgres'",
            &[],
        )
        .await?;
    assert!(
        row.get::<_, i64>(0) >= 3,
        "{} connections by certificate",
        row.get::<_, i64>(0)
    );

    // Without its certificate, each server turns walstream away, and check says which and
    // what to look at.
    streamer.terminate(Duration::from_secs(30))?;
    for (name, url, nats, reasons) in [
        (
            "no-postgres-cert.toml",
            url_with(""),
            nats_with(&nats_client_files),
            ["requires a valid client certificate", "ok   NATS reachable"],
        ),
        (
            "no-nats-cert.toml",
            url.clone(),
            nats_with(""),
            [
                "BadCertificate",
                "check nats.tls_ca_file, and nats.tls_client_cert",
            ],
        ),
    ] {
        let config = with_both(name, &url, &nats)?;
        let (ok, report) = check(&config)?;
        assert!(!ok, "{name}: {report}");
        for reason in reasons {
            assert!(report.contains(reason), "{name}: {reason}: {report}");
        }
    }
    Ok(())
}
