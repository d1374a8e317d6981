//! How stasisctl writes sizes and times for people.

/// Bytes as people read them (`4.0 MiB`).
pub fn human(bytes: u64) -> String {
    const UNITS: [&str; 4] = ["B", "KiB", "MiB", "GiB"];
    let mut v = bytes as f64;
    let mut u = 0;
    while v >= 1024.0 && u < UNITS.len() - 1 {
        v /= 1024.0;
        u += 1;
    }
    if u == 0 {
        format!("{bytes} B")
    } else {
        format!("{v:.1} {}", UNITS[u])
    }
}

/// RFC 3339 in UTC, whole seconds (`2026-12-01T00:00:00Z`), of a Unix time in nanoseconds.
pub fn rfc3339_from_unix_nanos(nanos: i64) -> String {
    let secs = nanos.div_euclid(1_000_000_000);
    let t =
        time::OffsetDateTime::from_unix_timestamp(secs).unwrap_or(time::OffsetDateTime::UNIX_EPOCH);
    let format =
        time::macros::format_description!("[year]-[month]-[day]T[hour]:[minute]:[second]Z");
    t.format(&format).unwrap_or_default()
}

/// Now in RFC 3339 (UTC, with its fraction of a second), as OCI annotations carry it.
pub fn rfc3339_now() -> String {
    time::OffsetDateTime::now_utc()
        .format(&time::format_description::well_known::Rfc3339)
        .unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes_read_as_people_write_them() {
        assert_eq!(human(512), "512 B");
        assert_eq!(human(1536), "1.5 KiB");
        assert_eq!(human(3 << 30), "3.0 GiB");
    }

    #[test]
    fn times_are_rfc3339_in_utc() {
        assert_eq!(rfc3339_from_unix_nanos(0), "1970-01-01T00:00:00Z");
        assert_eq!(
            rfc3339_from_unix_nanos(1_796_083_200_500_000_000),
            "2026-12-01T00:00:00Z"
        );
        // Leap day, and the end of a year.
        assert_eq!(
            rfc3339_from_unix_nanos(951_782_400 * 1_000_000_000),
            "2000-02-29T00:00:00Z"
        );
        assert_eq!(
            rfc3339_from_unix_nanos(1_798_761_599 * 1_000_000_000),
            "2026-12-31T23:59:59Z"
        );
    }
}
