//! Points in time as the agent writes them everywhere: ISO-8601 UTC with milliseconds
//! (`2026-11-26T11:14:13.123Z`), the form SQLite's `strftime('%Y-%m-%dT%H:%M:%fZ')`
//! gives the `*_at` columns, and events and the refused-request counts carry.

/// Now, as the `*_at` columns hold it (`2026-11-26T11:14:13.123Z`).
pub fn now_iso() -> String {
    iso_utc(std::time::SystemTime::now())
}

/// `t` as ISO-8601 UTC with milliseconds, the format SQLite's `store::NOW` writes.
pub fn iso_utc(t: std::time::SystemTime) -> String {
    let since_epoch = t.duration_since(std::time::UNIX_EPOCH).unwrap_or_default();
    let secs = since_epoch.as_secs();
    let (days, rem) = (secs / 86_400, secs % 86_400);
    let (y, m, d) = civil_from_days(days as i64);
    format!(
        "{y:04}-{m:02}-{d:02}T{:02}:{:02}:{:02}.{:03}Z",
        rem / 3600,
        rem % 3600 / 60,
        rem % 60,
        since_epoch.subsec_millis()
    )
}

/// The proleptic Gregorian date of a day count since 1970-01-01 (H. Hinnant's
/// `civil_from_days`).
fn civil_from_days(z: i64) -> (i64, u32, u32) {
    let z = z + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = (doy - (153 * mp + 2) / 5 + 1) as u32;
    let m = if mp < 10 { mp + 3 } else { mp - 9 } as u32;
    let y = yoe + era * 400 + i64::from(m <= 2);
    (y, m, d)
}
