//! What both benches read from their settings and their samples: counts from the environment
//! and quantiles of sorted samples.

/// The count in environment variable `name`, or `default` when unset or not a number.
pub fn env_count(name: &str, default: u64) -> u64 {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

/// The `p` quantile (0 to 1) of samples sorted in ascending order; None when there are none.
pub fn quantile<T: Copy>(sorted: &[T], p: f64) -> Option<T> {
    let index = ((sorted.len() as f64 * p) as usize).min(sorted.len().saturating_sub(1));
    sorted.get(index).copied()
}
