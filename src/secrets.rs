//! Keeping secrets (passwords in URLs) out of logs, errors and status output.

/// Hides passwords in `scheme://user:password@host` URLs, for logs and errors.
pub fn redact_urls(text: &str) -> String {
    text.split(',')
        .map(redact_url)
        .collect::<Vec<_>>()
        .join(",")
}

fn redact_url(url: &str) -> String {
    let Some((scheme, rest)) = url.split_once("://") else {
        return url.to_owned();
    };
    match rest.rsplit_once('@') {
        Some((userinfo, host)) => {
            let user = userinfo.split(':').next().unwrap_or_default();
            format!("{scheme}://{user}:***@{host}")
        }
        None => url.to_owned(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn passwords_are_hidden() {
        assert_eq!(
            redact_urls("nats://u:secret@h:4222,nats://h2"),
            "nats://u:***@h:4222,nats://h2"
        );
        assert_eq!(redact_urls("postgres://a:b@c/d"), "postgres://a:***@c/d");
    }
}
