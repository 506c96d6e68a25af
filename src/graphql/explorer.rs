//! The GraphiQL explorer, served whole from walstream: its page and pinned production builds
//! (assets/graphiql, see scripts/vendor-graphiql), so it works without internet and runs no
//! code from elsewhere in a page that holds the user's token.

use axum::extract::Path;
use axum::http::{header, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};

const PAGE: &str = include_str!("explorer/index.html");

/// (name, content type, body, gzipped).
const ASSETS: [(&str, &str, &[u8], bool); 5] = [
    (
        "graphiql.min.js",
        "text/javascript",
        include_bytes!("../../assets/graphiql/graphiql.min.js.gz"),
        true,
    ),
    (
        "graphiql.min.css",
        "text/css",
        include_bytes!("../../assets/graphiql/graphiql.min.css.gz"),
        true,
    ),
    (
        "react.production.min.js",
        "text/javascript",
        include_bytes!("../../assets/graphiql/react.production.min.js.gz"),
        true,
    ),
    (
        "react-dom.production.min.js",
        "text/javascript",
        include_bytes!("../../assets/graphiql/react-dom.production.min.js.gz"),
        true,
    ),
    (
        "explorer.js",
        "text/javascript",
        include_bytes!("explorer/explorer.js"),
        false,
    ),
];

/// Only walstream's own scripts, styles and endpoint; inline styles for GraphiQL's editors,
/// data: URLs for its fonts.
const CONTENT_SECURITY_POLICY: &str = "default-src 'self'; script-src 'self'; \
     style-src 'self' 'unsafe-inline'; font-src 'self' data:; img-src 'self' data:; \
     connect-src 'self'";

/// The explorer's page.
pub fn page() -> Response {
    (
        [
            (header::CONTENT_TYPE, "text/html; charset=utf-8"),
            (header::CONTENT_SECURITY_POLICY, CONTENT_SECURITY_POLICY),
        ],
        PAGE,
    )
        .into_response()
}

/// `GET /graphql/assets/{name}`.
pub async fn asset(Path(name): Path<String>) -> Response {
    let Some(&(_, content_type, body, gzipped)) = ASSETS.iter().find(|(n, ..)| *n == name) else {
        return (StatusCode::NOT_FOUND, "no such asset").into_response();
    };
    let mut response = ([(header::CONTENT_TYPE, content_type)], body).into_response();
    let headers = response.headers_mut();
    // Every browser accepts gzip; the files are pinned, so they may be cached for a day.
    if gzipped {
        headers.insert(header::CONTENT_ENCODING, HeaderValue::from_static("gzip"));
    }
    headers.insert(
        header::CACHE_CONTROL,
        HeaderValue::from_static("public, max-age=86400"),
    );
    response
}
