//! Statistics the benchmarks share.

// Each bench compiles this module on its own and uses a part of it.
#![allow(dead_code)]

/// The `q` quantile (0 to 1) of `sorted`, by nearest rank; `None` for no values.
pub fn percentile<T: Copy>(sorted: &[T], q: f64) -> Option<T> {
    let rank = (sorted.len() as f64 * q).ceil() as usize;
    sorted.get(rank.clamp(1, sorted.len().max(1)) - 1).copied()
}

/// The median of `v` (the mean of the two middle values for an even count).
pub fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    let m = v.len() / 2;
    if v.len() % 2 == 1 {
        v[m]
    } else {
        (v[m - 1] + v[m]) / 2.0
    }
}
