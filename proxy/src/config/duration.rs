//! Go-style duration strings (`time.ParseDuration`), the format Istio accepts
//! for every duration field: `10s`, `1.5s`, `500ms`, `1m30s`, `250us`, `100ns`.

use std::time::Duration;

const VALID_UNITS: &str = "ns, us, µs, ms, s, m, h";

/// Why a duration string was rejected.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum DurationError {
    #[error(
        "invalid duration {0:?} (expected a number with a unit, e.g. \"10s\", \"1.5s\", \"500ms\", \"1m30s\")"
    )]
    Invalid(String),
    #[error("missing unit in duration {0:?} (valid units: {VALID_UNITS})")]
    MissingUnit(String),
    #[error("unknown unit {unit:?} in duration {input:?} (valid units: {VALID_UNITS})")]
    UnknownUnit { unit: String, input: String },
    #[error("duration {0:?} must not be negative")]
    Negative(String),
    #[error("duration {0:?} is too large")]
    Overflow(String),
}

/// Parses a Go duration. Like Go, a bare `0` is accepted and every other
/// number needs a unit; unlike Go, negative durations are rejected because no
/// Istio field allows them.
pub fn parse_duration(input: &str) -> Result<Duration, DurationError> {
    // Go's Duration is an int64 of nanoseconds; stay within the same range.
    const MAX_NANOS: u128 = i64::MAX as u128;

    let invalid = || DurationError::Invalid(input.to_string());
    let (negative, mut rest) = match input.as_bytes().first() {
        Some(b'-') => (true, &input[1..]),
        Some(b'+') => (false, &input[1..]),
        _ => (false, input),
    };
    if rest == "0" {
        return Ok(Duration::ZERO);
    }
    if rest.is_empty() {
        return Err(invalid());
    }

    let mut total: u128 = 0;
    while !rest.is_empty() {
        let int_len = rest.bytes().take_while(u8::is_ascii_digit).count();
        let (int_part, after_int) = rest.split_at(int_len);
        let (frac_part, after_number) = match after_int.strip_prefix('.') {
            Some(after_dot) => {
                let frac_len = after_dot.bytes().take_while(u8::is_ascii_digit).count();
                after_dot.split_at(frac_len)
            }
            None => ("", after_int),
        };
        if int_part.is_empty() && frac_part.is_empty() {
            return Err(invalid());
        }
        let unit_len = after_number
            .find(|c: char| c == '.' || c.is_ascii_digit())
            .unwrap_or(after_number.len());
        let (unit, after_unit) = after_number.split_at(unit_len);
        let unit_nanos: u128 = match unit {
            "" => return Err(DurationError::MissingUnit(input.to_string())),
            "ns" => 1,
            "us" | "µs" | "μs" => 1_000,
            "ms" => 1_000_000,
            "s" => 1_000_000_000,
            "m" => 60 * 1_000_000_000,
            "h" => 3_600 * 1_000_000_000,
            other => {
                return Err(DurationError::UnknownUnit {
                    unit: other.to_string(),
                    input: input.to_string(),
                });
            }
        };

        let overflow = || DurationError::Overflow(input.to_string());
        let whole: u128 = if int_part.is_empty() {
            0
        } else {
            int_part.parse().map_err(|_| overflow())?
        };
        let mut nanos = whole.checked_mul(unit_nanos).ok_or_else(overflow)?;
        // Digits beyond nanosecond precision of the largest unit cannot matter.
        let frac_digits = &frac_part[..frac_part.len().min(20)];
        if !frac_digits.is_empty() {
            let frac: u128 = frac_digits.parse().map_err(|_| overflow())?;
            let scale = 10u128.pow(frac_digits.len() as u32);
            nanos += frac * unit_nanos / scale;
        }
        total = total
            .checked_add(nanos)
            .filter(|t| *t <= MAX_NANOS)
            .ok_or_else(overflow)?;
        rest = after_unit;
    }

    if negative && total > 0 {
        return Err(DurationError::Negative(input.to_string()));
    }
    Ok(Duration::from_nanos(total as u64))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ok(s: &str) -> Duration {
        parse_duration(s).unwrap_or_else(|e| panic!("{s}: {e}"))
    }

    #[test]
    fn accepts_go_durations() {
        assert_eq!(ok("10s"), Duration::from_secs(10));
        assert_eq!(ok("1.5s"), Duration::from_millis(1500));
        assert_eq!(ok("500ms"), Duration::from_millis(500));
        assert_eq!(ok("1m30s"), Duration::from_secs(90));
        assert_eq!(ok("1h"), Duration::from_secs(3600));
        assert_eq!(ok("250us"), Duration::from_micros(250));
        assert_eq!(ok("250µs"), Duration::from_micros(250));
        assert_eq!(ok("250μs"), Duration::from_micros(250));
        assert_eq!(ok("100ns"), Duration::from_nanos(100));
        assert_eq!(ok("0"), Duration::ZERO);
        assert_eq!(ok("0s"), Duration::ZERO);
        assert_eq!(ok("-0s"), Duration::ZERO);
        assert_eq!(ok("+2s"), Duration::from_secs(2));
        assert_eq!(ok(".5s"), Duration::from_millis(500));
        assert_eq!(ok("1.s"), Duration::from_secs(1));
        assert_eq!(ok("1h2m3s4ms"), Duration::from_millis(3_723_004));
        assert_eq!(ok("0.000000001s"), Duration::from_nanos(1));
    }

    #[test]
    fn rejects_bad_durations() {
        assert_eq!(parse_duration(""), Err(DurationError::Invalid("".into())));
        assert_eq!(parse_duration("s"), Err(DurationError::Invalid("s".into())));
        assert_eq!(parse_duration("."), Err(DurationError::Invalid(".".into())));
        assert_eq!(
            parse_duration("10"),
            Err(DurationError::MissingUnit("10".into()))
        );
        assert_eq!(
            parse_duration("1s5"),
            Err(DurationError::MissingUnit("1s5".into()))
        );
        assert_eq!(
            parse_duration("10sec"),
            Err(DurationError::UnknownUnit {
                unit: "sec".into(),
                input: "10sec".into()
            })
        );
        assert_eq!(
            parse_duration(" 1s"),
            Err(DurationError::Invalid(" 1s".into()))
        );
        assert_eq!(
            parse_duration("-1s"),
            Err(DurationError::Negative("-1s".into()))
        );
        assert_eq!(
            parse_duration("9999999999999h"),
            Err(DurationError::Overflow("9999999999999h".into()))
        );
    }

    #[test]
    fn error_messages_are_readable() {
        assert_eq!(
            parse_duration("10x").unwrap_err().to_string(),
            "unknown unit \"x\" in duration \"10x\" (valid units: ns, us, µs, ms, s, m, h)"
        );
    }
}
