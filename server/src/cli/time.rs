//! RFC 3339 times for the command line: the admin API carries Unix seconds
//! (and milliseconds for `created_at`); operators read and type dates.

use std::time::{SystemTime, UNIX_EPOCH};

/// Unix seconds as `2026-12-02T21:03:07Z` (UTC).
pub(crate) fn rfc3339(unix_secs: u64) -> String {
    let days = unix_secs / 86_400;
    let rem = unix_secs % 86_400;
    let (y, m, d) = civil_from_days(days);
    format!(
        "{y:04}-{m:02}-{d:02}T{:02}:{:02}:{:02}Z",
        rem / 3600,
        rem % 3600 / 60,
        rem % 60
    )
}

/// Unix milliseconds as RFC 3339 with milliseconds.
pub(crate) fn rfc3339_ms(unix_ms: u64) -> String {
    let secs = rfc3339(unix_ms / 1000);
    format!("{}.{:03}Z", secs.trim_end_matches('Z'), unix_ms % 1000)
}

/// Parses `--expires-at`: RFC 3339 (`2026-12-31T00:00:00Z`, any offset,
/// optional fraction, which is dropped) or Unix seconds. Refuses a time not
/// after `now`: such an entry would never apply.
pub(crate) fn parse_expiry(s: &str, now: SystemTime) -> Result<u64, String> {
    let secs = if !s.is_empty() && s.bytes().all(|b| b.is_ascii_digit()) {
        s.parse::<u64>()
            .map_err(|_| format!("--expires-at {s}: too large"))?
    } else {
        parse_rfc3339(s).ok_or_else(|| {
            format!(
                "--expires-at {s:?}: expected an RFC 3339 time (2026-12-31T00:00:00Z) \
                 or Unix seconds"
            )
        })?
    };
    let now = now
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0);
    if secs <= now {
        return Err(format!(
            "--expires-at {s}: {} is not in the future (now is {})",
            rfc3339(secs),
            rfc3339(now)
        ));
    }
    Ok(secs)
}

/// `YYYY-MM-DDTHH:MM:SS[.frac](Z|±HH:MM)` as Unix seconds; `t` and `z` may
/// be lowercase, and a space may stand for `T` (RFC 3339 allows both).
fn parse_rfc3339(s: &str) -> Option<u64> {
    let b = s.as_bytes();
    if b.len() < 20 || !b.is_ascii() {
        return None;
    }
    let num = |r: std::ops::Range<usize>| -> Option<u64> {
        let part = s.get(r)?;
        part.bytes()
            .all(|c| c.is_ascii_digit())
            .then(|| part.parse().ok())?
    };
    let sep_ok = b[4] == b'-'
        && b[7] == b'-'
        && matches!(b[10], b'T' | b't' | b' ')
        && b[13] == b':'
        && b[16] == b':';
    if !sep_ok {
        return None;
    }
    let (year, month, day) = (num(0..4)?, num(5..7)?, num(8..10)?);
    let (hour, minute, second) = (num(11..13)?, num(14..16)?, num(17..19)?);
    let mut rest = &s[19..];
    if let Some(frac) = rest.strip_prefix('.') {
        let digits = frac.bytes().take_while(u8::is_ascii_digit).count();
        if digits == 0 {
            return None;
        }
        rest = &frac[digits..];
    }
    let offset: i64 = match rest {
        "Z" | "z" => 0,
        _ => {
            let rb = rest.as_bytes();
            if rb.len() != 6 || rb[3] != b':' || !matches!(rb[0], b'+' | b'-') {
                return None;
            }
            let h: i64 = rest[1..3].parse().ok()?;
            let m: i64 = rest[4..6].parse().ok()?;
            if h > 23 || m > 59 {
                return None;
            }
            let o = h * 3600 + m * 60;
            if rb[0] == b'-' { -o } else { o }
        }
    };
    let leap = year % 4 == 0 && (year % 100 != 0 || year % 400 == 0);
    let month_days = [
        31,
        if leap { 29 } else { 28 },
        31,
        30,
        31,
        30,
        31,
        31,
        30,
        31,
        30,
        31,
    ];
    let valid = (1970..=9999).contains(&year)
        && (1..=12).contains(&month)
        && day >= 1
        && usize::try_from(month - 1)
            .ok()
            .and_then(|i| month_days.get(i))
            .is_some_and(|&n| day <= n)
        && hour < 24
        && minute < 60
        && second < 60;
    if !valid {
        return None;
    }
    let local = days_from_civil(year, month, day) * 86_400 + hour * 3600 + minute * 60 + second;
    u64::try_from(i64::try_from(local).ok()? - offset).ok()
}

/// Days since 1970-01-01 of a proleptic Gregorian date (year >= 1970);
/// Howard Hinnant's `days_from_civil`.
fn days_from_civil(y: u64, m: u64, d: u64) -> u64 {
    let y = if m <= 2 { y - 1 } else { y };
    let era = y / 400;
    let yoe = y - era * 400;
    let mp = (m + 9) % 12;
    let doy = (153 * mp + 2) / 5 + d - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    era * 146_097 + doe - 719_468
}

/// The inverse of [`days_from_civil`].
fn civil_from_days(days: u64) -> (u64, u64, u64) {
    let z = days + 719_468;
    let era = z / 146_097;
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = yoe + era * 400 + u64::from(m <= 2);
    (y, m, d)
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;

    #[test]
    fn formats_utc() {
        assert_eq!(rfc3339(0), "1970-01-01T00:00:00Z");
        assert_eq!(rfc3339(951_782_400), "2000-02-29T00:00:00Z");
        assert_eq!(rfc3339(1_798_761_599), "2026-12-31T23:59:59Z");
        assert_eq!(rfc3339_ms(1_798_761_599_042), "2026-12-31T23:59:59.042Z");
    }

    #[test]
    fn parses_what_it_formats_and_offsets() {
        for secs in [0, 951_782_400, 1_798_761_599, 4_102_444_800] {
            assert_eq!(parse_rfc3339(&rfc3339(secs)), Some(secs));
        }
        assert_eq!(
            parse_rfc3339("2026-12-31T23:59:59+01:00"),
            Some(1_798_761_599 - 3600)
        );
        assert_eq!(
            parse_rfc3339("2026-12-31t22:59:59.999-01:00"),
            Some(1_798_761_599)
        );
        for bad in [
            "2026-02-29T00:00:00Z",
            "2026-13-01T00:00:00Z",
            "2026-12-31T24:00:00Z",
            "2026-12-31T00:00:00",
            "2026-12-31T00:00:00.Z",
            "2026-12-31T00:00:00+0100",
            "2026-12-31",
            "tomorrow",
            "1969-12-31T00:00:00Z",
        ] {
            assert_eq!(parse_rfc3339(bad), None, "{bad}");
        }
    }

    #[test]
    fn expiry_takes_both_forms_and_refuses_the_past() {
        let now = UNIX_EPOCH + Duration::from_secs(1_700_000_000);
        assert_eq!(parse_expiry("1700000001", now), Ok(1_700_000_001));
        assert_eq!(parse_expiry("2026-12-31T23:59:59Z", now), Ok(1_798_761_599));
        for past in ["1700000000", "1", "2020-01-01T00:00:00Z"] {
            let e = parse_expiry(past, now).unwrap_err();
            assert!(e.contains("not in the future"), "{e}");
        }
        assert!(parse_expiry("soon", now).unwrap_err().contains("RFC 3339"));
        assert!(parse_expiry("", now).is_err());
    }
}
