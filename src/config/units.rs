//! Human-readable sizes ("256MiB") and durations ("10s") for the config file.
//!
//! As in TiKV, the decimal-looking units are binary: "1KB" = "1KiB" = 1024 bytes. A bare integer
//! is a number of bytes. Durations accept `ms`, `s`, `m` and `h` and their sums ("1m30s").

use std::fmt;
use std::time::Duration;

use serde::de::{self, Deserializer, Visitor};
use serde::{Deserialize, Serialize, Serializer};

/// A byte count.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Default)]
pub struct ReadableSize(pub u64);

impl ReadableSize {
    pub const fn kib(n: u64) -> Self {
        ReadableSize(n << 10)
    }
    pub const fn mib(n: u64) -> Self {
        ReadableSize(n << 20)
    }
    pub const fn gib(n: u64) -> Self {
        ReadableSize(n << 30)
    }

    /// Parses "256MiB", "10GiB", "512KB", "42B" or "42".
    pub fn parse(s: &str) -> Result<Self, String> {
        let s = s.trim();
        let split = s
            .find(|c: char| !(c.is_ascii_digit() || c == '.'))
            .unwrap_or(s.len());
        let (num, unit) = s.split_at(split);
        if num.is_empty() {
            return Err(format!("{s:?} is not a size (expected e.g. \"256MiB\")"));
        }
        let shift = match unit.trim() {
            "" | "B" => 0,
            "K" | "KB" | "KiB" => 10,
            "M" | "MB" | "MiB" => 20,
            "G" | "GB" | "GiB" => 30,
            "T" | "TB" | "TiB" => 40,
            other => {
                return Err(format!(
                    "unknown size unit {other:?} in {s:?} (use B, KiB, MiB, GiB, TiB)"
                ))
            }
        };
        let value: f64 = num.parse().map_err(|_| format!("{s:?} is not a size"))?;
        let bytes = value * (1u64 << shift) as f64;
        if !bytes.is_finite() || bytes >= u64::MAX as f64 {
            return Err(format!("{s:?} is too large"));
        }
        Ok(ReadableSize(bytes as u64))
    }
}

impl fmt::Display for ReadableSize {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let b = self.0;
        for (shift, unit) in [(40, "TiB"), (30, "GiB"), (20, "MiB"), (10, "KiB")] {
            if b >= 1 << shift && b.is_multiple_of(1 << shift) {
                return write!(f, "{}{unit}", b >> shift);
            }
        }
        write!(f, "{b}B")
    }
}

impl Serialize for ReadableSize {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&self.to_string())
    }
}

impl<'de> Deserialize<'de> for ReadableSize {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl Visitor<'_> for V {
            type Value = ReadableSize;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a size such as \"256MiB\" or a number of bytes")
            }
            fn visit_i64<E: de::Error>(self, v: i64) -> Result<ReadableSize, E> {
                u64::try_from(v)
                    .map(ReadableSize)
                    .map_err(|_| E::custom(format!("size {v} is negative")))
            }
            fn visit_u64<E: de::Error>(self, v: u64) -> Result<ReadableSize, E> {
                Ok(ReadableSize(v))
            }
            fn visit_str<E: de::Error>(self, v: &str) -> Result<ReadableSize, E> {
                ReadableSize::parse(v).map_err(E::custom)
            }
        }
        d.deserialize_any(V)
    }
}

/// A duration.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Default)]
pub struct ReadableDuration(pub Duration);

impl ReadableDuration {
    pub const fn millis(n: u64) -> Self {
        ReadableDuration(Duration::from_millis(n))
    }
    pub const fn secs(n: u64) -> Self {
        ReadableDuration(Duration::from_secs(n))
    }

    /// Parses "10ms", "3s", "5m", "2h" and sums of them ("1m30s").
    pub fn parse(s: &str) -> Result<Self, String> {
        let text = s.trim();
        if text.is_empty() {
            return Err("empty duration".into());
        }
        let mut rest = text;
        let mut total = Duration::ZERO;
        while !rest.is_empty() {
            let digits = rest
                .find(|c: char| !c.is_ascii_digit())
                .unwrap_or(rest.len());
            if digits == 0 {
                return Err(format!(
                    "{text:?} is not a duration (expected e.g. \"10s\")"
                ));
            }
            let n: u64 = rest[..digits]
                .parse()
                .map_err(|_| format!("{text:?} is too large"))?;
            rest = &rest[digits..];
            let (unit_ms, len) = if rest.starts_with("ms") {
                (1, 2)
            } else if rest.starts_with('s') {
                (1000, 1)
            } else if rest.starts_with('m') {
                (60_000, 1)
            } else if rest.starts_with('h') {
                (3_600_000, 1)
            } else {
                return Err(format!("{text:?} lacks a unit (ms, s, m, h)"));
            };
            rest = &rest[len..];
            let ms = n
                .checked_mul(unit_ms)
                .ok_or_else(|| format!("{text:?} is too large"))?;
            total += Duration::from_millis(ms);
        }
        Ok(ReadableDuration(total))
    }
}

impl fmt::Display for ReadableDuration {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let ms = self.0.as_millis();
        if ms > 0 && ms.is_multiple_of(3_600_000) {
            write!(f, "{}h", ms / 3_600_000)
        } else if ms > 0 && ms.is_multiple_of(60_000) {
            write!(f, "{}m", ms / 60_000)
        } else if ms.is_multiple_of(1000) {
            write!(f, "{}s", ms / 1000)
        } else {
            write!(f, "{ms}ms")
        }
    }
}

impl Serialize for ReadableDuration {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&self.to_string())
    }
}

impl<'de> Deserialize<'de> for ReadableDuration {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        ReadableDuration::parse(&s).map_err(de::Error::custom)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes() {
        assert_eq!(ReadableSize::parse("256MiB").unwrap().0, 256 << 20);
        assert_eq!(ReadableSize::parse("10GiB").unwrap().0, 10 << 30);
        assert_eq!(ReadableSize::parse("1KB").unwrap().0, 1024);
        assert_eq!(ReadableSize::parse("1.5GiB").unwrap().0, 3 << 29);
        assert_eq!(ReadableSize::parse("42").unwrap().0, 42);
        for bad in ["", "MiB", "12XB", "1..2MiB", "99999999999TiB"] {
            assert!(ReadableSize::parse(bad).is_err(), "{bad}");
        }
        for s in [ReadableSize(5), ReadableSize::mib(3), ReadableSize::gib(10)] {
            assert_eq!(ReadableSize::parse(&s.to_string()).unwrap(), s);
        }
    }

    #[test]
    fn durations() {
        assert_eq!(
            ReadableDuration::parse("10ms").unwrap().0,
            Duration::from_millis(10)
        );
        assert_eq!(
            ReadableDuration::parse("1m30s").unwrap().0,
            Duration::from_secs(90)
        );
        assert_eq!(
            ReadableDuration::parse("2h").unwrap().0,
            Duration::from_secs(7200)
        );
        for bad in ["", "10", "s", "3x", "99999999999999999999h"] {
            assert!(ReadableDuration::parse(bad).is_err(), "{bad}");
        }
        for d in [ReadableDuration::millis(1500), ReadableDuration::secs(60)] {
            assert_eq!(ReadableDuration::parse(&d.to_string()).unwrap(), d);
        }
    }
}
