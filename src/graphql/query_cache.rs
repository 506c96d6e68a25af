//! Parsed GraphQL documents kept by query text, so an application sending the same few
//! queries over and over does not pay the parser on every request.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use async_graphql::parser::types::ExecutableDocument;

/// Documents kept before the cache starts over; an application has a fixed set of queries, so
/// a cache this size only fills when clients build query text per request (inlined values),
/// and then starting over is as good as any eviction.
const MAX_ENTRIES: usize = 1024;

/// Longer query texts are parsed every time rather than kept, so the cache's memory stays
/// bounded by `MAX_ENTRIES × MAX_QUERY_BYTES`.
const MAX_QUERY_BYTES: usize = 16 * 1024;

#[derive(Default)]
pub struct QueryCache {
    documents: Mutex<HashMap<Arc<str>, ExecutableDocument>>,
}

impl QueryCache {
    /// Gives `request` its parsed document, from the cache or parsed now. A query that does
    /// not parse is left to the executor, which reports the syntax error as usual.
    pub fn prepare(&self, request: &mut async_graphql::Request) {
        if request.query.len() > MAX_QUERY_BYTES {
            return;
        }
        if let Some(document) = self.lookup(&request.query) {
            request.set_parsed_query(document);
            return;
        }
        if let Ok(document) = async_graphql::parser::parse_query(&request.query) {
            self.insert(&request.query, document.clone());
            request.set_parsed_query(document);
        }
    }

    /// The parsed document kept for `query`, if any.
    pub fn lookup(&self, query: &str) -> Option<ExecutableDocument> {
        let documents = self.documents.lock().ok()?;
        documents.get(query).cloned()
    }

    fn insert(&self, query: &str, document: ExecutableDocument) {
        let Ok(mut documents) = self.documents.lock() else {
            return;
        };
        if documents.len() >= MAX_ENTRIES {
            documents.clear();
        }
        documents.insert(Arc::from(query), document);
    }

    #[cfg(test)]
    fn len(&self) -> usize {
        self.documents.lock().map(|d| d.len()).unwrap_or(0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_repeated_query_is_parsed_once_and_reused() {
        let cache = QueryCache::default();
        let mut first = async_graphql::Request::new("{ orders { id } }");
        cache.prepare(&mut first);
        let mut second = async_graphql::Request::new("{ orders { id } }");
        cache.prepare(&mut second);
        assert_eq!(cache.len(), 1);
        let document = second.parsed_query().expect("a parsed document");
        assert_eq!(document.operations.iter().count(), 1);
    }

    #[test]
    fn syntax_errors_and_huge_queries_are_not_kept() {
        let cache = QueryCache::default();
        let mut broken = async_graphql::Request::new("{ orders { id ");
        cache.prepare(&mut broken);
        assert!(
            broken.parsed_query().is_err(),
            "the executor still reports it"
        );
        let huge = format!("{{ orders {{ id }} }} # {}", "x".repeat(MAX_QUERY_BYTES));
        cache.prepare(&mut async_graphql::Request::new(huge));
        assert_eq!(cache.len(), 0);
    }

    #[test]
    fn a_full_cache_starts_over() {
        let cache = QueryCache::default();
        for i in 0..=MAX_ENTRIES {
            cache.prepare(&mut async_graphql::Request::new(format!(
                "{{ order(id: \"{i}\") {{ id }} }}"
            )));
        }
        assert_eq!(cache.len(), 1);
    }
}
